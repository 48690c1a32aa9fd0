"""Frames from the network: every malformed payload raises MalformedPayloadError, nothing else."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dist_llm_train.compression import Encoded, MalformedPayloadError, build_codec, decode
from dist_llm_train.compression import payload as payload_module
from dist_llm_train.errors import UserError

CASES = {
    "none": ("none", {}),
    "fp16": ("fp16", {}),
    "bf16": ("bf16", {}),
    "int8": ("int8", {"chunk_size": 64}),
    "topk": ("topk", {"ratio": 0.1}),
    "topk_int8": ("topk", {"ratio": 0.1, "values": "int8", "chunk_size": 8}),
    "powersgd": ("powersgd", {"rank": 2, "shapes": [[10, 20], [50]]}),
}


def _frames(case: str) -> list[bytes]:
    name, params = CASES[case]
    x = torch.randn(250, generator=torch.Generator().manual_seed(0))
    return [bytes(f) for f in build_codec(name, **params).encode(x).to_frames()]


def _with_header(frames: list[bytes], **changes: object) -> list[bytes]:
    header = msgpack.unpackb(frames[0])
    for key, value in changes.items():
        if key.startswith("params."):
            header["params"][key.removeprefix("params.")] = value
        else:
            header[key] = value
    return [msgpack.packb(header), *frames[1:]]


def test_error_is_a_user_error_and_a_value_error() -> None:
    assert issubclass(MalformedPayloadError, UserError)
    assert issubclass(MalformedPayloadError, ValueError)


def test_accepts_all_bytes_like_frames() -> None:
    frames = _frames("int8")
    ref = decode(Encoded.from_frames(frames))
    for convert in (bytearray, memoryview, lambda b: memoryview(bytearray(b))):
        assert torch.equal(decode(Encoded.from_frames([convert(f) for f in frames])), ref)
    # a buffer frame at an odd offset inside a larger message is copied, not misread
    shifted = [frames[0], memoryview(b"\x00" + frames[1])[1:], memoryview(b"\x00" + frames[2])[1:]]
    assert torch.equal(decode(Encoded.from_frames(shifted)), ref)


def test_writable_frames_skip_the_warning_filter_and_read_only_ones_do_not_warn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    frames = _frames("int8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "buffer is not writable" warning would fail here
        for _ in range(2):
            ref = decode(Encoded.from_frames([bytes(f) for f in frames]))  # read-only, as network bytes are

    def no_filter(*args: object, **kwargs: object) -> None:
        raise AssertionError("warnings.catch_warnings entered for a writable frame")

    # ZeroMQ hands out writable frames: torch never warns for those, so they take the fast path (the
    # filter costs ~20 us per buffer, a visible share of the controller's per-update work).
    monkeypatch.setattr(payload_module, "_frombuffer_warning_silenced", False)  # as in a fresh process
    monkeypatch.setattr(payload_module, "warnings", SimpleNamespace(catch_warnings=no_filter))
    assert torch.equal(decode(Encoded.from_frames([bytearray(f) for f in frames])), ref)


@pytest.mark.parametrize(
    ("mutate", "pattern"),
    [
        (lambda f: [b"\xc1garbage", *f[1:]], "not valid msgpack"),
        (lambda f: [b"", *f[1:]], "not valid msgpack"),
        (lambda f: [msgpack.packb(f[0][:5]), *f[1:]], "header must be a map"),
        (lambda f: [msgpack.packb([1, 2, 3]), *f[1:]], "header must be a map"),
        (lambda f: [f[0][:-3], *f[1:]], "not valid msgpack"),
        (lambda f: [f[0] + b"\x00", *f[1:]], "not valid msgpack"),
        (lambda f: [f[0], f[1][:-1], *f[2:]], "frame has"),
        (lambda f: [f[0], f[1] + b"\x00", *f[2:]], "frame has"),
        (lambda f: f[:-1], "buffer frames arrived"),
        (lambda f: [*f, b"extra"], "buffer frames arrived"),
        (lambda f: [], "at least one frame"),
        (lambda f: b"".join(f), "list of frames"),
        (lambda f: [f[0], 12345, *f[2:]], "not a bytes-like object"),
        (lambda f: _with_header(f, codec="zstd"), "unknown codec 'zstd'"),
        (lambda f: _with_header(f, codec=7), "unknown codec 7"),
        (lambda f: _with_header(f, version=2), "version 1: run the same dist-llm-train version"),
        (lambda f: _with_header(f, dtype="float64"), "dtype must be 'float32'"),
        (lambda f: _with_header(f, shape=[2**40, 2**40]), "must hold integers in"),
        (
            lambda f: _with_header(f, shape=[2**30, 2**30]),
            "declares 1152921504606846976 elements, above the limit",
        ),
        (lambda f: _with_header(f, shape=[-1]), "integers in"),
        (lambda f: _with_header(f, shape="250"), "list of at most"),
        (lambda f: _with_header(f, shape=[True]), "integers in"),
        (lambda f: _with_header(f, shape=[251]), "must hold 251 elements"),
        (lambda f: _with_header(f, params={"chunk_size": 64, "x": 1}), "must carry params"),
        (
            lambda f: _with_header(f, **{"params.chunk_size": 0}),
            r"'chunk_size' is 0; expected an integer in \[1,",
        ),
        (lambda f: _with_header(f, **{"params.chunk_size": 32}), "'scales' must hold 16 elements"),
        (lambda f: _with_header(f, buffers=[["codes", "uint8", 250]]), "buffer frames arrived"),
        (
            lambda f: _with_header(f, buffers=[["codes", "float8", 250], ["scales", "float32", 8]]),
            "dtype 'float8'",
        ),
        (
            lambda f: _with_header(f, buffers=[["codes", "int8", 250], ["scales", "float32", 8]]),
            "must be uint8",
        ),
        (
            lambda f: _with_header(f, buffers=[["codes", "uint8"], ["scales", "float32", 8]]),
            "descriptor must be",
        ),
        (lambda f: _with_header(f, buffers={"a": 1}), "buffer list must be a list"),
        (lambda f: _with_header(f, extra=1), "unexpected \\['extra'\\]"),
    ],
)
def test_malformed_int8_payloads(mutate, pattern: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(MalformedPayloadError, match=pattern):
        Encoded.from_frames(mutate(_frames("int8")))


def test_huge_declared_shape_with_matching_descriptor_does_not_allocate() -> None:
    frames = _frames("none")
    forged = _with_header(frames, shape=[2**35], buffers=[["values", "float32", 2**35]])
    with pytest.raises(MalformedPayloadError, match="declares 34359738368 x float32"):
        Encoded.from_frames(forged)


@pytest.mark.parametrize(
    ("case", "changes", "pattern"),
    [
        ("topk", {"params.k": 1000}, r"'k' is 1000; expected an integer in \[0, 250\]"),
        ("topk", {"params.index_coding": "zigzag"}, "'index_coding' is 'zigzag'"),
        ("topk", {"params.values": "fp8"}, "'values' is 'fp8'"),
        ("topk", {"params.k": 24}, "'values' must hold 24 elements"),
        ("topk", {"shape": [20]}, r"'k' is 25; expected an integer in \[0, 20\]"),
        ("topk_int8", {"params.chunk_size": 4}, "'scales' must hold 14 elements"),
        ("powersgd", {"params.ranks": [30, 0]}, "rank 30 for a 10x20 matrix"),
        ("powersgd", {"params.ranks": [2]}, "equally long"),
        ("powersgd", {"params.ranks": [2, 2]}, "compresses shape \\[50\\] at rank 2"),
        ("powersgd", {"params.shapes": [[10, 20], [49]]}, "cover 249 values"),
        ("powersgd", {"params.shapes": [[10, 20], [2**40]]}, "invalid shape"),
        ("powersgd", {"params.ranks": [1, 0]}, "'p' must hold 10 elements"),
        ("powersgd", {"params.ranks": [-1, 0]}, "invalid rank"),
    ],
)
def test_malformed_codec_params(case: str, changes: dict, pattern: str) -> None:
    with pytest.raises(MalformedPayloadError, match=pattern):
        Encoded.from_frames(_with_header(_frames(case), **changes))


def test_malformed_topk_index_streams() -> None:
    frames = _frames("topk")
    header = msgpack.unpackb(frames[0])
    assert header["params"]["index_coding"] in ("u8", "varint")
    k = header["params"]["k"]
    values = frames[1]
    # u8 gaps that run past the end of the vector
    u8 = _with_header(
        frames, **{"params.index_coding": "u8"}, buffers=[["values", "float32", k], ["indices", "uint8", k]]
    )
    with pytest.raises(MalformedPayloadError, match="runs past the vector length 250"):
        Encoded.from_frames([u8[0], values, bytes([200] * k)])
    # a varint that never terminates
    vh = _with_header(
        frames,
        **{"params.index_coding": "varint"},
        buffers=[["values", "float32", k], ["indices", "uint8", k]],
    )
    with pytest.raises(MalformedPayloadError, match="complete varints"):
        Encoded.from_frames([vh[0], values, bytes([0x81] * k)])
    # one varint too long for a 250-entry vector (at most 2 bytes) but the right count of terminators
    vh2 = _with_header(
        frames,
        **{"params.index_coding": "varint"},
        buffers=[["values", "float32", k], ["indices", "uint8", k + 2]],
    )
    with pytest.raises(MalformedPayloadError, match="varint of 3 bytes"):
        Encoded.from_frames([vh2[0], values, bytes([0x80, 0x80, 0x00] + [0] * (k - 1))])
    # u16 stream whose length is not 2 bytes per index
    u16 = _with_header(
        frames, **{"params.index_coding": "u16"}, buffers=[["values", "float32", k], ["indices", "uint8", k]]
    )
    with pytest.raises(MalformedPayloadError, match="buffer 'indices' must hold 50 elements"):
        Encoded.from_frames([u16[0], values, bytes(k)])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=st.sampled_from(sorted(CASES)),
    frame=st.integers(0, 3),
    position=st.integers(0, 10_000),
    new_byte=st.integers(0, 255),
    truncate=st.booleans(),
)
def test_random_corruption_never_escapes_as_another_exception(
    case: str, frame: int, position: int, new_byte: int, truncate: bool
) -> None:
    frames = [bytearray(f) for f in _frames(case)]
    target = frames[frame % len(frames)]
    if target:
        pos = position % len(target)
        if truncate:
            del target[pos:]
        else:
            target[pos] = new_byte
    try:
        enc = Encoded.from_frames([bytes(f) for f in frames])
    except MalformedPayloadError:
        return
    out = decode(enc)  # a payload that validates must decode, to the declared shape
    assert out.shape == enc.shape and out.dtype == torch.float32


def test_frames_survive_a_real_zero_copy_zeromq_multipart_send() -> None:
    """The wire contract end to end: zero-copy send, zmq.Frame objects in, same update out."""
    import zmq

    ctx = zmq.Context()
    sender, receiver = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        sender.bind("inproc://compression-wire")
        receiver.connect("inproc://compression-wire")
        x = torch.randn(50_000, generator=torch.Generator().manual_seed(9))
        for name, params in CASES.values():
            if name == "powersgd":
                params = {"rank": 2, "shapes": [[100, 500]]}
            enc = build_codec(name, **params).encode(x)
            sender.send_multipart(enc.to_frames(), copy=False)
            frames = receiver.recv_multipart(copy=False)
            assert sum(len(f.bytes) for f in frames) == enc.nbytes
            assert torch.equal(decode(Encoded.from_frames(frames)), decode(enc))
    finally:
        sender.close(linger=0)
        receiver.close(linger=0)
        ctx.term()
