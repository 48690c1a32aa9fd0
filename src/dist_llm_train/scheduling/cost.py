"""The cost model every scheduler shares: how long a task takes on a worker, and whether it fits."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from dist_llm_train.errors import PreconditionError
from dist_llm_train.scheduling.capability import CapabilityTracker
from dist_llm_train.scheduling.types import Task, WorkerInfo

__all__ = ["CostModel", "CostTable", "free_slot_counts"]


def free_slot_counts(workers: Sequence[WorkerInfo], free_slots: Mapping[str, int] | None) -> list[int]:
    """Free slots per worker, in ``workers`` order.

    ``free_slots=None`` means every worker is idle (its full ``capacity``); a mapping that leaves a worker
    out gives it no slot, so a partial mapping can never over-assign. Negative counts and repeated worker
    ids raise PreconditionError.
    """
    seen: set[str] = set()
    slots = []
    for worker in workers:
        if worker.worker_id in seen:
            raise PreconditionError(f"worker id {worker.worker_id!r} appears twice in the worker list")
        seen.add(worker.worker_id)
        n = worker.capacity if free_slots is None else free_slots.get(worker.worker_id, 0)
        if n < 0:
            raise PreconditionError(f"free_slots[{worker.worker_id!r}]={n} must be >= 0")
        slots.append(int(n))
    return slots


@dataclass(frozen=True)
class CostTable:
    """Costs of every (task, worker) pair of one scheduling round, as ``(n_tasks, n_workers)`` arrays.

    ``completion_s``: expected seconds until the task's result is back if the worker starts it now, behind
    the worker's queued tokens. ``fits``: whether the task's memory need fits the worker.
    """

    tokens: np.ndarray
    throughput: np.ndarray
    transfer_s: np.ndarray
    completion_s: np.ndarray
    fits: np.ndarray

    @property
    def rate(self) -> np.ndarray:
        """Tokens per second each pair delivers: ``n_tokens / completion_s`` (0 where it does not fit)."""
        return np.where(self.fits, self.tokens[:, None] / self.completion_s, 0.0)


@dataclass(frozen=True)
class CostModel:
    """Expected completion time of a task on a worker: compute behind the worker's queue, plus transfer.

    ``completion_s = (queued_tokens + task tokens) / throughput + transfer_bytes * 8 / (link_mbps * 1e6)``

    Throughput comes, in order of preference, from the ``tracker``'s measurement of the worker, the
    worker's own ``throughput`` field, the tracker's prior (mean of measured workers), or
    ``default_throughput``. ``transfer_bytes``: bytes one task moves over the worker's link (model pull
    plus update push, after compression); 0 ignores links. If slow-link workers keep getting tasks whose
    results arrive long after the fast workers', set ``transfer_bytes`` to the real payload size; if
    large-memory workers sit idle while tasks wait, check the tasks' ``memory_bytes``.
    """

    tracker: CapabilityTracker | None = None
    transfer_bytes: int = 0
    default_throughput: float = 1000.0

    def __post_init__(self) -> None:
        if self.transfer_bytes < 0:
            raise PreconditionError(f"CostModel: transfer_bytes={self.transfer_bytes} must be >= 0")
        if not (math.isfinite(self.default_throughput) and self.default_throughput > 0):
            raise PreconditionError(
                f"CostModel: default_throughput={self.default_throughput} must be a finite tokens/s > 0"
            )

    def throughput(self, worker: WorkerInfo) -> float:
        """Tokens per second expected from ``worker``."""
        if self.tracker is not None and self.tracker.known(worker.worker_id):
            return self.tracker.throughput(worker.worker_id)
        if worker.throughput is not None:
            return worker.throughput
        if self.tracker is not None:
            return self.tracker.prior()
        return self.default_throughput

    def transfer_s(self, worker: WorkerInfo) -> float:
        """Seconds one task's transfers take on ``worker``'s link (0 when the link is unknown)."""
        if worker.link_mbps is None or self.transfer_bytes == 0:
            return 0.0
        return self.transfer_bytes * 8.0 / (worker.link_mbps * 1e6)

    def completion_s(self, task: Task, worker: WorkerInfo, extra_tokens: int = 0) -> float:
        """Seconds until ``task``'s result is back from ``worker``, behind its queue and ``extra_tokens``."""
        tokens = worker.queued_tokens + extra_tokens + task.n_tokens
        return tokens / self.throughput(worker) + self.transfer_s(worker)

    def table(self, tasks: Sequence[Task], workers: Sequence[WorkerInfo]) -> CostTable:
        """Costs of all pairs at once (throughput is evaluated once per worker)."""
        thr = np.array([self.throughput(w) for w in workers], dtype=np.float64)
        transfer = np.array([self.transfer_s(w) for w in workers], dtype=np.float64)
        queued = np.array([w.queued_tokens for w in workers], dtype=np.float64)
        tokens = np.array([t.n_tokens for t in tasks], dtype=np.float64)
        completion = (queued[None, :] + tokens[:, None]) / thr[None, :] + transfer[None, :]
        need = np.array([t.memory_bytes for t in tasks], dtype=np.int64)
        mem = np.array(
            [np.iinfo(np.int64).max if w.memory_bytes is None else w.memory_bytes for w in workers],
            dtype=np.int64,
        )
        fits = need[:, None] <= mem[None, :]
        return CostTable(tokens, thr, transfer, completion.reshape(len(tasks), len(workers)), fits)
