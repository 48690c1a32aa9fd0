"""Protocol encoding: every message type round-trips, every malformed input is one ProtocolError code."""

from __future__ import annotations

import math
import threading
from typing import Any

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_llm_train.compression import build_codec, decode
from dist_llm_train.errors import ConfigError
from dist_llm_train.runtime.protocol import (
    MESSAGE_CLASSES,
    PIECE_BYTES,
    PROTOCOL_ERROR_CODES,
    PROTOCOL_VERSION,
    ErrorReply,
    Heartbeat,
    HeartbeatAck,
    Leave,
    Limits,
    Message,
    MessageType,
    NoTask,
    Params,
    ProtocolError,
    Pull,
    Push,
    PushAck,
    Register,
    RegisterOk,
    Shutdown,
    TaskAssign,
    TaskRequest,
    decode_message,
    decode_payload,
    encode_message,
    next_message_id,
    owns_frame,
)

LIMITS = Limits(max_frames=8, max_frame_bytes=64 * 1024, max_header_bytes=4096)


def _update(n: int = 1000, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def sample_messages() -> list[Message]:
    """One instance of every type, with non-default values in every field."""
    return [
        Register(
            name="worker-3",
            device="cuda:0",
            memory_bytes=8 << 30,
            throughput=12345.5,
            link_mbps=100.0,
            capacity=2,
            software="0.1.0",
        ),
        RegisterOk(
            ref=7,
            worker_id="w-" + "ab" * 16,
            version=12,
            heartbeat_interval_s=2.0,
            lease_s=60.0,
            config_json='{"name": "x"}',
        ),
        Heartbeat(lease_ids=[1, 2, 2**64 - 1], throughput=900.0),
        HeartbeatAck(ref=3, version=4, registered=False),
        TaskRequest(max_tasks=3),
        TaskAssign(
            ref=5,
            lease_id=11,
            task_id=12,
            shard_id=3,
            start=100,
            end=4196,
            micro_batches=4,
            batch_seed=2**63 + 5,
            lease_s=30.0,
            version=9,
        ),
        NoTask(retry_after_s=0.5, reason="at-capacity"),
        Pull(have_version=8),
        Pull(),
        Params(version=9, base_version=None, numel=1000),
        Params(version=9, base_version=7, numel=1000),
        Push(base_version=8, lease_id=11, task_id=12, tokens=4096, loss=3.25, compute_s=1.5),
        PushAck(ref=9, accepted=False, reason="too-stale", staleness=7, version=10),
        PushAck(accepted=True, staleness=0, version=11),
        ErrorReply(ref=13, code="too-large", message="payload frame 0 is 99 bytes, above the limit"),
        Leave(reason="operator asked"),
        Shutdown(reason="run finished"),
    ]


def _payload(msg: Message) -> Any:
    if isinstance(msg, Push):
        return build_codec("topk", ratio=0.05).encode(_update())
    if isinstance(msg, Params):
        return build_codec("none" if msg.base_version is None else "fp16").encode(_update(seed=1))
    return ()


def test_samples_cover_every_type() -> None:
    assert {m.TYPE for m in sample_messages()} == set(MessageType)
    assert set(MESSAGE_CLASSES) == set(MessageType)


@pytest.mark.parametrize("msg", sample_messages(), ids=lambda m: f"{m.TYPE.value}-{m.id}")
def test_round_trip(msg: Message) -> None:
    payload = _payload(msg)
    frames = encode_message(msg, payload, limits=LIMITS)
    # What a socket delivers: immutable bytes, not the sender's memoryviews.
    wire = [bytes(f) for f in frames]
    decoded, views = decode_message(wire, LIMITS)
    assert type(decoded) is type(msg)
    assert decoded == msg
    assert decoded.id == msg.id and decoded.ref == msg.ref
    if msg.HAS_PAYLOAD:
        encoded = decode_payload(views)
        assert torch.equal(decode(encoded), decode(payload))
        assert [len(v) for v in views] == [len(f) for f in wire[1:]]
    else:
        assert views == []


def test_payload_frames_are_not_copied() -> None:
    tensor = _update(50_000)
    encoded = build_codec("none").encode(tensor)
    frames = encode_message(Params(version=1, numel=tensor.numel()), encoded, limits=Limits())
    buffer_frame = frames[2]
    assert isinstance(buffer_frame, memoryview)
    # The frame views the tensor's own memory: no serialisation of tensor data.
    assert torch.frombuffer(buffer_frame, dtype=torch.float32).data_ptr() == tensor.data_ptr()
    _, views = decode_message(frames, Limits())
    assert torch.frombuffer(views[1], dtype=torch.float32).data_ptr() == tensor.data_ptr()


def test_header_layout_on_the_wire() -> None:
    msg = Push(ref=4, base_version=1, lease_id=2, task_id=3, tokens=5, loss=0.5)
    frames = encode_message(msg, build_codec("fp16").encode(_update(10)))
    header = msgpack.unpackb(frames[0])
    assert header["v"] == PROTOCOL_VERSION and header["type"] == "push"
    assert header["id"] == msg.id and header["ref"] == 4
    assert header["frames"] == [len(f) for f in frames[1:]]
    assert len(frames[0]) < 256  # the msgpack header stays small


def test_message_ids_unique_across_threads() -> None:
    seen: list[list[int]] = [[] for _ in range(4)]

    def take(out: list[int]) -> None:
        out.extend(next_message_id() for _ in range(2000))

    threads = [threading.Thread(target=take, args=(out,)) for out in seen]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [i for out in seen for i in out]
    assert len(set(ids)) == len(ids) == 8000
    assert Heartbeat().id != Heartbeat().id


# ---------------------------------------------------------------------- malformed input
def _header(**overrides: Any) -> dict[str, Any]:
    header: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "type": "heartbeat",
        "id": 1,
        "lease_ids": [],
        "frames": [],
    }
    header.update(overrides)
    return {k: v for k, v in header.items() if v is not _DROP}


