"""The wire form of a compressed update: a small msgpack header plus raw buffers, one frame each.

An :class:`Encoded` is what a codec's ``encode`` returns and what its ``decode`` takes. On the wire it is
``[header, buffer_0, buffer_1, ...]``: frame 0 is a msgpack map, every other frame is the raw little-endian
bytes of one typed 1-D buffer. Large buffers go out zero-copy (a memoryview of the tensor's memory), so a
ZeroMQ multipart send never serialises tensor data through msgpack.

:meth:`Encoded.from_frames` is the trust boundary: the runtime feeds it whatever arrived from the network.
It checks every header field, every buffer's dtype and byte length against what the codec would have
produced for the declared shape, and (for sparse payloads) the index stream itself, and raises
:class:`MalformedPayloadError` (never a raw msgpack/struct/torch exception) when anything is off. Sizes
are checked before anything is allocated, so a header that declares a huge shape costs nothing.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import msgpack
import torch
from torch import Tensor

from dist_llm_train.errors import UserError

__all__ = [
    "BUFFER_DTYPES",
    "MAX_HEADER_BYTES",
    "MAX_NDIM",
    "MAX_NUMEL",
    "Encoded",
    "MalformedPayloadError",
]

# Largest update we accept from the wire: 2**36 float32 values is 256 GiB, far beyond any model this
# framework trains; the cap exists so that a forged shape can never make us allocate.
MAX_NUMEL = 2**36
MAX_NDIM = 32
# A PowerSGD header lists every parameter shape (a few KiB for GPT-2); 4 MiB leaves room for huge models.
MAX_HEADER_BYTES = 4 * 1024 * 1024

BUFFER_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int32": torch.int32,
    "int64": torch.int64,
}
_DTYPE_NAMES = {v: k for k, v in BUFFER_DTYPES.items()}
_HEADER_KEYS = frozenset({"codec", "version", "shape", "dtype", "params", "buffers"})


class MalformedPayloadError(UserError, ValueError):
    """Bytes that claim to be a compressed update but are not a valid one (truncated, forged, corrupt)."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_shape(shape: object, what: str) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_NDIM:
        raise MalformedPayloadError(f"{what} must be a list of at most {MAX_NDIM} sizes, got {shape!r:.200}")
    if not all(_is_int(d) and 0 <= d <= MAX_NUMEL for d in shape):
        raise MalformedPayloadError(f"{what} must hold integers in [0, {MAX_NUMEL}], got {shape!r:.200}")
    if math.prod(shape) > MAX_NUMEL:
        raise MalformedPayloadError(
            f"{what} {list(shape)!r:.200} declares {math.prod(shape)} elements, above the limit {MAX_NUMEL}"
        )
    return tuple(shape)


