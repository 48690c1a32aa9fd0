"""The wire protocol between controller and workers: a small msgpack header, then raw payload frames.

A message on the wire is a ZeroMQ multipart message::

    [header, payload_0, payload_1, ...]

``header`` is a msgpack map::

    {"v": 3, "type": "push", "id": 17, "ref": 12, <typed fields of the type>, "frames": [312, 4096]}

``v`` is :data:`PROTOCOL_VERSION`; ``type`` a :class:`MessageType` value; ``id`` a uint64 unique per sender
(:func:`next_message_id`); ``ref`` (optional) the ``id`` of the message being answered; ``frames`` the byte
length of every payload frame that follows, so the receiver can check the framing before it touches a byte
of payload. ``pieces`` (optional) says that payload frame ``i`` arrives as ``pieces[i]`` consecutive ZeroMQ
frames, which the receiver joins (see :data:`PIECE_BYTES` for why a sender splits). Only PUSH and PARAMS
carry payload frames: the frames of one :class:`~dist_llm_train.compression.Encoded` (its own msgpack
header, then one raw buffer per frame), so a compressed update and a full parameter vector (codec
``none``/``fp16``) travel the same way. Payload buffers are never serialised through msgpack: the sender
passes memoryviews of tensor memory and sends them with ``copy=False``.

:func:`decode_message` is the trust boundary for everything except the payload itself. Whatever arrives
(random bytes, a forged header, a frame of 2 GB) it returns a validated message or raises
:class:`ProtocolError` with one of these codes, never another exception:

=================== ==========================================================================
``malformed``       not a msgpack map, envelope key missing, declared frame lengths != actual
``version``         ``v`` is not this build's :data:`PROTOCOL_VERSION`
``unknown-type``    ``type`` is not a :class:`MessageType`
``too-large``       header above ``Limits.max_header_bytes`` or a frame above ``max_frame_bytes``
``too-many-frames`` more payload frames than ``Limits.max_frames`` (or any for a control message)
``bad-field``       a typed field is missing, unexpected, of the wrong type or out of range
``bad-payload``     the PUSH/PARAMS payload is not a valid ``Encoded`` (:func:`decode_payload`)
``identity``        the sender is not authenticated as it must be (raised by the transport)
=================== ==========================================================================

Many ``version`` errors mean machines run different dist-llm-train versions; many ``too-large`` errors from
honest workers mean ``Limits`` is smaller than the model (build it with :meth:`Limits.for_params`).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any, ClassVar, Literal, TypeAlias, get_args

import msgpack
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from dist_llm_train.compression.payload import Encoded, MalformedPayloadError
from dist_llm_train.errors import ConfigError, UserError

__all__ = [
    "MESSAGE_CLASSES",
    "PIECE_BYTES",
    "PROTOCOL_ERROR_CODES",
    "PROTOCOL_VERSION",
    "ErrorReply",
    "Heartbeat",
    "HeartbeatAck",
    "Leave",
    "Limits",
    "Message",
    "MessageType",
    "NoTask",
    "Params",
    "ProtocolError",
    "ProtocolErrorCode",
    "Pull",
    "Push",
    "PushAck",
    "Register",
    "RegisterOk",
    "Shutdown",
    "TaskAssign",
    "TaskRequest",
    "decode_message",
    "decode_payload",
    "encode_message",
    "frame_nbytes",
    "next_message_id",
    "owns_frame",
]

PROTOCOL_VERSION = 3
"""Bumped on any incompatible change of the header or of a message's fields (2: TASK_REQUEST's ``pull`` and
``have_version``; 3: payload frames sent in ``pieces``)."""

PIECE_BYTES = 512 * 1024
"""Payload frames larger than this are sent in pieces of this size on encrypted (CurveZMQ) links.

