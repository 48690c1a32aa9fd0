"""The WAN simulator: real training of a real model, on a virtual clock, over simulated links.

Every decision is made by the objects the real runtime uses: the :class:`~dist_llm_train.coordination.
Coordinator` (admission, staleness, aggregation, DP) over a :class:`~dist_llm_train.coordination.
ParameterServer`, a :class:`~dist_llm_train.scheduling.TaskPool` with its scheduler and
:class:`~dist_llm_train.scheduling.LeaseTable`, a failure detector, and per worker a
:class:`~dist_llm_train.coordination.WorkerEngine` (real gradients, worker momentum, DP clipping, error-feedback
compression). The simulator only supplies time: it moves messages over each worker's link and charges
compute time for the tokens a task trains on.

One worker's cycle:

1. register (on start and after a crash) or piggy-back a request on its last push; the server expires
   leases, asks the scheduler for a task and grants a lease;
2. the server sends the full fp32 parameters (``4·numel`` + a small header, the ``none`` payload) down the
   worker's link;
3. the worker computes its update on exactly those parameters; the compute takes
   ``tokens / (base_tokens_per_s · speed)`` virtual seconds (× the speed jitter). A Byzantine worker then
   replaces it with its attack's output, computed from the honest updates that reached the server most
   recently (the last ``n − f`` of them) and its own;
4. it encodes the update (NaN/Inf cannot be encoded: those go out raw, fp32) and pushes it up its link;
5. the server completes the lease (a late result of an expired or revoked lease is refused and never
   applied), decodes, and submits to the coordinator, which may step.

Synchronous modes (``sync``, ``local-sgd``): a worker whose update is in the current round waits for the
next version before it gets a new task (a barrier); ``sync.straggler_timeout_s`` after a round began the
driver calls ``coordinator.step()`` with what has arrived. Heartbeats every
``scheduling.heartbeat_interval_s`` renew leases and feed the failure detector; suspected workers are
evicted (``coordinator.forget``, leases released and requeued) and re-register when heard from again.

Cost: the real gradients dominate. All workers share one model module by default (``share_model``): a
:class:`WorkerEngine` keeps only per-worker momentum, error-feedback and inner-optimiser state and loads
the pulled parameters into the module before every computation, so sharing changes no number (the test
suite checks that a shared and an unshared run report the same) and saves a model copy per worker.
"""

from __future__ import annotations

import copy
import math
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch

from dist_llm_train.aggregation import Bulyan, Krum, MultiKrum, build_aggregator_from_config
from dist_llm_train.attacks import Attack, LabelFlip, build_attack
from dist_llm_train.compression import Encoded, NoneCodec, decode
from dist_llm_train.config import RunConfig
from dist_llm_train.coordination import (
    Coordinator,
    StepReport,
    Update,
    WorkerEngine,
    WorkItem,
    build_coordinator,
    build_server,
    flatten_params,
    load_flat_params,
    updates_per_step,
)
from dist_llm_train.data import PreparedData, prepare_data
from dist_llm_train.errors import ConfigError, NonFiniteError, PreconditionError
from dist_llm_train.models import LanguageModel, build_model, resolve_model_shapes
from dist_llm_train.scheduling import (
    CapabilityTracker,
    Lease,
    LeaseTable,
    TaskPool,
    WorkerInfo,
    build_failure_detector,
    build_scheduler,
)
from dist_llm_train.scheduling.types import Task
from dist_llm_train.simulation.engine import EventEngine
from dist_llm_train.simulation.links import transfer
from dist_llm_train.simulation.report import (
    ByzantineReport,
    EvalPoint,
    LeaseReport,
    SimulationReport,
    WorkerReport,
    percentiles,
)
from dist_llm_train.simulation.topology import Topology, WorkerProfile, default_topology, load_topology
from dist_llm_train.training.device import resolve_device
from dist_llm_train.training.evaluation import evaluate

__all__ = ["DEFAULT_BASE_TOKENS_PER_S", "SimProgress", "Simulation", "resolve_topology"]

# Tokens per second of a speed-1.0 worker. Only ratios to link speeds matter: at 5,000 tokens/s a 512-token
# task computes in 0.1 s, as long as pulling gpt-tiny (3.4 MB) takes over a 270 Mbit/s link.
DEFAULT_BASE_TOKENS_PER_S = 5_000.0
# Below this many parameters a worker's kernels are too small to gain from intra-op threads.
SMALL_MODEL_PARAMS = 5_000_000
# Registration and heartbeat messages (a small msgpack map, plus framing).
CONTROL_BYTES = 64

StopReason = Literal["max-steps", "max-virtual-s", "target-loss", "stalled"]


@dataclass(frozen=True)
class SimProgress:
    """Passed to the ``progress`` callback after every server step (and every evaluation)."""

    step: int
    max_steps: int
    virtual_s: float
    val_loss: float | None