class Encoded:
    """A compressed update: header (codec name, version, shape, dtype, codec params, buffer list) + buffers.

    Build one with :meth:`build` (codecs do) or :meth:`from_frames` (the receiving side). Treat it as
    immutable: ``nbytes`` and the packed header are computed once. Buffers made by ``encode`` may alias the
    encoded tensor (the ``none`` codec sends the input itself, zero-copy): do not modify a tensor in place
    before its payload has been sent. Buffers made by ``from_frames`` may alias the received frames and are
    read-only; ``decode`` never writes to them and always returns a fresh tensor.
    """

    __slots__ = ("_buffers", "_cache", "_header", "_header_bytes")

    def __init__(self, header: dict[str, Any], buffers: Sequence[Tensor], header_bytes: bytes) -> None:
        self._header = header
        self._buffers = list(buffers)
        self._header_bytes = header_bytes
        # Derived data a codec computes while validating (e.g. unpacked top-k indices) so decode can reuse it.
        self._cache: dict[str, Any] = {}

    @classmethod
    def build(
        cls,
        codec: str,
        version: int,
        shape: Sequence[int],
        params: dict[str, Any],
        buffers: Sequence[tuple[str, Tensor]],
    ) -> Encoded:
        """Assemble a payload from named 1-D buffers; the header's buffer descriptors are derived from them."""
        descriptors: list[list[Any]] = []
        tensors: list[Tensor] = []
        for name, buf in buffers:
            if buf.dim() != 1 or not buf.is_contiguous() or buf.dtype not in _DTYPE_NAMES:
                raise TypeError(
                    f"buffer {name!r} must be a contiguous 1-D tensor of a wire dtype, got {buf.dtype}"
                )
            descriptors.append([name, _DTYPE_NAMES[buf.dtype], buf.numel()])
            tensors.append(buf)
        header = {
            "codec": codec,
            "version": version,
            "shape": [int(d) for d in shape],
            "dtype": "float32",
            "params": params,
            "buffers": descriptors,
        }
        return cls(header, tensors, msgpack.packb(header, use_bin_type=True))

    # ------------------------------------------------------------------ accessors
    @property
    def header(self) -> dict[str, Any]:
        """The header map exactly as it goes on the wire (do not modify)."""
        return self._header

    @property
    def codec(self) -> str:
        return str(self._header["codec"])

    @property
    def version(self) -> int:
        return int(self._header["version"])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._header["shape"])

    @property
    def numel(self) -> int:
        return math.prod(self._header["shape"])

    @property
    def params(self) -> dict[str, Any]:
        return self._header["params"]

    @property
    def buffers(self) -> list[Tensor]:
        """The typed 1-D buffers in wire order (may live on an accelerator until :meth:`to_frames`)."""
        return self._buffers

    def buffer(self, name: str) -> Tensor:
        for (buf_name, _dtype, _count), buf in zip(self._header["buffers"], self._buffers, strict=True):
            if buf_name == name:
                return buf
        raise KeyError(f"payload of codec {self.codec!r} has no buffer {name!r}")

    @property
    def nbytes(self) -> int:
        """Exact bytes on the wire: the packed header plus every buffer (= sum of ``len`` over the frames)."""
        return len(self._header_bytes) + sum(b.numel() * b.element_size() for b in self._buffers)

    def __repr__(self) -> str:
        return f"Encoded(codec={self.codec!r}, shape={self.shape}, nbytes={self.nbytes})"

    # ------------------------------------------------------------------ wire form
    def to_frames(self) -> list[bytes | memoryview]:
        """Frames for a multipart send: the msgpack header, then one byte view per buffer.

        CPU buffers are not copied (each frame is a memoryview of the tensor's memory); accelerator buffers
        are copied to host memory once, here.
        """
        frames: list[bytes | memoryview] = [self._header_bytes]
        for buf in self._buffers:
            host = buf.detach().cpu()
            if not host.is_contiguous():
                host = host.contiguous()
            # numpy has no bfloat16; the bytes are the same whichever 2-byte integer type views them.
            arr = host.view(torch.int16).numpy() if host.dtype == torch.bfloat16 else host.numpy()
            frames.append(memoryview(arr).cast("B"))
        return frames

    @classmethod
    def from_frames(cls, frames: Sequence[Any]) -> Encoded:
        """Parse and fully validate frames received from the network.

        Accepts anything that supports the buffer protocol (``bytes``, ``bytearray``, ``memoryview``,
        ``zmq.Frame``). Raises :class:`MalformedPayloadError` naming the first problem found. Buffers are
        zero-copy views of the frames where the frame is suitably aligned.
        """
        if isinstance(frames, (bytes, bytearray, memoryview)) or not isinstance(frames, Sequence):
            raise MalformedPayloadError("a payload is a list of frames (header first), not a single buffer")
        if len(frames) < 1:
            raise MalformedPayloadError("a payload needs at least one frame (the header), got none")
        views = [_as_bytes_view(f, i) for i, f in enumerate(frames)]
        header_view = views[0]
        if len(header_view) > MAX_HEADER_BYTES:
            raise MalformedPayloadError(
                f"payload header is {len(header_view)} bytes, above the limit {MAX_HEADER_BYTES}"
            )
        try:
            header = msgpack.unpackb(header_view, raw=False, strict_map_key=True, use_list=True)
        except Exception as exc:  # msgpack raises a zoo of types (ExtraData, FormatError, StackError, ...)
            raise MalformedPayloadError(
                f"payload header is not valid msgpack ({type(exc).__name__})"
            ) from exc
        descriptors = _check_header(header)
        if len(views) != 1 + len(descriptors):
            raise MalformedPayloadError(
                f"header of codec {header['codec']!r} lists {len(descriptors)} buffers but "
                f"{len(views) - 1} buffer frames arrived"
            )
        tensors: list[Tensor] = []
        for (name, dtype_name, count), view in zip(descriptors, views[1:], strict=True):
            dtype = BUFFER_DTYPES[dtype_name]
            itemsize = dtype.itemsize
            if len(view) != count * itemsize:
                raise MalformedPayloadError(
                    f"buffer {name!r} of codec {header['codec']!r} declares {count} x {dtype_name} "
                    f"({count * itemsize} bytes) but its frame has {len(view)} bytes"
                )
            tensors.append(_frame_to_tensor(view, dtype, count))
        encoded = cls(header, tensors, bytes(header_view))
        # Imported here: the codec modules import this one.
        from dist_llm_train.compression.registry import codec_class

        codec_class(encoded.codec).validate_payload(encoded)
        return encoded


def _as_bytes_view(frame: Any, index: int) -> memoryview:
    try:
        view = memoryview(frame)
    except TypeError as exc:
        raise MalformedPayloadError(
            f"frame {index} is a {type(frame).__name__}, not a bytes-like object"
        ) from exc
    if view.ndim != 1 or view.format not in ("B", "b", "c"):
        try:
            view = view.cast("B")
        except TypeError as exc:
            raise MalformedPayloadError(f"frame {index} is not a contiguous byte buffer") from exc
    return view