CurveZMQ encrypts and authenticates each ZeroMQ frame as one box: a 3.4 MB frame is encrypted whole before
its first byte leaves and decrypted whole after its last byte arrives. In pieces, the sender's encryption,
the transfer and the receiver's decryption overlap. Measured on loopback with raw pyzmq (request, then the
reply with the reassembled payload): 3.4 MB 14.0 → 9.9 ms, 40 MB 263 → 106 ms; in the runtime, a worker
holds 3.4 MB of parameters 8.8-9.0 ms after the controller's send instead of 11.1-11.3 ms. In plaintext a
single frame is faster (2.1 against 3.4 ms at 3.4 MB: the receiver's reassembly is one more copy), so
plaintext is not split."""

U64_MAX = 2**64 - 1
# Model versions and token counts: int64 leaves room for any run and survives every msgpack/JSON consumer.
I64_MAX = 2**63 - 1

ProtocolErrorCode: TypeAlias = Literal[
    "malformed",
    "version",
    "unknown-type",
    "too-large",
    "too-many-frames",
    "bad-field",
    "bad-payload",
    "identity",
]
PROTOCOL_ERROR_CODES: tuple[str, ...] = get_args(ProtocolErrorCode)

_ENVELOPE_KEYS = frozenset({"v", "type", "id", "ref", "frames", "pieces"})


class ProtocolError(UserError, ValueError):
    """A message that violates the protocol; ``code`` says which rule (see the module docstring).

    ``ref`` is the offending message's id when its header could be read, so that :meth:`reply` can be
    matched by the sender. The transport fills ``routing_id`` (where to send the reply on a ROUTER) and
    ``worker_id`` (the authenticated sender) when it knows them; both stay ``None`` otherwise.
    """

    def __init__(self, code: ProtocolErrorCode, message: str, *, ref: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code: ProtocolErrorCode = code
        self.message = message
        self.ref = ref
        self.routing_id: bytes | None = None
        self.worker_id: str | None = None

    def reply(self) -> ErrorReply:
        """The ERROR message to send back to the offender (one line, no peer-controlled text beyond 400 chars)."""
        return ErrorReply(ref=self.ref, code=self.code, message=_one_line(self.message, 400))


def _one_line(text: str, limit: int) -> str:
    flat = "".join(ch if ch.isprintable() else " " for ch in text)
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


# ---------------------------------------------------------------------- limits
_DEFAULT_MAX_FRAME_BYTES = 1 << 30


@dataclass(frozen=True, slots=True)
class Limits:
    """Size limits a receiver enforces before it parses anything.

    ``max_frames``: payload frames allowed after the header (an ``Encoded`` of any codec here needs at
    most 4). ``max_frame_bytes``: bytes of one payload frame; it must hold the largest buffer a message
    carries, i.e. the full parameter vector in float32 (4 bytes x parameters) when PARAMS sends it
    uncompressed: build it with :meth:`for_params`. ``max_header_bytes``: bytes of the msgpack header
    (a few hundred bytes in practice; REGISTER_OK with a run config a few KiB).

    Symptoms: honest workers answered ``too-large`` → the limit is below the model, raise
    ``max_frame_bytes``; memory spikes on the controller from garbage traffic → lower it to what the model
    needs. The socket backstop (:func:`~dist_llm_train.runtime.transport.apply_socket_limits`) sits a
    little above ``max_frame_bytes`` so that a slightly oversized frame still gets an ERROR reply.
    """

    max_frames: int = 16
    max_frame_bytes: int = _DEFAULT_MAX_FRAME_BYTES
    max_header_bytes: int = 64 * 1024

    def __post_init__(self) -> None:
        for name, lo, hi in (
            ("max_frames", 1, 4096),
            ("max_frame_bytes", 1024, 2**40),
            ("max_header_bytes", 256, 2**26),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
                raise ConfigError(f"Limits.{name}={value!r} must be an integer in [{lo}, {hi}]")

    @property
    def max_wire_frames(self) -> int:
        """Most ZeroMQ frames a valid payload can arrive in: ``max_frames`` frames of up to
        ``max_frame_bytes``, the large ones split into pieces of :data:`PIECE_BYTES`. More are refused
        before the header is parsed."""
        return self.max_frames * -(-self.max_frame_bytes // PIECE_BYTES)

    @classmethod
    def for_params(cls, numel: int, *, max_frames: int = 16, max_header_bytes: int = 64 * 1024) -> Limits:
        """Limits that fit a model of ``numel`` parameters sent uncompressed in float32, plus 1 MiB of room
        for a payload header (PowerSGD lists every parameter shape) and index streams."""
        if not isinstance(numel, int) or isinstance(numel, bool) or numel < 1:
            raise ConfigError(f"Limits.for_params: numel={numel!r} must be a positive parameter count")
        return cls(max_frames, 4 * numel + (1 << 20), max_header_bytes)


# ---------------------------------------------------------------------- message ids
_id_lock = threading.Lock()
_id_counter = itertools.count(1)


def next_message_id() -> int:
    """A message id unique within this process (thread-safe); the default of every message's ``id``."""
    with _id_lock:
        return next(_id_counter) & U64_MAX


# ---------------------------------------------------------------------- field types
U64 = Annotated[int, Field(ge=0, le=U64_MAX)]
Version = Annotated[int, Field(ge=0, le=I64_MAX)]
# A token safe in logs, metric labels and file names: rejection reasons, error codes.
Code = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_.:-]*$")]
# Free text from a peer: one printable line (no control characters that could forge log lines).
_PRINTABLE = r"^[^\x00-\x1f\x7f]*$"
ShortText = Annotated[str, StringConstraints(max_length=256, pattern=_PRINTABLE)]
Line = Annotated[str, StringConstraints(max_length=512, pattern=_PRINTABLE)]
Label = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=_PRINTABLE)]
Name = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:@+-]*$")
]
PositiveSeconds = Annotated[float, Field(gt=0.0, le=7 * 24 * 3600.0)]