@dataclass
class _Worker:
    """Simulator-side state of one worker (the engine holds the learning state)."""

    index: int
    profile: WorkerProfile
    engine: WorkerEngine
    attack: Attack | None
    attack_generator: torch.Generator | None
    byz_index: int
    link_rng: np.random.Generator
    compute_rng: np.random.Generator
    report: WorkerReport
    up: bool = True
    incarnation: int = 0
    # What the worker itself is doing: waiting (for a task), computing, or down. The server never reads
    # it; it keeps its own view (barrier, waiters), as a real controller must.
    state: str = "waiting"
    compute_started: float = 0.0
    up_since: float = 0.0
    crash_times: list[float] = field(default_factory=list)
    rejected: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)

    @property
    def name(self) -> str:
        return self.profile.name


def resolve_topology(cfg: RunConfig, topology: Topology | str | None) -> Topology:
    """The topology of a run: the argument, else ``cluster.topology``, else ``cluster.workers`` on a LAN.

    ``cluster.byzantine`` (with ``cluster.attack``) turns the last workers of the topology Byzantine.
    Raises ConfigError when the config contradicts the topology.
    """
    cc = cfg.cluster
    source = topology if topology is not None else cc.topology
    if source is None:
        topo = default_topology(cc.workers, cc.speeds)
    else:
        topo = source if isinstance(source, Topology) else load_topology(source)
        if "workers" in cc.model_fields_set and cc.workers != topo.n_workers:
            raise ConfigError(
                f"cluster.workers={cc.workers} but topology {topo.name!r} has {topo.n_workers} workers; "
                "drop cluster.workers or change the topology's counts"
            )
        if cc.speeds is not None:
            raise ConfigError(
                f"cluster.speeds is set but topology {topo.name!r} gives each worker its speed; "
                "set speed: in the topology file instead"
            )
    if cc.byzantine:
        if any(w.role == "byzantine" for w in topo.workers):
            raise ConfigError(
                f"cluster.byzantine={cc.byzantine} but topology {topo.name!r} already has Byzantine workers; "
                "declare them in one place"
            )
        if cc.attack is None:
            raise ConfigError(
                f"cluster.byzantine={cc.byzantine} needs cluster.attack (e.g. --set cluster.attack=alie)"
            )
        if cc.byzantine > topo.n_workers:
            raise ConfigError(
                f"cluster.byzantine={cc.byzantine} exceeds the {topo.n_workers} workers of topology {topo.name!r}"
            )
    return topo