def _frame_to_tensor(view: memoryview, dtype: torch.dtype, count: int) -> Tensor:
    if count == 0:
        return torch.empty(0, dtype=dtype)
    tensor = _frombuffer(view, dtype, count)
    if tensor.data_ptr() % tensor.element_size():
        # A frame sliced at an odd offset: copy so that vectorised kernels see aligned data.
        tensor = tensor.clone()
    return tensor


_frombuffer_warning_silenced = False


def _frombuffer(view: memoryview, dtype: torch.dtype, count: int) -> Tensor:
    """``torch.frombuffer`` without its "buffer is not writable" warning.

    Frames from the network are usually immutable bytes; torch warns (once per process) that the tensor
    would be writable. decode never writes to payload buffers, so the view is safe. torch warns only for a
    read-only buffer, and only for the first one, so only read-only calls up to that one pay for
    ``warnings.catch_warnings`` (~20 us, a visible share of the per-update cost). Frames received by
    ZeroMQ are writable and never pay.
    """
    global _frombuffer_warning_silenced
    if _frombuffer_warning_silenced or not view.readonly:
        return torch.frombuffer(view, dtype=dtype, count=count)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        tensor = torch.frombuffer(view, dtype=dtype, count=count)
    _frombuffer_warning_silenced = view.readonly
    return tensor


def _check_header(header: object) -> list[tuple[str, str, int]]:
    """Generic header checks shared by every codec; returns the buffer descriptors."""
    from dist_llm_train.compression.registry import available_codecs, codec_class

    if not isinstance(header, dict):
        raise MalformedPayloadError(f"payload header must be a map, got {type(header).__name__}")
    keys = set(header)
    if keys != _HEADER_KEYS:
        missing, extra = sorted(_HEADER_KEYS - keys), sorted(map(str, keys - _HEADER_KEYS))
        raise MalformedPayloadError(f"payload header fields are wrong: missing {missing}, unexpected {extra}")
    codec = header["codec"]
    if not isinstance(codec, str) or codec not in available_codecs():
        raise MalformedPayloadError(f"payload names unknown codec {codec!r:.80}; known: {available_codecs()}")
    expected_version = codec_class(codec).version
    if header["version"] != expected_version or not _is_int(header["version"]):
        raise MalformedPayloadError(
            f"payload of codec {codec!r} has version {header['version']!r:.40}; this build reads "
            f"version {expected_version}: run the same dist-llm-train version on every machine"
        )
    _check_shape(header["shape"], f"shape of the {codec!r} payload")
    if header["dtype"] != "float32":
        raise MalformedPayloadError(f"payload dtype must be 'float32', got {header['dtype']!r:.40}")
    if not isinstance(header["params"], dict):
        raise MalformedPayloadError(f"payload params must be a map, got {type(header['params']).__name__}")
    raw = header["buffers"]
    if not isinstance(raw, list):
        raise MalformedPayloadError(f"payload buffer list must be a list, got {type(raw).__name__}")
    descriptors: list[tuple[str, str, int]] = []
    for entry in raw:
        if not (
            isinstance(entry, list)
            and len(entry) == 3
            and isinstance(entry[0], str)
            and isinstance(entry[1], str)
            and _is_int(entry[2])
        ):
            raise MalformedPayloadError(f"buffer descriptor must be [name, dtype, count], got {entry!r:.100}")
        name, dtype_name, count = entry
        if dtype_name not in BUFFER_DTYPES:
            raise MalformedPayloadError(
                f"buffer {name!r:.40} has dtype {dtype_name!r:.40}; allowed: {sorted(BUFFER_DTYPES)}"
            )
        if not 0 <= count <= 8 * MAX_NUMEL:
            raise MalformedPayloadError(
                f"buffer {name!r:.40} declares {count} elements, outside [0, {8 * MAX_NUMEL}]"
            )
        descriptors.append((name, dtype_name, count))
    return descriptors


def expect_buffers(encoded: Encoded, expected: Sequence[tuple[str, str, int | tuple[int, int]]]) -> None:
    """Check that the payload's buffers are exactly ``expected``: (name, dtype, count or inclusive range)."""
    got = [tuple(d) for d in encoded.header["buffers"]]
    if len(got) != len(expected):
        raise MalformedPayloadError(
            f"payload of codec {encoded.codec!r} must carry buffers {[e[0] for e in expected]}, "
            f"got {[g[0] for g in got]}"
        )
    for (name, dtype, count), (g_name, g_dtype, g_count) in zip(expected, got, strict=True):
        if g_name != name or g_dtype != dtype:
            raise MalformedPayloadError(
                f"payload of codec {encoded.codec!r}: buffer {name!r} must be {dtype}, got {g_name!r} as {g_dtype}"
            )
        lo, hi = count if isinstance(count, tuple) else (count, count)
        if not lo <= g_count <= hi:
            want = f"{lo}" if lo == hi else f"between {lo} and {hi}"
            raise MalformedPayloadError(
                f"payload of codec {encoded.codec!r}: buffer {name!r} must hold {want} elements for shape "
                f"{list(encoded.shape)}, got {g_count}"
            )
