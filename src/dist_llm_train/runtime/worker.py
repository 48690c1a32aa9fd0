"""The worker process: register, then request a task (with its parameters), compute, compress, push; repeat.

Threads and sockets: the worker's DEALER socket belongs to one background thread, the *link*, which also
sends the heartbeats (so they keep flowing while the main thread computes) and forwards every other
message between the DEALER and an in-process ``inproc://`` PAIR pipe to the main thread. No socket is
ever used by two threads, and payload frames cross the pipe without a copy.

The main thread drives the protocol with request/reply calls over the pipe, one round trip per task: the
TASK_REQUEST goes out right behind the PUSH of the previous update (``pull=True``), and the controller
answers PUSH_ACK, then TASK_ASSIGN followed by the parameters the task needs (a delta from the version the
worker holds, or the full vector). A separate PULL remains for when that reply is missing. On a WAN link
with latency L this is 2L per task instead of 6L for request, pull and push in turn. Every call has a timeout
(``timeout_s``): a reply that does not come (the controller restarted, the network dropped) makes the
worker abandon its task and register again, with exponential backoff, until ``give_up_s`` passes without
a controller. The run config comes with REGISTER_OK, so a worker needs no config file; it prepares the
same data locally and refuses to work when the data fingerprint or the model size differs.

Experiments on one machine:

- ``speed`` F < 1 emulates slower hardware: after computing for t seconds the worker waits t·(1/F − 1);
- ``bandwidth_mbps``/``latency_ms`` emulate its WAN link (:class:`~dist_llm_train.runtime.transport.LinkShaper`);
- ``byzantine`` ATTACK: the worker computes its honest update, then sends ``attack(own[None], own, 1)``
  (a data attack such as ``label-flip`` poisons its training targets instead).

Symptoms: ``lease-expired`` acknowledgements → tasks take longer than the controller's lease between two
heartbeats (raise ``scheduling.lease_s``); repeated re-registrations → ``timeout_s`` is shorter than the
controller's pauses (evaluation and checkpoints block it briefly): raise it.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import torch
import zmq

from dist_llm_train.compression import Encoded, NoneCodec, decode, decode_view
from dist_llm_train.config import RunConfig, build_config
from dist_llm_train.coordination import WorkerEngine, WorkItem
from dist_llm_train.data import PreparedData, prepare_data
from dist_llm_train.errors import ConfigError, DataError, NonFiniteError, UserError
from dist_llm_train.models import build_model, resolve_model_shapes
from dist_llm_train.runtime.protocol import (
    ErrorReply,
    Heartbeat,
    HeartbeatAck,
    Leave,
    Limits,
    Message,
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
    frame_nbytes,
    owns_frame,
)
from dist_llm_train.runtime.security import CurveClient, load_keypair, load_public_key
from dist_llm_train.runtime.transport import LinkShaper, Received, make_dealer
from dist_llm_train.training.device import resolve_device

if TYPE_CHECKING:  # attacks import scipy.stats (seconds at start-up): only Byzantine workers load them
    from dist_llm_train.attacks import Attack

__all__ = ["Worker", "WorkerOptions", "WorkerReport"]

log = logging.getLogger("dist_llm_train.worker")

_STOP = b"\x00stop"
_LOST = b"\x00lost"
_pipe_ids = itertools.count()


@dataclass
class WorkerOptions:
    """How a worker runs (the CLI's options).

    ``controller``: the controller's endpoint (``tcp://HOST:PORT``). ``key``: this worker's secret key file
    (``NAME.key_secret``) and ``server_key`` the controller's public ``controller.key`` (CurveZMQ);
    ``insecure``: plaintext instead. ``name``: a label in the controller's logs (the controller identifies
    the worker by its key). ``timeout_s``: longest wait for any reply; ``give_up_s``: exit when no
    controller answered for this long. ``max_tasks``: leave after this many pushes (benchmarks).
    ``resync_every``: with delta pulls, ask for the full parameters after this many deltas (bounds the
    rounding drift of compressed deltas). ``cache_dir``/``data_path``: where this machine keeps the token
    cache and the corpus, when they differ from the controller's paths.
    """

    controller: str
    key: Path | None = None
    server_key: Path | None = None
    insecure: bool = False
    name: str = field(default_factory=lambda: f"worker-{os.getpid()}")
    byzantine: str | None = None
    attack_params: dict[str, Any] = field(default_factory=dict)
    bandwidth_mbps: float | None = None
    latency_ms: float = 0.0
    speed: float = 1.0
    device: str = "auto"
    threads: int | None = 1
    timeout_s: float = 30.0
    give_up_s: float = 300.0
    max_tasks: int | None = None
    resync_every: int = 50
    cache_dir: str | None = None
    data_path: str | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.speed) and 0.0 < self.speed <= 1.0):
            raise ConfigError(
                f"--speed {self.speed} must be in (0, 1]: 1 is this machine's full speed, 0.25 a worker four "
                "times slower"
            )
        if not (self.timeout_s > 0 and self.give_up_s > 0):
            raise ConfigError("--timeout and --give-up-after must be positive numbers of seconds")
        if self.insecure == (self.key is not None):
            raise ConfigError(
                "a worker needs either --keys (its secret key) with --server-key (the controller's public "
                "key), or --insecure for plaintext on a trusted network"
            )
        if self.key is not None and self.server_key is None:
            raise ConfigError("--keys needs --server-key FILE: the controller's public controller.key")
        if self.resync_every < 1:
            raise ConfigError(f"resync_every={self.resync_every} must be at least 1")


@dataclass
class WorkerReport:
    """What a worker did (returned by :meth:`Worker.run`, logged at exit)."""

    worker_id: str | None = None
    tasks: int = 0
    pushes: int = 0
    accepted: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    registrations: int = 0
    pulls_full: int = 0
    pulls_delta: int = 0
    tokens: int = 0
    compute_s: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    exit_reason: str = ""


class _HeartbeatState:
    """What the link thread puts in heartbeats; written by the main thread under a lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.interval_s: float | None = None
        self.lease_ids: list[int] = []
        self.throughput: float | None = None

    def set(self, **values: Any) -> None:
        with self._lock:
            for key, value in values.items():
                setattr(self, key, value)

    def message(self) -> Heartbeat | None:
        with self._lock:
            if self.interval_s is None:
                return None
            return Heartbeat(lease_ids=list(self.lease_ids), throughput=self.throughput)

    def interval(self) -> float | None:
        with self._lock:
            return self.interval_s