_DROP = object()


def _code(frames: list[Any], limits: Limits = LIMITS) -> str:
    with pytest.raises(ProtocolError) as info:
        decode_message(frames, limits)
    assert info.value.code in PROTOCOL_ERROR_CODES
    return info.value.code


def _pack(header: Any) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def _push_frames() -> list[bytes]:
    msg = Push(base_version=1, lease_id=2, task_id=3, tokens=5, loss=0.5)
    return [bytes(f) for f in encode_message(msg, build_codec("topk", ratio=0.1).encode(_update(200)))]


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ([], "malformed"),
        ([b"\xc1\x00\xff garbage"], "malformed"),  # 0xc1 is never valid msgpack
        ([_pack([1, 2, 3])], "malformed"),
        ([_pack(_header(v=_DROP))], "malformed"),
        ([_pack(_header(v=PROTOCOL_VERSION + 1))], "version"),
        ([_pack(_header(v="1"))], "version"),
        ([_pack(_header(v=True))], "version"),
        ([_pack(_header(type="bogus"))], "unknown-type"),
        ([_pack(_header(type=5))], "unknown-type"),
        ([_pack(_header(id=_DROP))], "malformed"),
        ([_pack(_header(frames=_DROP))], "malformed"),
        ([_pack(_header(id=-1))], "bad-field"),
        ([_pack(_header(id=1.5))], "bad-field"),
        ([_pack(_header(ref="x"))], "bad-field"),
        ([_pack(_header(frames="3"))], "malformed"),
        ([_pack(_header(frames=[-1]))], "malformed"),
        ([_pack(_header(frames=[3])), b"abc"], "too-many-frames"),  # heartbeat carries no payload
        ([_pack(_header(frames=[5])), b"abc"], "malformed"),  # declared length != actual
        ([_pack(_header(frames=[3, 3])), b"abc"], "malformed"),  # declared count != actual
        ([_pack(_header(frames=[1] * 9))], "too-many-frames"),
        ([_pack(_header()), *([b"x"] * 9)], "too-many-frames"),
        ([_pack(_header(pad="x" * 5000))], "too-large"),
        ([_pack(_header(frames=[70_000])), b"\0" * 70_000], "too-large"),
        (
            [_pack(_header(type="push", base_version=1, lease_id=2, task_id=3, tokens=5, loss=0.5))],
            "malformed",
        ),
    ],
    ids=lambda v: None if isinstance(v, list) else v,
)
def test_malformed_envelope(frames: list[bytes], code: str) -> None:
    assert _code(frames) == code


