"""Coordinators: the decision of when and how admitted updates become a server step.

One object per run, driven by the runtime (real time, sockets) or the simulator (virtual time) through
the same two calls: :meth:`Coordinator.submit` for every update that arrives, and :meth:`Coordinator.step`
when the driver decides a round is over (a straggler timeout). Subclasses implement only the decision:
which updates are admitted and when the buffer is ready (Flower-style strategies).

- :class:`SyncCoordinator` — one update per worker per version; a step when ``quorum`` have arrived (or
  when the driver's straggler timeout calls :meth:`step`); also DiLoCo's outer loop (``local-sgd``).
- :class:`AsyncCoordinator` — any update whose staleness is within its worker's bound is admitted,
  scaled by the staleness policy, and buffered; every ``buffer_size`` updates are aggregated by the
  (robust) rule into one step. ``buffer_size=1`` is pure asynchrony. With :class:`AdaptiveBound`
  it is the ``adaptive`` mode.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from dist_llm_train.aggregation import Aggregator
from dist_llm_train.coordination.flat import all_finite
from dist_llm_train.coordination.parameter_server import ParameterServer
from dist_llm_train.coordination.staleness import (
    AdaptiveBound,
    FixedBound,
    StalenessBound,
    StalenessPolicyName,
    staleness_weight,
)
from dist_llm_train.errors import UserError
from dist_llm_train.privacy import PrivacyAccountant, WorkerLevelDP

# Pre-aggregators that map input i to row i, so a rule's selection still names workers.
ROW_PRESERVING_PRE = frozenset({"nnm", "clip"})


@dataclass
class Update:
    """A decoded update as it reaches the coordinator."""

    worker_id: str
    base_version: int
    vector: torch.Tensor
    tokens: int = 0
    task_id: int | None = None
    wire_bytes: int = 0
    # Ground truth known only to the simulator and tests; never used for decisions, only to count how
    # many Byzantine updates the defences filtered.
    byzantine: bool = False


@dataclass
class StepReport:
    """What one aggregation did. ``noop`` steps (empty buffer) change nothing and are only counted."""

    version: int
    noop: bool
    n_inputs: int = 0
    workers: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    byzantine_inputs: int = 0
    byzantine_excluded: int = 0
    reason: str | None = None
    diagnostics: dict[str, Any] = field(default_factory=dict)


@dataclass
class SubmitOutcome:
    accepted: bool
    reason: str | None
    staleness: int
    weight: float = 0.0
    step: StepReport | None = None


@dataclass
class CoordinatorStats:
    """Counters every driver reports: acceptance, rejection by reason, staleness, Byzantine filtering."""

    submitted: int = 0
    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    staleness: Counter[int] = field(default_factory=Counter)
    accepted_by_worker: Counter[str] = field(default_factory=Counter)
    rejected_by_worker: Counter[str] = field(default_factory=Counter)
    steps: int = 0
    noop_steps: int = 0
    tokens: int = 0
    wire_bytes: int = 0
    byzantine_submitted: int = 0
    byzantine_rejected: int = 0
    byzantine_aggregated: int = 0
    byzantine_excluded: int = 0
    honest_excluded: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.submitted if self.submitted else 1.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "submitted": self.submitted,
            "accepted": self.accepted,
            "acceptance_rate": self.acceptance_rate,
            "rejected": dict(self.rejected),
            "staleness": {str(k): v for k, v in sorted(self.staleness.items())},
            "accepted_by_worker": dict(self.accepted_by_worker),
            "rejected_by_worker": dict(self.rejected_by_worker),
            "steps": self.steps,
            "noop_steps": self.noop_steps,
            "tokens": self.tokens,
            "wire_bytes": self.wire_bytes,
            "byzantine_submitted": self.byzantine_submitted,
            "byzantine_rejected": self.byzantine_rejected,
            "byzantine_aggregated": self.byzantine_aggregated,
            "byzantine_excluded": self.byzantine_excluded,
            "honest_excluded": self.honest_excluded,
        }


class Coordinator(ABC):
    """Admission, buffering and aggregation of updates into server steps.

    Args:
        server: the parameter server the steps are applied to.
        aggregator: the rule (with pre-aggregators) that turns a buffer of updates into one vector.
        staleness_policy: how admitted updates are scaled by their staleness.
        privacy: worker-level DP: workers clip, the coordinator adds noise once per step and divides by
            the *expected* number of updates (DP-FedAvg); ``accountant`` then tracks ε.
    """

    mode = "base"

    def __init__(
        self,
        server: ParameterServer,
        aggregator: Aggregator,
        *,
        staleness_policy: StalenessPolicyName = "none",
        staleness_alpha: float = 0.5,
        privacy: WorkerLevelDP | None = None,
        accountant: PrivacyAccountant | None = None,
        population: int | None = None,
    ) -> None:
        self.server = server
        self.aggregator = aggregator
        self.staleness_policy = staleness_policy
        self.staleness_alpha = staleness_alpha
        self.privacy = privacy
        self.accountant = accountant
        self.population = population
        self.stats = CoordinatorStats()
        self._buffer: list[tuple[Update, float]] = []

    # ---------------------------------------------------------------- decisions (subclasses)
    @abstractmethod
    def _admission(self, update: Update, staleness: int) -> str | None:
        """``None`` to admit, else the rejection reason."""

    @abstractmethod
    def _ready(self) -> bool:
        """Whether the buffer should be aggregated now."""

    def _observe(self, update: Update, staleness: int) -> None:  # noqa: B027 - optional hook
        """See every update's staleness (admitted or not)."""

    def forget(self, worker_id: str) -> None:
        """A worker left: drop its buffered update (sync) and what is known about it."""
        self._buffer = [(u, w) for u, w in self._buffer if u.worker_id != worker_id]

    def step_wait_s(self, mean_task_s: float | None, in_flight: int) -> float:
        """Seconds a worker asking for a task now should wait for the next step (0: serve it at once).

        ``mean_task_s``: the asking worker's measured mean task time (``None`` before its first result);
        ``in_flight``: tasks other workers are computing. Only asynchronous coordinators ever wait.
        """
        del mean_task_s, in_flight
        return 0.0

    # ---------------------------------------------------------------- driving
    @property
    def version(self) -> int:
        return self.server.version

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def _validate(self, update: Update) -> str | None:
        if update.vector.dim() != 1 or update.vector.numel() != self.server.numel:
            return "wrong-shape"
        if not torch.is_floating_point(update.vector):
            return "wrong-dtype"
        if update.base_version > self.server.version or update.base_version < 0:
            return "unknown-version"
        if not all_finite(update.vector):
            return "non-finite"
        return None

    def submit(self, update: Update) -> SubmitOutcome:
        """Admit or reject one update; aggregates and steps when the buffer becomes ready."""
        stats = self.stats
        stats.submitted += 1
        stats.wire_bytes += update.wire_bytes
        if update.byzantine:
            stats.byzantine_submitted += 1
        staleness = self.server.version - update.base_version
        reason = self._validate(update)
        if reason is None:
            self._observe(update, staleness)
            reason = self._admission(update, staleness)
        if reason is not None:
            stats.rejected[reason] += 1
            stats.rejected_by_worker[update.worker_id] += 1
            if update.byzantine:
                stats.byzantine_rejected += 1
            return SubmitOutcome(False, reason, staleness)
        weight = staleness_weight(staleness, self.staleness_policy, self.staleness_alpha)
        stats.accepted += 1
        stats.accepted_by_worker[update.worker_id] += 1
        stats.staleness[staleness] += 1
        stats.tokens += update.tokens
        self._buffer.append((update, weight))
        step = self.step() if self._ready() else None
        return SubmitOutcome(True, None, staleness, weight, step)

    def step(self) -> StepReport:
        """Aggregate the buffer into one server step. An empty buffer is a reported no-op."""
        if not self._buffer:
            self.stats.noop_steps += 1
            return StepReport(version=self.server.version, noop=True, reason="empty buffer")
        updates = [u for u, _ in self._buffer]
        weights = torch.tensor([w for _, w in self._buffer], dtype=torch.float32)
        self._buffer = []
        matrix = torch.stack([u.vector.float() for u in updates])
        if not bool((weights == 1.0).all()):
            matrix = matrix * weights.to(matrix.device).unsqueeze(1)
        result = self.aggregator(matrix)
        vector = result.vector
        if self.privacy is not None:
            vector = self._privatise(matrix, vector)
        self.server.apply(vector)
        excluded_idx = (
            sorted(set(range(len(updates))) - set(result.selected))
            if result.selected is not None and self._rows_are_inputs()
            else []
        )
        excluded = [updates[i].worker_id for i in excluded_idx]
        byz_in = sum(u.byzantine for u in updates)
        byz_out = sum(updates[i].byzantine for i in excluded_idx)
        stats = self.stats
        stats.steps += 1
        stats.byzantine_aggregated += byz_in
        stats.byzantine_excluded += byz_out
        stats.honest_excluded += len(excluded_idx) - byz_out
        return StepReport(
            version=self.server.version,
            noop=False,
            n_inputs=len(updates),
            workers=[u.worker_id for u in updates],
            excluded=excluded,
            byzantine_inputs=byz_in,
            byzantine_excluded=byz_out,
            diagnostics=dict(result.diagnostics),
        )

    def _rows_are_inputs(self) -> bool:
        """Whether the rule's selected rows are the submitted inputs (bucketing averages them away)."""
        return all(p.name in ROW_PRESERVING_PRE for p in self.aggregator.pre)

    def _privatise(self, matrix: torch.Tensor, aggregated: torch.Tensor) -> torch.Tensor:
        """DP-FedAvg: noise N(0, (zS)²) once on the sum, divided by the expected number of updates.

        With plain ``mean`` this is exactly DP-FedAvg (the sum is re-divided by the *expected* count, not
        the count that arrived); with a robust rule the same noise is added to its output.
        """
        assert self.privacy is not None
        if self.aggregator.name == "mean" and not self.aggregator.pre:
            out = self.privacy.noise(matrix.sum(dim=0))
        else:
            out = aggregated + self.privacy.noise(torch.zeros_like(aggregated))
        if self.accountant is not None and self.population:
            rate = min(1.0, self.privacy.expected_workers / self.population)
            self.accountant.step(rate, self.privacy.noise_multiplier)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"stats": self.stats.as_dict()}


