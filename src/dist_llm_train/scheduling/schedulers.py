"""Schedulers (which pending task goes to which worker) and the :class:`TaskPool` that drives them.

A :class:`Scheduler` sees one round: the pending tasks, a snapshot of the workers and their free slots,
and returns ``(task, worker_id)`` pairs. Subclasses implement only :meth:`Scheduler.decide` on index
arrays; the base validates inputs, builds the shared :class:`~dist_llm_train.scheduling.cost.CostModel`
table and checks every decision (no task twice, no slot over-used, no memory misfit), Flower-style.

=================  =========================================================================================
name               decision
=================  =========================================================================================
stable-matching    many-to-one Gale–Shapley, tasks propose: a task prefers the worker that returns its result
                   soonest (throughput, queue, link), a worker prefers higher priority, then shorter tasks;
                   memory misfits are unacceptable both ways. Stable and task-optimal, not throughput-
                   maximal (see :func:`~dist_llm_train.scheduling.matching.throughput_ratio`).
priority           greedy: highest priority first, each to the worker that would finish it soonest given
                   what that worker already holds and was given this round.
capability         the same earliest-finish rule in queue order (requeued tasks first), priorities ignored:
                   work spreads in proportion to measured (EWMA) throughput, a worker twice as fast gets
                   about twice the tasks when it has the slots, and over a run because it returns sooner.
=================  =========================================================================================

Symptoms: fast workers idle while slow ones hold long tasks → ``capability``; urgent shards (e.g. the
least-seen) wait behind others → ``priority`` or ``stable-matching`` with ``Task.priority``; big-memory
workers hog small tasks while large tasks wait → ``stable-matching`` and compare it with the
max-weight optimum.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any, ClassVar

import numpy as np

from dist_llm_train.errors import ConfigError, PreconditionError
from dist_llm_train.scheduling.capability import CapabilityTracker
from dist_llm_train.scheduling.cost import CostModel, CostTable, free_slot_counts
from dist_llm_train.scheduling.leases import CompletionResult, Lease, LeaseTable
from dist_llm_train.scheduling.matching import DeferredAcceptance
from dist_llm_train.scheduling.types import Task, WorkerInfo

__all__ = [
    "CapabilityScheduler",
    "PriorityScheduler",
    "Scheduler",
    "StableMatchingScheduler",
    "TaskPool",
    "available_schedulers",
    "build_scheduler",
]


class Scheduler(ABC):
    """Base of all schedulers. Keyword parameters configure the shared cost model.

    ``tracker``: a :class:`~dist_llm_train.scheduling.capability.CapabilityTracker` whose measured
    throughputs override what workers report (pass the one the :class:`TaskPool` feeds).
    ``transfer_bytes``: bytes a task moves over a worker's link (pull + push); 0 ignores link speed.
    ``default_throughput``: tokens/s assumed for a worker nobody measured and that reported nothing.
    """

    name: ClassVar[str]

    def __init__(
        self,
        *,
        tracker: CapabilityTracker | None = None,
        transfer_bytes: int = 0,
        default_throughput: float = 1000.0,
    ) -> None:
        self.cost = CostModel(tracker, transfer_bytes, default_throughput)

    def assign(
        self,
        pending: Sequence[Task],
        workers: Sequence[WorkerInfo],
        free_slots: Mapping[str, int] | None = None,
    ) -> list[tuple[Task, str]]:
        """Pairs ``(task, worker_id)`` to start now; tasks left out stay pending.

        ``free_slots[worker_id]``: how many more tasks that worker may take this round (``None``: each
        worker's full ``capacity``; a worker missing from the mapping gets none).
        """
        slots = free_slot_counts(workers, free_slots)
        ids = [t.task_id for t in pending]
        if len(set(ids)) != len(ids):
            raise PreconditionError("pending holds the same task id twice; each task must be pending once")
        if not pending or not any(slots):
            return []
        costs = self.cost.table(pending, workers)
        pairs = self.decide(pending, workers, slots, costs)
        used = [0] * len(workers)
        seen: set[int] = set()
        for t, w in pairs:
            if t in seen:
                raise PreconditionError(f"scheduler {self.name!r} assigned task {pending[t].task_id} twice")
            seen.add(t)
            used[w] += 1
            if used[w] > slots[w]:
                raise PreconditionError(
                    f"scheduler {self.name!r} gave worker {workers[w].worker_id!r} more than its "
                    f"{slots[w]} free slots"
                )
            if not costs.fits[t, w]:
                raise PreconditionError(
                    f"scheduler {self.name!r} put task {pending[t].task_id} on worker "
                    f"{workers[w].worker_id!r}, whose memory is too small for it"
                )
        return [(pending[t], workers[w].worker_id) for t, w in pairs]

    @abstractmethod
    def decide(
        self, pending: Sequence[Task], workers: Sequence[WorkerInfo], slots: list[int], costs: CostTable
    ) -> list[tuple[int, int]]:
        """The assignment as ``(task index, worker index)`` pairs; only this differs between schedulers.

        Called with at least one task and one free slot; ``costs`` holds the cost model's table for the
        round (``costs.fits[t, w]`` must hold for every returned pair).
        """


class StableMatchingScheduler(Scheduler):
    """Many-to-one Gale–Shapley (hospitals/residents), tasks proposing: stable and task-optimal.

    A task ranks the workers it fits by expected completion time (queue + compute + transfer; ties to the
    worker listed first). A worker ranks the tasks that fit it by priority (higher first), then expected
    duration on that worker (shorter first), then position in the pending queue. Capacity is the free slot
    count. No task and worker would both rather be paired with each other than with what they got, and
    no stable matching gives any task a better worker. Stable is not maximal: compare with
    :func:`~dist_llm_train.scheduling.matching.throughput_ratio`.
    """

    name = "stable-matching"
    block_size: ClassVar[int] = 64

    def decide(
        self, pending: Sequence[Task], workers: Sequence[WorkerInfo], slots: list[int], costs: CostTable
    ) -> list[tuple[int, int]]:
        n_tasks = len(pending)
        ok = costs.fits & (np.asarray(slots) > 0)[None, :]
        priority = np.array([t.priority for t in pending], dtype=np.float64)
        position = np.arange(n_tasks)
        ranks = np.full((n_tasks, len(workers)), n_tasks, dtype=np.int64)  # n_tasks: unranked
        for w in range(len(workers)):
            if slots[w] > 0:
                ranks[np.lexsort((position, costs.completion_s[:, w], -priority)), w] = position
        order = np.argsort(costs.completion_s, axis=1, kind="stable")  # ties: the worker listed first
        da = DeferredAcceptance(slots)
        # Tasks enter most-wanted first, in blocks; before each block, tasks already beaten at every worker
        # they fit (rank at or above its bar) are left out: they would be rejected everywhere anyway, so
        # the matching is unchanged, but a long queue no longer costs a proposal per (task, worker).
        entry = np.argsort(np.where(ok, ranks, n_tasks).min(axis=1), kind="stable")
        for start in range(0, n_tasks, self.block_size):
            block = entry[start : start + self.block_size]
            bar = np.asarray(da.bar)
            for t in block[(ok[block] & (ranks[block] < bar[None, :])).any(axis=1)].tolist():
                listed = order[t][ok[t, order[t]]]
                da.add(t, list(zip(listed.tolist(), ranks[t, listed].tolist(), strict=True)))
        return sorted(da.match.items())


class _EarliestFinish(Scheduler):
    """Tasks in :meth:`order`, each to the worker that would finish it soonest given its queue.

    A worker's queue is its ``queued_tokens`` plus what it was given earlier in the round. Ties go to the
    faster worker, then to the one listed first.
    """

    @abstractmethod
    def order(self, pending: Sequence[Task]) -> list[int]:
        """Indices of ``pending`` in the order tasks pick their worker."""

    def decide(
        self, pending: Sequence[Task], workers: Sequence[WorkerInfo], slots: list[int], costs: CostTable
    ) -> list[tuple[int, int]]:
        remaining = np.asarray(slots, dtype=np.int64).copy()
        queued = np.array([w.queued_tokens for w in workers], dtype=np.float64)
        pairs = []
        for t in self.order(pending):
            candidates = (remaining > 0) & costs.fits[t]
            if not candidates.any():
                continue
            finish = (queued + costs.tokens[t]) / costs.throughput + costs.transfer_s
            finish = np.where(candidates, finish, np.inf)
            tied = np.flatnonzero(finish == finish.min())
            w = int(tied[np.argmax(costs.throughput[tied])])
            pairs.append((t, w))
            remaining[w] -= 1
            queued[w] += costs.tokens[t]
            if not remaining.any():
                break
        return pairs


class PriorityScheduler(_EarliestFinish):
    """Greedy: highest ``priority`` first (queue order among equals), each to its earliest-finishing worker."""

    name = "priority"

    def order(self, pending: Sequence[Task]) -> list[int]:
        return sorted(range(len(pending)), key=lambda i: -pending[i].priority)


class CapabilityScheduler(_EarliestFinish):
    """Throughput-proportional: queue order, each task to the worker with the earliest expected finish.

    Pass the run's tracker so the EWMA-measured throughput, not the workers' own claims, sets the shares.
    """

    name = "capability"

    def order(self, pending: Sequence[Task]) -> list[int]:
        return list(range(len(pending)))


_SCHEDULERS: dict[str, type[Scheduler]] = {
    cls.name: cls for cls in (StableMatchingScheduler, PriorityScheduler, CapabilityScheduler)
}


def available_schedulers() -> list[str]:
    """Names accepted by :func:`build_scheduler` (the config's ``scheduling.scheduler``), sorted."""
    return sorted(_SCHEDULERS)


def build_scheduler(name: str, **params: Any) -> Scheduler:
    """Build the scheduler ``name`` (``stable-matching``, ``priority``, ``capability``).

    ``params``: ``tracker``, ``transfer_bytes``, ``default_throughput`` (see :class:`Scheduler`). An
    unknown name or parameter raises ConfigError listing what is allowed.
    """
    cls = _SCHEDULERS.get(name)
    if cls is None:
        raise ConfigError(
            f"unknown scheduler {name!r} (scheduling.scheduler); available: {', '.join(available_schedulers())}"
        )
    sig = inspect.signature(cls.__init__)
    allowed = [p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ConfigError(
            f"scheduler {name!r} has no parameter {', '.join(unknown)}; allowed: {', '.join(allowed)}"
        )
    return cls(**params)


class TaskPool:
    """The controller's work queue: pending tasks, a scheduler to place them, leases on what is placed.

    Drive it once per tick (real or simulated): :meth:`expire` (requeues tasks whose leases ran out), then
    :meth:`schedule` with the live workers; on each heartbeat :meth:`heartbeat`; on each result
    :meth:`complete` (apply the update only if it returns accepted); on eviction :meth:`release_worker`.
    Requeued tasks go to the front of the queue, in their original order, with their priority unchanged.

    ``tracker``: when given, every accepted result with a measured ``seconds`` updates it; pass the same
    tracker to the scheduler so placements follow measured speed.

    Epochs (optional): tasks added at construction or with :meth:`add` form the current epoch. Once all
    of them are completed (:attr:`epoch_complete`), :meth:`next_epoch` enqueues the same shards again as
    new tasks with fresh ids, so a straggler's result from the old epoch can never be credited to the new.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        leases: LeaseTable,
        tasks: Iterable[Task] = (),
        *,
        tracker: CapabilityTracker | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.leases = leases
        self.tracker = tracker
        self._pending: deque[Task] = deque()
        self._seen_ids: set[int] = set()
        self._next_id = 0
        self.epoch = 0
        self._epoch_tasks: list[Task] = []
        self._epoch_done: set[int] = set()
        self.add(tasks)

    @classmethod
    def from_shards(
        cls,
        shards: Iterable[Any],
        scheduler: Scheduler,
        leases: LeaseTable,
        *,
        micro_batches: int,
        priority: float = 0.0,
        memory_bytes: int = 0,
        tracker: CapabilityTracker | None = None,
    ) -> TaskPool:
        """A pool with one task per :class:`~dist_llm_train.data.Shard` (task id = shard id)."""
        tasks = [
            Task.from_shard(s, micro_batches=micro_batches, priority=priority, memory_bytes=memory_bytes)
            for s in shards
        ]
        return cls(scheduler, leases, tasks, tracker=tracker)

    # -- queue -----------------------------------------------------------------------------------------

    def add(self, tasks: Iterable[Task]) -> None:
        """Append tasks to the queue and the current epoch; task ids must never have been used here."""
        tasks = list(tasks)
        for task in tasks:
            if task.task_id in self._seen_ids:
                raise PreconditionError(
                    f"task id {task.task_id} was already used in this pool; task ids are never reused"
                )
            self._seen_ids.add(task.task_id)
            self._next_id = max(self._next_id, task.task_id + 1)
        self._pending.extend(tasks)
        self._epoch_tasks.extend(tasks)

    @property
    def pending(self) -> tuple[Task, ...]:
        """Tasks waiting for a worker, front first."""
        return tuple(self._pending)

    def in_flight(self) -> list[Lease]:
        """Live leases, in grant order."""
        return self.leases.active()

    # -- the tick --------------------------------------------------------------------------------------

    def schedule(self, workers: Sequence[WorkerInfo]) -> list[Lease]:
        """Ask the scheduler to place pending tasks on ``workers`` and lease them; returns the new leases.

        A worker's free slots are its ``capacity`` minus the leases it holds; its ``queued_tokens`` are
        replaced by the tokens of those leases.
        """
        snapshot = []
        free: dict[str, int] = {}
        for worker in workers:
            held = self.leases.active(worker.worker_id)
            snapshot.append(replace(worker, queued_tokens=sum(lease.task.n_tokens for lease in held)))
            free[worker.worker_id] = max(0, worker.capacity - len(held))
        pairs = self.scheduler.assign(tuple(self._pending), snapshot, free)
        granted = [self.leases.grant(task, worker_id) for task, worker_id in pairs]
        placed = {lease.task.task_id for lease in granted}
        self._pending = deque(t for t in self._pending if t.task_id not in placed)
        return granted

    def heartbeat(self, worker_id: str) -> list[Lease]:
        """Renew every lease ``worker_id`` holds; returns them."""
        return self.leases.renew_worker(worker_id)

    def complete(self, lease_id: int, worker_id: str, *, seconds: float | None = None) -> CompletionResult:
        """Deliver a result; apply the worker's update only if the returned result is ``accepted``.

        ``seconds``: how long the worker computed (measured by the worker); feeds the tracker.
        """
        result = self.leases.complete(lease_id, worker_id)
        if result.accepted and result.lease is not None:
            task = result.lease.task
            self._epoch_done.add(task.task_id)
            if self.tracker is not None and seconds is not None:
                self.tracker.observe(worker_id, task.n_tokens, seconds)
        return result

    def expire(self, now: float | None = None) -> list[Task]:
        """Requeue (at the front) the tasks whose leases expired by ``now`` (default: the clock)."""
        return self._requeue_front(self.leases.expire(now))

    def release_worker(self, worker_id: str) -> list[Task]:
        """Revoke an evicted worker's leases and requeue its tasks at the front; returns them."""
        return self._requeue_front(self.leases.release_worker(worker_id))

    def _requeue_front(self, tasks: list[Task]) -> list[Task]:
        self._pending.extendleft(reversed(tasks))
        return tasks

    # -- progress and epochs ---------------------------------------------------------------------------

    @property
    def done_count(self) -> int:
        """Tasks of the current epoch whose result was accepted."""
        return len(self._epoch_done)

    @property
    def epoch_size(self) -> int:
        return len(self._epoch_tasks)

    @property
    def epoch_complete(self) -> bool:
        """Whether every task of the current epoch has an accepted result."""
        return len(self._epoch_done) == len(self._epoch_tasks)

    def next_epoch(self) -> list[Task]:
        """Start the next epoch: the same shards as new tasks (fresh ids), queued; returns them."""
        if not self.epoch_complete:
            raise PreconditionError(
                f"epoch {self.epoch} has {len(self._epoch_tasks) - len(self._epoch_done)} unfinished tasks; "
                "wait until epoch_complete before next_epoch()"
            )
        fresh = []
        for task in self._epoch_tasks:
            fresh.append(replace(task, task_id=self._next_id))
            self._next_id += 1
        self.epoch += 1
        self._epoch_tasks = []
        self._epoch_done = set()
        self.add(fresh)
        return fresh
