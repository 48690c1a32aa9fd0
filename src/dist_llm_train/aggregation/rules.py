"""Averaging and coordinate-wise rules: mean, coordinate median, trimmed mean."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from dist_llm_train.aggregation.base import Aggregator, Decision, PreAggregator
from dist_llm_train.aggregation.coordinatewise import Backend, coordinate_median, coordinate_trimmed_mean
from dist_llm_train.aggregation.geometry import Points
from dist_llm_train.errors import ConfigError

__all__ = ["CoordinateMedian", "Mean", "TrimmedMean"]

#: a column-wise statistic: (block [m, c], total element count of the whole aggregation) -> [c]
Statistic = Callable[[Tensor, int], Tensor]


def check_backend(backend: object, owner: str) -> Backend:
    if backend not in ("auto", "compiled", "eager"):
        raise ConfigError(f"{owner}: backend must be 'auto', 'compiled' or 'eager', got {backend!r}.")
    return backend  # type: ignore[return-value]


def coordinatewise(points: Points, stat: Statistic) -> Tensor:
    """Apply a column-wise statistic to the points without materialising mixed points in full."""
    basis = points.basis
    basis.passes += 1
    total = points.count * basis.d
    if points.is_inputs:
        return stat(basis.x, total).to(basis.x.dtype)
    out = torch.empty(basis.d, dtype=basis.x.dtype, device=basis.x.device)
    for c0, c1, block in points.chunks():
        out[c0:c1] = stat(block, total)
    return out


def median_statistic(backend: Backend = "auto") -> Statistic:
    return lambda block, total: coordinate_median(block, backend=backend, size_hint=total)


class Mean(Aggregator):
    """Plain average ``(1/n) Σ x_i``.

    Not robust: a single Byzantine input moves it arbitrarily far (use it as the baseline, or after
    pre-aggregators that bound what one input can do).  Translation- and permutation-equivariant.
    """

    name = "mean"

    def __init__(self, f: int = 0, pre: Sequence[PreAggregator] = ()) -> None:
        super().__init__(f, pre)

    def decide(self, points: Points) -> Decision:
        m = points.count
        return Decision(weights=torch.full((m,), 1.0 / m, dtype=torch.float64))


class CoordinateMedian(Aggregator):
    """Per coordinate, the true median of the n values (mean of the two middle ones when n is even).

    Needs n >= 2f+1.  Each output coordinate lies within the honest inputs' range for that coordinate
    whatever the f others send.  Its error grows with the spread of honest inputs per coordinate; when
    updates are sparse or heterogeneous, try ``trimmed-mean`` or NNM pre-aggregation.

    Args:
        backend: kernel choice of :func:`~dist_llm_train.aggregation.coordinatewise.coordinate_median`:
            "auto" (default; large inputs use a compiled kernel whose first call compiles for up to a
            minute), "compiled" or "eager" (no compile; slower on large inputs).
    """

    name = "median"
    needs_finite_inputs = True

    def __init__(self, f: int = 0, pre: Sequence[PreAggregator] = (), *, backend: Backend = "auto") -> None:
        super().__init__(f, pre)
        self.backend = check_backend(backend, self.name)

    def min_inputs(self, f: int) -> tuple[int, str]:
        return 2 * f + 1, "2f+1"

    def decide(self, points: Points) -> Decision:
        return Decision(vector=coordinatewise(points, median_statistic(self.backend)))


class TrimmedMean(Aggregator):
    """Per coordinate, drop the f largest and f smallest values and average the n-2f left.

    Needs n >= 2f+1.  Stays within the honest range per coordinate; with f = 0 it is the mean.

    Args:
        backend: as for :class:`CoordinateMedian`.
    """

    name = "trimmed-mean"
    needs_finite_inputs = True

    def __init__(self, f: int = 0, pre: Sequence[PreAggregator] = (), *, backend: Backend = "auto") -> None:
        super().__init__(f, pre)
        self.backend = check_backend(backend, self.name)

    def min_inputs(self, f: int) -> tuple[int, str]:
        return 2 * f + 1, "2f+1"

    def decide(self, points: Points) -> Decision:
        f, backend = self.f, self.backend

        def stat(block: Tensor, total: int) -> Tensor:
            return coordinate_trimmed_mean(block, f, backend=backend, size_hint=total)

        return Decision(vector=coordinatewise(points, stat))
