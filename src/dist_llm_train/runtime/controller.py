"""The controller process: parameter server, coordinator, scheduler and failure detector behind a ROUTER.

Two layers:

- :class:`ControllerCore` — everything the controller decides, as a pure function of the messages it is
  handed and an injected clock: registration, heartbeats, task leases, parameter pulls, update pushes,
  eviction of silent workers, lease expiry, the synchronous straggler timeout. It owns the same objects the
  simulator drives (:class:`~dist_llm_train.coordination.ParameterServer`, a
  :class:`~dist_llm_train.coordination.Coordinator`, a :class:`~dist_llm_train.scheduling.TaskPool` with
  its lease table, a failure detector) and returns the replies to send; it never touches a socket, so
  tests drive it message by message on a :class:`~dist_llm_train.scheduling.ManualClock`.
- :class:`Controller` — the process: a ROUTER socket (CurveZMQ unless ``--insecure``), one poll loop with a
  bounded timeout that feeds the core and runs the periodic duties (evaluation in a helper thread on a
  parameter snapshot, atomic checkpoints every ``training.checkpoint_interval`` server steps, metrics as
  JSON lines and on a Prometheus endpoint), and a graceful stop on SIGINT/SIGTERM (final checkpoint,
  SHUTDOWN to the workers, exit 0).

Every malformed, oversized, unknown or wrong-version message is answered with an ERROR when its sender can
be addressed and counted by code; a message that makes a handler fail is answered ``internal`` and logged.
Nothing a peer sends stops the controller.

Symptoms and settings:

- many ``lease-expired`` refusals from healthy workers: tasks outlast ``scheduling.lease_s`` between
  heartbeats; raise ``lease_s`` or lower ``heartbeat_interval_s``;
- healthy workers evicted (``evict`` events with reason ``silent``): raise ``scheduling.failure_timeout_s``
  (a worker blocked on a long upload over a slow link sends no heartbeat meanwhile);
- many ``too-stale`` rejections: ``sync.mode=adaptive`` or a larger ``sync.max_staleness``;
- workers waiting on pulls over a slow link: ``--pull-codec fp16`` (or ``int8`` deltas).
- workers answered ``no-task`` with reason ``assembling``: fewer than ``scheduling.min_workers`` are
  registered (start the missing ones, or lower it);
- after a start or ``--resume``, the first worker to arrive runs far ahead of the others: raise
  ``scheduling.min_workers``.
- a controller sharing its CPUs falls behind its workers' pushes: keep ``ControllerOptions.io_nice`` above 0
  (libzmq's I/O threads yield to the loop; see :mod:`~dist_llm_train.runtime.io_threads`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
import zmq

from dist_llm_train.compression import Encoded, NoneCodec, build_codec, decode_view
from dist_llm_train.config import RunConfig, config_to_yaml
from dist_llm_train.coordination import (
    Coordinator,
    ParameterServer,
    StepReport,
    Update,
    build_coordinator,
    build_server,
    flatten_params,
    load_flat_params,
    updates_per_step,
)
from dist_llm_train.data import PreparedData, prepare_data
from dist_llm_train.errors import ConfigError, PreconditionError, UserError
from dist_llm_train.models import LanguageModel, build_model, resolve_model_shapes
from dist_llm_train.runtime.allocator import retain_freed_buffers
from dist_llm_train.runtime.io_threads import IO_THREAD_NICE, start_io_threads
from dist_llm_train.runtime.metrics import PrometheusExporter, setup_logging
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
    decode_payload,
)
from dist_llm_train.runtime.security import CurveServer, load_keypair
from dist_llm_train.runtime.state import (
    has_checkpoint,
    load_controller_checkpoint,
    restore_stats,
    save_controller_checkpoint,
)
from dist_llm_train.runtime.transport import Inbound, make_router, router_recv, router_send
from dist_llm_train.scheduling import (
    CapabilityTracker,
    Clock,
    Lease,
    LeaseTable,
    MonotonicClock,
    Task,
    TaskPool,
    WorkerInfo,
    build_failure_detector,
    build_scheduler,
)
from dist_llm_train.telemetry import MetricsWriter
from dist_llm_train.training.device import resolve_device
from dist_llm_train.training.evaluation import EvalResult, evaluate

__all__ = [
    "PULL_CODECS",
    "Controller",
    "ControllerCore",
    "ControllerOptions",
    "Outgoing",
    "WorkerRecord",
    "run_config_payload",
]

log = logging.getLogger("dist_llm_train.controller")

PULL_CODECS = ("none", "fp16", "bf16", "int8")
"""``--pull-codec``: ``none`` sends full fp32 parameters on every pull (exact); ``fp16``/``bf16`` send full
parameters in 16 bits, and deltas from the version a worker holds in the same format; ``int8`` sends full
parameters in fp32 and deltas in int8 (4x smaller than fp32 deltas, with error ``Δ²/12`` per value)."""

# How long a task request may wait on the controller (sync barrier, nothing to hand out) before it is
# answered NO_TASK: well below any worker's reply timeout, so a parked worker never thinks it was lost.
_PARK_S = 1.0
# Retry hint in NO_TASK replies.
_RETRY_S = 0.05
# A step wait parks the worker's TASK_REQUEST; it must end well before the worker's reply timeout (30 s by
# default) or the worker would take the silence for a lost controller.
_STEP_WAIT_CAP_S = 10.0
# Protocol errors logged per code before logging only every 100th (a flood must not fill the disk).
_LOG_FIRST = 20
_MAX_UNREGISTERED_CONTACTS = 4096


def run_config_payload(cfg: RunConfig, data_fingerprint: str, numel: int, shapes: dict[str, Any]) -> str:
    """The ``config_json`` of REGISTER_OK: the run config plus what a worker must reproduce exactly.

    ``{"run_config": <RunConfig as JSON>, "data_fingerprint": ..., "numel": ..., "model_shapes": ...}``:
    the worker prepares the data from ``run_config`` and refuses to work when its fingerprint or its model's
    parameter count differs (it would compute updates for another dataset or model).
    """
    return json.dumps(
        {
            "run_config": cfg.model_dump(mode="json"),
            "data_fingerprint": data_fingerprint,
            "numel": numel,
            "model_shapes": shapes,
        },
        separators=(",", ":"),
    )


@dataclass
class Outgoing:
    """A reply the core wants sent: to ``routing_id`` (worker ``worker_id``), ``message`` + payload."""

    routing_id: bytes
    worker_id: str | None
    message: Message
    payload: Encoded | Sequence[Any] = ()


@dataclass
class WorkerRecord:
    """What the controller knows about one registered worker (its capabilities and its traffic)."""

    worker_id: str
    routing_id: bytes
    name: str
    device: str
    memory_bytes: int | None
    link_mbps: float | None
    capacity: int
    reported_throughput: float | None
    registered_at: float
    byzantine: bool = False
    bytes_up: int = 0
    bytes_down: int = 0
    pushes: int = 0
    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    excluded: int = 0
    tasks: int = 0
    pulls_full: int = 0
    pulls_delta: int = 0
    last_loss: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id,
            "name": self.name,
            "device": self.device,
            "memory_bytes": self.memory_bytes,
            "capacity": self.capacity,
            "throughput": self.reported_throughput,
            "byzantine": self.byzantine,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "pushes": self.pushes,
            "accepted": self.accepted,
            "rejected": dict(self.rejected),
            "excluded": self.excluded,
            "tasks": self.tasks,
            "pulls_full": self.pulls_full,
            "pulls_delta": self.pulls_delta,
            "last_loss": self.last_loss,
        }


@dataclass
class _Waiter:
    """A parked TASK_REQUEST: answered when a task frees up (or with NO_TASK at ``deadline``)."""

    routing_id: bytes
    request: TaskRequest
    deadline: float

    @property
    def ref(self) -> int:
        return self.request.id


EventSink = Callable[..., None]


def _no_events(event: str, **fields: Any) -> None:
    del event, fields


class ControllerCore:
    """The controller's decisions, socket-free (see the module docstring).

    Args:
        cfg: the run config (sync mode, aggregation, compression, scheduling timeouts, max_steps, ...).
        data: the prepared data (shards become tasks; its fingerprint is sent to workers).
        initial_params: the flat initial parameters (from the seeded model).
        model_shapes: the resolved architecture, sent to workers and stored in checkpoints.
        clock: the only source of time (``MonotonicClock`` in the process, ``ManualClock`` in tests).
        emit: ``emit(event, **fields)`` receives structured events (registrations, leases, pushes,
            evictions); the process writes them to ``metrics.jsonl``.
        roles: ground truth for experiments, ``worker_id -> "byzantine" | "honest"``; used only to count how
            many Byzantine updates the defences filtered, never for a decision.
        pull_codec: one of :data:`PULL_CODECS`.

    ``cfg.cluster.workers`` is the number of workers the run expects: the sync quorum (when unset) and the
    population of worker-level DP are computed from it, not from who happens to be registered.
    """

    def __init__(
        self,
        cfg: RunConfig,
        *,
        data: PreparedData,
        initial_params: torch.Tensor,
        model_shapes: dict[str, Any],
        clock: Clock,
        emit: EventSink = _no_events,
        roles: Mapping[str, str] | None = None,
        pull_codec: str = "none",
    ) -> None:
        if pull_codec not in PULL_CODECS:
            raise ConfigError(f"pull codec {pull_codec!r} is not one of {', '.join(PULL_CODECS)}")
        self.cfg = cfg
        self.data = data
        self.clock = clock
        self.emit = emit
        self.roles = dict(roles or {})
        self.pull_codec = pull_codec
        self.model_shapes = model_shapes
        self.block_size = int(model_shapes["block_size"])
        self.numel = int(initial_params.numel())
        self.max_steps = cfg.training.max_steps
        self.limits = Limits.for_params(self.numel)
        self.server: ParameterServer = build_server(cfg, initial_params, total_steps=self.max_steps)
        n_expected = cfg.cluster.workers
        self.coordinator: Coordinator = build_coordinator(
            cfg, self.server, n_workers=n_expected, total_steps=self.max_steps
        )
        # Fail at start, not at the first aggregation, when the rule cannot take the configured buffer.
        self.coordinator.aggregator.preconditions(updates_per_step(cfg, n_expected))
        self.sync_like = cfg.sync.mode in ("sync", "local-sgd")
        tc, sc = cfg.training, cfg.scheduling
        steps = cfg.sync.steps_per_update(tc.grad_accum_steps)
        self.micro_batches = tc.grad_accum_steps
        self.tokens_per_task = steps * tc.batch_size * self.block_size
        shard_tokens = sum(s.n_tokens for s in data.shards) / max(1, len(data.shards))
        # The tracker and the cost model count shard tokens per second; workers report trained tokens/s.
        self._shard_per_trained = shard_tokens / self.tokens_per_task
        self.leases = LeaseTable(sc.lease_s, clock)
        self.tracker = CapabilityTracker(default_throughput=2000.0 * self._shard_per_trained)
        scheduler = build_scheduler(
            sc.scheduler,
            tracker=self.tracker,
            transfer_bytes=8 * self.numel,
            default_throughput=2000.0 * self._shard_per_trained,
        )
        self.pool = TaskPool(scheduler, self.leases, tracker=self.tracker)
        self.detector = build_failure_detector(sc, clock)
        self.config_json = run_config_payload(cfg, data.fingerprint, self.numel, model_shapes)

        self.workers: dict[str, WorkerRecord] = {}
        self.protocol_errors: Counter[str] = Counter()
        self.runtime_rejected: Counter[str] = Counter()
        self.lease_refusals: Counter[str] = Counter()
        self.evictions: Counter[str] = Counter()
        self.excluded_by_worker: Counter[str] = Counter()
        self.requeued = 0
        self.passes = 0
        self.next_task_id = 0
        self.straggler_timeouts = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.bytes_by_worker: dict[str, list[int]] = {}
        self.train_loss_sum = 0.0
        self.train_loss_count = 0
        self.last_train_loss: float | None = None
        self.finished = False
        self.finish_reason = "finished"
        self._logged_errors: Counter[str] = Counter()
        self._waiters: OrderedDict[str, _Waiter] = OrderedDict()
        # Workers that may still be running though they are not registered (evicted as silent, or heard
        # from since): they get SHUTDOWN too at the end, or they would keep trying to re-register.
        self._unregistered_contacts: OrderedDict[str, bytes] = OrderedDict()
        self._contributed: dict[str, int] = {}
        # sync.step_wait: worker -> (version it waits to see retired, deadline of the wait).
        self._step_waiting: dict[str, tuple[int, float]] = {}
        self.step_waits = 0
        self.step_wait_timeouts = 0
        self._round_started = clock.now()
        # scheduling.min_workers: no task until that many workers are registered with this process. Not
        # checkpointed on purpose: after --resume the cluster assembles again before training goes on.
        self.assembled = sc.min_workers <= 1
        self._dirty = False
        self._full_cache: tuple[int, Encoded] | None = None
        self._delta_cache: dict[int, Encoded] = {}
        self._delta_cache_version = -1

    # ------------------------------------------------------------------ state
    @property
    def version(self) -> int:
        return self.server.version

    def state_dict(self) -> dict[str, Any]:
        """Progress counters for the checkpoint (the server's tensors are saved separately)."""
        return {
            "coordinator": self.coordinator.stats.as_dict(),
            "passes": self.passes,
            "next_task_id": self.next_task_id,
            "requeued": self.requeued,
            "protocol_errors": dict(self.protocol_errors),
            "runtime_rejected": dict(self.runtime_rejected),
            "lease_refusals": dict(self.lease_refusals),
            "evictions": dict(self.evictions),
            "excluded_by_worker": dict(self.excluded_by_worker),
            "straggler_timeouts": self.straggler_timeouts,
            "step_waits": self.step_waits,
            "step_wait_timeouts": self.step_wait_timeouts,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "bytes_by_worker": {k: list(v) for k, v in self.bytes_by_worker.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the counters and the data passes of a checkpointed run (task ids are never reused)."""
        restore_stats(self.coordinator.stats, dict(state.get("coordinator") or {}))
        self.passes = int(state.get("passes", 0))
        self.next_task_id = int(state.get("next_task_id", 0))
        self.requeued = int(state.get("requeued", 0))
        self.protocol_errors = Counter(
            {str(k): int(v) for k, v in (state.get("protocol_errors") or {}).items()}
        )
        self.runtime_rejected = Counter(
            {str(k): int(v) for k, v in (state.get("runtime_rejected") or {}).items()}
        )
        self.lease_refusals = Counter(
            {str(k): int(v) for k, v in (state.get("lease_refusals") or {}).items()}
        )
        self.evictions = Counter({str(k): int(v) for k, v in (state.get("evictions") or {}).items()})
        self.excluded_by_worker = Counter(
            {str(k): int(v) for k, v in (state.get("excluded_by_worker") or {}).items()}
        )
        self.straggler_timeouts = int(state.get("straggler_timeouts", 0))
        self.step_waits = int(state.get("step_waits", 0))
        self.step_wait_timeouts = int(state.get("step_wait_timeouts", 0))
        self.bytes_up = int(state.get("bytes_up", 0))
        self.bytes_down = int(state.get("bytes_down", 0))
        self.bytes_by_worker = {
            str(k): [int(v[0]), int(v[1])] for k, v in (state.get("bytes_by_worker") or {}).items()
        }
        self._round_started = self.clock.now()

    # ------------------------------------------------------------------ accounting
    def received(self, worker_id: str | None, nbytes: int) -> None:
        """Count ``nbytes`` that arrived from ``worker_id`` (any message, valid or not)."""
        self.bytes_up += nbytes
        if worker_id is not None:
            self.bytes_by_worker.setdefault(worker_id, [0, 0])[0] += nbytes
            record = self.workers.get(worker_id)
            if record is not None:
                record.bytes_up += nbytes

    def sent(self, worker_id: str | None, nbytes: int) -> None:
        """Count ``nbytes`` the process sent to ``worker_id``."""
        self.bytes_down += nbytes
        if worker_id is not None:
            self.bytes_by_worker.setdefault(worker_id, [0, 0])[1] += nbytes
            record = self.workers.get(worker_id)
            if record is not None:
                record.bytes_down += nbytes

    # ------------------------------------------------------------------ errors
    def protocol_error(self, exc: ProtocolError) -> list[Outgoing]:
        """Count a refused message and, when its sender can be addressed, answer it with an ERROR."""
        self.protocol_errors[exc.code] += 1
        self._log_error(exc.code, exc.worker_id, exc.message)
        if exc.routing_id is None:
            return []
        return [Outgoing(exc.routing_id, exc.worker_id, exc.reply())]

    def _error(self, inbound: Inbound, code: str, message: str) -> list[Outgoing]:
        self.protocol_errors[code] += 1
        self._log_error(code, inbound.worker_id, message)
        reply = ErrorReply(ref=inbound.message.id, code=code, message=message[:500])
        return [Outgoing(inbound.routing_id, inbound.worker_id, reply)]

    def _log_error(self, code: str, worker_id: str | None, message: str) -> None:
        self._logged_errors[code] += 1
        n = self._logged_errors[code]
        if n <= _LOG_FIRST or n % 100 == 0:
            log.warning("refused message: %s from %s: %s (%d so far)", code, worker_id or "?", message, n)
            self.emit("protocol_error", code=code, worker_id=worker_id, count=n)

    # ------------------------------------------------------------------ dispatch
    def handle(self, inbound: Inbound) -> list[Outgoing]:
        """Process one validated message; returns the replies (several when a step unblocks waiters)."""
        msg = inbound.message
        self.received(inbound.worker_id, inbound.nbytes)
        try:
            if self.finished:
                # Every message after the end gets SHUTDOWN: a worker that missed the first one (its
                # connection was being re-established) hears it at its next heartbeat.
                if isinstance(msg, Leave):
                    return []
                return [self._to(inbound, Shutdown(ref=msg.id, reason=self.finish_reason))]
            if isinstance(msg, Register):
                return self._on_register(inbound, msg)
            record = self.workers.get(inbound.worker_id)
            if record is None:
                if not isinstance(msg, Leave):
                    self._remember_unregistered(inbound.worker_id, inbound.routing_id)
                if isinstance(msg, Heartbeat):
                    return [
                        self._to(inbound, HeartbeatAck(ref=msg.id, version=self.version, registered=False))
                    ]
                if isinstance(msg, Leave):
                    return []
                return self._error(
                    inbound,
                    "not-registered",
                    "this worker is not registered (evicted, or the controller "
                    "restarted): send REGISTER first",
                )
            # Any message proves the worker alive; ROUTER_HANDOVER may have moved it to a new connection.
            record.routing_id = inbound.routing_id
            self.detector.heartbeat(record.worker_id)
            if isinstance(msg, Heartbeat):
                return self._on_heartbeat(inbound, record, msg)
            if isinstance(msg, TaskRequest):
                return self._on_task_request(inbound, record, msg)
            if isinstance(msg, Pull):
                return self._on_pull(inbound, record, msg)
            if isinstance(msg, Push):
                return self._on_push(inbound, record, msg)
            if isinstance(msg, Leave):
                self._evict(record.worker_id, "leave", detail=msg.reason)
                return []
            return self._error(
                inbound, "unexpected-type", f"a controller does not accept {msg.TYPE.value} messages"
            )
        except UserError as exc:
            # A precondition the message violated deeper down (e.g. a forged update that breaks the rule).
            return self._error(inbound, "rejected", str(exc))
        except Exception as exc:  # a defect must cost one message, never the controller
            log.exception("internal error while handling %s from %s", msg.TYPE.value, inbound.worker_id)
            return self._error(
                inbound, "internal", f"internal error ({type(exc).__name__}); see controller log"
            )

    def _to(self, inbound: Inbound, message: Message, payload: Encoded | Sequence[Any] = ()) -> Outgoing:
        return Outgoing(inbound.routing_id, inbound.worker_id, message, payload)

    # ------------------------------------------------------------------ registration and liveness
    def _on_register(self, inbound: Inbound, msg: Register) -> list[Outgoing]:
        wid = inbound.worker_id
        if wid in self.workers:
            # A known worker registering again restarted (or lost us): its old leases can never complete.
            self._evict(wid, "re-register")
        now = self.clock.now()
        record = WorkerRecord(
            worker_id=wid,
            routing_id=inbound.routing_id,
            name=msg.name,
            device=msg.device,
            memory_bytes=msg.memory_bytes,
            link_mbps=msg.link_mbps,
            capacity=msg.capacity,
            reported_throughput=msg.throughput,
            registered_at=now,
            byzantine=self.roles.get(wid) == "byzantine",
        )
        self.workers[wid] = record
        self.detector.heartbeat(wid)
        self.emit(
            "register",
            worker_id=wid,
            name=msg.name,
            device=msg.device,
            memory_bytes=msg.memory_bytes,
            throughput=msg.throughput,
            capacity=msg.capacity,
            software=msg.software,
            version=self.version,
        )
        log.info("worker %s (%s, %s) registered", wid, msg.name, msg.device)
        self._open_when_assembled()
        sc = self.cfg.scheduling
        ok = RegisterOk(
            ref=msg.id,
            worker_id=wid,
            version=self.version,
            heartbeat_interval_s=sc.heartbeat_interval_s,
            lease_s=sc.lease_s,
            config_json=self.config_json,
        )
        return [self._to(inbound, ok)]

    def _open_when_assembled(self) -> None:
        min_workers = self.cfg.scheduling.min_workers
        if self.assembled or len(self.workers) < min_workers:
            return
        self.assembled = True
        self._dirty = True
        self._round_started = self.clock.now()  # a sync round starts now, not while the cluster gathered
        self.emit("assembled", workers=len(self.workers), min_workers=min_workers, version=self.version)
        log.info("%d workers registered (min_workers %d): handing out tasks", len(self.workers), min_workers)

    def _on_heartbeat(self, inbound: Inbound, record: WorkerRecord, msg: Heartbeat) -> list[Outgoing]:
        # Renew only the leases the worker says it still works on: a task it abandoned then expires and
        # is requeued, instead of being kept alive by the worker's other heartbeats.
        for lease_id in msg.lease_ids:
            self.leases.renew(lease_id, record.worker_id)
        if msg.throughput is not None:
            record.reported_throughput = msg.throughput
        return [self._to(inbound, HeartbeatAck(ref=msg.id, version=self.version))]

    def _remember_unregistered(self, worker_id: str, routing_id: bytes) -> None:
        self._unregistered_contacts[worker_id] = routing_id
        self._unregistered_contacts.move_to_end(worker_id)
        while len(self._unregistered_contacts) > _MAX_UNREGISTERED_CONTACTS:
            self._unregistered_contacts.popitem(last=False)

    def _evict(self, worker_id: str, reason: str, *, detail: str = "") -> None:
        record = self.workers.get(worker_id)
        if record is not None and reason == "silent":
            # Silent is not dead: on a loaded host a live worker can miss the failure timeout.
            self._remember_unregistered(worker_id, record.routing_id)
        self.detector.remove(worker_id)
        self.coordinator.forget(worker_id)
        tasks = self.pool.release_worker(worker_id)
        self.requeued += len(tasks)
        for task in tasks:
            self.emit("lease", kind="release", task_id=task.task_id, worker_id=worker_id, reason=reason)
        self.tracker.forget(worker_id)
        self.workers.pop(worker_id, None)
        self._waiters.pop(worker_id, None)
        self._contributed.pop(worker_id, None)
        self._step_waiting.pop(worker_id, None)
        self.evictions[reason] += 1
        self._dirty = True
        self.emit("evict", worker_id=worker_id, reason=reason, detail=detail, requeued=len(tasks))
        log.info("worker %s removed (%s), %d task(s) requeued", worker_id, reason, len(tasks))

    # ------------------------------------------------------------------ tasks
    def _refill(self) -> None:
        if self.pool.pending:
            return
        # A new pass over the shards in a fresh seeded order, with task ids never used before (a late
        # result from an earlier pass can never be credited to this one). The order depends only on the
        # pass number, so a resumed run continues the same sequence.
        rng = np.random.default_rng(np.random.SeedSequence([self.cfg.training.seed, 0x5EED, self.passes]))
        tasks = []
        for i in rng.permutation(len(self.data.shards)):
            shard = self.data.shards[int(i)]
            tasks.append(Task.from_shard(shard, task_id=self.next_task_id, micro_batches=self.micro_batches))
            self.next_task_id += 1
        self.pool.add(tasks)
        self.passes += 1

    def _expire(self) -> None:
        tasks = self.pool.expire()
        self.requeued += len(tasks)
        for task in tasks:
            self.emit("lease", kind="expire", task_id=task.task_id)
        if tasks:
            self._dirty = True

    def _worker_info(self, record: WorkerRecord) -> WorkerInfo:
        throughput = record.reported_throughput
        return WorkerInfo(
            worker_id=record.worker_id,
            capacity=record.capacity,
            memory_bytes=record.memory_bytes,
            link_mbps=record.link_mbps,
            throughput=None if throughput is None else throughput * self._shard_per_trained,
        )

    def _blocked(self, worker_id: str) -> bool:
        """Whether a worker's task request waits for the next version.

        Sync modes: its update is in the current round. Async with ``sync.step_wait``: it waits, until the
        wait's deadline, for the step the workers still computing are about to complete.
        """
        if self.sync_like:
            return self._contributed.get(worker_id) == self.version
        waiting = self._step_waiting.get(worker_id)
        return waiting is not None and waiting[0] == self.version and self.clock.now() < waiting[1]

    def _start_step_wait(self, worker_id: str) -> float:
        """Park a request for an imminent step when the coordinator says so; returns the wait (0: none)."""
        wait = self.coordinator.step_wait_s(self.tracker.mean_duration(worker_id), len(self.leases))
        wait = min(wait, _STEP_WAIT_CAP_S)
        if wait > 0.0:
            self._step_waiting[worker_id] = (self.version, self.clock.now() + wait)
            self.step_waits += 1
        return wait

    def _end_step_waits(self) -> None:
        """Forget waits the step ended; a wait that ran out lets its worker be served at the old version."""
        now = self.clock.now()
        for wid, (version, deadline) in list(self._step_waiting.items()):
            if version != self.version:
                del self._step_waiting[wid]
            elif now >= deadline:
                del self._step_waiting[wid]
                self.step_wait_timeouts += 1
                self._dirty = True

    def _assign(self, worker_ids: Sequence[str]) -> dict[str, list[Lease]]:
        self._expire()
        self._refill()
        infos = [self._worker_info(self.workers[w]) for w in worker_ids]
        granted: dict[str, list[Lease]] = {}
        for lease in self.pool.schedule(infos):
            granted.setdefault(lease.worker_id, []).append(lease)
            self.emit(
                "lease",
                kind="grant",
                task_id=lease.task.task_id,
                lease_id=lease.lease_id,
                worker_id=lease.worker_id,
            )
        return granted

    def _assign_message(self, lease: Lease, ref: int) -> TaskAssign:
        task = lease.task
        seed = int(np.random.SeedSequence([self.cfg.training.seed, task.task_id]).generate_state(1)[0] >> 1)
        return TaskAssign(
            ref=ref,
            lease_id=lease.lease_id,
            task_id=task.task_id,
            shard_id=task.shard_id,
            start=task.start,
            end=task.end,
            micro_batches=task.micro_batches,
            batch_seed=seed,
            lease_s=lease.duration_s,
            version=self.version,
        )

    def _on_task_request(self, inbound: Inbound, record: WorkerRecord, msg: TaskRequest) -> list[Outgoing]:
        wid = record.worker_id
        if self.finished or self.version >= self.max_steps:
            return [self._to(inbound, Shutdown(ref=msg.id, reason="finished"))]
        if self.leases.active_count(wid) >= record.capacity:
            # A worker only asks when idle: leases it still holds are abandoned (it timed out on a reply).
            tasks = self.pool.release_worker(wid)
            self.requeued += len(tasks)
            for task in tasks:
                self.emit("lease", kind="release", task_id=task.task_id, worker_id=wid, reason="abandoned")
        wait = self._start_step_wait(wid)
        if self.assembled and not self._blocked(wid):
            granted = self._assign([wid]).get(wid)
            if granted:
                return self._grant(record, inbound.routing_id, msg, granted)
        self._waiters[wid] = _Waiter(inbound.routing_id, msg, self.clock.now() + max(_PARK_S, wait))
        return []

    def _grant(
        self, record: WorkerRecord, routing_id: bytes, request: TaskRequest, leases: list[Lease]
    ) -> list[Outgoing]:
        """TASK_ASSIGN per lease, then the parameters when the request asked for them and needs them."""
        record.tasks += len(leases)
        wid = record.worker_id
        out = [Outgoing(routing_id, wid, self._assign_message(lease, request.id)) for lease in leases]
        if request.pull and request.have_version != self.version:
            reply, payload = self._params_reply(record, request.id, request.have_version)
            out.append(Outgoing(routing_id, wid, reply, payload))
        return out

    def _serve_waiters(self) -> list[Outgoing]:
        out: list[Outgoing] = []
        self._end_step_waits()
        if not self._waiters:
            return out
        if self.finished or self.version >= self.max_steps:
            for wid, waiter in self._waiters.items():
                out.append(Outgoing(waiter.routing_id, wid, Shutdown(ref=waiter.ref, reason="finished")))
            self._waiters.clear()
            return out
        now = self.clock.now()
        ready = (
            [w for w in self._waiters if w in self.workers and not self._blocked(w)] if self.assembled else []
        )
        granted = self._assign(ready) if ready and self._dirty else {}
        for wid in list(self._waiters):
            waiter = self._waiters[wid]
            leases = granted.get(wid)
            if leases:
                out.extend(self._grant(self.workers[wid], waiter.routing_id, waiter.request, leases))
                del self._waiters[wid]
            elif now >= waiter.deadline or wid not in self.workers:
                reason = (
                    "assembling" if not self.assembled else "barrier" if self._blocked(wid) else "no-task"
                )
                out.append(
                    Outgoing(
                        waiter.routing_id, wid, NoTask(ref=waiter.ref, retry_after_s=_RETRY_S, reason=reason)
                    )
                )
                del self._waiters[wid]
        return out

    # ------------------------------------------------------------------ parameters
    def _full_payload(self) -> Encoded:
        version = self.version
        if self._full_cache is None or self._full_cache[0] != version:
            # The server's stored copy of this version, not a fresh clone: the server never writes to it, and
            # an evicted version lives on for as long as a frame still being sent refers to it. Every worker
            # pulling this version shares this one zero-copy payload.
            params = self.server.stored()
            assert params is not None
            if self.pull_codec in ("fp16", "bf16"):
                payload = build_codec(self.pull_codec).encode(params)
            else:
                # Finite by construction (the server refuses non-finite updates): no check on every pull.
                payload = NoneCodec.wrap(params.reshape(-1))
            self._full_cache = (version, payload)
        return self._full_cache[1]

    def _delta_payload(self, have: int) -> Encoded | None:
        if self.pull_codec == "none" or have >= self.version:
            return None
        if self._delta_cache_version != self.version:
            self._delta_cache.clear()
            self._delta_cache_version = self.version
        cached = self._delta_cache.get(have)
        if cached is None:
            delta = self.server.delta_since(have)
            if delta is None:
                return None
            cached = build_codec(self.pull_codec).encode(delta)
            self._delta_cache[have] = cached
        return cached

    def _params_reply(
        self, record: WorkerRecord, ref: int, have_version: int | None
    ) -> tuple[Params, Encoded]:
        """PARAMS for a worker holding ``have_version``: a delta from it where the pull codec allows."""
        payload = None if have_version is None else self._delta_payload(have_version)
        if payload is not None:
            record.pulls_delta += 1
            return Params(ref=ref, version=self.version, base_version=have_version, numel=self.numel), payload
        record.pulls_full += 1
        return Params(ref=ref, version=self.version, numel=self.numel), self._full_payload()

    def _on_pull(self, inbound: Inbound, record: WorkerRecord, msg: Pull) -> list[Outgoing]:
        reply, payload = self._params_reply(record, msg.id, msg.have_version)
        return [self._to(inbound, reply, payload)]

    # ------------------------------------------------------------------ updates
    def _ack(
        self, inbound: Inbound, msg: Push, accepted: bool, reason: str | None, staleness: int
    ) -> Outgoing:
        ack = PushAck(
            ref=msg.id, accepted=accepted, reason=reason, staleness=max(0, staleness), version=self.version
        )
        return self._to(inbound, ack)

    def _on_push(self, inbound: Inbound, record: WorkerRecord, msg: Push) -> list[Outgoing]:
        wid = record.worker_id
        record.pushes += 1
        staleness = self.version - msg.base_version
        lease = self.leases.get(msg.lease_id)
        seconds = None if lease is None else self.clock.now() - lease.granted_at
        # Measured here, not taken from the worker: a worker cannot buy itself more tasks by lying.
        result = self.pool.complete(msg.lease_id, wid, seconds=seconds if seconds and seconds > 0 else None)
        if not result.accepted:
            assert result.reason is not None
            reason = f"lease-{result.reason}"
            self.lease_refusals[result.reason] += 1
            record.rejected[reason] += 1
            task_id = result.task.task_id if result.task is not None else msg.task_id
            self.emit(
                "lease",
                kind=f"refused-{result.reason}",
                task_id=task_id,
                lease_id=msg.lease_id,
                worker_id=wid,
            )
            return [self._ack(inbound, msg, False, reason, staleness), *self._serve_waiters()]
        task = result.lease.task if result.lease is not None else None
        self.emit(
            "lease", kind="complete", task_id=msg.task_id if task is None else task.task_id, worker_id=wid
        )
        if self.version >= self.max_steps:
            return [self._ack(inbound, msg, False, "finished", staleness)]
        try:
            encoded = decode_payload(inbound.frames)
        except ProtocolError as exc:
            exc.routing_id, exc.worker_id, exc.ref = inbound.routing_id, wid, msg.id
            record.rejected["bad-payload"] += 1
            return self.protocol_error(exc)
        if encoded.numel > self.numel:
            # Refused before decoding: a forged shape must never make the controller allocate.
            self.runtime_rejected["wrong-shape"] += 1
            record.rejected["wrong-shape"] += 1
            self.emit("push", worker_id=wid, accepted=False, reason="wrong-shape", staleness=staleness)
            return [self._ack(inbound, msg, False, "wrong-shape", staleness)]
        # An uncompressed update is used in place (a read-only view of the frame): the coordinator and
        # the aggregators only read their inputs.
        vector = decode_view(encoded)
        # Tokens come from the task, never from the worker's claim (it only feeds the statistics anyway).
        tokens = self.tokens_per_task
        outcome = self.coordinator.submit(
            Update(
                worker_id=wid,
                base_version=msg.base_version,
                vector=vector,
                tokens=tokens,
                task_id=msg.task_id,
                wire_bytes=inbound.nbytes,
                byzantine=record.byzantine,
            )
        )
        if outcome.accepted:
            record.accepted += 1
            if math.isfinite(msg.loss):
                record.last_loss = msg.loss
                self.train_loss_sum += msg.loss
                self.train_loss_count += 1
            if self.sync_like and outcome.step is None:
                self._contributed[wid] = self.version
        else:
            assert outcome.reason is not None
            record.rejected[outcome.reason] += 1
        self.emit(
            "push",
            worker_id=wid,
            accepted=outcome.accepted,
            reason=outcome.reason,
            staleness=outcome.staleness,
            base_version=msg.base_version,
            version=self.version,
            wire_bytes=inbound.nbytes,
            loss=msg.loss,
            compute_s=msg.compute_s,
        )
        out = [self._ack(inbound, msg, outcome.accepted, outcome.reason, outcome.staleness)]
        if outcome.step is not None:
            self._after_step(outcome.step)
        self._dirty = True
        out.extend(self._serve_waiters())
        return out

    def _after_step(self, report: StepReport) -> None:
        if report.noop:
            return
        for wid in report.excluded:
            self.excluded_by_worker[wid] += 1
            record = self.workers.get(wid)
            if record is not None:
                record.excluded += 1
        self._round_started = self.clock.now()
        self._dirty = True
        if self.train_loss_count:
            self.last_train_loss = self.train_loss_sum / self.train_loss_count

    def take_train_loss(self) -> float | None:
        """Mean training loss of the accepted updates since the last call (``None`` if none arrived)."""
        if not self.train_loss_count:
            return None
        mean = self.train_loss_sum / self.train_loss_count
        self.train_loss_sum, self.train_loss_count = 0.0, 0
        return mean

    # ------------------------------------------------------------------ periodic duties
    def tick(self) -> list[Outgoing]:
        """Evict silent workers, expire leases, run the straggler timeout, answer parked requests."""
        for wid in self.detector.suspects():
            self._evict(wid, "silent")
        self._expire()
        self._straggler_timeout()
        out = self._serve_waiters()
        self._dirty = False
        return out

    def _straggler_timeout(self) -> None:
        timeout = self.cfg.sync.straggler_timeout_s
        if (
            not self.sync_like
            or not self.assembled
            or timeout is None
            or self.clock.now() - self._round_started < timeout
        ):
            return
        coordinator = self.coordinator
        self.straggler_timeouts += 1
        self._round_started = self.clock.now()
        if coordinator.buffered == 0:
            coordinator.step()  # a reported no-op: nobody arrived this round
            return
        try:
            coordinator.aggregator.preconditions(coordinator.buffered)
        except PreconditionError:
            return  # too few updates for the rule's bound yet: wait another period
        self._after_step(coordinator.step())

    def reachable_workers(self) -> set[str]:
        """Registered workers and those that may still run unregistered: whom SHUTDOWN must reach."""
        return set(self.workers) | set(self._unregistered_contacts)

    def finish(self, reason: str) -> list[Outgoing]:
        """Stop handing out work: SHUTDOWN to every registered worker (and every parked request)."""
        self.finished = True
        self.finish_reason = reason
        out = []
        for record in self.workers.values():
            waiter = self._waiters.get(record.worker_id)
            ref = None if waiter is None else waiter.ref
            out.append(Outgoing(record.routing_id, record.worker_id, Shutdown(ref=ref, reason=reason)))
        for worker_id, routing_id in self._unregistered_contacts.items():
            if worker_id not in self.workers:
                out.append(Outgoing(routing_id, worker_id, Shutdown(reason=reason)))
        self._waiters.clear()
        return out

    # ------------------------------------------------------------------ reporting
    def snapshot(self) -> dict[str, Any]:
        """Everything the metrics file, the Prometheus endpoint and the ``metrics`` command report."""
        stats = self.coordinator.stats
        rejected = Counter(stats.rejected)
        rejected.update(self.runtime_rejected)
        rejected.update({f"lease-{k}": v for k, v in self.lease_refusals.items()})
        workers = {}
        for wid, (up, down) in self.bytes_by_worker.items():
            record = self.workers.get(wid)
            entry: dict[str, Any] = record.as_dict() if record is not None else {"worker_id": wid}
            entry.update(
                bytes_up=up,
                bytes_down=down,
                registered=record is not None,
                accepted=stats.accepted_by_worker.get(wid, 0),
                rejected_total=stats.rejected_by_worker.get(wid, 0),
                excluded=self.excluded_by_worker.get(wid, 0),
                byzantine=self.roles.get(wid) == "byzantine",
            )
            workers[wid] = entry
        ls = self.leases.stats
        return {
            "version": self.version,
            "max_steps": self.max_steps,
            "mode": self.cfg.sync.mode,
            "codec": self.cfg.compression.codec,
            "aggregator": self.cfg.aggregation.rule,
            "numel": self.numel,
            "workers_registered": len(self.workers),
            "assembled": self.assembled,
            "coordinator": stats.as_dict(),
            "rejected": dict(rejected),
            "protocol_errors": dict(self.protocol_errors),
            "lease_refusals": dict(self.lease_refusals),
            "leases": {
                "grants": ls.grants,
                "completions": ls.completions,
                "renewals": ls.renewals,
                "expiries": ls.expiries,
                "releases": ls.releases,
                "requeued": self.requeued,
                "passes": self.passes,
            },
            "evictions": dict(self.evictions),
            "straggler_timeouts": self.straggler_timeouts,
            "step_waits": {"parked": self.step_waits, "timed_out": self.step_wait_timeouts},
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "workers": workers,
            "train_loss": self.last_train_loss,
        }


# ====================================================================== the process
@dataclass
class ControllerOptions:
    """How the controller process runs (the CLI's options).

    ``bind``: ZeroMQ endpoint, e.g. ``tcp://0.0.0.0:5555``; a ``*`` or ``0`` port picks a free one (the
    chosen endpoint is written to ``RUN_DIR/controller.json``). ``keys_dir``: directory with
    ``controller.key_secret``; ``allow_dir``: the allow-list of worker public keys; ``insecure``: plaintext
    instead (trusted networks only). ``metrics_port``: serve Prometheus metrics on ``metrics_addr``.
    ``time_limit_s``: stop (gracefully, with a checkpoint) after this many seconds of serving.
    ``roles``: ground-truth roles for experiments (see :class:`ControllerCore`). ``poll_s``: the poll
    timeout of the loop: the longest the periodic duties wait (eviction, lease expiry); lower it for
    sub-second failure timeouts. ``io_nice``: how far below the loop's priority libzmq's I/O threads run
    (see :mod:`~dist_llm_train.runtime.io_threads`; 0 leaves them as they start).
    """

    bind: str = "tcp://127.0.0.1:5555"
    run_dir: Path | None = None
    keys_dir: Path | None = None
    allow_dir: Path | None = None
    insecure: bool = False
    resume: bool = False
    metrics_port: int | None = None
    metrics_addr: str = "127.0.0.1"
    pull_codec: str = "none"
    time_limit_s: float | None = None
    roles: dict[str, str] = field(default_factory=dict)
    poll_s: float = 0.05
    stats_interval_s: float = 2.0
    checkpoint_keep: int = 2
    io_nice: int = IO_THREAD_NICE


class _Evaluator:
    """Validation loss in a helper thread, on a snapshot of the parameters, one evaluation at a time."""

    def __init__(
        self, model: LanguageModel, data: PreparedData, cfg: RunConfig, device: torch.device
    ) -> None:
        self.model = model
        self.data = data
        self.cfg = cfg
        self.device = device
        self._thread: threading.Thread | None = None
        self._result: tuple[int, EvalResult] | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    def run_now(self, params: torch.Tensor) -> EvalResult:
        tc = self.cfg.training
        load_flat_params(self.model, params)
        return evaluate(
            self.model,
            self.data.val,
            batch_size=tc.batch_size,
            n_batches=tc.eval_batches,
            device=self.device,
            byte_level=self.data.tokenizer.is_byte_level,
        )

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, version: int, params: torch.Tensor) -> bool:
        if self.busy:
            return False

        def work() -> None:
            try:
                result = self.run_now(params)
            except BaseException as exc:  # reported to the main thread, which logs it
                with self._lock:
                    self._error = exc
                return
            with self._lock:
                self._result = (version, result)

        self._thread = threading.Thread(target=work, name="controller-eval", daemon=True)
        self._thread.start()
        return True

    def take(self) -> tuple[int, EvalResult] | None:
        with self._lock:
            result, self._result = self._result, None
            error, self._error = self._error, None
        if error is not None:
            log.error("evaluation failed: %r", error)
        return result

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()


class Controller:
    """The controller process (see the module docstring). ``run()`` returns the process exit code."""

    def __init__(self, cfg: RunConfig, options: ControllerOptions, *, clock: Clock | None = None) -> None:
        self.cfg = cfg
        self.options = options
        self.clock = clock or MonotonicClock()
        if options.insecure == (options.keys_dir is not None):
            raise ConfigError(
                "the controller needs either --keys DIR and --allow DIR (CurveZMQ) or --insecure (plaintext "
                "on a trusted network), not both and not neither"
            )
        if options.keys_dir is not None and options.allow_dir is None:
            raise ConfigError("--keys needs --allow DIR: the directory of worker public keys to admit")
        self.run_dir = Path(options.run_dir or cfg.training.run_dir or f"runs/{cfg.name}-controller")
        if options.resume and not has_checkpoint(self.run_dir):
            raise UserError(f"--resume: {self.run_dir} holds no checkpoint (checkpoints/latest is missing)")
        if not options.resume and has_checkpoint(self.run_dir):
            raise UserError(
                f"run directory {self.run_dir} already holds a checkpoint: pass --resume to continue it, or "
                "choose another --run-dir"
            )
        self._stop_reason: str | None = None
        self._started = self.clock.now()
        self._session: dict[str, int] = {}
        self.endpoint: str | None = None

    # ------------------------------------------------------------------ signals
    def request_stop(self, reason: str = "stopped") -> None:
        """Ask the loop to stop gracefully at its next iteration (safe from a signal handler)."""
        if self._stop_reason is None:
            self._stop_reason = reason

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        del frame
        self.request_stop(signal.Signals(signum).name)

    # ------------------------------------------------------------------ run
    def run(self) -> int:
        cfg, opts = self.cfg, self.options
        tc = cfg.training
        self.run_dir.mkdir(parents=True, exist_ok=True)
        setup_logging(self.run_dir / "controller.log", "dist_llm_train")
        retain_freed_buffers()  # every push arrives in a fresh multi-megabyte buffer (see allocator.py)
        torch.set_num_threads(tc.threads or 1)
        device = resolve_device(tc.device)
        shapes = resolve_model_shapes(cfg.model)
        data = prepare_data(cfg.data, block_size=int(shapes["block_size"]))
        torch.manual_seed(tc.seed)
        model = build_model(cfg.model, data.tokenizer.vocab_size)
        initial = flatten_params(model)
        eval_model = build_model(cfg.model, data.tokenizer.vocab_size).to(device)
        metrics = MetricsWriter(self.run_dir / "metrics.jsonl", append=opts.resume)
        core = ControllerCore(
            cfg,
            data=data,
            initial_params=initial,
            model_shapes=shapes,
            clock=self.clock,
            emit=metrics.write,
            roles=opts.roles,
            pull_codec=opts.pull_codec,
        )
        base_state = {
            "config": cfg.model_dump(mode="json"),
            "model_shapes": shapes,
            "tokenizer": data.tokenizer.to_json(),
            "data_fingerprint": data.fingerprint,
            "torch_version": torch.__version__,
        }
        resumed_from = None
        if opts.resume:
            checkpoint = load_controller_checkpoint(
                self.run_dir,
                server=core.server,
                model=model,
                model_shapes=shapes,
                data_fingerprint=data.fingerprint,
            )
            core.load_state_dict(checkpoint.controller)
            resumed_from = checkpoint.version
            metrics.write("resume", step=checkpoint.version, checkpoint=str(checkpoint.path))
            log.info("resumed from %s at version %d", checkpoint.path, checkpoint.version)
        (self.run_dir / "config.yaml").write_text(config_to_yaml(cfg), encoding="utf-8")
        data.tokenizer.save(self.run_dir / "tokenizer.json")

        context = zmq.Context()
        # Before the CurveZMQ authenticator's socket starts the context, and before the evaluator's thread.
        io_threads = start_io_threads(context, nice=opts.io_nice)
        if io_threads:
            log.info("ZeroMQ background threads %s run at nice +%d", io_threads, opts.io_nice)
        curve: CurveServer | None = None
        exporter: PrometheusExporter | None = None
        evaluator = _Evaluator(eval_model, data, cfg, device)
        previous_handlers: dict[int, Any] = {}
        sock: zmq.Socket | None = None
        try:
            if opts.keys_dir is not None:
                assert opts.allow_dir is not None
                keypair = load_keypair(Path(opts.keys_dir) / "controller.key_secret")
                curve = CurveServer(context, keypair, opts.allow_dir).start()
            sock = make_router(context, core.limits, curve=curve, insecure=opts.insecure)
            endpoint = opts.bind
            if endpoint.endswith(":0"):
                endpoint = endpoint[:-2] + ":*"
            sock.bind(endpoint)
            self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            if opts.metrics_port is not None:
                exporter = PrometheusExporter(opts.metrics_port, opts.metrics_addr)
            _write_json_atomic(
                self.run_dir / "controller.json",
                {
                    "endpoint": self.endpoint,
                    "pid": os.getpid(),
                    "secure": curve is not None,
                    "metrics_port": exporter.port if exporter is not None else None,
                    "version": core.version,
                    "numel": core.numel,
                },
            )
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(ValueError):  # not the main thread (tests): no handlers
                    previous_handlers[sig] = signal.signal(sig, self._on_signal)
            log.info(
                "controller serving on %s (%s), %s mode, %d parameters, max %d steps",
                self.endpoint,
                "curve" if curve else "INSECURE",
                cfg.sync.mode,
                core.numel,
                core.max_steps,
            )
            metrics.write(
                "start",
                endpoint=self.endpoint,
                version=core.version,
                max_steps=core.max_steps,
                numel=core.numel,
                mode=cfg.sync.mode,
                codec=cfg.compression.codec,
                aggregator=cfg.aggregation.rule,
                resumed_from=resumed_from,
            )
            reason = self._loop(sock, core, evaluator, metrics, exporter, model, base_state)
            # Final evaluation and checkpoint, then tell the workers.
            evaluator.join()
            pending = evaluator.take()
            if pending is not None:
                metrics.write("eval", step=pending[0], **pending[1].as_dict())
            final_eval = evaluator.run_now(core.server.params)
            metrics.write("eval", step=core.version, **final_eval.as_dict())
            self._checkpoint(core, model, base_state, metrics)
            told = core.reachable_workers()
            for out in core.finish(reason):
                self._send(sock, core, out)
            summary = self._summary(core, reason, final_eval)
            metrics.write("summary", **summary)
            _write_json_atomic(self.run_dir / "summary.json", summary)
            if exporter is not None:
                exporter.update({**summary, "version": core.version}, final_eval.loss)
            log.info(
                "finished (%s) at version %d, validation loss %.4f", reason, core.version, final_eval.loss
            )
            self._drain(sock, core, told)
            return 0
        finally:
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
            if sock is not None:
                # Give the SHUTDOWN messages time to leave: on a loaded machine the I/O thread needed more
                # than 0.5 s, and a worker that misses SHUTDOWN keeps trying to re-register. Sends to gone
                # peers already failed (ROUTER_MANDATORY), so only live workers' messages are waited for.
                sock.close(linger=2000)
            if curve is not None:
                curve.stop()
            if exporter is not None:
                exporter.close()
            evaluator.join()
            metrics.close()
            context.term()

    def _drain(self, sock: zmq.Socket, core: ControllerCore, workers: set[str]) -> None:
        """After the SHUTDOWN broadcast, keep answering for a few heartbeat intervals: each message gets
        SHUTDOWN back (see :meth:`ControllerCore.handle`). A broadcast SHUTDOWN can be lost (CI saw it under
        load), and a worker that never hears one keeps re-registering with a controller that is gone. Lasts
        three heartbeat intervals (at least 2 s, at most 10 s); logs the workers not heard from."""
        pending = set(workers)
        window = min(10.0, max(2.0, 3.0 * self.cfg.scheduling.heartbeat_interval_s + 0.5))
        deadline = self.clock.now() + window
        while self.clock.now() < deadline:
            try:
                inbound = router_recv(sock, core.limits, timeout_s=0.05)
            except ProtocolError:
                continue
            if inbound is None:
                continue
            for out in core.handle(inbound):
                self._send(sock, core, out)
            pending.discard(inbound.worker_id)
        if pending:
            log.info(
                "%d worker(s) did not answer after SHUTDOWN: %s", len(pending), ", ".join(sorted(pending))
            )

    def _send(self, sock: zmq.Socket, core: ControllerCore, out: Outgoing) -> None:
        try:
            sent = router_send(sock, out.routing_id, out.message, out.payload, limits=core.limits)
        except ProtocolError as exc:  # our own reply is too large for the limits: a configuration bug
            log.error("cannot send %s to %s: %s", out.message.TYPE.value, out.worker_id, exc)
            return
        if sent is not None:
            core.sent(out.worker_id, sent)
        elif isinstance(out.message, Shutdown):
            log.warning("SHUTDOWN for %s not delivered (connection gone or its queue full)", out.worker_id)

    def _loop(
        self,
        sock: zmq.Socket,
        core: ControllerCore,
        evaluator: _Evaluator,
        metrics: MetricsWriter,
        exporter: PrometheusExporter | None,
        model: LanguageModel,
        base_state: dict[str, Any],
    ) -> str:
        cfg, opts = self.cfg, self.options
        tc = cfg.training
        started = self._started = self.clock.now()
        # Where this session started: rates are computed over it, not over the steps a resume inherited.
        self._session = {
            "session_start_version": core.version,
            "session_start_tokens": core.coordinator.stats.tokens,
        }
        last_stats = started - opts.stats_interval_s
        last_logged_version = core.version
        last_log_time = started
        last_log_tokens = core.coordinator.stats.tokens
        last_eval_version = -1
        last_ckpt_version = core.version
        last_loss: float | None = None
        if core.version < core.max_steps:
            initial = core.server.snapshot()
            assert initial is not None
            evaluator.start(core.version, initial)
            last_eval_version = core.version
        while True:
            if self._stop_reason is not None:
                return f"signal-{self._stop_reason.lower()}"
            # Drain what has arrived (bounded, so duties run even under a flood), then run the duties.
            for i in range(256):
                try:
                    inbound = router_recv(sock, core.limits, timeout_s=opts.poll_s if i == 0 else 0.0)
                except ProtocolError as exc:
                    for out in core.protocol_error(exc):
                        self._send(sock, core, out)
                    continue
                if inbound is None:
                    break
                for out in core.handle(inbound):
                    self._send(sock, core, out)
                if self._stop_reason is not None:
                    break
            for out in core.tick():
                self._send(sock, core, out)
            now = self.clock.now()
            version = core.version
            done = evaluator.take()
            if done is not None:
                last_loss = done[1].loss
                metrics.write("eval", step=done[0], **done[1].as_dict())
                log.info("version %d: validation loss %.4f", done[0], done[1].loss)
            if version >= last_logged_version + self.cfg.telemetry.log_interval:
                elapsed = max(now - last_log_time, 1e-9)
                tokens = core.coordinator.stats.tokens
                metrics.write(
                    "step",
                    step=version,
                    tokens=tokens,
                    tokens_per_s=(tokens - last_log_tokens) / elapsed,
                    train_loss=core.take_train_loss(),
                    lr=core.server.current_lr(),
                    acceptance_rate=core.coordinator.stats.acceptance_rate,
                    bytes_up=core.bytes_up,
                    bytes_down=core.bytes_down,
                    workers=len(core.workers),
                    elapsed_s=now - started,
                )
                last_logged_version, last_log_time, last_log_tokens = version, now, tokens
            if (
                version // tc.eval_interval > last_eval_version // tc.eval_interval
                and version < core.max_steps
            ):
                snapshot = core.server.snapshot()
                assert snapshot is not None
                if evaluator.start(version, snapshot):
                    last_eval_version = version
            interval = tc.checkpoint_interval
            if interval and version // interval > last_ckpt_version // interval and version < core.max_steps:
                self._checkpoint(core, model, base_state, metrics)
                last_ckpt_version = version
            if now - last_stats >= opts.stats_interval_s:
                snapshot_stats = core.snapshot()
                snapshot_stats.update(elapsed_s=now - started, **self._session)
                metrics.write("stats", **snapshot_stats)
                if exporter is not None:
                    exporter.update(snapshot_stats, last_loss)
                last_stats = now
            if version >= core.max_steps:
                return "max-steps"
            if opts.time_limit_s is not None and now - started >= opts.time_limit_s:
                return "time-limit"

    def _checkpoint(
        self, core: ControllerCore, model: LanguageModel, base_state: dict[str, Any], metrics: MetricsWriter
    ) -> None:
        path = save_controller_checkpoint(
            self.run_dir,
            server=core.server,
            model=model,
            state=base_state,
            controller=core.state_dict(),
            keep=self.options.checkpoint_keep,
        )
        metrics.write("checkpoint", step=core.version, path=str(path))
        log.info("checkpoint %s", path)

    def _summary(self, core: ControllerCore, reason: str, final_eval: EvalResult) -> dict[str, Any]:
        snap = core.snapshot()
        return {
            "stop_reason": reason,
            "elapsed_s": self.clock.now() - self._started,
            **self._session,
            "steps": core.version,
            "final_val_loss": final_eval.loss,
            "final_val_perplexity": final_eval.perplexity,
            "final_val_bits_per_byte": final_eval.bits_per_byte,
            **{k: v for k, v in snap.items() if k not in ("version",)},
        }


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


def parse_roles(path: Path | None) -> dict[str, str]:
    """Read a roles file (``{worker_id: {"role": "byzantine"|"honest", ...}}``, written by the launcher)."""
    if path is None:
        return {}
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(
            f"roles file {path} is unreadable ({exc}): pass the roles.json the launcher wrote"
        ) from exc
    if not isinstance(raw, dict):
        raise UserError(f"roles file {path} must map worker ids to roles")
    return {str(k): str(v.get("role", "honest") if isinstance(v, dict) else v) for k, v in raw.items()}
