"""Robust aggregation of worker updates: rules, pre-aggregators and their shared geometry.

Usage::

    from dist_llm_train.aggregation import build_aggregator

    agg = build_aggregator("multi-krum", f=2, pre=["nnm"])
    result = agg(torch.stack(updates))      # updates: n tensors of shape [d]
    result.vector, result.selected, result.weights, result.diagnostics

Rules (``available_aggregators()``): ``mean``, ``median``, ``trimmed-mean``, ``krum``, ``multi-krum``,
``bulyan``, ``geometric-median``, ``centered-clip``.  Pre-aggregators (``available_preaggregators()``),
applied in order before any rule: ``nnm``, ``bucketing``, ``clip``.

Properties, for choosing a rule:

* permutation invariant: all rules (CenteredClip for a fixed starting point; bucketing only in
  distribution, since it shuffles);
* translation equivariant (``agg(X + c) = agg(X) + c``): all rules (CenteredClip when its starting
  point moves too) and NNM and bucketing; norm clipping is not;
* preconditions: median, trimmed mean and geometric median need n >= 2f+1, Krum and Multi-Krum
  n >= 2f+3, Bulyan n >= 4f+3, NNM n >= f+1; with f = 0 a single input is always accepted.

The core is pure tensor code: no sockets, no clocks, so the same objects serve the runtime and the
simulator.  CenteredClip and bucketing keep state between calls (``reset()``).
"""

from __future__ import annotations

from dist_llm_train.aggregation.base import AggregationResult, Aggregator, Decision, PreAggregator
from dist_llm_train.aggregation.geometry import (
    Basis,
    Points,
    centred_gram,
    pairwise_sq_distances,
    sq_distances_from_gram,
)
from dist_llm_train.aggregation.iterative import CenteredClip, GeometricMedian
from dist_llm_train.aggregation.preaggregators import NNM, Bucketing, NormClip
from dist_llm_train.aggregation.registry import (
    available_aggregators,
    available_preaggregators,
    build_aggregator,
    build_aggregator_from_config,
    build_preaggregator,
)
from dist_llm_train.aggregation.rules import CoordinateMedian, Mean, TrimmedMean
from dist_llm_train.aggregation.selection import Bulyan, Krum, MultiKrum, krum_ranking, recursive_krum

__all__ = [
    "NNM",
    "AggregationResult",
    "Aggregator",
    "Basis",
    "Bucketing",
    "Bulyan",
    "CenteredClip",
    "CoordinateMedian",
    "Decision",
    "GeometricMedian",
    "Krum",
    "Mean",
    "MultiKrum",
    "NormClip",
    "Points",
    "PreAggregator",
    "TrimmedMean",
    "available_aggregators",
    "available_preaggregators",
    "build_aggregator",
    "build_aggregator_from_config",
    "build_preaggregator",
    "centred_gram",
    "krum_ranking",
    "pairwise_sq_distances",
    "recursive_krum",
    "sq_distances_from_gram",
]
