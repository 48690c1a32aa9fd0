"""Task leases: at most one live holder per task, and every task's result applied at most once.

A worker that is given a task holds a :class:`Lease` on it until ``expires_at``; heartbeats renew it. When
a lease runs out (the worker crashed, stalled or lost its link) the controller calls
:meth:`LeaseTable.expire` and requeues the returned tasks; another worker then gets a new lease. If the old
holder comes back with a result afterwards, :meth:`LeaseTable.complete` refuses it, so the update of a task
is applied once even when two workers computed it.

Refusal reasons (counted in :attr:`LeaseTable.stats`):

``"unknown"``     the lease id was never granted here (or left the bounded history).
``"not-holder"``  the lease belongs to another worker: a confused or malicious worker claims it.
``"duplicate"``   the lease was already completed: a retransmitted result.
``"expired"``     the lease ran out (its time passed, even if :meth:`~LeaseTable.expire` has not been called
                  yet) or was revoked by :meth:`~LeaseTable.release_worker`: the task is, or will be, someone
                  else's.

Many refusals of one kind point at one setting: ``expired`` under healthy workers means ``lease_s`` is
shorter than a task (raise ``scheduling.lease_s`` or heartbeat more often); ``not-holder`` should never
happen with honest workers; ``duplicate`` means results are resent (harmless, but check the transport).
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Literal

from dist_llm_train.errors import PreconditionError
from dist_llm_train.scheduling.clock import Clock
from dist_llm_train.scheduling.types import Task

__all__ = ["CompletionResult", "Lease", "LeaseStats", "LeaseTable", "RefusalReason"]

RefusalReason = Literal["expired", "not-holder", "duplicate", "unknown"]
_EndState = Literal["completed", "expired", "released"]


@dataclass(frozen=True)
class Lease:
    """The right of ``worker_id`` to deliver the result of ``task`` until ``expires_at`` (seconds).

    ``lease_id`` is unique within a :class:`LeaseTable` and never reused, so a result names exactly one
    grant. ``duration_s`` is the lease length a renewal extends by.
    """

    lease_id: int
    task: Task
    worker_id: str
    granted_at: float
    expires_at: float
    duration_s: float

    def remaining(self, now: float) -> float:
        """Seconds left at time ``now`` (negative once expired)."""
        return self.expires_at - now


@dataclass(frozen=True)
class CompletionResult:
    """Answer to a result delivery: ``accepted``, or refused with a ``reason``.

    ``lease`` is the lease the result named, when it is known. Truthy exactly when accepted.
    """

    accepted: bool
    reason: RefusalReason | None = None
    lease: Lease | None = None

    @property
    def task(self) -> Task | None:
        return None if self.lease is None else self.lease.task

    def __bool__(self) -> bool:
        return self.accepted


@dataclass
class LeaseStats:
    """Counters since the table was created."""

    grants: int = 0
    renewals: int = 0
    renewals_refused: int = 0
    completions: int = 0
    expiries: int = 0
    releases: int = 0
    refusals: dict[str, int] = field(
        default_factory=lambda: {"expired": 0, "not-holder": 0, "duplicate": 0, "unknown": 0}
    )

    @property
    def refused(self) -> int:
        return sum(self.refusals.values())


def _check_seconds(name: str, value: float) -> float:
    if not (math.isfinite(value) and value > 0):
        raise PreconditionError(f"LeaseTable: {name}={value} must be a finite number of seconds > 0")
    return float(value)


class LeaseTable:
    """All task leases of a run, against an injected :class:`~dist_llm_train.scheduling.clock.Clock`.

    ``lease_s``: default lease length (the config's ``scheduling.lease_s``). Each heartbeat renews a
    worker's leases to ``now + lease_s``, so the lease only needs to outlast a few missed heartbeats, not a
    whole task; too short and healthy workers lose tasks on a jittery link (``expired`` refusals, duplicated
    work), too long and a crashed worker's tasks wait that long before anyone else gets them.
    ``max_history``: how many ended leases are remembered to tell ``expired``/``duplicate`` from
    ``unknown``; older ones answer ``unknown`` (still refused, never applied twice).

    A lease is live while ``now < expires_at``; at ``now == expires_at`` it has expired.
    """

    def __init__(self, lease_s: float, clock: Clock, *, max_history: int = 1_000_000) -> None:
        self.lease_s = _check_seconds("lease_s", lease_s)
        if max_history < 0:
            raise PreconditionError(f"LeaseTable: max_history={max_history} must be >= 0")
        self.clock = clock
        self.max_history = max_history
        self.stats = LeaseStats()
        self._next_id = 0
        self._live: dict[int, Lease] = {}
        self._ended: OrderedDict[int, tuple[Lease, _EndState]] = OrderedDict()
        self._task_lease: dict[int, int] = {}
        self._completed_tasks: set[int] = set()
        # Insertion-ordered sets (dict keys) so release_worker returns tasks in grant order.
        self._by_worker: dict[str, dict[int, None]] = {}
        # (expires_at, lease_id); renewals push a new entry and leave the old one stale (checked on pop).
        self._heap: list[tuple[float, int]] = []

    # -- granting and renewing -------------------------------------------------------------------------

    def grant(self, task: Task, worker_id: str, *, lease_s: float | None = None) -> Lease:
        """Lease ``task`` to ``worker_id`` for ``lease_s`` seconds (default: the table's ``lease_s``).

        Raises PreconditionError if the task already has a live lease or was already completed: granting
        either would let its update be applied twice.
        """
        duration = self.lease_s if lease_s is None else _check_seconds("lease_s", lease_s)
        if task.task_id in self._completed_tasks:
            raise PreconditionError(
                f"task {task.task_id} was already completed; a new epoch needs new task ids"
            )
        current = self._task_lease.get(task.task_id)
        if current is not None:
            holder = self._live[current].worker_id
            raise PreconditionError(
                f"task {task.task_id} already has live lease {current} held by {holder!r}; "
                "expire or release it before granting it again"
            )
        now = self.clock.now()
        lease = Lease(self._next_id, task, worker_id, now, now + duration, duration)
        self._next_id += 1
        self._live[lease.lease_id] = lease
        self._task_lease[task.task_id] = lease.lease_id
        self._by_worker.setdefault(worker_id, {})[lease.lease_id] = None
        heapq.heappush(self._heap, (lease.expires_at, lease.lease_id))
        self.stats.grants += 1
        return lease

    def renew(self, lease_id: int, worker_id: str | None = None) -> Lease | None:
        """Extend a live lease to ``now + duration_s``; returns the renewed lease.

        ``None`` means the lease is not live (unknown, ended, past its expiry) or, when ``worker_id`` is
        given, not held by that worker: the worker should abandon the task, its result will be refused.
        """
        lease = self._live.get(lease_id)
        now = self.clock.now()
        if (
            lease is None
            or now >= lease.expires_at
            or (worker_id is not None and lease.worker_id != worker_id)
        ):
            self.stats.renewals_refused += 1
            return None
        renewed = replace(lease, expires_at=now + lease.duration_s)
        self._live[lease_id] = renewed
        heapq.heappush(self._heap, (renewed.expires_at, lease_id))
        self._compact_heap()
        self.stats.renewals += 1
        return renewed

    def renew_worker(self, worker_id: str) -> list[Lease]:
        """Renew every live lease of ``worker_id`` (a heartbeat); returns the renewed leases."""
        renewed = []
        for lease_id in list(self._by_worker.get(worker_id, ())):
            lease = self.renew(lease_id, worker_id)
            if lease is not None:
                renewed.append(lease)
        return renewed

    # -- ending leases ---------------------------------------------------------------------------------

    def complete(self, lease_id: int, worker_id: str) -> CompletionResult:
        """Accept the result of ``lease_id`` from ``worker_id`` if that is the task's live lease and holder.

        Accepting ends the lease and marks the task completed for good. Anything else is refused with a
        reason (see the module docstring) and changes nothing but the counters; a refused live lease past
        its expiry stays in the table until :meth:`expire` hands its task back for requeueing.
        """
        lease = self._live.get(lease_id)
        if lease is None:
            record = self._ended.get(lease_id)
            if record is None:
                return self._refuse("unknown", None)
            ended, state = record
            if ended.worker_id != worker_id:
                return self._refuse("not-holder", ended)
            return self._refuse("duplicate" if state == "completed" else "expired", ended)
        if lease.worker_id != worker_id:
            return self._refuse("not-holder", lease)
        if self.clock.now() >= lease.expires_at:
            return self._refuse("expired", lease)
        self._end(lease, "completed")
        self._completed_tasks.add(lease.task.task_id)
        self.stats.completions += 1
        return CompletionResult(True, None, lease)

    def expire(self, now: float | None = None) -> list[Task]:
        """End every live lease with ``expires_at <= now`` (default: the clock) and return their tasks.

        The caller requeues the returned tasks; they come in order of expiry.
        """
        now = self.clock.now() if now is None else now
        tasks = []
        while self._heap and self._heap[0][0] <= now:
            expires_at, lease_id = heapq.heappop(self._heap)
            lease = self._live.get(lease_id)
            if lease is None or lease.expires_at != expires_at:
                continue  # stale entry: the lease ended or was renewed since
            self._end(lease, "expired")
            self.stats.expiries += 1
            tasks.append(lease.task)
        return tasks

    def release_worker(self, worker_id: str) -> list[Task]:
        """Revoke every live lease of an evicted worker and return its tasks (in grant order) to requeue.

        Results it sends later are refused as ``expired``.
        """
        tasks = []
        for lease_id in list(self._by_worker.get(worker_id, ())):
            lease = self._live[lease_id]
            self._end(lease, "released")
            self.stats.releases += 1
            tasks.append(lease.task)
        self._by_worker.pop(worker_id, None)
        return tasks

    # -- queries ---------------------------------------------------------------------------------------

    def get(self, lease_id: int) -> Lease | None:
        """The live lease ``lease_id`` (``None`` once it ended)."""
        return self._live.get(lease_id)

    def lease_of_task(self, task_id: int) -> Lease | None:
        """The live lease on ``task_id``, if any."""
        lease_id = self._task_lease.get(task_id)
        return None if lease_id is None else self._live[lease_id]

    def active(self, worker_id: str | None = None) -> list[Lease]:
        """Live leases (of one worker when given), in grant order."""
        if worker_id is None:
            return sorted(self._live.values(), key=lambda lease: lease.lease_id)
        return [self._live[i] for i in self._by_worker.get(worker_id, ())]

    def active_count(self, worker_id: str) -> int:
        """How many live leases ``worker_id`` holds."""
        return len(self._by_worker.get(worker_id, ()))

    def is_completed(self, task_id: int) -> bool:
        """Whether a result for ``task_id`` was accepted."""
        return task_id in self._completed_tasks

    def completed_tasks(self) -> Iterable[int]:
        """Ids of every task whose result was accepted."""
        return iter(self._completed_tasks)

    def next_expiry(self) -> float | None:
        """Earliest ``expires_at`` among live leases (the simulator's next lease event), or ``None``."""
        while self._heap:
            expires_at, lease_id = self._heap[0]
            lease = self._live.get(lease_id)
            if lease is not None and lease.expires_at == expires_at:
                return expires_at
            heapq.heappop(self._heap)
        return None

    def __len__(self) -> int:
        return len(self._live)

    # -- internals -------------------------------------------------------------------------------------

    def _refuse(self, reason: RefusalReason, lease: Lease | None) -> CompletionResult:
        self.stats.refusals[reason] += 1
        return CompletionResult(False, reason, lease)

    def _end(self, lease: Lease, state: _EndState) -> None:
        del self._live[lease.lease_id]
        del self._task_lease[lease.task.task_id]
        held = self._by_worker.get(lease.worker_id)
        if held is not None:
            held.pop(lease.lease_id, None)
            if not held:
                del self._by_worker[lease.worker_id]
        if self.max_history:
            self._ended[lease.lease_id] = (lease, state)
            while len(self._ended) > self.max_history:
                self._ended.popitem(last=False)

    def _compact_heap(self) -> None:
        # Renewals leave stale entries behind; rebuild when they dominate so memory stays O(live leases)
        # even if expire() is rarely called.
        if len(self._heap) > 4 * len(self._live) + 64:
            self._heap = [(lease.expires_at, lease.lease_id) for lease in self._live.values()]
            heapq.heapify(self._heap)