def _params_frames(nbytes: int, *, split: bool) -> tuple[list[bytes], torch.Tensor]:
    values = torch.arange(nbytes // 4, dtype=torch.float32)
    frames = encode_message(
        Params(ref=1, version=2, numel=values.numel()), build_codec("none").encode(values), split=split
    )
    return [bytes(f) for f in frames], values


def test_large_frames_go_in_pieces_and_are_joined() -> None:
    limits = Limits.for_params(1_000_000)
    frames, values = _params_frames(4 * 300_000, split=True)
    header = msgpack.unpackb(frames[0])
    # The Encoded header frame, then the 1.2 MB value buffer in three pieces of at most PIECE_BYTES.
    assert header["pieces"] == [1, 3] and len(frames) == 5
    assert header["frames"] == [len(frames[1]), 4 * 300_000]
    assert all(len(f) <= PIECE_BYTES for f in frames[2:])
    msg, payload = decode_message(frames, limits)
    assert isinstance(msg, Params) and [len(p) for p in payload] == header["frames"]
    assert torch.equal(decode(decode_payload(payload)), values)
    # The joined frame is the receiver's own writable buffer; a frame that came whole is a view of it.
    assert owns_frame(payload[1]) and not payload[1].readonly
    assert not owns_frame(payload[0])
    whole, _ = _params_frames(4 * 300_000, split=False)
    assert not any(owns_frame(f) for f in decode_message(whole, limits)[1])
    # Small payloads, and plaintext links, keep one frame per buffer.
    assert "pieces" not in msgpack.unpackb(_params_frames(4 * 1000, split=True)[0][0])
    assert "pieces" not in msgpack.unpackb(_params_frames(4 * 300_000, split=False)[0][0])


@pytest.mark.parametrize(
    ("pieces", "code"),
    [
        ("3", "malformed"),
        ([1], "malformed"),  # one count per declared frame
        ([1, 0], "malformed"),
        ([1, 2], "malformed"),  # pieces announced != frames that arrived
        ([2, 2], "malformed"),  # the pieces of frame 0 do not add up to its declared length
    ],
)
def test_bad_piece_declarations_are_refused(pieces: object, code: str) -> None:
    frames, _ = _params_frames(4 * 300_000, split=True)
    header = msgpack.unpackb(frames[0])
    header["pieces"] = pieces
    assert _code([_pack(header), *frames[1:]], Limits.for_params(1_000_000)) == code


def test_a_frame_joined_from_pieces_above_the_limit_is_refused() -> None:
    # Every piece fits the per-frame limit; the frame they make does not. Refused before any join.
    frames, _ = _params_frames(4 * 300_000, split=True)
    small = Limits(max_frames=8, max_frame_bytes=PIECE_BYTES, max_header_bytes=4096)
    assert _code(frames, small) == "too-large"


def test_oversized_and_extra_frames_refused_before_parsing() -> None:
    # The header is garbage: only size/count checks can have produced these codes.
    assert _code([b"\xc1", b"\0" * 70_000]) == "too-large"
    assert _code([b"\xc1"] + [b""] * 9) == "too-many-frames"
    assert _code([b"\xc1" * 5000]) == "too-large"


def test_payload_frames_carry_the_message_ref() -> None:
    frames = _push_frames()
    frames[1] = frames[1] + b"\0"
    with pytest.raises(ProtocolError) as info:
        decode_message(frames, LIMITS)
    assert info.value.code == "malformed"
    header = msgpack.unpackb(frames[0])
    reply = info.value.reply()
    assert isinstance(reply, ErrorReply) and reply.ref == header["id"] and reply.code == "malformed"


BAD_FIELDS: list[tuple[str, dict[str, Any]]] = [
    ("register", {"device": "cpu"}),  # name missing
    ("register", {"name": "w", "device": "cpu", "claimed_id": "w-0"}),  # extra field
    ("register", {"name": "w/../x", "device": "cpu"}),
    ("register", {"name": "w" * 65, "device": "cpu"}),
    ("register", {"name": "w", "device": "cpu\nINFO forged log line"}),
    ("register", {"name": "w", "device": "cpu", "capacity": 0}),
    ("register", {"name": "w", "device": "cpu", "capacity": True}),
    ("register", {"name": "w", "device": "cpu", "throughput": -1.0}),
    ("register", {"name": "w", "device": "cpu", "memory_bytes": "8G"}),
    ("register-ok", {"worker_id": "w", "version": -1, "heartbeat_interval_s": 1.0, "lease_s": 1.0}),
    ("register-ok", {"worker_id": "w", "version": 1, "heartbeat_interval_s": 0.0, "lease_s": 1.0}),
    ("heartbeat", {"lease_ids": [1] * 65}),
    ("heartbeat", {"lease_ids": [-1]}),
    ("heartbeat", {"lease_ids": "1,2"}),
    ("heartbeat-ack", {"version": 1, "registered": 1}),
    ("task-request", {"max_tasks": 65}),
    (
        "task-assign",
        {
            "lease_id": 1,
            "task_id": 1,
            "shard_id": 0,
            "start": 10,
            "end": 10,
            "micro_batches": 1,
            "batch_seed": 0,
            "lease_s": 1.0,
            "version": 0,
        },
    ),
    ("no-task", {"retry_after_s": 0.0}),
    ("no-task", {"retry_after_s": 1.0, "reason": "Not A Code"}),
    ("pull", {"have_version": "latest"}),
    ("push-ack", {"accepted": False, "staleness": 1, "version": 2}),  # rejected without a reason
    ("push-ack", {"accepted": True, "staleness": -1, "version": 2}),
    ("error", {"code": "x", "message": "a\x00b"}),
    ("error", {"code": "x", "message": "m" * 600}),
    ("leave", {"reason": 5}),
    ("shutdown", {"reason": b"bytes"}),
]


@pytest.mark.parametrize(("kind", "fields"), BAD_FIELDS)
def test_bad_fields(kind: str, fields: dict[str, Any]) -> None:
    header = {"v": PROTOCOL_VERSION, "type": kind, "id": 99, **fields, "frames": []}
    with pytest.raises(ProtocolError) as info:
        decode_message([_pack(header)], LIMITS)
    assert info.value.code == "bad-field"
    assert info.value.ref == 99
    assert "\n" not in info.value.message


PUSH_FIELDS = {"base_version": 1, "lease_id": 2, "task_id": 3, "tokens": 5, "loss": 0.5}


@pytest.mark.parametrize(
    "override",
    [
        {"loss": math.nan},
        {"loss": math.inf},
        {"loss": "0.5"},
        {"tokens": -1},
        {"base_version": 2**63},
        {"lease_id": None},
        {"compute_s": -0.1},
    ],
    ids=str,
)
def test_bad_push_fields(override: dict[str, Any]) -> None:
    frames = _push_frames()
    header = msgpack.unpackb(frames[0])
    header.update(override)
    with pytest.raises(ProtocolError) as info:
        decode_message([_pack(header), *frames[1:]], LIMITS)
    assert info.value.code == "bad-field"


def test_params_delta_base_must_not_be_newer() -> None:
    frames = [
        bytes(f) for f in encode_message(Params(version=3, numel=10), build_codec("none").encode(_update(10)))
    ]
    header = msgpack.unpackb(frames[0])
    header["base_version"] = 4
    with pytest.raises(ProtocolError) as info:
        decode_message([_pack(header), *frames[1:]], LIMITS)
    assert info.value.code == "bad-field"


def test_bad_payload() -> None:
    frames = _push_frames()
    _, views = decode_message(frames, LIMITS)
    assert decode_payload(views).codec == "topk"
    # Valid framing, but the Encoded header lies about its buffers.
    forged = msgpack.unpackb(frames[1])
    forged["buffers"][0][2] += 1
    bad = [_pack(forged), *frames[2:]]
    with pytest.raises(ProtocolError) as info:
        decode_payload(bad)
    assert info.value.code == "bad-payload"
    with pytest.raises(ProtocolError) as info:
        decode_payload([b"\x93\x01"])
    assert info.value.code == "bad-payload"


def test_encode_checks_what_the_receiver_checks() -> None:
    big = build_codec("none").encode(_update(20_000))  # 80 KB frame
    with pytest.raises(ProtocolError) as info:
        encode_message(Params(version=1, numel=20_000), big, limits=LIMITS)
    assert info.value.code == "too-large"
    with pytest.raises(ProtocolError) as info:
        encode_message(Heartbeat(), [b"x"])
    assert info.value.code == "too-many-frames"
    with pytest.raises(ProtocolError) as info:
        encode_message(Push(**PUSH_FIELDS))
    assert info.value.code == "malformed"
    with pytest.raises(ProtocolError) as info:
        encode_message(ErrorReply(code="x", message="m" * 500), limits=Limits(max_header_bytes=256))
    assert info.value.code == "too-large"


def test_limits() -> None:
    lim = Limits.for_params(1_000_000)
    assert lim.max_frame_bytes == 4_000_000 + (1 << 20)
    assert lim == Limits(16, 4_000_000 + (1 << 20), 64 * 1024)
    for bad in ({"max_frames": 0}, {"max_frame_bytes": 10}, {"max_header_bytes": True}):
        with pytest.raises(ConfigError):
            Limits(**bad)
    with pytest.raises(ConfigError):
        Limits.for_params(0)


# ---------------------------------------------------------------------- fuzzing
@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=12))
def test_fuzz_random_frames(frames: list[bytes]) -> None:
    try:
        decode_message(frames, LIMITS)
    except ProtocolError as exc:
        assert exc.code in PROTOCOL_ERROR_CODES


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=80)
    | st.binary(max_size=40)
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)