class SyncCoordinator(Coordinator):
    """Synchronous rounds: every update must be computed on the current version, one per worker."""

    mode = "sync"

    def __init__(
        self, server: ParameterServer, aggregator: Aggregator, *, quorum: int, **kwargs: Any
    ) -> None:
        super().__init__(server, aggregator, **kwargs)
        if quorum < 1:
            raise UserError(f"sync quorum must be at least 1, got {quorum}")
        self.quorum = quorum

    def _admission(self, update: Update, staleness: int) -> str | None:
        if staleness != 0:
            return "stale-round"
        if any(u.worker_id == update.worker_id for u, _ in self._buffer):
            return "duplicate"
        return None

    def _ready(self) -> bool:
        return len(self._buffer) >= self.quorum


class AsyncCoordinator(Coordinator):
    """Bounded-staleness asynchrony with buffered (robust) aggregation; adaptive with AdaptiveBound."""

    mode = "async"

    def __init__(
        self,
        server: ParameterServer,
        aggregator: Aggregator,
        *,
        bound: StalenessBound,
        buffer_size: int = 1,
        step_wait: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(server, aggregator, **kwargs)
        self.bound = bound
        self.buffer_size = buffer_size
        if not 0.0 <= step_wait <= 1.0:
            raise UserError(f"step_wait must be a fraction of a task time in [0, 1], got {step_wait}")
        self.step_wait = step_wait
        if isinstance(bound, AdaptiveBound):
            self.mode = "adaptive"

    def _observe(self, update: Update, staleness: int) -> None:
        self.bound.observe(update.worker_id, staleness)

    def _admission(self, update: Update, staleness: int) -> str | None:
        if staleness > self.bound.bound(update.worker_id):
            return "too-stale"
        return None

    def _ready(self) -> bool:
        return len(self._buffer) >= self.buffer_size

    def step_wait_s(self, mean_task_s: float | None, in_flight: int) -> float:
        """Wait for a step that is near and that other workers can complete.

        With a buffer of b updates, a worker served while the buffer is part-filled computes on a version
        that the next step retires: its update arrives at least one version stale. When the workers still
        computing can fill the buffer without it, the step is coming anyway, so it is worth waiting up to
        ``step_wait`` of a task for it; the wait is bounded so that a slow or lost peer costs little.
        With an empty buffer the current version is the freshest there will be for a while; with more
        updates missing than tasks in flight the step needs this worker's update: both serve at once.
        """
        if self.step_wait <= 0.0 or mean_task_s is None or self.buffered == 0:
            return 0.0
        if self.buffer_size - self.buffered > in_flight:
            return 0.0
        return self.step_wait * mean_task_s

    def forget(self, worker_id: str) -> None:
        super().forget(worker_id)
        self.bound.forget(worker_id)


def build_bound(mode: str, max_staleness: int, adaptive_max: int, margin: float) -> StalenessBound:
    if mode == "adaptive":
        return AdaptiveBound(floor=max_staleness, ceiling=max(adaptive_max, max_staleness), margin=margin)
    return FixedBound(max_staleness)
