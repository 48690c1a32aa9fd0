"""Pre-aggregators: maps applied to the inputs before a rule (NNM, bucketing, norm clipping).

All three are linear in the inputs (row averages or row scalings), so they act on the coefficient
matrices of :class:`~dist_llm_train.aggregation.geometry.Points`; the rule after them reuses the same
Gram matrix and nothing d-sized is recomputed until the output is materialised.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from dist_llm_train.aggregation.base import PreAggregator
from dist_llm_train.aggregation.geometry import Points
from dist_llm_train.errors import ConfigError

__all__ = ["NNM", "Bucketing", "NormClip"]


class NNM(PreAggregator):
    """Nearest-neighbour mixing (Allouah et al. 2023): replace each input by the mean of its n-f nearest
    inputs, itself included.

    Needs n >= f+1.  Pulls honest inputs together (their spread shrinks, so the rule after it can tell
    them from attackers better, especially under heterogeneous data) at the cost of one n x n mixing
    matmul over the data.  Distances come from the shared Gram matrix; ties go to the lower index.
    """

    name = "nnm"
    uses_geometry = True

    def min_inputs(self, f: int) -> tuple[int, str]:
        return f + 1, "f+1"

    def apply(self, points: Points, f: int, diagnostics: dict[str, Any]) -> Points:
        m = points.count
        keep = m - f
        dist = points.sq_distances(self.name)
        # each point is its own nearest neighbour even when duplicates tie with it at distance 0
        dist.fill_diagonal_(-1.0)
        nearest = torch.sort(dist, dim=1, stable=True).indices[:, :keep]
        mixing = torch.zeros(m, m, dtype=torch.float64)
        mixing.scatter_(1, nearest, 1.0 / keep)
        return points.mixed(mixing, affine=True)


class Bucketing(PreAggregator):
    """Bucketing (Karimireddy, He and Jaggi 2022): shuffle, average buckets of ``s`` inputs, aggregate the
    bucket means.

    The rule then sees ceil(n/s) rows (the last bucket may be smaller) and the same f: each attacker
    spoils at most one bucket, so check the rule's bound for ceil(n/s).  Averaging shrinks the honest
    spread under heterogeneous data; a larger ``s`` shrinks it more but leaves fewer rows, so the rule's
    bound fails sooner.

    Args:
        s: bucket size (>= 1; 1 only shuffles).  Karimireddy et al. use s = 2.
        seed: seed of the shuffle.  Each call draws a fresh permutation from one generator, so a run is
            reproducible and the shuffle differs between calls; :meth:`reset` restarts the sequence.
    """

    name = "bucketing"

    def __init__(self, *, s: int = 2, seed: int = 0) -> None:
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ConfigError(f"bucketing: s must be an integer >= 1 (bucket size), got {s!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"bucketing: seed must be an integer, got {seed!r}.")
        self.s = s
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)

    def reset(self) -> None:
        self._generator = torch.Generator().manual_seed(self.seed)

    def output_count(self, n: int) -> int:
        return math.ceil(n / self.s)

    def apply(self, points: Points, f: int, diagnostics: dict[str, Any]) -> Points:
        m = points.count
        perm = torch.randperm(m, generator=self._generator)
        buckets = [perm[i : i + self.s] for i in range(0, m, self.s)]
        mixing = torch.zeros(len(buckets), m, dtype=torch.float64)
        for b, members in enumerate(buckets):
            mixing[b, members] = 1.0 / members.numel()
        diagnostics["buckets"] = [[int(i) for i in members] for members in buckets]
        return points.mixed(mixing, affine=True)


class NormClip(PreAggregator):
    """Clip every input to a maximum Euclidean norm: ``x_i · min(1, threshold / ‖x_i‖)``.

    Bounds what any one input can contribute while keeping its direction.  Not translation-equivariant
    (norms are measured from the origin, so the inputs should be updates, not weights).

    Args:
        threshold: absolute maximum norm.  Exactly one of ``threshold`` and ``relative``.
        relative: clip to ``relative`` times the median of the inputs' norms at each call (default 1.0
            when ``threshold`` is not given): adapts as updates shrink during training.  If honest
            updates are clipped a lot (``diagnostics["clip_count"]`` well above f), raise it.
    """

    name = "clip"
    changes_row_sums = True

    def __init__(self, *, threshold: float | None = None, relative: float | None = None) -> None:
        if threshold is not None and relative is not None:
            raise ConfigError(
                "clip: give either threshold (absolute norm) or relative (times the median norm)."
            )
        for label, value in (("threshold", threshold), ("relative", relative)):
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ConfigError(f"clip: {label} must be a finite number > 0, got {value!r}.")
        self.threshold = None if threshold is None else float(threshold)
        self.relative = 1.0 if threshold is None and relative is None else relative

    def apply(self, points: Points, f: int, diagnostics: dict[str, Any]) -> Points:
        norms = points.sq_norms(self.name).sqrt()
        if self.threshold is not None:
            limit = self.threshold
        else:
            assert self.relative is not None
            ordered = torch.sort(norms).values
            m = ordered.numel()
            median = 0.5 * (float(ordered[(m - 1) // 2]) + float(ordered[m // 2]))
            limit = float(self.relative) * median
        factors = torch.where(norms > limit, limit / norms.clamp_min(1e-300), 1.0)
        diagnostics["clip_threshold"] = limit
        diagnostics["clip_count"] = int((factors < 1.0).sum())
        return points.scaled(factors)
