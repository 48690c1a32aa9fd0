"""Iterative reweighting rules: geometric median (smoothed Weiszfeld) and CenteredClip.

Every iterate is an affine combination of the points, ``z = Σ_j γ_j p_j`` with ``Σ γ = 1``, so distances
follow from the centred Gram matrix H: ``‖z − p_i‖² = γᵀHγ − 2(Hγ)_i + H_ii``.  In this *span* mode the
d-sized work is the Gram pass plus one final weighted sum, whatever the number of iterations.  For a
few iterations it is cheaper to work on the vectors directly (*direct* mode: per iteration one pass that
forms the iterate and the distances to it, by the one-pass kernels of :mod:`.onepass` for large CPU
inputs; CenteredClip's median start is computed in its first pass); ``method="auto"`` picks the cheaper
one by the cost model below, and both give the same result up to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from dist_llm_train.aggregation import onepass
from dist_llm_train.aggregation.base import AggregationResult, Aggregator, Decision, PreAggregator
from dist_llm_train.aggregation.coordinatewise import Backend
from dist_llm_train.aggregation.geometry import Points
from dist_llm_train.aggregation.rules import check_backend, coordinatewise, median_statistic
from dist_llm_train.errors import ConfigError, PreconditionError

__all__ = ["CenteredClip", "GeometricMedian"]

Method = Literal["auto", "span", "direct"]
# Cost model for method="auto", in passes over the data (one pass = the time of ``x.mean(0)``), measured
# on a 2-core CPU with n = 25, d = 5M: the centred Gram pass costs about 0.2 n passes (it is compute
# bound, and its cost per column grows with n); a direct iteration (form the iterate and the distances
# to it) about 0.9 with the one-pass kernel and about 2 with blocked torch ops.  Both modes then pay one
# pass for the output, and the span mode one more for CenteredClip's median start, which the one-pass
# kernel computes with the first distances.  So with the one-pass kernels CenteredClip runs direct up to
# L = 5 and the geometric median with T = 8 on the Gram matrix; with blocked ops direct pays for L <= 2.
_GRAM_PASSES_PER_ROW = 0.2
_DIRECT_PASSES_PER_ITERATION = 2.0
_COMPILED_PASSES_PER_ITERATION = 1.0


def _check_method(method: object, owner: str) -> Method:
    if method not in ("auto", "span", "direct"):
        raise ConfigError(f"{owner}: method must be 'auto', 'span' or 'direct', got {method!r}.")
    return method  # type: ignore[return-value]


def _positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be an integer >= 1, got {value!r}.")
    return value


def _positive_float(value: object, what: str, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{what} must be a number, got {value!r}.")
    v = float(value)
    if not math.isfinite(v) or v < 0.0 or (v == 0.0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{what} must be a finite number {bound}, got {value!r}.")
    return v


def _one_pass(points: Points, backend: Backend) -> bool:
    """Whether direct iterations on ``points`` run the one-pass kernels."""
    return points.is_inputs and onepass.use_compiled(points.basis.x, backend)


def _use_span(method: Method, points: Points, iterations: int, one_pass: bool) -> bool:
    if method != "auto":
        return method == "span"
    if points.basis.has_geometry:
        return True
    per_iteration = _COMPILED_PASSES_PER_ITERATION if one_pass else _DIRECT_PASSES_PER_ITERATION
    return per_iteration * iterations > _GRAM_PASSES_PER_ROW * points.basis.size


def _direct_distances(
    points: Points, coefficients: Tensor, what: str, backend: Backend, one_pass: bool
) -> Callable[[Tensor], Tensor]:
    """Distances from ``z = Σ γ_j q_j`` to every point, where ``coefficients`` [len(γ), K] expresses the
    rows q_j on the basis; one d-sized pass per call, by the one-pass kernel where it applies."""
    basis = points.basis

    def dist(gamma: Tensor) -> Tensor:
        weights = coefficients.T @ gamma
        sq = None
        arguments = onepass.on_basis(weights, basis.x, basis.extras) if one_pass else None
        if arguments is not None:
            sq = onepass.sq_distances_to_combination(basis.x, *arguments, strict=backend == "compiled")
            if sq is not None:
                basis.passes += 1
                if not basis.finite_verified:
                    basis.verify_rowwise(sq, what)
        if sq is None:
            sq = points.sq_distances_to_combination(weights, what)
        return sq.sqrt()

    return dist


def _kernel_name(span: bool, one_pass: bool) -> str:
    """What did the d-sized work, for diagnostics: the Gram matrix, the one-pass kernels or blocked ops."""
    if span:
        return "gram"
    return "one-pass" if one_pass and onepass.available() else "blocked"


def _span_distances(h: Tensor, targets: int) -> Callable[[Tensor], Tensor]:
    """Distances from ``z = Σ γ_j p_j`` to the first ``targets`` points, from the centred Gram ``h``."""
    diag = h.diagonal()[:targets]

    def dist(gamma: Tensor) -> Tensor:
        hg = h @ gamma
        return (gamma @ hg - 2.0 * hg[:targets] + diag).clamp_min(0.0).sqrt()

    return dist


class GeometricMedian(Aggregator):
    """Geometric median by smoothed Weiszfeld iterations (RFA, Pillutla et al. 2022).

    ``z ← Σ β_i x_i / Σ β_i`` with ``β_i = 1 / max(ν, ‖z − x_i‖)``, starting from the mean, for at most
    ``iterations`` steps.  Needs n >= 2f+1 (f itself is not used by the iteration).

    Args:
        nu: smoothing distance ν, in the units of the inputs.  Inputs closer than ν to the iterate all
            get the same weight; if ``diagnostics["within_nu"]`` is close to n the rule degenerates to
            the mean: lower ν below the typical distance between updates.
        iterations: maximum Weiszfeld steps T (3 to 8 in the literature).  If ``diagnostics
            ["converged"]`` is usually False, raise it.
        tol: stop early when the smoothed objective changes by less than ``tol`` relatively.
        method: "auto" (default), "span" (iterate on the Gram matrix) or "direct" (iterate on vectors).
        backend: kernels of the direct iterations: "auto" (default; large CPU inputs use the one-pass
            kernels of :mod:`.onepass`, built by the system C++ compiler in about 2 s on first use),
            "compiled" (always, for any size; a build failure raises) or "eager" (blocked torch ops, no
            compiler; about 2x slower per iteration on large inputs).
    """

    name = "geometric-median"

    def __init__(
        self,
        f: int = 0,
        pre: Sequence[PreAggregator] = (),
        *,
        nu: float = 0.1,
        iterations: int = 8,
        tol: float = 1e-6,
        method: Method = "auto",
        backend: Backend = "auto",
    ) -> None:
        super().__init__(f, pre)
        self.nu = _positive_float(nu, "geometric-median: nu")
        self.iterations = _positive_int(iterations, "geometric-median: iterations")
        self.tol = _positive_float(tol, "geometric-median: tol", allow_zero=True)
        self.method = _check_method(method, "geometric-median")
        self.backend = check_backend(backend, "geometric-median")

    def min_inputs(self, f: int) -> tuple[int, str]:
        return 2 * f + 1, "2f+1"

    def _objective(self, dist: Tensor) -> float:
        # the function the smoothed Weiszfeld step minimises (majorise-minimise), so it never increases
        nu = self.nu
        smooth = torch.where(dist >= nu, dist, dist * dist / (2 * nu) + nu / 2)
        return float(smooth.sum())

    def decide(self, points: Points) -> Decision:
        m = points.count
        gamma = torch.full((m,), 1.0 / m, dtype=torch.float64)
        one_pass = _one_pass(points, self.backend)
        span = _use_span(self.method, points, self.iterations, one_pass)
        if span:
            distances = _span_distances(points.gram(self.name), m)
        else:
            distances = _direct_distances(points, points.coefficients(), self.name, self.backend, one_pass)

        previous: float | None = None
        steps = 0
        converged = False
        dist = torch.zeros(m, dtype=torch.float64)
        for _ in range(self.iterations):
            dist = distances(gamma).cpu()
            objective = self._objective(dist)
            if previous is not None and abs(previous - objective) <= self.tol * max(objective, 1e-300):
                converged = True
                break
            beta = 1.0 / dist.clamp_min(self.nu)
            gamma = beta / beta.sum()
            previous = objective
            steps += 1
        return Decision(
            weights=gamma,
            diagnostics={
                "iterations": steps,
                "converged": converged,
                "within_nu": int((dist < self.nu).sum()),
                "mode": "span" if span else "direct",
                "kernel": _kernel_name(span, one_pass),
            },
        )


class CenteredClip(Aggregator):
    """CenteredClip (Karimireddy, He and Jaggi 2021): clip every input around the previous aggregate.

    ``v ← v + (1/n) Σ (x_i − v) · min(1, τ / ‖x_i − v‖)``, ``iterations`` (L) times, starting from the
    previous call's output.  Stateful: call :meth:`reset` when the meaning of the inputs changes (a new
    model, a new run).  No bound on n; pair it with worker momentum (the guarantees assume the inputs
    are momenta whose honest spread shrinks).

    Args:
        tau: clipping radius τ in the units of the inputs (ByzFL's default is 100).  If
            ``diagnostics["clipped"]`` is 0 every round the rule is the mean (no protection): lower τ
            toward ``diagnostics["median_distance"]``.  If nearly every input is clipped, progress is
            slowed to about τ per iteration: raise τ or L.
        iterations: L, clipping steps per call (default 1, as in the paper's experiments and ByzFL).
        init: where the first call (and the first after :meth:`reset`) starts: "median" (default,
            the coordinate median of the inputs: robust, and one input returns itself), "zero" (ByzFL
            and the paper, where the inputs are momenta starting at zero) or "mean".
        method: "auto" (default), "span" or "direct"; see the module docstring.
        backend: kernels of the median start and the direct iterations: "auto" (default; large CPU inputs
            use the one-pass kernels of :mod:`.onepass`, built by the system C++ compiler in about 2 s on
            first use), "compiled" (always, for any size; a build failure raises) or "eager" (blocked
            torch ops, no compiler; about 2x slower per pass on large inputs).  diagnostics["kernel"]
            says which ran ("one-pass", "blocked" or "gram"); "blocked" on a large CPU input with "auto"
            means the kernels could not be built (see the logged warning).
    """

    name = "centered-clip"

    def __init__(
        self,
        f: int = 0,
        pre: Sequence[PreAggregator] = (),
        *,
        tau: float = 100.0,
        iterations: int = 1,
        init: Literal["median", "zero", "mean"] = "median",
        method: Method = "auto",
        backend: Backend = "auto",
    ) -> None:
        super().__init__(f, pre)
        self.tau = _positive_float(tau, "centered-clip: tau")
        self.iterations = _positive_int(iterations, "centered-clip: iterations")
        if init not in ("median", "zero", "mean"):
            raise ConfigError(f"centered-clip: init must be 'median', 'zero' or 'mean', got {init!r}.")
        self.init = init
        self.method = _check_method(method, "centered-clip")
        self.backend = check_backend(backend, "centered-clip")
        self._start: Tensor | None = None
        # the start of the call in progress, a vector this rule owns: commit() reuses it for the state
        self._scratch: Tensor | None = None

    def reset(self, start: Tensor | None = None) -> None:
        """Forget the previous output; the next call starts at ``start`` [d] if given, else at ``init``."""
        super().reset()
        self._start = None if start is None else start.detach().clone()
        self._scratch = None

    @property
    def state(self) -> Tensor | None:
        """The point the next call starts from (a copy), or None before the first call."""
        return None if self._start is None else self._start.clone()

    def _starting_point(self, points: Points, one_pass: bool) -> tuple[Tensor, Tensor | None]:
        """The start, and the distances of the points to it when they came for free (else None)."""
        basis = points.basis
        if self._start is not None:
            if self._start.shape != (basis.d,):
                raise PreconditionError(
                    f"centered-clip starts from a vector of shape {tuple(self._start.shape)} but got updates "
                    f"of dimension {basis.d}; call reset() when the model changes."
                )
            return self._start.to(device=basis.x.device, dtype=basis.x.dtype), None
        if self.init == "zero":
            return torch.zeros(basis.d, dtype=basis.x.dtype, device=basis.x.device), None
        if self.init == "mean":
            mean = torch.full((points.count,), 1.0 / points.count, dtype=torch.float64)
            return points.combine(mean)[0], None
        if one_pass:
            # The median and the first iteration's distances in one pass.  The comparator network gives
            # garbage on NaN, but a row holding NaN or Inf gets a non-finite distance, so checking the
            # distances (before the start is used) checks the inputs without a pass of its own.
            fused = onepass.median_and_sq_distances(basis.x, strict=self.backend == "compiled")
            if fused is not None:
                start, sq = fused
                basis.passes += 1
                if not basis.finite_verified:
                    basis.verify_rowwise(sq, self.name)
                return start, sq.sqrt()
        # the comparator network behind the median needs finite inputs
        basis.ensure_finite(self.name)
        return coordinatewise(points, median_statistic(self.backend)), None

    def decide(self, points: Points) -> Decision:
        m = points.count
        one_pass = _one_pass(points, self.backend)
        span = _use_span(self.method, points, self.iterations, one_pass)
        start, first = self._starting_point(points, one_pass and not span)
        self._scratch = start
        augmented = points.with_extra(start)
        gamma = torch.zeros(m + 1, dtype=torch.float64)
        gamma[m] = 1.0
        if span:
            distances = _span_distances(augmented.gram(self.name), m)
        else:
            coefficients = augmented.coefficients()
            distances = _direct_distances(points, coefficients, self.name, self.backend, one_pass)

        dist = torch.zeros(m, dtype=torch.float64)
        clip = torch.ones(m, dtype=torch.float64)
        for step in range(self.iterations):
            dist = first if step == 0 and first is not None else distances(gamma).cpu()
            clip = torch.where(dist > self.tau, self.tau / dist.clamp_min(1e-300), 1.0)
            gamma = gamma * (1.0 - clip.mean())
            gamma[:m] += clip / m
        return Decision(
            weights=gamma,
            points=augmented,
            diagnostics={
                "clipped": int((clip < 1.0).sum()),
                "median_distance": float(dist.median()) if m else 0.0,
                "tau": self.tau,
                "mode": "span" if span else "direct",
                "kernel": _kernel_name(span, one_pass),
            },
        )

    def commit(self, result: AggregationResult) -> None:
        vector = result.vector.detach()
        buffer, self._scratch = self._scratch, None
        if buffer is not None and buffer.shape == vector.shape and buffer.dtype == vector.dtype:
            # Copy into the start of this call (a vector this rule allocated, no longer needed): a fresh
            # d-sized tensor per call costs page faults on first touch, about 0.2x the time of the mean.
            self._start = buffer.copy_(vector)
        else:
            self._start = vector.clone()
