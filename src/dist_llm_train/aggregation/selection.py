"""Distance-based selection rules: Krum, Multi-Krum, Bulyan.

All three read one n x n matrix of squared distances (from the shared centred Gram matrix, see
:mod:`.geometry`); the selection runs in n x n space and the d-sized work after it is one weighted sum
(Krum, Multi-Krum) or one blocked pass over the θ selected rows (Bulyan).

Ties: with few neighbours counted (Krum with n = 3, Bulyan's last recursive steps) two mutual nearest
neighbours always have equal scores.  Breaking such ties by index would make the output depend on the
order the updates arrived in, so ties are broken by the rest of each row's sorted distances (the row
whose next-nearest others are closer wins), and only then by index.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from dist_llm_train.aggregation.base import Aggregator, Decision, PreAggregator
from dist_llm_train.aggregation.geometry import Points
from dist_llm_train.aggregation.rules import check_backend
from dist_llm_train.aggregation.sorting import Backend, closest_to_median_mean_rows
from dist_llm_train.errors import ConfigError, PreconditionError

__all__ = ["Bulyan", "Krum", "MultiKrum", "krum_ranking", "recursive_krum"]


def krum_ranking(sq_dist: Tensor, neighbours: int) -> tuple[list[int], Tensor]:
    """Rows ordered from most to least central by Krum score, and the scores.

    Equal scores are ordered by the row's remaining sorted distances (lexicographically), then by index,
    so the order does not depend on how the rows are numbered unless the rows are interchangeable.
    """
    m = sq_dist.shape[0]
    if m < 2:
        return list(range(m)), torch.zeros(m, dtype=sq_dist.dtype)
    masked = sq_dist + torch.diag(torch.full((m,), math.inf, dtype=sq_dist.dtype, device=sq_dist.device))
    near = torch.sort(masked, dim=1).values[:, : m - 1]
    k = max(0, min(neighbours, m - 1))
    scores = near[:, :k].sum(dim=1)
    keys = [(float(scores[i]), *near[i, k:].tolist(), i) for i in range(m)]
    return [int(key[-1]) for key in sorted(keys)], scores


def recursive_krum(sq_dist: Tensor, f: int, count: int) -> tuple[list[int], Tensor]:
    """Bulyan's selection: ``count`` rows chosen one at a time by Krum on the rows still left.

    After each pick the winner's row and column are dropped and scores are recomputed on the rest with
    the neighbour count of Krum for the current set size, m - f - 2, but never fewer than max(f, 1).

    Why the floor: the last pick happens on m = 2f+1 rows, below Krum's own bound, where m - f - 2 =
    f - 1.  Then f colluding inputs sent as one point score 0 on each other and the last pick is always
    an attacker (for f = 1 the count is 0 and every score ties).  Counting f neighbours forces every
    score to reach outside any group of f rows, while each honest row still has f honest others (at
    least f+1 of the 2f+1 are honest).  For m >= 2f+2 the floor never binds, so only the last step
    differs from the literal recursion of El Mhamdi et al. (2018).

    Returns the chosen indices in order and the scores of the first round.
    """
    remaining = list(range(sq_dist.shape[0]))
    chosen: list[int] = []
    first_scores: Tensor | None = None
    for _ in range(count):
        m = len(remaining)
        idx = torch.tensor(remaining, device=sq_dist.device)
        sub = sq_dist.index_select(0, idx).index_select(1, idx)
        order, scores = krum_ranking(sub, max(1, f, m - f - 2))
        if first_scores is None:
            first_scores = scores
        chosen.append(remaining.pop(order[0]))
    assert first_scores is not None
    return chosen, first_scores


class Krum(Aggregator):
    """Krum (Blanchard et al. 2017): output the input whose n-f-2 nearest others are closest in total.

    Needs n >= 2f+3.  The output is one of the inputs (``selected`` says which), so its variance is that
    of a single worker: if training with Krum is noisy or slow, try ``multi-krum`` (averages the m most
    central inputs) or NNM pre-aggregation.
    """

    name = "krum"
    uses_geometry = True

    def __init__(self, f: int = 0, pre: Sequence[PreAggregator] = ()) -> None:
        super().__init__(f, pre)

    def min_inputs(self, f: int) -> tuple[int, str]:
        return 2 * f + 3, "2f+3"

    def decide(self, points: Points) -> Decision:
        m = points.count
        dist = points.sq_distances(self.name)
        order, scores = krum_ranking(dist, m - self.f - 2)
        k = order[0]
        weights = torch.zeros(m, dtype=torch.float64)
        weights[k] = 1.0
        return Decision(weights=weights, selected=[k], scores=scores)


class MultiKrum(Aggregator):
    """Multi-Krum: the plain (unweighted) mean of the m inputs with the lowest Krum scores.

    Args:
        f: declared Byzantine inputs; needs n >= 2f+3.
        m: how many inputs to average, 1 <= m <= n-f-2.  Default (None): n-f-2 at each call, the
            largest m that Krum's bound allows and the choice of AggregaThor (Damaskinos et al. 2019).
            ByzFL averages n-f inputs, which exceeds the n-f-2 bound this package enforces.  m = 1 is
            Krum.  A larger m lowers the output's variance; a smaller m tolerates attackers that sit
            just inside the honest cloud.

    Inputs are weighted equally: a count that a worker reports about itself is never used as a weight.
    """

    name = "multi-krum"
    uses_geometry = True

    def __init__(self, f: int = 0, pre: Sequence[PreAggregator] = (), *, m: int | None = None) -> None:
        super().__init__(f, pre)
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ConfigError(f"multi-krum: m must be an integer >= 1 (inputs to average), got {m!r}.")
        self.m = m

    def min_inputs(self, f: int) -> tuple[int, str]:
        return 2 * f + 3, "2f+3"

    def check(self, n: int, f: int, note: str = "") -> None:
        super().check(n, f, note)
        if self.m is None:
            return
        top = 1 if (f == 0 and n == 1) else n - f - 2
        if self.m > top:
            raise PreconditionError(
                f"multi-krum needs 1 <= m <= n-f-2 (n={n}, f={f} allows m <= {top}, got m={self.m}){note}; "
                "lower m or wait for more updates."
            )

    def decide(self, points: Points) -> Decision:
        n = points.count
        dist = points.sq_distances(self.name)
        ranking, scores = krum_ranking(dist, n - self.f - 2)
        m = self.m if self.m is not None else max(1, n - self.f - 2)
        order = ranking[:m]
        weights = torch.zeros(n, dtype=torch.float64)
        weights[order] = 1.0 / m
        return Decision(weights=weights, selected=order, scores=scores, diagnostics={"m": m})


class Bulyan(Aggregator):
    """Bulyan (El Mhamdi et al. 2018): recursive Krum selection, then a per-coordinate trimmed average.

    θ = n-2f inputs are chosen by applying Krum recursively (pick the winner, remove it, recompute the
    scores on the rest, see :func:`recursive_krum` for the neighbour count); then per coordinate the β = θ-2f selected values closest to the median of the
    selected values are averaged.  Needs n >= 4f+3.  Stronger than Krum against attackers that hide in
    a few coordinates, at the price of needing many more workers; if the bound fails, use
    ``multi-krum`` or ``trimmed-mean``.  (Not "the θ best one-shot Krum scores": that picks different
    sets.)

    Args:
        backend: kernel of the per-coordinate phase (see :mod:`.sorting`): "auto" (default; large
            inputs use a compiled kernel whose first call compiles for up to a minute), "compiled" or
            "eager" (no compile; about 20x a pass over the data).
    """

    name = "bulyan"
    uses_geometry = True

    def __init__(self, f: int = 0, pre: Sequence[PreAggregator] = (), *, backend: Backend = "auto") -> None:
        super().__init__(f, pre)
        self.backend = check_backend(backend, self.name)

    def min_inputs(self, f: int) -> tuple[int, str]:
        return 4 * f + 3, "4f+3"

    def decide(self, points: Points) -> Decision:
        n = points.count
        theta = n - 2 * self.f
        beta = theta - 2 * self.f
        dist = points.sq_distances(self.name)
        chosen, scores = recursive_krum(dist, self.f, theta)
        basis = points.basis
        basis.passes += 1
        if points.is_inputs and basis.x.dtype == basis.wdtype:
            out = closest_to_median_mean_rows(basis.x, chosen, beta, self.backend)
        else:
            # mixed or low-precision points: materialise the θ chosen ones once, in the work dtype
            rows = torch.tensor(chosen)
            picked = torch.empty(theta, basis.d, dtype=basis.wdtype, device=basis.x.device)
            for c0, c1, block in points.chunks(rows):
                picked[:, c0:c1] = block
            out = closest_to_median_mean_rows(picked, range(theta), beta, self.backend).to(basis.x.dtype)
        return Decision(
            vector=out, selected=chosen, scores=scores, diagnostics={"theta": theta, "beta": beta}
        )
