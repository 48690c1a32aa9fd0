"""ZeroMQ sockets for the controller (ROUTER) and workers (DEALER), protocol send/receive, link shaping.

The controller owns one ROUTER socket (:func:`make_router`), every worker one DEALER (:func:`make_dealer`).
Both are made secure with a :class:`~dist_llm_train.runtime.security.CurveServer` /
:class:`~dist_llm_train.runtime.security.CurveClient`, or explicitly plaintext with ``insecure=True``.
Options set here (REFERENCES §6):

- ``ROUTER_MANDATORY``: a send to a worker that is gone fails (``router_send`` returns ``False``) instead
  of vanishing, so the controller learns of the loss at once.
- ``ROUTER_HANDOVER``: a worker reconnecting under its routing id replaces its stale connection (the old TCP
  connection may not have timed out yet); DEALERs use an unguessable per-process routing id.
- ``LINGER 0``: closing never blocks on unsent messages (a stopping controller must not hang on a dead peer).
- ``RECONNECT_IVL``/``RECONNECT_IVL_MAX``: exponential reconnect backoff of a worker whose controller went
  away; ``HEARTBEAT_IVL``/``HEARTBEAT_TIMEOUT`` (optional): ZMTP pings that drop a dead TCP connection.
- ``MAXMSGSIZE``: a per-frame backstop set a little above the protocol limit (:func:`apply_socket_limits`):
  libzmq drops a connection that exceeds it without a word, so the protocol check (which replies with an
  ERROR) must trigger first.

All frames are sent with ``copy=False``: pyzmq copies frames below its ``copy_threshold`` anyway and sends
larger ones (tensor buffers) without a copy.
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import zmq

from dist_llm_train.compression.payload import Encoded
from dist_llm_train.errors import ConfigError, PreconditionError
from dist_llm_train.runtime.protocol import (
    Frame,
    Limits,
    Message,
    ProtocolError,
    decode_message,
    encode_message,
    frame_nbytes,
)
from dist_llm_train.runtime.security import CurveClient, CurveServer, peer_identity, random_routing_id

__all__ = [
    "Inbound",
    "LinkShaper",
    "Received",
    "apply_socket_limits",
    "dealer_recv",
    "dealer_send",
    "make_dealer",
    "make_router",
    "router_recv",
    "router_send",
    "socket_max_bytes",
    "splits_payloads",
]

# Above the protocol limit by enough for any header, below it by nothing a peer could exploit.
_BACKSTOP_SLACK = 64 * 1024


def socket_max_bytes(limits: Limits) -> int:
    """The ZMQ_MAXMSGSIZE backstop for ``limits``: the largest frame the protocol accepts plus 64 KiB."""
    return max(limits.max_frame_bytes, limits.max_header_bytes) + _BACKSTOP_SLACK


def apply_socket_limits(socket: zmq.Socket, limits: Limits) -> None:
    """Set ZMQ_MAXMSGSIZE (checked per frame by libzmq) to :func:`socket_max_bytes`.

    A frame above it makes libzmq close the connection silently (no error reply is possible, the peer just
    reconnects); frames between the protocol limit and this backstop reach :func:`decode_message`, which
    refuses them with ``too-large``.
    """
    socket.setsockopt(zmq.MAXMSGSIZE, socket_max_bytes(limits))


def _seconds_to_ms(name: str, value: float | None, *, allow_none: bool = True) -> int | None:
    if value is None:
        if allow_none:
            return None
        raise ConfigError(f"{name} must be set")
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{name}={value!r} must be a finite number of seconds > 0")
    return max(1, round(value * 1000))


def _security_mode(curve: object | None, insecure: bool, side: str) -> None:
    if curve is None and not insecure:
        raise ConfigError(
            f"the {side} socket has no CurveZMQ keys: pass the keys (see `dist-llm-train keys generate`), "
            "or insecure=True (--insecure) for plaintext on a trusted network"
        )
    if curve is not None and insecure:
        raise ConfigError(f"the {side} socket got both CurveZMQ keys and insecure=True: choose one")


def _apply_heartbeat(socket: zmq.Socket, ivl_s: float | None, timeout_s: float | None) -> None:
    ivl = _seconds_to_ms("heartbeat_ivl_s", ivl_s)
    if ivl is None:
        if timeout_s is not None:
            raise ConfigError("heartbeat_timeout_s needs heartbeat_ivl_s (ZMTP pings) to be set")
        return
    socket.setsockopt(zmq.HEARTBEAT_IVL, ivl)
    timeout = _seconds_to_ms("heartbeat_timeout_s", timeout_s)
    if timeout is not None:
        socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, timeout)
        # The peer drops us after this long without traffic from our side.
        socket.setsockopt(zmq.HEARTBEAT_TTL, timeout)


def make_router(
    context: zmq.Context,
    limits: Limits,
    *,
    curve: CurveServer | None = None,
    insecure: bool = False,
    heartbeat_ivl_s: float | None = None,
    heartbeat_timeout_s: float | None = None,
    hwm: int = 1000,
) -> zmq.Socket:
    """The controller's ROUTER socket, configured but not bound (call ``bind`` or ``bind_to_random_port``).

    ``curve``: a started :class:`CurveServer` (only allow-listed workers get through), or ``insecure=True``
    for plaintext. ``heartbeat_ivl_s``/``heartbeat_timeout_s``: ZMTP pings that detect a dead TCP peer
    (the protocol's own HEARTBEAT drives eviction; these only free the connection). ``hwm``: messages queued
    per worker before sends to it fail (``router_send`` returns ``False``): raise it when fast workers see
    dropped replies under bursts, lower it to bound controller memory with many workers.
    """
    _security_mode(curve, insecure, "controller")
    socket = context.socket(zmq.ROUTER)
    try:
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
        socket.setsockopt(zmq.SNDHWM, hwm)
        socket.setsockopt(zmq.RCVHWM, hwm)
        apply_socket_limits(socket, limits)
        _apply_heartbeat(socket, heartbeat_ivl_s, heartbeat_timeout_s)
        if curve is not None:
            curve.apply(socket)
    except BaseException:
        socket.close(linger=0)
        raise
    return socket


def make_dealer(
    context: zmq.Context,
    limits: Limits,
    *,
    curve: CurveClient | None = None,
    insecure: bool = False,
    routing_id: bytes | None = None,
    reconnect_ivl_s: float = 0.1,
    reconnect_ivl_max_s: float = 5.0,
    heartbeat_ivl_s: float | None = None,
    heartbeat_timeout_s: float | None = None,
    hwm: int = 1000,
) -> zmq.Socket:
    """A worker's DEALER socket, configured but not connected (call ``connect``).

    ``curve``: a :class:`CurveClient` with the worker's keys and the controller's public key, or
    ``insecure=True`` for plaintext. ``routing_id``: default a fresh unguessable one
    (:func:`~dist_llm_train.runtime.security.random_routing_id`); with ``insecure`` it is also the worker's
    identity on the controller, so pass a readable one (e.g. ``b"worker-3"``). ``reconnect_ivl_s`` doubles
    up to ``reconnect_ivl_max_s`` while the controller is unreachable: a larger maximum spares a restarting
    controller a reconnect storm, a smaller one brings workers back sooner.
    """
    _security_mode(curve, insecure, "worker")
    rid = random_routing_id() if routing_id is None else routing_id
    if not isinstance(rid, bytes) or not 1 <= len(rid) <= 255 or rid[0] == 0:
        raise ConfigError("routing_id must be 1-255 bytes not starting with a zero byte (reserved by ZeroMQ)")
    ivl = _seconds_to_ms("reconnect_ivl_s", reconnect_ivl_s, allow_none=False)
    ivl_max = _seconds_to_ms("reconnect_ivl_max_s", reconnect_ivl_max_s, allow_none=False)
    assert ivl is not None and ivl_max is not None
    if ivl_max < ivl:
        raise ConfigError(
            f"reconnect_ivl_max_s={reconnect_ivl_max_s} must be >= reconnect_ivl_s={reconnect_ivl_s}"
        )
    socket = context.socket(zmq.DEALER)
    try:
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.ROUTING_ID, rid)
        socket.setsockopt(zmq.RECONNECT_IVL, ivl)
        socket.setsockopt(zmq.RECONNECT_IVL_MAX, ivl_max)
        socket.setsockopt(zmq.SNDHWM, hwm)
        socket.setsockopt(zmq.RCVHWM, hwm)
        apply_socket_limits(socket, limits)
        _apply_heartbeat(socket, heartbeat_ivl_s, heartbeat_timeout_s)
        if curve is not None:
            curve.apply(socket)
    except BaseException:
        socket.close(linger=0)
        raise
    return socket


# ---------------------------------------------------------------------- receive
@dataclass(frozen=True)
class Received:
    """A validated message. ``frames``: its payload frames (zero-copy views); ``nbytes``: bytes it took on
    the wire (header + payload, without the routing id)."""

    message: Message
    frames: list[memoryview]
    nbytes: int


@dataclass(frozen=True)
class Inbound(Received):
    """A message received on the ROUTER. ``worker_id``: the sender's identity, bound to its authenticated
    key (``insecure``: its routing id); ``routing_id``: where replies go; ``peer_key``: its z85 public key
    (``None`` when insecure)."""

    routing_id: bytes
    worker_id: str
    peer_key: str | None


def splits_payloads(socket: zmq.Socket) -> bool:
    """Whether large payload frames sent on ``socket`` go in pieces of :data:`PIECE_BYTES`: on a CurveZMQ
    socket (encryption, transfer and decryption then overlap), not in plaintext."""
    return bool(socket.getsockopt(zmq.MECHANISM) == zmq.CURVE)


def _wait(socket: zmq.Socket, event: int, timeout_s: float | None) -> bool:
    if timeout_s is None:
        return True
    return bool(socket.poll(max(0, round(timeout_s * 1000)), event))


# The RCVTIMEO each socket was last given by _recv_parts (nothing else sets it), so a receive sets the
# option only when its timeout changes.
_receive_timeouts: weakref.WeakKeyDictionary[zmq.Socket, int] = weakref.WeakKeyDictionary()


def _recv_parts(socket: zmq.Socket, timeout_s: float | None) -> list[zmq.Frame] | None:
    # Wait inside libzmq (RCVTIMEO), not with socket.poll: poll builds a Poller per call, and the
    # non-blocking attempt that would avoid it raises an exception whenever nothing is queued, which is
    # every time a controller keeps up with its workers. Together ~30 us of Python per update.
    timeout_ms = -1 if timeout_s is None else max(0, round(timeout_s * 1000))
    flags = 0
    if timeout_ms == 0:
        flags = zmq.NOBLOCK
    elif _receive_timeouts.get(socket) != timeout_ms:
        socket.setsockopt(zmq.RCVTIMEO, timeout_ms)
        _receive_timeouts[socket] = timeout_ms
    try:
        return socket.recv_multipart(flags, copy=False)
    except zmq.Again:
        return None


def _user_id(frame: zmq.Frame) -> str | None:
    try:
        value = frame.get("User-Id")
    except zmq.ZMQError:  # EINVAL: no such property (plaintext, or no ZAP handler)
        return None
    return value if isinstance(value, str) and value else None


def router_recv(socket: zmq.Socket, limits: Limits, *, timeout_s: float | None = None) -> Inbound | None:
    """Receive and validate one message on the controller's ROUTER; ``None`` when ``timeout_s`` passes.

    The sender's identity comes from the socket, never from the message: on a Curve socket from the ZAP
    ``User-Id`` (the peer's public key), otherwise from the routing id. A bad message raises
    :class:`ProtocolError` with ``routing_id`` (and ``worker_id`` when known) set, so the caller can count it
    and answer ``socket``-side with ``router_send(socket, exc.routing_id, exc.reply())``.
    """
    parts = _recv_parts(socket, timeout_s)
    if parts is None:
        return None
    routing_id = parts[0].bytes
    if len(parts) < 2:
        exc = ProtocolError("malformed", "empty message")
        exc.routing_id = routing_id
        raise exc
    secure = bool(socket.getsockopt(zmq.CURVE_SERVER))
    peer_key = _user_id(parts[1]) if secure else None
    try:
        worker_id = peer_identity(routing_id, peer_key, secure=secure)
    except ProtocolError as exc:
        exc.routing_id = routing_id
        raise
    body = parts[1:]
    try:
        message, payload = decode_message(body, limits)
    except ProtocolError as exc:
        exc.routing_id, exc.worker_id = routing_id, worker_id
        raise
    return Inbound(
        message=message,
        frames=payload,
        nbytes=sum(len(p) for p in body),
        routing_id=routing_id,
        worker_id=worker_id,
        peer_key=peer_key,
    )


def dealer_recv(
    socket: zmq.Socket,
    limits: Limits,
    *,
    timeout_s: float | None = None,
    shaper: LinkShaper | None = None,
) -> Received | None:
    """Receive and validate one message on a worker's DEALER; ``None`` when ``timeout_s`` passes.

    ``shaper``: a :class:`LinkShaper` charges the message's download time after it arrived. A bad message
    raises :class:`ProtocolError`.
    """
    parts = _recv_parts(socket, timeout_s)
    if parts is None:
        return None
    nbytes = sum(len(p) for p in parts)
    if shaper is not None:
        shaper.after_recv(nbytes)
    message, payload = decode_message(parts, limits)
    return Received(message=message, frames=payload, nbytes=nbytes)


# ---------------------------------------------------------------------- send
def router_send(
    socket: zmq.Socket,
    routing_id: bytes,
    message: Message,
    frames: Sequence[Frame] | Encoded = (),
    *,
    limits: Limits | None = None,
) -> int | None:
    """Send ``message`` (+ payload) to the worker at ``routing_id`` without blocking.

    Returns the bytes sent (header + payload), or ``None`` when the worker is gone (EHOSTUNREACH, thanks to
    ROUTER_MANDATORY) or its queue is full (EAGAIN): the caller treats it as a lost message, like a
    network loss. ``limits``: check sizes before sending (see :func:`encode_message`).
    """
    parts = encode_message(message, frames, limits=limits, split=splits_payloads(socket))
    try:
        socket.send_multipart([routing_id, *parts], flags=zmq.NOBLOCK, copy=False)
    except zmq.ZMQError as exc:
        if exc.errno in (zmq.EHOSTUNREACH, zmq.EAGAIN):
            return None
        raise
    return sum(frame_nbytes(p) for p in parts)


def dealer_send(
    socket: zmq.Socket,
    message: Message,
    frames: Sequence[Frame] | Encoded = (),
    *,
    limits: Limits | None = None,
    shaper: LinkShaper | None = None,
    timeout_s: float | None = None,
) -> int | None:
    """Send ``message`` (+ payload) from a worker's DEALER.

    ``shaper``: a :class:`LinkShaper` delays the send by the emulated link's latency and upload time first.
    ``timeout_s``: wait at most this long for room in the send queue (the DEALER queues while disconnected,
    up to its HWM); ``None`` blocks. Returns the bytes sent, or ``None`` when the queue stayed full.
    """
    parts = encode_message(message, frames, limits=limits, split=splits_payloads(socket))
    nbytes = sum(frame_nbytes(p) for p in parts)
    if shaper is not None:
        shaper.before_send(nbytes)
    if not _wait(socket, zmq.POLLOUT, timeout_s):
        return None
    try:
        socket.send_multipart(parts, flags=0 if timeout_s is None else zmq.NOBLOCK, copy=False)
    except zmq.Again:
        return None
    return nbytes


# ---------------------------------------------------------------------- link shaping
class LinkShaper:
    """Emulates a worker's WAN link on one machine: each message waits latency + bytes x 8 / bandwidth.

    ``bandwidth_mbps``: link rate in megabits per second (``None``: unlimited); ``latency_ms``: one-way
    latency, so a request and its reply cost two. Upload (:meth:`before_send`) and download
    (:meth:`after_recv`) are separate directions, each serialised: a message that starts while an earlier
    one is still on the link waits for it (a heartbeat queued behind a 50 MB push is late, as on a real
    link). ``sleep`` and ``clock``: injectable (``time.sleep``/``time.monotonic`` in a real worker; a fake
    that records in tests). Thread-safe: the link is reserved under a lock and slept on outside it.

    Messages pipelined behind another (``with_previous``) share its latency, as on a real link where
    several messages are in flight at once. The emulation is at message granularity and only on the
    worker's side; it does not model loss or jitter. For an update of B bytes the worker is blocked
    ``latency + 8B/bandwidth`` seconds.
    """

    def __init__(
        self,
        bandwidth_mbps: float | None = None,
        latency_ms: float = 0.0,
        *,
        sleep: Callable[[float], Any] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if bandwidth_mbps is not None and not (
            isinstance(bandwidth_mbps, (int, float)) and math.isfinite(bandwidth_mbps) and bandwidth_mbps > 0
        ):
            raise ConfigError(f"bandwidth_mbps={bandwidth_mbps!r} must be a finite number > 0 (or unset)")
        if not (isinstance(latency_ms, (int, float)) and math.isfinite(latency_ms) and latency_ms >= 0):
            raise ConfigError(f"latency_ms={latency_ms!r} must be a finite number >= 0")
        self.bandwidth_mbps = None if bandwidth_mbps is None else float(bandwidth_mbps)
        self.latency_s = float(latency_ms) / 1000.0
        self._sleep = sleep
        self._clock = clock
        self._lock = threading.Lock()
        self._busy_until: dict[str, float] = {"up": -math.inf, "down": -math.inf}
        self._last_sent: dict[str, float] = {"up": -math.inf, "down": -math.inf}
        self.slept_s = 0.0
        self.bytes: dict[str, int] = {"up": 0, "down": 0}

    def transfer_s(self, nbytes: int) -> float:
        """Seconds ``nbytes`` occupy the link (no latency)."""
        if nbytes < 0:
            raise PreconditionError(f"LinkShaper: nbytes={nbytes} must be >= 0")
        if self.bandwidth_mbps is None:
            return 0.0
        return nbytes * 8.0 / (self.bandwidth_mbps * 1e6)

    def delay_s(self, nbytes: int) -> float:
        """Delay of one message on an idle link: latency + transfer time."""
        return self.latency_s + self.transfer_s(nbytes)

    def _pass(self, direction: Literal["up", "down"], nbytes: int, with_previous: bool) -> float:
        tx = self.transfer_s(nbytes)
        with self._lock:
            now = self._clock()
            # A message pipelined behind the previous one left with it: the latency is shared, only its own
            # transfer time adds (the caller has already slept for the first one's latency).
            sent = min(now, self._last_sent[direction]) if with_previous else now
            self._last_sent[direction] = sent
            start = max(sent, self._busy_until[direction])
            self._busy_until[direction] = start + tx
            wait = start + tx + self.latency_s - now
            self.bytes[direction] += nbytes
            self.slept_s += max(wait, 0.0)
        if wait > 0:
            self._sleep(wait)
        return max(wait, 0.0)

    def before_send(self, nbytes: int, *, with_previous: bool = False) -> float:
        """Block for the upload of ``nbytes`` (queueing behind earlier uploads); returns seconds waited.
        ``with_previous``: sent back-to-back with the previous upload (pipelined), so it shares its latency."""
        return self._pass("up", nbytes, with_previous)

    def after_recv(self, nbytes: int, *, with_previous: bool = False) -> float:
        """Block for the download of ``nbytes`` just received; returns seconds waited. ``with_previous``: the
        peer sent it right behind the previous download (several replies to one burst of requests)."""
        return self._pass("down", nbytes, with_previous)