class Simulation:
    """A discrete-event simulation of one distributed training run (see the module docstring).

    Args:
        cfg: the run config: model, data, training (``max_steps`` = server steps, batch size, lr, seed,
            eval batches), sync mode, compression, aggregation, privacy, scheduling, cluster.
        topology: a :class:`Topology`, a preset name or YAML path; ``None``: ``cluster.topology``, else
            ``cluster.workers`` workers (``cluster.speeds``) on a 10 Gbit/s LAN.
        base_tokens_per_s: compute speed of a speed-1.0 worker in tokens per second. Raise it to make
            links the bottleneck (compression then pays more), lower it to make compute dominate.
        eval_every: validation loss every this many server steps (default ``training.eval_interval``);
            evaluations take no virtual time, but they do cost real time: raise it for big runs.
        target_loss: a validation loss to reach; the report gives the virtual time of the first
            evaluation at or below it (so its resolution is ``eval_every`` steps: lower it for a finer one).
        max_virtual_s: stop after this many virtual seconds (``None``: no limit).
        stop_at_target: stop as soon as ``target_loss`` is reached (else run to ``max_steps``).
        bandwidth_mbps: when given, overrides every link of the topology (both directions).
        share_model: all workers share one model module (default; identical results, far less memory).
        threads: torch CPU threads during :meth:`run` (restored afterwards). ``None``:
            ``training.threads``, else 1 for models under 5M parameters (their many small kernels run
            slower across threads) and torch's default above.
        progress: called with a :class:`SimProgress` after every server step.
        data: already prepared data for ``cfg.data`` (tests and sweeps reuse one); ``None``: prepared here.
    """

    def __init__(
        self,
        cfg: RunConfig,
        topology: Topology | str | None = None,
        *,
        base_tokens_per_s: float = DEFAULT_BASE_TOKENS_PER_S,
        eval_every: int | None = None,
        target_loss: float | None = None,
        max_virtual_s: float | None = None,
        stop_at_target: bool = True,
        seed: int | None = None,
        bandwidth_mbps: float | None = None,
        share_model: bool = True,
        threads: int | None = None,
        progress: Callable[[SimProgress], None] | None = None,
        data: PreparedData | None = None,
    ) -> None:
        if not (math.isfinite(base_tokens_per_s) and base_tokens_per_s > 0):
            raise ConfigError(
                f"base_tokens_per_s={base_tokens_per_s} must be a finite number of tokens/s > 0"
            )
        if eval_every is not None and eval_every < 1:
            raise ConfigError(f"eval_every={eval_every} must be at least 1 server step")
        if max_virtual_s is not None and not max_virtual_s > 0:
            raise ConfigError(f"max_virtual_s={max_virtual_s} must be > 0 virtual seconds")
        if target_loss is not None and not math.isfinite(target_loss):
            raise ConfigError(f"target_loss={target_loss} must be a finite loss")
        self.cfg = cfg
        topo = resolve_topology(cfg, topology)
        if bandwidth_mbps is not None:
            topo = topo.with_bandwidth(bandwidth_mbps)
        self.topology = topo
        self.base_tokens_per_s = float(base_tokens_per_s)
        self.eval_every = eval_every or cfg.training.eval_interval
        self.target_loss = target_loss
        self.max_virtual_s = max_virtual_s
        self.stop_at_target = stop_at_target
        self.seed = cfg.training.seed if seed is None else seed
        if self.seed < 0:
            raise ConfigError(f"seed={self.seed} must be >= 0 (it seeds numpy's SeedSequence)")
        self.progress = progress
        self.max_steps = cfg.training.max_steps
        if threads is not None and threads < 1:
            raise ConfigError(f"threads={threads} must be at least 1")
        self._threads = threads if threads is not None else cfg.training.threads
        self._sync_like = cfg.sync.mode in ("sync", "local-sgd")

        tc = cfg.training
        self.device = resolve_device(tc.device)
        shapes = resolve_model_shapes(cfg.model)
        self.block_size = int(shapes["block_size"])
        self.data = data if data is not None else prepare_data(cfg.data, block_size=self.block_size)
        torch.manual_seed(self.seed)
        self.model: LanguageModel = build_model(cfg.model, self.data.tokenizer.vocab_size).to(self.device)
        self._share_model = share_model
        initial = flatten_params(self.model).cpu()
        self.numel = initial.numel()
        self.server = build_server(cfg, initial, total_steps=self.max_steps)
        profiles = topo.profiles()
        n = len(profiles)
        self.coordinator: Coordinator = build_coordinator(
            cfg, self.server, n_workers=n, total_steps=self.max_steps
        )
        per_step = updates_per_step(cfg, n)
        # Fail before any compute when the rule cannot aggregate the configured buffer (e.g. Krum, f=2, b=4).
        self.coordinator.aggregator.preconditions(per_step)

        # Pulls send the parameters as the `none` payload: exact bytes, header included.
        self.pull_bytes = NoneCodec().encode(initial).nbytes
        steps = cfg.sync.steps_per_update(tc.grad_accum_steps)
        self.tokens_per_task = steps * tc.batch_size * self.block_size

        self.engine = EventEngine()
        self.clock = self.engine.clock
        sc = cfg.scheduling
        self.leases = LeaseTable(sc.lease_s, self.clock)
        task_tokens = sum(s.n_tokens for s in self.data.shards) / max(1, len(self.data.shards))
        # The tracker measures shard tokens per second (Task.n_tokens), not trained tokens: scale the prior.
        prior = self.base_tokens_per_s * task_tokens / self.tokens_per_task
        self.tracker = CapabilityTracker(default_throughput=prior)
        scheduler = build_scheduler(
            sc.scheduler,
            tracker=self.tracker,
            transfer_bytes=self.pull_bytes + 4 * self.numel,
            default_throughput=prior,
        )
        self.pool = TaskPool(scheduler, self.leases, tracker=self.tracker)
        self.detector = build_failure_detector(sc, self.clock)
        self._micro_batches = tc.grad_accum_steps
        self._next_task_id = 0
        self._passes = 0
        self._requeued = 0
        self._pass_rng = np.random.default_rng(np.random.SeedSequence([self.seed, 0x5EED]))

        self.workers = self._build_workers(profiles)
        self._by_name = {w.name: w for w in self.workers}
        n_byz = sum(w.profile.byzantine for w in self.workers)
        self.n_byzantine = n_byz
        self._needs_honest = any(w.attack is not None and not w.attack.is_data_attack for w in self.workers)
        self._recent_honest: deque[torch.Tensor] = deque(maxlen=max(1, n - n_byz))
        self._attacks_deferred = 0

        self._contributed: dict[str, int] = {}
        self._barrier: dict[str, None] = {}
        self._task_waiters: dict[str, None] = {}
        # sync.step_wait: worker -> (version it waits to see retired, virtual time it started waiting).
        self._step_waiting: dict[str, tuple[int, float]] = {}
        self._step_waits = 0
        self._step_wait_timeouts = 0
        self._step_wait_s = 0.0
        self._dropped_requests: dict[str, None] = {}
        self._straggler_timeouts = 0
        self._history: list[EvalPoint] = []
        self._time_to_target: float | None = None
        self._steps_to_target: int | None = None
        self._stop_reason: StopReason | None = None
        self._last_eval_version = -1
        self._pushes_since_step = 0
        # Results delivered without a server step before the run is declared stalled (e.g. a sync round
        # without straggler timeout that waits for a worker whose every update is rejected).
        self.stall_pushes = max(100, 20 * n)
        self._ran = False
        #: (virtual_s, event, task_id, worker): grant, complete, refused-<reason>, release, expire. Lets
        #: tests and users follow one shard through crashes and requeues.
        self.task_log: list[tuple[float, str, int, str]] = []

    # ------------------------------------------------------------------------------------------ setup
    def _build_workers(self, profiles: list[WorkerProfile]) -> list[_Worker]:
        cc = self.cfg.cluster
        n = len(profiles)
        if cc.byzantine:
            profiles = [
                p
                if i < n - cc.byzantine
                else replace(p, byzantine=True, attack=cc.attack, attack_params=dict(cc.attack_params))
                for i, p in enumerate(profiles)
            ]
        workers = []
        byz_index = 0
        for i, profile in enumerate(profiles):
            link_ss, compute_ss, attack_ss = np.random.SeedSequence([self.seed, 0xC0FFEE, i]).spawn(3)
            attack = None
            generator = None
            index = -1
            if profile.byzantine:
                assert profile.attack is not None, "validated by WorkerSpec / resolve_topology"
                attack = self._build_attack(profile.attack, profile.attack_params, i)
                generator = torch.Generator().manual_seed(int(attack_ss.generate_state(1)[0]))
                index = byz_index
                byz_index += 1
            report = WorkerReport(
                name=profile.name,
                role="byzantine" if profile.byzantine else "honest",
                speed=profile.speed,
                up_mbps=profile.up_bps / 1e6,
                down_mbps=profile.down_bps / 1e6,
                latency_ms=profile.latency_s * 1000.0,
            )
            worker = _Worker(
                index=i,
                profile=profile,
                engine=self._new_engine(attack),
                attack=attack,
                attack_generator=generator,
                byz_index=index,
                link_rng=np.random.default_rng(link_ss),
                compute_rng=np.random.default_rng(compute_ss),
                report=report,
            )
            workers.append(worker)
        if byz_index:
            for w in workers:
                if w.attack is None or w.attack.is_data_attack:
                    continue
                needed = w.attack.required_honest(byz_index)
                if needed > n - byz_index:
                    raise ConfigError(
                        f"attack {w.attack.name!r} needs {needed} honest workers to observe but the "
                        f"cluster has {n - byz_index}; add honest workers or pick another attack"
                    )
        return workers

    def _build_attack(self, name: str, params: dict[str, Any], index: int) -> Attack:
        params = dict(params)
        if name == "label-flip":
            params.setdefault("vocab_size", self.data.tokenizer.vocab_size)
            params.setdefault("seed", self.seed + index)
        elif name.startswith("optimal-"):
            params.setdefault("aggregator", build_aggregator_from_config(self.cfg.aggregation))
        return build_attack(name, **params)

    def _new_engine(self, attack: Attack | None) -> WorkerEngine:
        model = self.model if self._share_model else copy.deepcopy(self.model)
        transform = attack.transform_targets if isinstance(attack, LabelFlip) else None
        return WorkerEngine(model, self.data.train, self.cfg, device=self.device, target_transform=transform)

    # ------------------------------------------------------------------------------------------ running
    def run(self) -> SimulationReport:
        """Run to ``training.max_steps`` server steps, ``max_virtual_s``, the target loss, or a stall."""
        if self._ran:
            raise PreconditionError("Simulation.run() can be called once; build a new Simulation to rerun")
        self._ran = True
        previous_threads = torch.get_num_threads()
        threads = self._threads or (1 if self.numel < SMALL_MODEL_PARAMS else previous_threads)
        torch.set_num_threads(threads)
        try:
            return self._run()
        finally:
            torch.set_num_threads(previous_threads)

    def _run(self) -> SimulationReport:
        wall_start = time.perf_counter()
        engine = self.engine
        self._evaluate()
        if self._stop_reason is None:
            for worker in self.workers:
                engine.at(0.0, self._start_worker, worker)
                for at_s, down_s in worker.profile.crashes:
                    engine.at(at_s, self._crash, worker, down_s)
            sweep = self.cfg.scheduling.heartbeat_interval_s / 2.0
            engine.at(sweep, self._sweep, sweep, background=True)
            self._arm_straggler_timer()
            outcome = engine.run(until=self.max_virtual_s)
            if self._stop_reason is None:
                self._stop_reason = "max-virtual-s" if outcome == "until" else "stalled"
        if self._last_eval_version != self.server.version:
            self._evaluate()
        return self._report(time.perf_counter() - wall_start)

    def _stop(self, reason: StopReason) -> None:
        if self._stop_reason is None:
            self._stop_reason = reason
        self.engine.stop()

    # ------------------------------------------------------------------------------------------ links
    def _send_up(
        self,
        w: _Worker,
        nbytes: int,
        control: bool,
        handler: Callable[..., None],
        *args: Any,
        bg: bool = False,
    ) -> None:
        p = w.profile
        tr = transfer(
            nbytes, p.up_bps, p.latency_s, jitter_s=p.jitter_s, loss=p.loss, rto_s=p.rto_s, rng=w.link_rng
        )
        self._account(w, tr.wire_bytes, nbytes, tr.attempts, control, up=True)
        now = self.clock.now()
        self.engine.after(
            tr.seconds, self._at_server, w, now, now + tr.sender_s, handler, args, background=bg
        )

    def _send_down(
        self, w: _Worker, nbytes: int, control: bool, handler: Callable[..., None], *args: Any
    ) -> None:
        p = w.profile
        tr = transfer(
            nbytes, p.down_bps, p.latency_s, jitter_s=p.jitter_s, loss=p.loss, rto_s=p.rto_s, rng=w.link_rng
        )
        self._account(w, tr.wire_bytes, nbytes, tr.attempts, control, up=False)
        self.engine.after(tr.seconds, self._at_worker, w, w.incarnation, handler, args)

    @staticmethod
    def _account(w: _Worker, wire: int, payload: int, attempts: int, control: bool, *, up: bool) -> None:
        r = w.report
        r.retransmissions += attempts - 1
        if control:
            r.control_bytes += wire
        elif up:
            r.bytes_up += wire
            r.payload_up += payload
        else:
            r.bytes_down += wire
            r.payload_down += payload

    def _at_server(
        self, w: _Worker, sent_at: float, sent_by: float, handler: Callable[..., None], args: tuple[Any, ...]
    ) -> None:
        # A sender that died before its last byte left never delivered the message.
        if any(sent_at <= t < sent_by for t in w.crash_times):
            return
        handler(w, *args)

    def _at_worker(
        self, w: _Worker, incarnation: int, handler: Callable[..., None], args: tuple[Any, ...]
    ) -> None:
        if w.up and w.incarnation == incarnation:
            handler(w, *args)

    # ------------------------------------------------------------------------------------------ worker side
    def _start_worker(self, w: _Worker) -> None:
        w.up = True
        w.state = "waiting"
        w.up_since = self.clock.now()
        interval = self.cfg.scheduling.heartbeat_interval_s
        # A random phase keeps a hundred workers from heartbeating in lock-step.
        phase = float(w.compute_rng.uniform(0.0, interval))
        self.engine.after(phase, self._heartbeat, w, w.incarnation, background=True)
        self._send_up(w, CONTROL_BYTES, True, self._on_register)

    def _heartbeat(self, w: _Worker, incarnation: int) -> None:
        if not w.up or w.incarnation != incarnation:
            return
        self._send_up(w, CONTROL_BYTES, True, self._on_heartbeat, bg=True)
        self.engine.after(
            self.cfg.scheduling.heartbeat_interval_s, self._heartbeat, w, incarnation, background=True
        )

    def _on_assigned(self, w: _Worker, lease: Lease, version: int, params: torch.Tensor) -> None:
        w.state = "computing"
        w.compute_started = self.clock.now()
        duration = self.tokens_per_task / (self.base_tokens_per_s * w.profile.speed)
        jitter = w.profile.speed_jitter
        if jitter > 0:
            duration *= float(w.compute_rng.uniform(1.0 - jitter, 1.0 + jitter))
        self.engine.after(duration, self._on_computed, w, w.incarnation, lease, version, params, duration)

    def _on_computed(
        self, w: _Worker, incarnation: int, lease: Lease, version: int, params: torch.Tensor, duration: float
    ) -> None:
        if not w.up or w.incarnation != incarnation:
            return
        w.report.compute_s += duration
        task = lease.task
        seed = int(np.random.SeedSequence([self.seed, task.task_id]).generate_state(1)[0] >> 1)
        if self.cfg.model.dropout > 0:
            torch.manual_seed(seed)  # dropout draws from the global generator
        item = WorkItem(task.start, task.end, task.micro_batches, seed)
        update = w.engine.compute(params, version, item)
        vector = update.vector
        if w.attack is not None:
            vector = self._forge(w, vector)
        try:
            encoded = w.engine.encode(vector)
        except NonFiniteError:
            # Codecs refuse NaN/Inf; a malicious worker sends it raw and the coordinator must reject it.
            encoded = Encoded.build(
                NoneCodec.name, NoneCodec.version, vector.shape, {}, [("values", vector.float().contiguous())]
            )
        w.state = "waiting"  # the push doubles as the request for the next task
        w.report.updates_sent += 1
        self._send_up(
            w, encoded.nbytes, False, self._on_push, lease, version, encoded, update.tokens, duration
        )

    def _forge(self, w: _Worker, own: torch.Tensor) -> torch.Tensor:
        attack = w.attack
        assert attack is not None
        if attack.is_data_attack:
            return own  # the poison is in its training targets already
        honest = list(self._recent_honest)
        needed = attack.required_honest(self.n_byzantine)
        if len(honest) < max(1, needed):
            honest.append(own)
        if len(honest) < needed:
            self._attacks_deferred += 1
            return own
        forged = attack(torch.stack(honest), own, self.n_byzantine, w.attack_generator)
        return forged[w.byz_index].clone()

    def _crash(self, w: _Worker, down_s: float | None) -> None:
        if not w.up:
            return
        now = self.clock.now()
        if w.state == "computing":
            lost = now - w.compute_started
            w.report.compute_s += lost
            w.report.lost_compute_s += lost
        w.report.up_s += now - w.up_since
        w.report.crashes += 1
        w.crash_times.append(now)
        w.up = False
        w.state = "down"
        w.incarnation += 1
        if down_s is not None:
            self.engine.after(down_s, self._rejoin, w)

    def _rejoin(self, w: _Worker) -> None:
        # A restarted process: fresh momentum and error-feedback residual, nothing of the old task.
        w.engine = self._new_engine(w.attack)
        w.report.rejoins += 1
        self._start_worker(w)

    # ------------------------------------------------------------------------------------------ server side
    def _touch(self, w: _Worker) -> bool:
        """Record a sign of life; returns True when the worker was not registered (it re-registers)."""
        new = w.name not in self.detector
        self.detector.heartbeat(w.name)
        return new

    def _on_register(self, w: _Worker) -> None:
        if not self._touch(w):
            # A known worker registering again restarted: its old leases can never be completed.
            self._release(w)
        self._on_request(w)

    def _on_heartbeat(self, w: _Worker) -> None:
        if self._stop_reason is not None:
            return
        new = self._touch(w)
        self.pool.heartbeat(w.name)
        if new and w.name in self._dropped_requests:
            # Evicted while waiting for a task: its request was dropped with it; serve it now.
            self._dropped_requests.pop(w.name)
            self._on_request(w)

    def _on_request(self, w: _Worker) -> None:
        if self._stop_reason is not None:
            return
        self._dropped_requests.pop(w.name, None)
        if self._sync_like and self._contributed.get(w.name) == self.server.version:
            self._barrier[w.name] = None
            return
        wait = self.coordinator.step_wait_s(self.tracker.mean_duration(w.name), len(self.leases))
        if wait > 0.0:
            version = self.server.version
            self._step_waiting[w.name] = (version, self.clock.now())
            self._step_waits += 1
            self.engine.after(wait, self._on_step_wait_over, w, version)
            return
        self._assign([w])

    def _on_step_wait_over(self, w: _Worker, version: int) -> None:
        waiting = self._step_waiting.get(w.name)
        if self._stop_reason is not None or waiting is None or waiting[0] != version:
            return  # the step came first (or the worker left)
        self._step_wait_timeouts += 1
        self._step_wait_s += self.clock.now() - waiting[1]
        del self._step_waiting[w.name]
        self._assign([w])

    def _release(self, w: _Worker) -> None:
        tasks = self.pool.release_worker(w.name)
        now = self.clock.now()
        self.task_log.extend((now, "release", t.task_id, w.name) for t in tasks)
        self._requeued += len(tasks)

    def _expire(self) -> None:
        tasks = self.pool.expire()
        now = self.clock.now()
        self.task_log.extend((now, "expire", t.task_id, "") for t in tasks)
        self._requeued += len(tasks)

    def _refill(self, wanted: int) -> None:
        # New passes over the shards, each shuffled, with fresh task ids (an old pass's result is never
        # credited to the new one), until every requesting worker can be given a task.
        while len(self.pool.pending) < wanted:
            order = self._pass_rng.permutation(len(self.data.shards))
            tasks = []
            for i in order:
                shard = self.data.shards[int(i)]
                tasks.append(
                    Task.from_shard(shard, task_id=self._next_task_id, micro_batches=self._micro_batches)
                )
                self._next_task_id += 1
            self.pool.add(tasks)
            self._passes += 1

    def _params(self) -> tuple[int, torch.Tensor]:
        # The server's own copy of this version, shared by every worker assigned at it: it is never written,
        # and a worker's engine copies it into its model.
        params = self.server.stored()
        assert params is not None
        return self.server.version, params

    def _assign(self, workers: list[_Worker]) -> None:
        self._expire()
        self._refill(len(workers))
        infos = [WorkerInfo(worker_id=w.name, capacity=1, link_mbps=w.profile.link_mbps) for w in workers]
        granted = {lease.worker_id: lease for lease in self.pool.schedule(infos)}
        now = self.clock.now()
        for lease in granted.values():
            self.task_log.append((now, "grant", lease.task.task_id, lease.worker_id))
        version, params = self._params()
        for w in workers:
            lease = granted.get(w.name)
            if lease is None:
                self._task_waiters[w.name] = None
                continue
            self._task_waiters.pop(w.name, None)
            w.report.tasks_assigned += 1
            self._send_down(w, self.pull_bytes, False, self._on_assigned, lease, version, params)

    def _on_push(
        self, w: _Worker, lease: Lease, version: int, encoded: Encoded, tokens: int, seconds: float
    ) -> None:
        if self._stop_reason is not None:
            return
        if self._touch(w):
            self.pool.heartbeat(w.name)
        result = self.pool.complete(lease.lease_id, w.name, seconds=seconds)
        now = self.clock.now()
        if not result.accepted:
            assert result.reason is not None
            w.refused[result.reason] += 1
            self.task_log.append((now, f"refused-{result.reason}", lease.task.task_id, w.name))
        else:
            self.task_log.append((now, "complete", lease.task.task_id, w.name))
            vector = decode(encoded)
            if self._needs_honest and not w.profile.byzantine:
                self._recent_honest.append(vector)
            outcome = self.coordinator.submit(
                Update(
                    worker_id=w.name,
                    base_version=version,
                    vector=vector,
                    tokens=tokens,
                    task_id=lease.task.task_id,
                    wire_bytes=encoded.nbytes,
                    byzantine=w.profile.byzantine,
                )
            )
            w.engine.observe_staleness(outcome.staleness)
            if outcome.accepted:
                w.report.accepted += 1
                if self._sync_like and outcome.step is None:
                    self._contributed[w.name] = self.server.version
            else:
                assert outcome.reason is not None
                w.rejected[outcome.reason] += 1
            if outcome.step is not None:
                self._after_step(outcome.step)
        self._pushes_since_step += 1
        if self._stop_reason is None and self._pushes_since_step > self.stall_pushes:
            self._stop("stalled")
        self._on_request(w)

    def _after_step(self, report: StepReport) -> None:
        if report.noop:
            return
        self._pushes_since_step = 0
        version = self.server.version
        if self.progress is not None:
            self.progress(SimProgress(version, self.max_steps, self.clock.now(), None))
        if version % self.eval_every == 0 or version >= self.max_steps:
            self._evaluate()
        if self._stop_reason is None and version >= self.max_steps:
            self._stop("max-steps")
        if self._stop_reason is not None:
            return
        waiting = [self._by_name[name] for name in self._barrier]
        self._barrier.clear()
        now = self.clock.now()
        for name, (_, since) in self._step_waiting.items():
            self._step_wait_s += now - since
            waiting.append(self._by_name[name])
        self._step_waiting.clear()
        if waiting:
            self._assign(waiting)
        self._arm_straggler_timer()

    def _evaluate(self) -> None:
        tc = self.cfg.training
        load_flat_params(self.model, self.server.params)
        result = evaluate(
            self.model,
            self.data.val,
            batch_size=tc.batch_size,
            n_batches=tc.eval_batches,
            device=self.device,
            byte_level=self.data.tokenizer.is_byte_level,
        )
        version = self.server.version
        now = self.clock.now()
        self._last_eval_version = version
        self._history.append(
            EvalPoint(
                version,
                now,
                self.coordinator.stats.tokens,
                result.loss,
                bytes_up=sum(w.report.bytes_up for w in self.workers),
                bytes_down=sum(w.report.bytes_down for w in self.workers),
                mlm_accuracy=result.mlm_accuracy,
            )
        )
        if self.progress is not None:
            self.progress(SimProgress(version, self.max_steps, now, result.loss))
        if self.target_loss is not None and self._time_to_target is None and result.loss <= self.target_loss:
            self._time_to_target = now
            self._steps_to_target = version
            if self.stop_at_target:
                self._stop("target-loss")

    def _arm_straggler_timer(self, *, background: bool = False) -> None:
        timeout = self.cfg.sync.straggler_timeout_s
        if not self._sync_like or timeout is None:
            return
        self.engine.after(timeout, self._on_straggler_timeout, self.server.version, background=background)

    def _on_straggler_timeout(self, version: int) -> None:
        if self._stop_reason is not None or self.server.version != version:
            return  # the round finished in time
        coordinator = self.coordinator
        self._straggler_timeouts += 1
        if coordinator.buffered == 0:
            coordinator.step()  # a reported no-op: nobody arrived this round
            # Re-armed in the background: with nobody working, waiting longer cannot make progress.
            self._arm_straggler_timer(background=True)
            return
        try:
            coordinator.aggregator.preconditions(coordinator.buffered)
        except PreconditionError:
            self._arm_straggler_timer()  # too few updates for the rule's bound yet: keep waiting
            return
        self._after_step(coordinator.step())

    def _sweep(self, interval: float) -> None:
        if self._stop_reason is not None:
            return
        for name in self.detector.suspects():
            self._evict(self._by_name[name])
        self._expire()
        if self._task_waiters:
            waiting = [self._by_name[n] for n in self._task_waiters]
            self._task_waiters.clear()
            self._assign(waiting)
        self.engine.after(interval, self._sweep, interval, background=True)

    def _evict(self, w: _Worker) -> None:
        self.detector.remove(w.name)
        self.coordinator.forget(w.name)
        self._release(w)
        self.tracker.forget(w.name)
        self._contributed.pop(w.name, None)
        if w.name in self._barrier or w.name in self._task_waiters or w.name in self._step_waiting:
            self._dropped_requests[w.name] = None
        self._barrier.pop(w.name, None)
        self._step_waiting.pop(w.name, None)
        self._task_waiters.pop(w.name, None)
        w.report.evictions += 1

    # ------------------------------------------------------------------------------------------ report
    def _report(self, wall_s: float) -> SimulationReport:
        now = self.clock.now()
        stats = self.coordinator.stats
        workers = []
        compute_total = 0.0
        for w in self.workers:
            r = w.report
            if w.up:
                r.up_s += now - w.up_since
                w.up_since = now
                if w.state == "computing":
                    r.compute_s += now - w.compute_started
                    w.compute_started = now
            r.rejected = dict(sorted(w.rejected.items()))
            r.refused = dict(sorted(w.refused.items()))
            r.utilization = r.compute_s / now if now > 0 else 0.0
            compute_total += r.compute_s
            workers.append(r)
        n = len(self.workers)
        pushes = sum(r.updates_sent for r in workers)
        payload_up = sum(r.payload_up for r in workers)
        fp32 = 4 * self.numel * pushes
        agg = self.coordinator.aggregator
        selects = isinstance(agg, (Krum, MultiKrum, Bulyan)) and not agg.pre
        excluded = stats.byzantine_excluded + stats.honest_excluded
        byz = ByzantineReport(
            workers=self.n_byzantine,
            submitted=stats.byzantine_submitted,
            rejected=stats.byzantine_rejected,
            aggregated=stats.byzantine_aggregated,
            excluded=stats.byzantine_excluded,
            honest_excluded=stats.honest_excluded,
            precision=(stats.byzantine_excluded / excluded) if selects and excluded else None,
            recall=(stats.byzantine_excluded / stats.byzantine_aggregated)
            if selects and stats.byzantine_aggregated
            else None,
            attacks_deferred=self._attacks_deferred,
        )
        ls = self.leases.stats
        leases = LeaseReport(
            grants=ls.grants,
            completions=ls.completions,
            renewals=ls.renewals,
            expired=ls.expiries,
            released=ls.releases,
            requeued=self._requeued,
            refused={k: v for k, v in ls.refusals.items() if v},
            passes=self._passes,
        )
        staleness = dict(sorted(stats.staleness.items()))
        aggregation = self.cfg.aggregation
        rule = aggregation.rule + (f"(f={aggregation.f})" if aggregation.f else "")
        if aggregation.pre:
            rule = "+".join([*aggregation.pre, rule])
        return SimulationReport(
            topology=self.topology.name,
            mode=self.cfg.sync.mode,
            n_workers=n,
            seed=self.seed,
            codec=self.cfg.compression.codec,
            aggregator=rule,
            model_params=self.numel,
            stop_reason=self._stop_reason or "stalled",
            virtual_s=now,
            server_steps=self.server.version,
            noop_steps=stats.noop_steps,
            straggler_timeouts=self._straggler_timeouts,
            step_waits=self._step_waits,
            step_wait_timeouts=self._step_wait_timeouts,
            step_wait_s=self._step_wait_s,
            tokens=stats.tokens,
            target_loss=self.target_loss,
            time_to_target_s=self._time_to_target,
            steps_to_target=self._steps_to_target,
            initial_val_loss=self._history[0].loss,
            final_val_loss=self._history[-1].loss,
            eval_history=list(self._history),
            bytes_up=sum(r.bytes_up for r in workers),
            bytes_down=sum(r.bytes_down for r in workers),
            payload_up=payload_up,
            payload_down=sum(r.payload_down for r in workers),
            control_bytes=sum(r.control_bytes for r in workers),
            fp32_up_bytes=fp32,
            compression_ratio=fp32 / payload_up if payload_up else None,
            submitted=stats.submitted,
            accepted=stats.accepted,
            acceptance_rate=stats.acceptance_rate,
            rejected=dict(sorted(stats.rejected.items())),
            staleness=staleness,
            staleness_percentiles=percentiles(staleness),
            utilization=compute_total / (n * now) if now > 0 and n else 0.0,
            byzantine=byz,
            leases=leases,
            workers=workers,
            events=self.engine.processed,
            wall_s=wall_s,
        )
