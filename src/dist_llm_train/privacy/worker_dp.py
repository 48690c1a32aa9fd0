"""Worker-level differential privacy (DP-FedAvg, McMahan et al. 2018; REFERENCES.md §5).

Each worker clips its whole update to L2 norm S; the aggregator sums the clipped updates, adds Gaussian
noise N(0, (zS)² I) *once per round* and divides by the *expected* number of participating workers (not
the number that actually arrived: dividing by the actual count would make the output's scale depend on
whether one worker took part, which leaks exactly what DP hides).

The guarantee is per worker (add/remove one worker's whole contribution). Account it with
``PrivacyAccountant.step(sample_rate=expected_workers / total_workers, noise_multiplier=z)`` once per round.

Combining with compression: compress *after* the noise (the noised aggregate is post-processing, so any
codec keeps the guarantee). Compressing the clipped update before the noise is also safe only if the codec
cannot raise the norm above S; error feedback on the worker carries un-noised residuals, so keep it off
the private path.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dist_llm_train.errors import ConfigError, NonFiniteError, PreconditionError

__all__ = ["WorkerLevelDP", "clip_update"]


def _check_clip_norm(clip_norm: float) -> float:
    if isinstance(clip_norm, bool) or not isinstance(clip_norm, (int, float)):
        raise ConfigError(f"privacy.clip_norm must be a number > 0, got {clip_norm!r}.")
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ConfigError(f"privacy.clip_norm must be finite and > 0, got {clip_norm!r}.")
    return float(clip_norm)


def clip_update(update: Tensor, clip_norm: float) -> tuple[Tensor, float]:
    """Scale ``update`` by min(1, S / ‖update‖₂) and return ``(clipped copy, original norm)``.

    The input is never modified. The norm is taken over all elements, whatever the shape.

    Args:
        update: a floating-point tensor (typically a flattened update [d]).
        clip_norm: the bound S (> 0). If most updates are clipped (original norm well above S) the signal is
            shrunk and training slows: raise S; if few are, the noise zS is larger than needed: lower S.

    Raises:
        NonFiniteError: the update holds NaN or Inf (its norm is undefined, and clipping would spread it).
    """
    clip_norm = _check_clip_norm(clip_norm)
    if not isinstance(update, Tensor) or not update.is_floating_point():
        raise PreconditionError("clip_update expects a floating-point tensor.")
    # Norm in float64: a float32 sum of 10^8 squares loses digits that decide whether a borderline update
    # is clipped.
    norm = float(torch.linalg.vector_norm(update, dtype=torch.float64))
    if not math.isfinite(norm):
        raise NonFiniteError(
            "clip_update: the update holds NaN or Inf values; drop it (or find the worker that produced it) "
            "before clipping."
        )
    if norm <= clip_norm:
        return update.clone(), norm
    return update * (clip_norm / norm), norm


class WorkerLevelDP:
    """DP-FedAvg: clip on each worker, noise once per round at the aggregator.

    Args:
        clip_norm: S, the L2 bound of one worker's update (see :func:`clip_update` for tuning).
        noise_multiplier: z; the noise on the sum has standard deviation z·S per coordinate. If the loss is
            much noisier than without DP, raise ``expected_workers`` (noise on the mean is zS/expected) or
            lower z and accept a larger ε.
        expected_workers: the expected number of updates summed per round (the divisor). Dividing by the
            actual count would break the guarantee; a round with fewer arrivals is just a smaller mean.
        generator: source of the Gaussian noise; unset: a fresh generator seeded from the OS entropy (the
            noise must not be predictable to anyone who could subtract it). Pass a seeded one only in tests.
    """

    def __init__(
        self,
        clip_norm: float,
        noise_multiplier: float,
        expected_workers: float,
        generator: torch.Generator | None = None,
    ) -> None:
        self.clip_norm = _check_clip_norm(clip_norm)
        if (
            isinstance(noise_multiplier, bool)
            or not isinstance(noise_multiplier, (int, float))
            or not (math.isfinite(noise_multiplier) and noise_multiplier >= 0)
        ):
            raise ConfigError(f"privacy.noise_multiplier must be finite and >= 0, got {noise_multiplier!r}.")
        if (
            isinstance(expected_workers, bool)
            or not isinstance(expected_workers, (int, float))
            or not (math.isfinite(expected_workers) and expected_workers > 0)
        ):
            raise ConfigError(
                f"WorkerLevelDP: expected_workers must be > 0 (the expected number of updates per round), "
                f"got {expected_workers!r}."
            )
        self.noise_multiplier = float(noise_multiplier)
        self.expected_workers = float(expected_workers)
        if generator is None:
            generator = torch.Generator()
            generator.seed()
        self.generator = generator

    @property
    def noise_std(self) -> float:
        """Standard deviation z·S of the noise added to each coordinate of the *sum*."""
        return self.noise_multiplier * self.clip_norm

    def clip(self, update: Tensor) -> Tensor:
        """Worker side: the update clipped to norm S (a new tensor; the input is untouched)."""
        return clip_update(update, self.clip_norm)[0]

    def noise(self, sum_vector: Tensor) -> Tensor:
        """From the sum of the clipped updates: ``(sum + N(0, (zS)² I)) / expected_workers``.

        For a coordinator that accumulates the sum itself (streaming, or after secure aggregation). Call it
        exactly once per round: every call spends privacy budget. The input is not modified.
        """
        if not isinstance(sum_vector, Tensor) or not sum_vector.is_floating_point():
            raise PreconditionError(
                "WorkerLevelDP.noise expects the floating-point sum of the clipped updates."
            )
        noise = torch.randn(
            sum_vector.shape, generator=self.generator, device=self.generator.device, dtype=torch.float32
        )
        noise = noise.to(device=sum_vector.device, dtype=sum_vector.dtype)
        return (sum_vector + noise * self.noise_std) / self.expected_workers

    def aggregate(self, clipped_updates: Tensor) -> Tensor:
        """Aggregator side: ``(Σ_i clip(u_i) + N(0, (zS)² I)) / expected_workers`` for rows ``[k, d]``.

        Rows are clipped again here (a no-op for honest workers) so the guarantee does not rest on every
        worker having clipped: a worker that skipped clipping cannot raise its weight beyond S.
        """
        if not isinstance(clipped_updates, Tensor) or clipped_updates.dim() != 2:
            raise PreconditionError("WorkerLevelDP.aggregate expects the stacked updates as a tensor [k, d].")
        if not clipped_updates.is_floating_point():
            raise PreconditionError("WorkerLevelDP.aggregate expects floating-point updates.")
        norms = torch.linalg.vector_norm(clipped_updates, dim=1, dtype=torch.float64)
        if not bool(torch.isfinite(norms).all()):
            raise NonFiniteError(
                "WorkerLevelDP.aggregate: an update holds NaN or Inf; reject it before aggregation."
            )
        scale = torch.clamp(self.clip_norm / norms.clamp_min(1e-300), max=1.0).to(clipped_updates.dtype)
        total = (clipped_updates * scale.unsqueeze(1)).sum(dim=0)
        return self.noise(total)

    def __repr__(self) -> str:
        return (
            f"WorkerLevelDP(clip_norm={self.clip_norm}, noise_multiplier={self.noise_multiplier}, "
            f"expected_workers={self.expected_workers})"
        )