class MessageType(str, Enum):
    """Every message the controller and the workers exchange; the value is what goes on the wire."""

    REGISTER = "register"
    REGISTER_OK = "register-ok"
    HEARTBEAT = "heartbeat"
    HEARTBEAT_ACK = "heartbeat-ack"
    TASK_REQUEST = "task-request"
    TASK_ASSIGN = "task-assign"
    NO_TASK = "no-task"
    PULL = "pull"
    PARAMS = "params"
    PUSH = "push"
    PUSH_ACK = "push-ack"
    ERROR = "error"
    LEAVE = "leave"
    SHUTDOWN = "shutdown"


class _MessageBase(BaseModel):
    """Fields every message has. Strict: no coercion (``"3"`` is not 3, ``True`` is not 1), no NaN/Inf."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)

    TYPE: ClassVar[MessageType]
    # Whether the message carries an ``Encoded`` in its payload frames (then at least its header frame).
    HAS_PAYLOAD: ClassVar[bool] = False

    id: U64 = Field(default_factory=next_message_id, description="unique per sender")
    ref: U64 | None = Field(default=None, description="id of the message this one answers")


class Register(_MessageBase):
    """Worker → controller, first message after (re)connecting.

    ``name`` is a label for logs only: the controller identifies the worker by its authenticated key
    (or, with ``insecure``, by its routing id), never by anything the worker claims. ``memory_bytes``,
    ``throughput`` (tokens/s) and ``link_mbps`` feed the scheduler; ``None`` means unknown. ``capacity``:
    how many task leases the worker wants to hold at once.
    """

    TYPE: ClassVar[MessageType] = MessageType.REGISTER
    name: Name
    device: Label
    memory_bytes: int | None = Field(default=None, ge=0, le=2**60)
    throughput: float | None = Field(default=None, gt=0.0, le=1e12)
    link_mbps: float | None = Field(default=None, gt=0.0, le=1e7)
    capacity: int = Field(default=1, ge=1, le=64)
    software: ShortText = ""


class RegisterOk(_MessageBase):
    """Controller → worker: accepted. ``worker_id`` is how the controller knows this worker (derived from
    its key); ``version`` the current model version; ``config_json`` the run config (JSON of
    :class:`~dist_llm_train.config.schema.RunConfig`) when the controller distributes it, else empty."""

    TYPE: ClassVar[MessageType] = MessageType.REGISTER_OK
    worker_id: Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=_PRINTABLE)]
    version: Version
    heartbeat_interval_s: PositiveSeconds
    lease_s: PositiveSeconds
    config_json: Annotated[str, StringConstraints(max_length=32768)] = ""


class Heartbeat(_MessageBase):
    """Worker → controller, every ``heartbeat_interval_s``: alive, still working on ``lease_ids`` (renews
    them), optionally its measured ``throughput`` in tokens/s."""

    TYPE: ClassVar[MessageType] = MessageType.HEARTBEAT
    lease_ids: list[U64] = Field(default_factory=list, max_length=64)
    throughput: float | None = Field(default=None, gt=0.0, le=1e12)


class HeartbeatAck(_MessageBase):
    """Controller → worker. ``registered=False``: the controller does not know this worker (evicted, or the
    controller restarted): register again. ``version``: the current model version."""

    TYPE: ClassVar[MessageType] = MessageType.HEARTBEAT_ACK
    version: Version
    registered: bool = True


class TaskRequest(_MessageBase):
    """Worker → controller: give me up to ``max_tasks`` tasks.

    ``pull=True`` saves the worker a PULL round trip: when the task's version differs from ``have_version``
    (``None``: it holds no parameters), the TASK_ASSIGN is followed by the PARAMS a PULL with the same
    ``have_version`` would get, with the same ``ref``. A worker may send this request right behind its PUSH,
    before the PUSH_ACK arrives; one round trip per task remains."""

    TYPE: ClassVar[MessageType] = MessageType.TASK_REQUEST
    max_tasks: int = Field(default=1, ge=1, le=64)
    pull: bool = False
    have_version: Version | None = None


class TaskAssign(_MessageBase):
    """Controller → worker: a task under lease ``lease_id``: train ``micro_batches`` micro-batches drawn
    with ``batch_seed`` from tokens ``[start, end)``. The lease ends after ``lease_s`` without a heartbeat
    naming it. ``version``: the current model version (pull first when holding an older one, unless the
    request asked for the parameters with ``pull``: then they follow this message)."""

    TYPE: ClassVar[MessageType] = MessageType.TASK_ASSIGN
    lease_id: U64
    task_id: U64
    shard_id: int = Field(ge=0, le=I64_MAX)
    start: int = Field(ge=0, le=I64_MAX)
    end: int = Field(ge=1, le=I64_MAX)
    micro_batches: int = Field(ge=1, le=1_000_000)
    batch_seed: U64
    lease_s: PositiveSeconds
    version: Version

    @model_validator(mode="after")
    def _range(self) -> TaskAssign:
        if self.start >= self.end:
            raise ValueError(f"token range [{self.start}, {self.end}) must satisfy start < end")
        return self


class NoTask(_MessageBase):
    """Controller → worker: nothing to do now; ask again after ``retry_after_s``. ``reason`` e.g.
    ``no-task``, ``not-registered``, ``at-capacity``, ``barrier`` (sync round), ``assembling`` (fewer
    than ``scheduling.min_workers`` registered), ``finished``."""

    TYPE: ClassVar[MessageType] = MessageType.NO_TASK
    retry_after_s: float = Field(gt=0.0, le=3600.0)
    reason: Code = "no-task"


class Pull(_MessageBase):
    """Worker → controller: send me the parameters. ``have_version``: the version this worker holds, so the
    controller may answer with a delta from it; ``None``: send the full parameters."""

    TYPE: ClassVar[MessageType] = MessageType.PULL
    have_version: Version | None = None


class Params(_MessageBase):
    """Controller → worker: parameters at ``version``. ``base_version=None``: the payload is the full flat
    parameter vector; otherwise it is the delta ``params[version] - params[base_version]``. The payload is
    an ``Encoded`` of ``numel`` elements (codec ``none``/``fp16`` or a compressed delta)."""

    TYPE: ClassVar[MessageType] = MessageType.PARAMS
    HAS_PAYLOAD: ClassVar[bool] = True
    version: Version
    base_version: Version | None = None
    numel: int = Field(ge=1, le=2**40)

    @model_validator(mode="after")
    def _versions(self) -> Params:
        if self.base_version is not None and self.base_version > self.version:
            raise ValueError(f"base_version {self.base_version} is newer than version {self.version}")
        return self


class Push(_MessageBase):
    """Worker → controller: the update computed for lease ``lease_id`` (task ``task_id``) from parameters
    at ``base_version``, over ``tokens`` tokens with mean training ``loss``, in ``compute_s`` seconds of
    computation. The payload is the compressed update (``ErrorFeedback``/codec ``encode(...).to_frames()``)."""

    TYPE: ClassVar[MessageType] = MessageType.PUSH
    HAS_PAYLOAD: ClassVar[bool] = True
    base_version: Version
    lease_id: U64
    task_id: U64
    tokens: int = Field(ge=0, le=2**48)
    loss: float = Field(ge=-1e9, le=1e9)
    compute_s: float = Field(default=0.0, ge=0.0, le=7 * 24 * 3600.0)


class PushAck(_MessageBase):
    """Controller → worker: the update was ``accepted`` or rejected for ``reason`` (e.g. ``too-stale``,
    ``expired``, ``not-holder``, ``non-finite``); ``staleness`` it was measured at; ``version`` the model
    version now."""

    TYPE: ClassVar[MessageType] = MessageType.PUSH_ACK
    accepted: bool
    reason: Code | None = None
    staleness: int = Field(ge=0, le=I64_MAX)
    version: Version

    @model_validator(mode="after")
    def _reason(self) -> PushAck:
        if not self.accepted and self.reason is None:
            raise ValueError("a rejected update needs a reason")
        return self


class ErrorReply(_MessageBase):
    """Either side: the message ``ref`` was refused. ``code``: a :data:`PROTOCOL_ERROR_CODES` value or a
    runtime code (e.g. ``not-registered``); ``message``: one line saying what was wrong."""

    TYPE: ClassVar[MessageType] = MessageType.ERROR
    code: Code
    message: Line


class Leave(_MessageBase):
    """Worker → controller: leaving on purpose; its leases can be requeued at once."""

    TYPE: ClassVar[MessageType] = MessageType.LEAVE
    reason: ShortText = ""


class Shutdown(_MessageBase):
    """Controller → worker: the run is over (or the controller stops): exit."""

    TYPE: ClassVar[MessageType] = MessageType.SHUTDOWN
    reason: ShortText = ""


Message: TypeAlias = (
    Register
    | RegisterOk
    | Heartbeat
    | HeartbeatAck
    | TaskRequest
    | TaskAssign
    | NoTask
    | Pull
    | Params
    | Push
    | PushAck
    | ErrorReply
    | Leave
    | Shutdown
)

MESSAGE_CLASSES: dict[MessageType, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Register,
        RegisterOk,
        Heartbeat,
        HeartbeatAck,
        TaskRequest,
        TaskAssign,
        NoTask,
        Pull,
        Params,
        Push,
        PushAck,
        ErrorReply,
        Leave,
        Shutdown,
    )
}
_BY_WIRE_NAME: dict[str, type[Message]] = {t.value: cls for t, cls in MESSAGE_CLASSES.items()}
_FIELD_NAMES: dict[type[Message], frozenset[str]] = {
    cls: frozenset(cls.model_fields) - {"id", "ref"} for cls in MESSAGE_CLASSES.values()
}
for _cls, _names in _FIELD_NAMES.items():
    # A typed field named like an envelope key would be silently shadowed on the wire.
    assert not _names & _ENVELOPE_KEYS, (_cls, _names & _ENVELOPE_KEYS)


# ---------------------------------------------------------------------- encode
Frame: TypeAlias = Any  # bytes | bytearray | memoryview | zmq.Frame: anything with the buffer protocol


def frame_nbytes(frame: Frame) -> int:
    """Bytes a frame puts on the wire."""
    if isinstance(frame, (bytes, bytearray)):
        return len(frame)
    return memoryview(frame).nbytes


def encode_message(
    msg: Message,
    frames: Sequence[Frame] | Encoded = (),
    *,
    limits: Limits | None = None,
    split: bool = False,
) -> list[Any]:
    """The frames of ``msg`` for ``socket.send_multipart(..., copy=False)``: header first, then ``frames``.

    ``frames``: the payload, an ``Encoded`` or its ``to_frames()``; required (non-empty) for PUSH and PARAMS,
    empty for every other type. The payload frames are passed through untouched (no copy): do not modify
    the tensors they view until the send is done. ``limits``: when given, the sender checks what the
    receiver will check, so an oversized message fails here with a clear error instead of being refused
    (or silently dropped by the socket backstop) on the other side. ``split``: send payload frames larger
    than :data:`PIECE_BYTES` in pieces of that size (zero-copy slices) that the receiver joins. Raises
    :class:`ProtocolError`.
    """
    if isinstance(frames, Encoded):
        frames = frames.to_frames()
    payload = list(frames)
    if type(msg) not in _FIELD_NAMES:
        raise ProtocolError("unknown-type", f"cannot encode a {type(msg).__name__}: not a protocol message")
    lengths = [frame_nbytes(f) for f in payload]
    _check_payload_layout(msg.TYPE, len(payload), limits, ref=msg.id)
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": msg.TYPE.value, "id": msg.id}
    if msg.ref is not None:
        header["ref"] = msg.ref
    header.update(msg.model_dump(exclude={"id", "ref"}))
    header["frames"] = lengths
    if split and any(n > PIECE_BYTES for n in lengths):
        payload, header["pieces"] = _split(payload, lengths)
    packed = msgpack.packb(header, use_bin_type=True)
    if limits is not None:
        _check_sizes(len(packed), lengths, limits, ref=msg.id)
    return [packed, *payload]


def _split(payload: list[Any], lengths: list[int]) -> tuple[list[Any], list[int]]:
    wire: list[Any] = []
    counts: list[int] = []
    for frame, n in zip(payload, lengths, strict=True):
        if n <= PIECE_BYTES:
            wire.append(frame)
            counts.append(1)
            continue
        view = _view(frame, len(counts))
        wire.extend(view[start : start + PIECE_BYTES] for start in range(0, n, PIECE_BYTES))
        counts.append(-(-n // PIECE_BYTES))
    return wire, counts


# ---------------------------------------------------------------------- decode
def decode_message(frames: Sequence[Frame], limits: Limits) -> tuple[Message, list[memoryview]]:
    """Parse and validate one received multipart message (without any ROUTER routing-id frame).

    Returns the typed message and its payload frames as memoryviews (zero-copy views of the received
    frames, which stay valid while the frames do; a frame sent in pieces is joined into a writable copy,
    see :func:`owns_frame`). Sizes and frame counts are checked before the header is unpacked, so
    oversized traffic costs nothing to refuse.
    Raises :class:`ProtocolError` and nothing else. The payload of PUSH/PARAMS is not parsed here: pass it
    to :func:`decode_payload`.
    """
    try:
        return _decode(frames, limits)
    except ProtocolError:
        raise
    except Exception as exc:  # a defect below must never take the controller down
        raise ProtocolError("malformed", f"unparseable message ({type(exc).__name__})") from exc


def _decode(frames: Sequence[Frame], limits: Limits) -> tuple[Message, list[memoryview]]:
    if isinstance(frames, (bytes, bytearray, memoryview)) or len(frames) == 0:
        raise ProtocolError("malformed", "a message needs at least a header frame")
    if len(frames) - 1 > limits.max_wire_frames:
        raise ProtocolError(
            "too-many-frames",
            f"{len(frames) - 1} payload frames, more than {limits.max_frames} frames of at most "
            f"{limits.max_frame_bytes} bytes could arrive in",
        )
    views = [_view(f, i) for i, f in enumerate(frames)]
    _check_sizes(len(views[0]), [len(v) for v in views[1:]], limits, ref=None)
    try:
        header = msgpack.unpackb(views[0], raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises many types (ExtraData, FormatError, StackError, ValueError)
        raise ProtocolError("malformed", f"header is not valid msgpack ({type(exc).__name__})") from exc
    if not isinstance(header, dict):
        raise ProtocolError("malformed", f"header must be a msgpack map, got {type(header).__name__}")
    if "v" not in header:
        raise ProtocolError("malformed", "header has no protocol version 'v'")
    version = header["v"]
    if not _is_int(version) or version != PROTOCOL_VERSION:
        raise ProtocolError(
            "version",
            f"peer speaks protocol version {version!r:.20}, this build speaks {PROTOCOL_VERSION}: "
            "run the same dist-llm-train version on every machine",
        )
    for key in ("type", "id", "frames"):
        if key not in header:
            raise ProtocolError("malformed", f"header has no {key!r}")
    msg_id = header["id"]
    if not _is_int(msg_id) or not 0 <= msg_id <= U64_MAX:
        raise ProtocolError("bad-field", f"message id must be a uint64, got {msg_id!r:.40}")
    kind = header["type"]
    cls = _BY_WIRE_NAME.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError("unknown-type", f"unknown message type {kind!r:.40}", ref=msg_id)
    declared = header["frames"]
    if not isinstance(declared, list) or not all(_is_int(n) and n >= 0 for n in declared):
        raise ProtocolError("malformed", "'frames' must be a list of byte lengths", ref=msg_id)
    if len(declared) > limits.max_frames:
        raise ProtocolError(
            "too-many-frames",
            f"header declares {len(declared)} payload frames, above the limit {limits.max_frames}",
            ref=msg_id,
        )
    payload = views[1:]
    if "pieces" in header:
        payload = _join(header["pieces"], declared, payload, limits, msg_id)
    elif len(payload) > limits.max_frames:
        raise ProtocolError(
            "too-many-frames",
            f"{len(payload)} payload frames, above the limit {limits.max_frames}",
            ref=msg_id,
        )
    if len(declared) != len(payload):
        raise ProtocolError(
            "malformed",
            f"header declares {len(declared)} payload frames but {len(payload)} arrived",
            ref=msg_id,
        )
    for i, (want, view) in enumerate(zip(declared, payload, strict=True)):
        if want != len(view):
            raise ProtocolError(
                "malformed", f"payload frame {i} declared {want} bytes but has {len(view)}", ref=msg_id
            )
    _check_payload_layout(cls.TYPE, len(declared), limits, ref=msg_id)
    fields = {k: v for k, v in header.items() if k not in _ENVELOPE_KEYS}
    fields["id"] = msg_id
    if header.get("ref") is not None:
        fields["ref"] = header["ref"]
    try:
        msg = cls.model_validate(fields)
    except ValidationError as exc:
        raise ProtocolError("bad-field", _describe(cls.TYPE, exc), ref=msg_id) from None
    return msg, payload


def _join(
    pieces: object, declared: list[int], wire: list[memoryview], limits: Limits, msg_id: int
) -> list[memoryview]:
    """The payload frames sent in ``pieces``, joined after their sizes are checked (nothing is allocated
    for a frame above the limit or one whose pieces do not add up to its declared length)."""
    if (
        not isinstance(pieces, list)
        or len(pieces) != len(declared)
        or not all(_is_int(n) and n >= 1 for n in pieces)
    ):
        raise ProtocolError(
            "malformed",
            f"'pieces' must list, for each of the {len(declared)} payload frames, its count of pieces (>= 1)",
            ref=msg_id,
        )
    if sum(pieces) != len(wire):
        raise ProtocolError(
            "malformed", f"header declares {sum(pieces)} payload pieces but {len(wire)} arrived", ref=msg_id
        )
    groups: list[list[memoryview]] = []
    start = 0
    for i, count in enumerate(pieces):
        parts = wire[start : start + count]
        start += count
        total = sum(len(p) for p in parts)
        if total != declared[i]:
            raise ProtocolError(
                "malformed",
                f"payload frame {i} declared {declared[i]} bytes but its pieces hold {total}",
                ref=msg_id,
            )
        if total > limits.max_frame_bytes:
            raise ProtocolError(
                "too-large",
                f"payload frame {i} is {total} bytes, above the limit {limits.max_frame_bytes}",
                ref=msg_id,
            )
        groups.append(parts)
    # One copy per split frame, into a fresh writable buffer that belongs to the caller (see
    # :func:`owns_frame`): the zero-copy views downstream need it contiguous. ``bytearray().join`` does not
    # zero-fill it first, as ``bytearray(n)`` would.
    return [parts[0] if len(parts) == 1 else memoryview(bytearray().join(parts)) for parts in groups]


def owns_frame(frame: memoryview) -> bool:
    """Whether a payload frame from :func:`decode_message` is a buffer of its own (joined from pieces)
    rather than a view of a received ZeroMQ frame.

    An owned frame is writable and holds no ZeroMQ message, so a receiver may keep a tensor view of it
    instead of copying it out; a ZeroMQ frame is better copied and released (docs/results_runtime.md,
    session 9: the worker's held view of one made `make train` 3% slower)."""
    return isinstance(frame.obj, bytearray)


def decode_payload(frames: Sequence[Frame]) -> Encoded:
    """Validate the payload frames of a PUSH or PARAMS into an ``Encoded`` (codec, dtypes, buffer lengths,
    index streams); a bad one raises :class:`ProtocolError` with code ``bad-payload``. Whether its shape
    fits the model is the caller's check."""
    try:
        return Encoded.from_frames(list(frames))
    except MalformedPayloadError as exc:
        raise ProtocolError("bad-payload", str(exc)) from None
    except Exception as exc:  # from_frames promises MalformedPayloadError; a defect must not escape
        raise ProtocolError("bad-payload", f"unparseable payload ({type(exc).__name__})") from exc


# ---------------------------------------------------------------------- helpers
def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _view(frame: Frame, index: int) -> memoryview:
    try:
        view = memoryview(frame)
    except TypeError:
        raise ProtocolError("malformed", f"frame {index} is not a byte buffer") from None
    if view.ndim != 1 or view.format not in ("B", "b", "c"):
        view = view.cast("B")
    return view


def _check_sizes(header_bytes: int, lengths: Sequence[int], limits: Limits, *, ref: int | None) -> None:
    if header_bytes > limits.max_header_bytes:
        raise ProtocolError(
            "too-large", f"header is {header_bytes} bytes, above the limit {limits.max_header_bytes}", ref=ref
        )
    for i, n in enumerate(lengths):
        if n > limits.max_frame_bytes:
            raise ProtocolError(
                "too-large",
                f"payload frame {i} is {n} bytes, above the limit {limits.max_frame_bytes}",
                ref=ref,
            )


def _check_payload_layout(
    kind: MessageType, n_frames: int, limits: Limits | None, *, ref: int | None
) -> None:
    has_payload = MESSAGE_CLASSES[kind].HAS_PAYLOAD
    if has_payload and n_frames == 0:
        raise ProtocolError(
            "malformed", f"{kind.value} must carry its payload (an Encoded's frames), got none", ref=ref
        )
    if not has_payload and n_frames > 0:
        raise ProtocolError(
            "too-many-frames", f"{kind.value} carries no payload, got {n_frames} frames", ref=ref
        )
    if limits is not None and n_frames > limits.max_frames:
        raise ProtocolError(
            "too-many-frames", f"{n_frames} payload frames, above the limit {limits.max_frames}", ref=ref
        )


def _describe(kind: MessageType, exc: ValidationError) -> str:
    # Only the location and pydantic's message: never echo the (peer-controlled, possibly huge) input.
    err = exc.errors(include_url=False, include_input=False, include_context=False)[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(message)"
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return _one_line(f"{kind.value}: field {loc}: {err['msg']}{more}", 300)
