"""Units of work (:class:`Task`) and what the scheduler knows about a worker (:class:`WorkerInfo`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dist_llm_train.errors import PreconditionError

if TYPE_CHECKING:  # only for the annotation: keeps this pure-logic package free of the torch import
    from dist_llm_train.data.dataset import Shard

__all__ = ["Task", "WorkerInfo"]


@dataclass(frozen=True)
class Task:
    """One data shard as a unit of work: train ``micro_batches`` micro-batches on tokens ``[start, end)``.

    ``task_id`` is unique for the life of a run and never reused (a new epoch of the same shard is a new
    task), so a result can be credited to exactly one task. ``priority``: larger runs first under the
    ``priority`` and ``stable-matching`` schedulers (e.g. raise it for shards the model has seen least).
    ``memory_bytes``: memory a worker needs to run the task; a worker reporting less is never given it.
    The cost model measures a task's work as its token count ``end - start``.
    """

    task_id: int
    shard_id: int
    start: int
    end: int
    micro_batches: int
    priority: float = 0.0
    memory_bytes: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise PreconditionError(
                f"Task {self.task_id}: token range [{self.start}, {self.end}) must satisfy 0 <= start < end"
            )
        if self.micro_batches < 1:
            raise PreconditionError(f"Task {self.task_id}: micro_batches={self.micro_batches} must be >= 1")
        if not math.isfinite(self.priority):
            raise PreconditionError(f"Task {self.task_id}: priority={self.priority} must be finite")
        if self.memory_bytes < 0:
            raise PreconditionError(f"Task {self.task_id}: memory_bytes={self.memory_bytes} must be >= 0")

    @property
    def n_tokens(self) -> int:
        """Tokens in the task's shard: the work the cost model charges for it."""
        return self.end - self.start

    @classmethod
    def from_shard(
        cls,
        shard: Shard,
        *,
        task_id: int | None = None,
        micro_batches: int,
        priority: float = 0.0,
        memory_bytes: int = 0,
    ) -> Task:
        """The task training on ``shard``; ``task_id`` defaults to the shard id (first epoch)."""
        return cls(
            task_id=shard.shard_id if task_id is None else task_id,
            shard_id=shard.shard_id,
            start=shard.start,
            end=shard.end,
            micro_batches=micro_batches,
            priority=priority,
            memory_bytes=memory_bytes,
        )


@dataclass(frozen=True)
class WorkerInfo:
    """A snapshot of one worker as the scheduler sees it at one scheduling round.

    ``capacity``: how many task leases the worker may hold at once. A worker works through its tasks one
    after another (one task saturates a GPU); capacity above 1 is a prefetch queue that hides the round
    trip to the controller. Raise it when workers idle between tasks on high-latency links; keep it at 1
    when failures are frequent (every held task is requeued only after its lease expires).
    ``memory_bytes``: memory available for a task; ``None`` (not reported) fits every task.
    ``link_mbps``: the worker's link in megabits per second; ``None`` (unknown) charges no transfer time.
    ``throughput``: tokens per second the worker reported or was measured at; ``None`` leaves the estimate
    to the :class:`~dist_llm_train.scheduling.capability.CapabilityTracker` or the scheduler's default.
    ``queued_tokens``: tokens of tasks the worker already holds and has not finished; the
    :class:`~dist_llm_train.scheduling.schedulers.TaskPool` fills it from the live leases each round.
    """

    worker_id: str
    capacity: int = 1
    memory_bytes: int | None = None
    link_mbps: float | None = None
    throughput: float | None = None
    queued_tokens: int = 0

    def __post_init__(self) -> None:
        if self.capacity < 0:
            raise PreconditionError(f"worker {self.worker_id!r}: capacity={self.capacity} must be >= 0")
        if self.memory_bytes is not None and self.memory_bytes < 0:
            raise PreconditionError(
                f"worker {self.worker_id!r}: memory_bytes={self.memory_bytes} must be >= 0 (or None)"
            )
        if self.link_mbps is not None and not (math.isfinite(self.link_mbps) and self.link_mbps > 0):
            raise PreconditionError(
                f"worker {self.worker_id!r}: link_mbps={self.link_mbps} must be a finite number > 0 (or None)"
            )
        if self.throughput is not None and not (math.isfinite(self.throughput) and self.throughput > 0):
            raise PreconditionError(
                f"worker {self.worker_id!r}: throughput={self.throughput} must be a finite tokens/s > 0 "
                "(or None when not yet measured)"
            )
        if self.queued_tokens < 0:
            raise PreconditionError(
                f"worker {self.worker_id!r}: queued_tokens={self.queued_tokens} must be >= 0"
            )

    def fits(self, task: Task) -> bool:
        """Whether the task's memory need fits this worker (unknown worker memory fits everything)."""
        return self.memory_bytes is None or task.memory_bytes <= self.memory_bytes