class _Link(threading.Thread):
    """Owns the DEALER: forwards pipe → controller and controller → pipe, and sends heartbeats."""

    def __init__(
        self,
        context: zmq.Context,
        make_socket: Callable[[], zmq.Socket],
        endpoint: str,
        pipe_address: str,
        heartbeat: _HeartbeatState,
        shaper: LinkShaper | None,
    ) -> None:
        super().__init__(name="worker-link", daemon=True)
        self.context = context
        self.make_socket = make_socket
        self.endpoint = endpoint
        self.pipe_address = pipe_address
        self.heartbeat = heartbeat
        self.shaper = shaper
        self.sent_bytes = 0
        self.dropped = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported to the main thread, which exits with it
            self.error = exc
            log.exception("link thread failed")

    def _run(self) -> None:
        dealer = self.make_socket()
        pipe = self.context.socket(zmq.PAIR)
        pipe.setsockopt(zmq.LINGER, 0)
        pipe.setsockopt(zmq.SNDHWM, 0)
        pipe.setsockopt(zmq.RCVHWM, 0)
        pipe.connect(self.pipe_address)
        dealer.connect(self.endpoint)
        poller = zmq.Poller()
        poller.register(dealer, zmq.POLLIN)
        poller.register(pipe, zmq.POLLIN)
        next_beat = time.monotonic()
        try:
            while True:
                interval = self.heartbeat.interval()
                now = time.monotonic()
                if interval is not None and now >= next_beat:
                    beat = self.heartbeat.message()
                    if beat is not None:
                        self._send(dealer, pipe, encode_message(beat), control=True)
                    next_beat = now + interval
                wait_s = 0.5 if interval is None else max(0.0, next_beat - time.monotonic())
                events = dict(poller.poll(max(1, round(wait_s * 1000))))
                # Incoming first: a SHUTDOWN that arrived must reach the main thread before the "lost"
                # notice of a send that fails because that same controller has just closed.
                if dealer in events:
                    pipe.send_multipart(dealer.recv_multipart(copy=False), copy=False)
                if pipe in events:
                    frames = pipe.recv_multipart(copy=False)
                    if len(frames) == 1 and frames[0].bytes == _STOP:
                        return
                    self._send(dealer, pipe, frames, control=False)
        finally:
            # A moment for a final LEAVE to leave; never block on a controller that is gone.
            dealer.close(linger=300)
            pipe.close(linger=0)

    def _send(self, dealer: zmq.Socket, pipe: zmq.Socket, frames: Sequence[Any], *, control: bool) -> None:
        nbytes = sum(frame_nbytes(f) for f in frames)
        if control and self.shaper is not None:
            self.shaper.before_send(nbytes)
        try:
            dealer.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            # No connected controller (the socket does not queue for one that is not there): tell the
            # main thread at once instead of letting it wait for a reply that cannot come. Forward what
            # the controller sent before it went (its SHUTDOWN) first.
            self.dropped += 1
            if not control:
                while dealer.poll(0, zmq.POLLIN):
                    pipe.send_multipart(dealer.recv_multipart(copy=False), copy=False)
                pipe.send(_LOST)
            return
        self.sent_bytes += nbytes


