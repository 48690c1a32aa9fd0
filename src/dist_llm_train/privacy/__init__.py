"""Differential privacy: worker-level DP-FedAvg, example-level DP-SGD and privacy accounting (REFERENCES.md §5).

- :func:`clip_update`, :class:`WorkerLevelDP`: clip each worker's update to S, noise N(0, (zS)²) once per
  round at the aggregator, divide by the expected number of workers. Compress after the noise.
- :func:`dp_sgd_gradients`: per-sample clipped, noised gradients (a sample = one sequence for an LM).
- :func:`compute_epsilon`, :func:`noise_multiplier_for`, :class:`PrivacyAccountant`: accounting with
  Opacus' maintained RDP and PRV accountants.
"""

from __future__ import annotations

from dist_llm_train.privacy.accounting import (
    DEFAULT_ORDERS,
    PrivacyAccountant,
    compute_epsilon,
    noise_multiplier_for,
)
from dist_llm_train.privacy.dp_sgd import dp_sgd_gradients, per_sample_gradients
from dist_llm_train.privacy.worker_dp import WorkerLevelDP, clip_update

__all__ = [
    "DEFAULT_ORDERS",
    "PrivacyAccountant",
    "WorkerLevelDP",
    "clip_update",
    "compute_epsilon",
    "dp_sgd_gradients",
    "noise_multiplier_for",
    "per_sample_gradients",
]