@settings(max_examples=60, deadline=None)
@given(
    sample=st.integers(min_value=0, max_value=len(sample_messages()) - 1),
    mutations=st.lists(
        st.tuples(st.sampled_from(["set", "drop", "add"]), st.integers(min_value=0, max_value=30), _values),
        min_size=1,
        max_size=3,
    ),
)
def test_fuzz_mutated_headers(sample: int, mutations: list[tuple[str, int, Any]]) -> None:
    """Valid messages with header fields replaced, dropped or added: a ProtocolError or a valid message."""
    msg = sample_messages()[sample]
    frames = [bytes(f) for f in encode_message(msg, _payload(msg))]
    header = msgpack.unpackb(frames[0])
    for op, index, value in mutations:
        keys = sorted(header)
        key = keys[index % len(keys)] if keys else "x"
        if op == "set":
            header[key] = value
        elif op == "drop":
            header.pop(key, None)
        else:
            header[f"k{index}"] = value
    try:
        decoded, _ = decode_message([_pack(header), *frames[1:]], LIMITS)
    except ProtocolError as exc:
        assert exc.code in PROTOCOL_ERROR_CODES
    else:
        # Whatever was accepted is a valid message that re-encodes to itself.
        again, _ = decode_message([bytes(f) for f in encode_message(decoded, frames[1:])], LIMITS)
        assert again == decoded
