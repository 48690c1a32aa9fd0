"""White-box ALIE / IPM: choose the attack scale against the defender's actual aggregation rule (ByzFL style).

For a candidate scale τ all f attackers send v(τ) (ALIE: μ - τ·σ; IPM: -τ·μ). The attack evaluates the
defender's rule on ``honest ∪ {v(τ)}×f`` and keeps the τ that maximises the damage

    D(τ) = ‖Agg(honest ∪ attackers(τ)) - mean(honest)‖₂.

D is rarely unimodal (selection rules such as Krum jump as the attackers enter or leave the chosen set), so
the search first evaluates an even grid over the range and then refines around the best grid point with a
golden-section search; the best τ seen anywhere wins. Cost: ``grid_points + refine_steps`` aggregations.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from dist_llm_train.attacks.base import Attack, check_finite_param
from dist_llm_train.errors import ConfigError, PreconditionError

__all__ = ["OptimalALIE", "OptimalIPM", "OptimalScaleAttack"]

_INV_PHI = (math.sqrt(5.0) - 1.0) / 2.0  # 1/φ, the golden-section shrink factor


def _aggregate_vector(result: Any, attack: str) -> Tensor:
    vector = result if isinstance(result, Tensor) else getattr(result, "vector", None)
    if not isinstance(vector, Tensor):
        raise PreconditionError(
            f"attack '{attack}': the aggregator must return a tensor or an object with a .vector tensor, "
            f"got {type(result).__name__}."
        )
    return vector


class OptimalScaleAttack(Attack):
    """Base of the white-box attacks: a 1-D search over the scale τ of a fixed attack direction.

    Args:
        aggregator: the defender's rule, a callable ``[n, d] -> result`` where result is a tensor ``[d]`` or
            has ``.vector`` (e.g. ``dist_llm_train.aggregation.build_aggregator(...)``).
        scale_range: ``(low, high)`` bounds of τ, low < high. Against the plain mean the damage grows without
            bound, so the search returns ``high``: widen the range for a stronger (and easier to detect) attack.
        grid_points: evaluations on the even grid (>= 3). If ``last_scale`` jumps between rounds, the damage
            curve is rugged: raise this.
        refine_steps: golden-section evaluations around the best grid point (>= 0).
        isolate_state: deep-copy the aggregator for every evaluation so that a stateful rule (CenteredClip
            starts from its previous output) is not advanced by the attacker's trial runs. Turn off only for
            stateless rules when the copy is too slow.

    Attributes:
        last_scale: the τ chosen in the latest call (None before the first call).
        last_deviation: D(last_scale) measured in that call.
    """

    min_honest = 1
    default_range: ClassVar[tuple[float, float]] = (0.0, 10.0)

    def __init__(
        self,
        *,
        aggregator: Callable[[Tensor], Any] | None = None,
        scale_range: tuple[float, float] | list[float] | None = None,
        grid_points: int = 16,
        refine_steps: int = 12,
        isolate_state: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(seed=seed)
        if aggregator is None or not callable(aggregator):
            raise ConfigError(
                f"attack '{self.name}' needs aggregator=<the defender's rule>, a callable [n, d] -> result with "
                f".vector (e.g. dist_llm_train.aggregation.build_aggregator(...)); got {aggregator!r}."
            )
        low, high = self.default_range if scale_range is None else self._check_range(scale_range)
        if isinstance(grid_points, bool) or not isinstance(grid_points, int) or grid_points < 3:
            raise ConfigError(
                f"attack '{self.name}': grid_points must be an integer >= 3, got {grid_points!r}."
            )
        if isinstance(refine_steps, bool) or not isinstance(refine_steps, int) or refine_steps < 0:
            raise ConfigError(
                f"attack '{self.name}': refine_steps must be an integer >= 0, got {refine_steps!r}."
            )
        self.aggregator = aggregator
        self.scale_range = (low, high)
        self.grid_points = grid_points
        self.refine_steps = refine_steps
        self.isolate_state = bool(isolate_state)
        self.last_scale: float | None = None
        self.last_deviation: float | None = None

    def _check_range(self, scale_range: object) -> tuple[float, float]:
        if not isinstance(scale_range, (tuple, list)) or len(scale_range) != 2:
            raise ConfigError(
                f"attack '{self.name}': scale_range must be a pair (low, high), got {scale_range!r}."
            )
        low = check_finite_param(self.name, "scale_range[0]", scale_range[0])
        high = check_finite_param(self.name, "scale_range[1]", scale_range[1])
        if not low < high:
            raise ConfigError(f"attack '{self.name}': scale_range needs low < high, got ({low}, {high}).")
        return low, high

    def _statistics(self, honest: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(base, direction)`` so that an attacker sends ``base + τ·direction``."""
        raise NotImplementedError

    def required_honest(self, f: int) -> int:
        """At least ``min_honest``, and enough that the defender's rule accepts ``honest + f`` inputs: the
        search runs the rule on exactly those (a median with f=3 needs 7 rows, so 4 honest ones)."""
        preconditions = getattr(self.aggregator, "preconditions", None)
        if preconditions is None:
            return self.min_honest
        # Every rule's minimum is at most a few multiples of f (Bulyan: 4f + 3), so this loop is short.
        for honest in range(self.min_honest, self.min_honest + 4 * f + 8):
            try:
                preconditions(honest + f)
            except PreconditionError:
                continue
            return honest
        return self.min_honest + 4 * f + 8

    def deviation(self, honest: Tensor, f: int, scale: float) -> float:
        """D(scale): how far the defender's output moves from the honest mean when f attackers use ``scale``."""
        base, direction = self._statistics(honest)
        return self._damage(honest, honest.mean(dim=0), base, direction, f, scale)

    def _damage(
        self, honest: Tensor, target: Tensor, base: Tensor, direction: Tensor, f: int, tau: float
    ) -> float:
        attackers = (base + tau * direction).unsqueeze(0).repeat(f, 1)
        rule = copy.deepcopy(self.aggregator) if self.isolate_state else self.aggregator
        output = _aggregate_vector(rule(torch.cat([honest, attackers], dim=0)), self.name)
        value = float(torch.linalg.vector_norm((output - target).double()))
        # A NaN damage cannot be compared; rank it below every real value rather than letting it win.
        return value if not math.isnan(value) else -math.inf

    def _search(self, honest: Tensor, f: int, base: Tensor, direction: Tensor) -> tuple[float, float]:
        target = honest.mean(dim=0)
        low, high = self.scale_range
        best = [low, -math.inf]

        def damage(tau: float) -> float:
            value = self._damage(honest, target, base, direction, f, tau)
            if value > best[1]:
                best[0], best[1] = tau, value
            return value

        grid = [low + (high - low) * i / (self.grid_points - 1) for i in range(self.grid_points)]
        values = [damage(tau) for tau in grid]
        best_i = max(range(len(grid)), key=lambda i: values[i])
        a, b = grid[max(best_i - 1, 0)], grid[min(best_i + 1, len(grid) - 1)]
        if self.refine_steps >= 2:
            # Golden-section search for a maximum inside the bracket around the best grid point.
            c, d = b - _INV_PHI * (b - a), a + _INV_PHI * (b - a)
            fc, fd = damage(c), damage(d)
            for _ in range(self.refine_steps - 2):
                if fc >= fd:
                    b, d, fd = d, c, fc
                    c = b - _INV_PHI * (b - a)
                    fc = damage(c)
                else:
                    a, c, fc = c, d, fd
                    d = a + _INV_PHI * (b - a)
                    fd = damage(d)
        elif self.refine_steps == 1:
            damage((a + b) / 2.0)
        return best[0], best[1]

    def _forge(self, honest: Tensor, own: Tensor | None, f: int, generator: torch.Generator) -> Tensor:
        base, direction = self._statistics(honest)
        tau, value = self._search(honest, f, base, direction)
        self.last_scale, self.last_deviation = tau, value
        return (base + tau * direction).unsqueeze(0).repeat(f, 1)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(aggregator={self.aggregator!r}, scale_range={self.scale_range}, "
            f"grid_points={self.grid_points}, refine_steps={self.refine_steps})"
        )


class OptimalALIE(OptimalScaleAttack):
    """ALIE with z chosen per round to maximise the defender's deviation: attackers send μ - z·σ.

    Needs at least 2 honest updates (σ is the unbiased per-coordinate standard deviation).
    """

    name: ClassVar[str] = "optimal-alie"
    min_honest = 2

    def _statistics(self, honest: Tensor) -> tuple[Tensor, Tensor]:
        return honest.mean(dim=0), -honest.std(dim=0, correction=1)


class OptimalIPM(OptimalScaleAttack):
    """IPM with ε chosen per round to maximise the defender's deviation: attackers send -ε·μ."""

    name: ClassVar[str] = "optimal-ipm"

    def _statistics(self, honest: Tensor) -> tuple[Tensor, Tensor]:
        return torch.zeros_like(honest[0]), -honest.mean(dim=0)
