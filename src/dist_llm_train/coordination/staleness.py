"""Staleness: how old an update is, whether it is still admitted, and how much it counts.

Staleness ``τ = server version now − version the update was computed on``. A *bound* decides admission
(updates with ``τ`` above it are rejected as ``too-stale``); a *policy* scales admitted ones
(REFERENCES.md §4: staleness-aware SGD divides the step by ``τ``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Literal

StalenessPolicyName = Literal["none", "inverse", "exponential"]


def staleness_weight(staleness: int, policy: StalenessPolicyName, alpha: float = 0.5) -> float:
    """Scale of an admitted update: 1 (none), 1/max(1, τ) (inverse, Zhang et al. 2016), exp(−ατ)."""
    if policy == "none":
        return 1.0
    if policy == "inverse":
        return 1.0 / max(1, staleness)
    if policy == "exponential":
        return math.exp(-alpha * staleness)
    raise ValueError(f"unknown staleness policy {policy!r}")


class StalenessBound(ABC):
    """Per-worker admission bound; :meth:`observe` sees every update's staleness, admitted or not."""

    @abstractmethod
    def bound(self, worker_id: str) -> int: ...

    def observe(self, worker_id: str, staleness: int) -> None:  # noqa: B027 - optional hook
        """Record a measured staleness (the fixed bound ignores it)."""

    def forget(self, worker_id: str) -> None:  # noqa: B027 - optional hook
        """Drop what is known about a worker that left."""

    def snapshot(self) -> dict[str, int]:
        return {}


class FixedBound(StalenessBound):
    """The same bound ``s`` for every worker (SSP-style bounded staleness)."""

    def __init__(self, max_staleness: int) -> None:
        self.max_staleness = max_staleness

    def bound(self, worker_id: str) -> int:
        return self.max_staleness


class AdaptiveBound(StalenessBound):
    """Per-worker bounds from each worker's measured speed.

    A worker's *natural staleness* is the number of server steps the others make while it computes one
    update, which is exactly the staleness its updates arrive with; it is tracked as a bias-corrected
    EWMA (``decay``), observed on rejected updates too so that a slow worker's bound rises after its
    first rejection. The bound is ``clamp(ceil(margin · natural), floor, ceiling)``: fast workers stay at
    ``floor`` (tight), slow workers get room for their speed, and ``ceiling`` caps how old any admitted
    update can be. Symptoms: slow workers still rejected → raise ``margin``/``ceiling``; loss noisy from
    very old updates → lower ``ceiling`` or use the ``inverse`` policy.
    """

    def __init__(self, floor: int, ceiling: int, margin: float = 1.5, decay: float = 0.8) -> None:
        if ceiling < floor:
            raise ValueError(f"adaptive staleness ceiling ({ceiling}) is below its floor ({floor})")
        self.floor = floor
        self.ceiling = ceiling
        self.margin = margin
        self.decay = decay
        self._avg: dict[str, float] = {}
        self._count: dict[str, int] = {}

    def natural_staleness(self, worker_id: str) -> float | None:
        count = self._count.get(worker_id, 0)
        if count == 0:
            return None
        return self._avg[worker_id] / (1.0 - self.decay**count)  # Adam-style bias correction

    def observe(self, worker_id: str, staleness: int) -> None:
        self._avg[worker_id] = self.decay * self._avg.get(worker_id, 0.0) + (1.0 - self.decay) * staleness
        self._count[worker_id] = self._count.get(worker_id, 0) + 1

    def bound(self, worker_id: str) -> int:
        natural = self.natural_staleness(worker_id)
        if natural is None:
            return self.floor
        return int(min(self.ceiling, max(self.floor, math.ceil(self.margin * natural))))

    def forget(self, worker_id: str) -> None:
        self._avg.pop(worker_id, None)
        self._count.pop(worker_id, None)

    def snapshot(self) -> dict[str, int]:
        return {worker: self.bound(worker) for worker in self._count}