class _Lost(Exception):
    """No reply: the controller is gone, restarted, or the network dropped."""


class _ShutdownRequested(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _physical_memory() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


class Worker:
    """One worker process (see the module docstring). :meth:`run` returns a :class:`WorkerReport`."""

    def __init__(self, options: WorkerOptions) -> None:
        self.options = options
        self.shaper = (
            LinkShaper(options.bandwidth_mbps, options.latency_ms)
            if options.bandwidth_mbps is not None or options.latency_ms > 0
            else None
        )
        self.limits = Limits()
        self.report = WorkerReport()
        self._stop = threading.Event()
        self._stop_reason = ""
        self._heartbeat = _HeartbeatState()
        self._curve: CurveClient | None = None
        if options.key is not None:
            assert options.server_key is not None
            self._curve = CurveClient(load_keypair(options.key), load_public_key(options.server_key))
        self.device = resolve_device(options.device)
        self.cfg: RunConfig | None = None
        self.data: PreparedData | None = None
        self.engine: WorkerEngine | None = None
        self.attack: Attack | None = None
        self.numel = 0
        self._params: torch.Tensor | None = None
        self._version = -1
        self._deltas = 0
        self._pending_request: TaskRequest | None = None
        self._tput: float | None = None

    # ------------------------------------------------------------------ control
    def request_stop(self, reason: str = "stopped") -> None:
        """Leave at the next opportunity (safe from a signal handler)."""
        self._stop_reason = self._stop_reason or reason
        self._stop.set()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        del frame
        self.request_stop(signal.Signals(signum).name)

    # ------------------------------------------------------------------ pipe
    def _send(
        self, message: Message, payload: Encoded | Sequence[Any] = (), *, with_previous: bool = False
    ) -> None:
        """Send ``message``; ``with_previous``: pipelined right behind the previous one (link emulation)."""
        # The main thread never touches the DEALER (the link thread owns it), so it splits large payloads
        # as an encrypted socket's sends are split (see PIECE_BYTES).
        frames = encode_message(message, payload, split=self._curve is not None)
        nbytes = sum(frame_nbytes(f) for f in frames)
        if self.shaper is not None:
            self.shaper.before_send(nbytes, with_previous=with_previous)
        self.report.bytes_up += nbytes
        self._pipe.send_multipart(frames, copy=False)

    def _call(
        self, message: Message, payload: Encoded | Sequence[Any] = (), *, timeout_s: float | None = None
    ) -> Received:
        """Send ``message`` and wait for the reply that names it. Raises :class:`_Lost` on timeout."""
        self._send(message, payload)
        return self._receive(message, timeout_s=timeout_s)

    def _receive(
        self, message: Message, *, timeout_s: float | None = None, with_previous: bool = False
    ) -> Received:
        """Wait for the next reply that names ``message`` (sent earlier). Raises :class:`_Lost` on timeout.
        ``with_previous``: the reply was sent right behind the last one received (link emulation)."""
        deadline = time.monotonic() + (self.options.timeout_s if timeout_s is None else timeout_s)
        while True:
            if self._link.error is not None:
                raise UserError(f"the worker's network thread failed: {self._link.error}")
            if self._stop.is_set():
                raise _ShutdownRequested(self._stop_reason)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Lost(f"no reply to {message.TYPE.value} within the timeout")
            if not self._pipe.poll(max(1, round(min(remaining, 0.2) * 1000))):
                continue
            frames = self._pipe.recv_multipart(copy=False)
            if len(frames) == 1 and frames[0].bytes == _LOST:
                raise _Lost("not connected to the controller")
            nbytes = sum(len(f) for f in frames)
            self.report.bytes_down += nbytes
            if self.shaper is not None:
                self.shaper.after_recv(nbytes, with_previous=with_previous)
            try:
                message_in, payload_in = decode_message(frames, self.limits)
            except ProtocolError as exc:
                log.warning("ignoring a malformed message from the controller: %s", exc)
                continue
            if isinstance(message_in, Shutdown):
                raise _ShutdownRequested(message_in.reason or "shutdown")
            if isinstance(message_in, HeartbeatAck):
                continue
            if message_in.ref != message.id:
                continue  # the reply to an earlier request we stopped waiting for
            return Received(message_in, payload_in, nbytes)

    def _wait(self, seconds: float) -> None:
        """Sleep ``seconds`` unless stopped; a SHUTDOWN that arrives meanwhile is acted on."""
        deadline = time.monotonic() + seconds
        while not self._stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if self._pipe.poll(max(1, round(min(remaining, 0.2) * 1000))):
                frames = self._pipe.recv_multipart(copy=False)
                if len(frames) == 1:
                    continue
                try:
                    message_in, _ = decode_message(frames, self.limits)
                except ProtocolError:
                    continue
                if isinstance(message_in, Shutdown):
                    raise _ShutdownRequested(message_in.reason or "shutdown")
        raise _ShutdownRequested(self._stop_reason)

    # ------------------------------------------------------------------ run
    def run(self) -> WorkerReport:
        """Work until the controller says SHUTDOWN, a signal arrives, ``max_tasks`` is reached, or no
        controller answers for ``give_up_s`` (then raises :class:`UserError`)."""
        opts = self.options
        if opts.threads is not None:
            torch.set_num_threads(opts.threads)
        previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, self._on_signal)
        context = zmq.Context()
        pipe_address = f"inproc://worker-link-{os.getpid()}-{next(_pipe_ids)}"
        self._pipe = context.socket(zmq.PAIR)
        self._pipe.setsockopt(zmq.LINGER, 0)
        self._pipe.setsockopt(zmq.SNDHWM, 0)
        self._pipe.setsockopt(zmq.RCVHWM, 0)
        self._pipe.bind(pipe_address)

        def make_socket() -> zmq.Socket:
            routing_id = None
            if opts.insecure:
                # Plaintext: the routing id is the worker's identity on the controller; keep it readable,
                # and unique so that two workers with one name do not take over each other's connection.
                routing_id = f"{opts.name}-{os.urandom(3).hex()}".encode()
            sock = make_dealer(
                context,
                self.limits,
                curve=self._curve,
                insecure=opts.insecure,
                routing_id=routing_id,
                reconnect_ivl_s=0.1,
                reconnect_ivl_max_s=2.0,
            )
            # Do not queue messages for a controller that is not connected: a send fails at once and the
            # main thread retries with backoff (no burst of stale requests when it comes back).
            sock.setsockopt(zmq.IMMEDIATE, 1)
            return sock

        self._link = _Link(context, make_socket, opts.controller, pipe_address, self._heartbeat, self.shaper)
        self._link.start()
        try:
            self._main()
        finally:
            with _suppress_zmq():
                self._pipe.send(_STOP)
            self._link.join(timeout=5.0)
            self._pipe.close(linger=0)
            if self._link.is_alive():
                context.destroy(linger=0)
            else:
                context.term()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            log.info("worker exits (%s): %s", self.report.exit_reason, json.dumps(self.report.__dict__))
        return self.report

    def _main(self) -> None:
        opts = self.options
        registered = False
        last_contact = time.monotonic()
        backoff = 0.1
        try:
            while True:
                if self._stop.is_set():
                    raise _ShutdownRequested(self._stop_reason)
                if not registered:
                    try:
                        self._register()
                    except _Lost as exc:
                        if time.monotonic() - last_contact > opts.give_up_s:
                            self.report.exit_reason = "controller-unreachable"
                            raise UserError(
                                f"no controller answered at {opts.controller} for {opts.give_up_s:.0f} s ({exc}): "
                                "check the address, that it runs, and (secure mode) that this worker's public "
                                "key is on its allow-list and --server-key is its controller.key"
                            ) from None
                        self._wait(backoff)
                        backoff = min(backoff * 2.0, 2.0)
                        continue
                    registered = True
                    backoff = 0.1
                last_contact = time.monotonic()
                try:
                    done = self._one_task()
                except _Lost as exc:
                    log.warning("lost the controller (%s): registering again", exc)
                    registered = False
                    self._heartbeat.set(interval_s=None, lease_ids=[])
                    continue
                if done == "not-registered":
                    registered = False
                    continue
                if opts.max_tasks is not None and self.report.pushes >= opts.max_tasks:
                    self._send(Leave(reason="max-tasks"))
                    self.report.exit_reason = "max-tasks"
                    return
        except _ShutdownRequested as stop:
            self.report.exit_reason = stop.reason or "shutdown"
            if stop.reason in ("SIGINT", "SIGTERM", "stopped"):
                with _suppress_zmq():
                    self._send(Leave(reason=stop.reason))

    # ------------------------------------------------------------------ registration
    def _register(self) -> None:
        opts = self.options
        memory = (
            int(torch.cuda.get_device_properties(self.device).total_memory)
            if self.device.type == "cuda"
            else _physical_memory()
        )
        register = Register(
            name=opts.name[:64],
            device=str(self.device),
            memory_bytes=memory,
            throughput=self._tput,
            link_mbps=opts.bandwidth_mbps,
            capacity=1,
            software=f"dist-llm-train torch {torch.__version__}",
        )
        reply = self._call(register, timeout_s=min(opts.timeout_s, 5.0))
        msg = reply.message
        if isinstance(msg, ErrorReply):
            raise _Lost(f"registration refused: {msg.code}: {msg.message}")
        if not isinstance(msg, RegisterOk):
            raise _Lost(f"unexpected reply to REGISTER: {msg.TYPE.value}")
        self.report.registrations += 1
        self.report.worker_id = msg.worker_id
        self._setup(msg)
        # A (re)registration starts from the controller's current parameters: what this worker held may
        # belong to a controller that restarted from a checkpoint, and so does the error-feedback residual.
        self._params, self._version, self._deltas = None, -1, 0
        self._pending_request = None  # asked of a controller that no longer knows this worker
        assert self.engine is not None
        reset = getattr(self.engine.codec, "reset", None)
        if callable(reset):
            reset()
        self._heartbeat.set(interval_s=msg.heartbeat_interval_s, lease_ids=[], throughput=self._tput)
        log.info("registered as %s (%s) at version %d", msg.worker_id, opts.name, msg.version)

    def _setup(self, ok: RegisterOk) -> None:
        try:
            payload = json.loads(ok.config_json)
            config = payload["run_config"]
            fingerprint = payload["data_fingerprint"]
            numel = int(payload["numel"])
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(
                f"the controller sent no usable run config ({exc}): run the same version on both"
            ) from exc
        data_cfg = dict(config.get("data", {}))
        if self.options.cache_dir is not None:
            data_cfg["cache_dir"] = self.options.cache_dir
        if self.options.data_path is not None:
            data_cfg["path"] = self.options.data_path
        cfg = build_config({**config, "data": data_cfg})
        if self.cfg is not None:
            if cfg.model_dump() != self.cfg.model_dump():
                raise UserError(
                    "the controller now runs another configuration than when this worker joined: start a new "
                    "worker for the new run"
                )
            return
        shapes = resolve_model_shapes(cfg.model)
        data = prepare_data(cfg.data, block_size=int(shapes["block_size"]))
        if data.fingerprint != fingerprint:
            self._send(Leave(reason="data-fingerprint-mismatch"))
            raise DataError(
                f"this worker's data (fingerprint {data.fingerprint}) differs from the controller's "
                f"({fingerprint}): give it the same corpus (--data-path) and tokenizer settings"
            )
        torch.manual_seed(cfg.training.seed)
        model = build_model(cfg.model, data.tokenizer.vocab_size)
        own = sum(p.numel() for p in model.parameters())
        if own != numel:
            self._send(Leave(reason="model-mismatch"))
            raise UserError(
                f"this worker's model has {own} parameters but the controller's has {numel}: run the same "
                "dist-llm-train version on both"
            )
        self.numel = numel
        transform = None
        if self.options.byzantine is not None:
            from dist_llm_train.attacks import build_attack

            params = dict(self.options.attack_params)
            if self.options.byzantine == "label-flip":
                params.setdefault("vocab_size", data.tokenizer.vocab_size)
            self.attack = build_attack(self.options.byzantine, **params)
            if not self.attack.is_data_attack and self.attack.min_honest > 1:
                raise ConfigError(
                    f"attack {self.options.byzantine!r} needs {self.attack.min_honest} honest updates to observe, "
                    "but a worker process only sees its own; use it in the simulator, or pick sign-flip, "
                    "scaling, gaussian, zero, nonfinite, ipm or label-flip"
                )
            if self.attack.is_data_attack:
                transform = self.attack.transform_targets  # type: ignore[attr-defined]
        self.engine = WorkerEngine(model, data.train, cfg, device=self.device, target_transform=transform)
        self.cfg, self.data = cfg, data

    # ------------------------------------------------------------------ one task
    def _task_request(self) -> TaskRequest:
        # The parameters come with the assignment (one round trip fewer than a separate PULL).
        return TaskRequest(pull=True, have_version=self._have_version())

    def _one_task(self) -> str:
        request, self._pending_request = self._pending_request, None
        pipelined = request is not None  # its reply comes right behind the PUSH_ACK
        if request is None:
            request = self._task_request()
            self._send(request)
        reply = self._receive(request, with_previous=pipelined)
        msg = reply.message
        if isinstance(msg, ErrorReply):
            if msg.code == "not-registered":
                return "not-registered"
            log.warning("task request refused: %s: %s", msg.code, msg.message)
            self._wait(0.5)
            return "error"
        if isinstance(msg, NoTask):
            self._wait(msg.retry_after_s)
            return "idle"
        if not isinstance(msg, TaskAssign):
            log.warning("unexpected reply to TASK_REQUEST: %s", msg.TYPE.value)
            return "error"
        if msg.version != request.have_version:
            failed = self._apply_params(self._receive(request, with_previous=True))
            if failed is not None:
                return failed
        return self._run_task(msg)

    def _have_version(self) -> int | None:
        """The version to ask a delta from; ``None`` (full parameters) every ``resync_every`` pulls."""
        return (
            self._version if self._params is not None and self._deltas < self.options.resync_every else None
        )

    def _pull(self) -> str | None:
        return self._apply_params(self._call(Pull(have_version=self._have_version())))

    def _apply_params(self, reply: Received) -> str | None:
        """Take the parameters of a PARAMS reply (full, or a delta from the version held)."""
        msg = reply.message
        if isinstance(msg, ErrorReply):
            return "not-registered" if msg.code == "not-registered" else "error"
        if not isinstance(msg, Params):
            return "error"
        try:
            encoded = decode_payload(reply.frames)
        except ProtocolError as exc:
            log.warning("bad parameters from the controller: %s", exc)
            return "error"
        if encoded.numel != self.numel or msg.numel != self.numel:
            log.warning("parameters of %d values, expected %d", encoded.numel, self.numel)
            return "error"
        # Full parameters are held until the next pull, and compute copies them into the model. A view of a
        # received ZeroMQ frame is copied out first: with the view held, `make train` ran at 8,040-8,145
        # tokens/s against 8,300-8,457 with the copy, in alternating runs (docs/results_runtime.md, session
        # 9). Pieces joined on an encrypted link are already a buffer of our own: held as they are, one
        # 3.4 MB copy fewer per pull. A delta is only read once, so it is never copied.
        copy_out = msg.base_version is None and not all(owns_frame(f) for f in reply.frames[1:])
        values = (decode(encoded) if copy_out else decode_view(encoded)).reshape(-1)
        if msg.base_version is None:
            self._params, self._deltas = values, 0
            self.report.pulls_full += 1
        else:
            if self._params is None or msg.base_version != self._version:
                return "error"
            self._params = self._params + values
            self._deltas += 1
            self.report.pulls_delta += 1
        self._version = msg.version
        return None

    def _run_task(self, assign: TaskAssign) -> str:
        assert self.engine is not None and self.cfg is not None
        self.report.tasks += 1
        self._heartbeat.set(lease_ids=[assign.lease_id])
        try:
            if self._params is None or self._version != assign.version:
                failed = self._pull()
                if failed is not None:
                    return failed
            assert self._params is not None
            started = time.perf_counter()
            if self.cfg.model.dropout > 0:
                torch.manual_seed(assign.batch_seed)  # dropout draws from the global generator
            item = WorkItem(assign.start, assign.end, assign.micro_batches, assign.batch_seed)
            update = self.engine.compute(self._params, self._version, item)
            vector = update.vector
            if self.attack is not None and not self.attack.is_data_attack:
                vector = self.attack(vector[None], vector, 1)[0]
            try:
                # The residual is formed after the push is on its way (below), not on the critical path.
                encoded = self.engine.encode(vector, defer_residual=True)
            except NonFiniteError:
                # Codecs refuse NaN/Inf; a hostile worker sends it raw, and the controller must reject it.
                encoded = Encoded.build(
                    NoneCodec.name,
                    NoneCodec.version,
                    vector.shape,
                    {},
                    [("values", vector.float().contiguous())],
                )
            compute_s = time.perf_counter() - started
            if self.options.speed < 1.0:
                self._wait(compute_s * (1.0 / self.options.speed - 1.0))
            elapsed = time.perf_counter() - started
            self.report.compute_s += elapsed
            self.report.tokens += update.tokens
            rate = update.tokens / max(elapsed, 1e-9)
            self._tput = rate if self._tput is None else 0.7 * self._tput + 0.3 * rate
            self._heartbeat.set(throughput=self._tput)
            loss = update.loss if math.isfinite(update.loss) and abs(update.loss) < 1e9 else 1e9
            push = Push(
                base_version=update.base_version,
                lease_id=assign.lease_id,
                task_id=assign.task_id,
                tokens=update.tokens,
                loss=loss,
                compute_s=elapsed,
            )
            self.report.pushes += 1
            self._send(push, encoded)
            if self.options.max_tasks is None or self.report.pushes < self.options.max_tasks:
                # Asked before the acknowledgement arrives: the controller handles it right after the push,
                # so the next task (and the parameters it needs) come back without another round trip.
                self._pending_request = self._task_request()
                self._send(self._pending_request, with_previous=True)
            # While the controller steps and replies: this worker would only wait.
            self.engine.settle()
            reply = self._receive(push)
        finally:
            self._heartbeat.set(lease_ids=[])
        msg = reply.message
        if isinstance(msg, ErrorReply):
            return "not-registered" if msg.code == "not-registered" else "error"
        if isinstance(msg, PushAck):
            self.engine.observe_staleness(msg.staleness)
            if msg.accepted:
                self.report.accepted += 1
            else:
                reason = msg.reason or "rejected"
                self.report.rejected[reason] = self.report.rejected.get(reason, 0) + 1
        return "done"


class _suppress_zmq:
    """Best-effort sends at exit: a closed or full pipe must not turn a clean exit into a traceback."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        return exc_type is not None and issubclass(exc_type, (zmq.ZMQError, _Lost))


def attack_params_from_json(text: str | None) -> dict[str, Any]:
    """``--attack-params '{"scale": 100}'`` → dict (ConfigError when it is not a JSON object)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--attack-params {text!r} is not valid JSON: {exc.msg}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"--attack-params must be a JSON object, got {text!r}")
    return value


def worker_options_from_key_dir(keys: Path, name: str) -> Path:
    """The secret key file a ``--keys`` argument names: a file as given, or ``DIR/NAME.key_secret``."""
    keys = Path(keys)
    if keys.is_dir():
        candidate = keys / f"{name}.key_secret"
        if not candidate.is_file():
            raise ConfigError(
                f"{keys} holds no {candidate.name}: pass the worker's key file, or --name matching a key in it"
            )
        return candidate
    return keys
