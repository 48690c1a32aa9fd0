"""Strategy base classes: the pipeline does the bookkeeping, each rule only makes its decision.

An :class:`Aggregator` is called with the stacked updates ``x`` [n, d] and returns an
:class:`AggregationResult`.  The base class (in the spirit of Flower's ``Strategy``) owns everything that
is the same for every rule:

* input validation: a 2-D floating tensor with n >= 1, d >= 1; NaN/Inf rows raise
  :class:`~dist_llm_train.errors.NonFiniteError` naming the rows (the caller decides what to do with
  them: drop the workers, retry, ...);
* preconditions, checked before any d-sized work: each stage's bound on n and f, with n as the stage
  sees it (bucketing shrinks n); violations raise :class:`~dist_llm_train.errors.PreconditionError`
  naming the rule, n, f and the bound;
* the pre-aggregators (:class:`PreAggregator`), applied in order;
* the shared geometry (:mod:`.geometry`), so that a rule asks for distances and gets them without
  recomputation, and the final materialisation of the output;
* mapping the rule's weights back to the caller's inputs, and the diagnostics.

A rule implements :meth:`Aggregator.decide` (and, if it has a bound, :meth:`Aggregator.min_inputs`).
Inputs are never modified in place.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from dist_llm_train.aggregation.geometry import Basis, Points, all_finite
from dist_llm_train.errors import ConfigError, PreconditionError

__all__ = ["AggregationResult", "Aggregator", "Decision", "PreAggregator", "check_f"]


@dataclass(frozen=True)
class AggregationResult:
    """What one aggregation produced.

    Attributes:
        vector: the aggregate [d], same dtype and device as the inputs; never aliases them.
        selected: for selection rules (Krum, Multi-Krum, Bulyan) the indices of the chosen rows, in the
            order the rule chose them.  They index the rows the rule saw: the caller's inputs when there
            are no pre-aggregators, otherwise the pre-aggregated rows (see ``diagnostics["mixing"]``).
        weights: [n] float64, the effective weight of each of the caller's inputs in ``vector`` whenever
            the output is a linear combination of the inputs (mean, Krum family, geometric median,
            CenteredClip, and after linear pre-aggregators); ``None`` for coordinate-wise rules.
            CenteredClip also puts weight on its starting point (``diagnostics["start_weight"]``).
        scores: per-row scores where the rule has them (Krum scores: lower is more central).
        diagnostics: small facts for logs (rule, n, f, d-sized passes over the data, rule specifics); with
            linear pre-aggregators also ``"mixing"``, the [n_rule, n] float64 matrix that maps the
            caller's inputs to the rows the rule saw.
    """

    vector: Tensor
    selected: list[int] | None = None
    weights: Tensor | None = None
    scores: Tensor | None = None
    diagnostics: dict[str, Any] = field(default_factory=dict)


@dataclass
class Decision:
    """A rule's answer: either ``weights`` over ``points`` (output = their combination) or a ``vector``."""

    weights: Tensor | None = None
    points: Points | None = None
    vector: Tensor | None = None
    selected: list[int] | None = None
    scores: Tensor | None = None
    diagnostics: dict[str, Any] = field(default_factory=dict)


def check_f(f: object, owner: str) -> int:
    """Validate a declared Byzantine count: a non-negative int."""
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise ConfigError(
            f"{owner}: f must be a non-negative integer (declared Byzantine inputs), got {f!r}."
        )
    return f


class _Stage:
    """Common part of rules and pre-aggregators."""

    #: registry name, also used in messages
    name: ClassVar[str] = ""
    #: the stage needs pairwise geometry (so the pipeline computes the Gram matrix once, up front)
    uses_geometry: ClassVar[bool] = False
    #: the stage makes rows that are not affine combinations (so the geometry also tracks the centre)
    changes_row_sums: ClassVar[bool] = False
    #: the stage's kernels need finite inputs (comparator networks give garbage on NaN), so the inputs
    #: are checked before it runs rather than after
    needs_finite_inputs: ClassVar[bool] = False

    def min_inputs(self, f: int) -> tuple[int, str] | None:
        """Smallest n the stage accepts for this f, and the bound as text (``"2f+3"``); None: no bound."""
        return None

    def check(self, n: int, f: int, note: str = "") -> None:
        """Raise :class:`PreconditionError` when ``n`` inputs are too few for ``f``.

        With f = 0 a single input is always accepted: it is its own aggregate.
        """
        bound = self.min_inputs(f)
        if bound is None or (f == 0 and n == 1):
            return
        need, text = bound
        if n < need:
            raise PreconditionError(
                f"{self.name} needs n >= {text} (n={n}, f={f} needs n >= {need}){note}; "
                "lower f or wait for more updates."
            )

    def reset(self) -> None:
        """Forget any state carried between calls (default: none)."""


class PreAggregator(_Stage, ABC):
    """A map from the n rows a stage sees to the rows the next stage sees (e.g. NNM, bucketing, clip)."""

    def output_count(self, n: int) -> int:
        """How many rows the stage outputs for ``n`` inputs."""
        return n

    @abstractmethod
    def apply(self, points: Points, f: int, diagnostics: dict[str, Any]) -> Points:
        """Return the transformed points; may record small facts in ``diagnostics``."""


class Aggregator(_Stage, ABC):
    """Base of every aggregation rule; callable as ``agg(x) -> AggregationResult``.

    Args:
        f: declared number of Byzantine inputs per call; rules with a bound check it (e.g. Krum needs
            n >= 2f+3).  Too small an f lets attackers through; too large an f discards honest
            information and raises :class:`PreconditionError` when few updates arrive.
        pre: pre-aggregators applied in order before the rule (e.g. ``[NNM()]``); they use the same f.
    """

    def __init__(self, f: int = 0, pre: Sequence[PreAggregator] = ()) -> None:
        self.f = check_f(f, self.name or type(self).__name__)
        self.pre: tuple[PreAggregator, ...] = tuple(pre)
        for p in self.pre:
            if not isinstance(p, PreAggregator):
                raise ConfigError(f"{self.name}: pre must hold pre-aggregators, got {type(p).__name__}.")

    def __repr__(self) -> str:
        pre = f", pre={[p.name for p in self.pre]}" if self.pre else ""
        return f"{type(self).__name__}(f={self.f}{pre})"

    @abstractmethod
    def decide(self, points: Points) -> Decision:
        """The rule itself: aggregate ``points`` (already validated and pre-aggregated)."""

    def commit(self, result: AggregationResult) -> None:
        """Called after a successful call; stateful rules update their state here (default: nothing)."""

    def reset(self) -> None:
        """Forget state carried between calls, in the rule and in its pre-aggregators."""
        for p in self.pre:
            p.reset()

    # ------------------------------------------------------------------ the template method
    def preconditions(self, n: int) -> int:
        """Check every stage for ``n`` inputs; return the number of rows the rule itself will see."""
        note = ""
        count = n
        for p in self.pre:
            p.check(count, self.f, note)
            out = p.output_count(count)
            if out != count:
                note = f" after {p.name} turned {n} inputs into {out}"
            count = out
        self.check(count, self.f, note)
        return count

    def _validate(self, x: object) -> Tensor:
        if not isinstance(x, Tensor):
            raise PreconditionError(
                f"{self.name} expects a torch.Tensor [n, d] of stacked updates, got {type(x).__name__}; "
                "stack them with torch.stack."
            )
        if x.dim() != 2:
            raise PreconditionError(
                f"{self.name} expects a 2-D tensor [n, d] (one row per update), got shape {tuple(x.shape)}; "
                "flatten each update and stack them."
            )
        if x.shape[0] < 1:
            raise PreconditionError(
                f"{self.name} got no inputs (shape {tuple(x.shape)}); wait for at least one update."
            )
        if x.shape[1] < 1:
            raise PreconditionError(f"{self.name} got updates of dimension 0 (shape {tuple(x.shape)}).")
        if not x.is_floating_point():
            raise PreconditionError(
                f"{self.name} expects floating-point updates, got dtype {x.dtype}; cast them to float32."
            )
        return x.detach()

    def __call__(self, x: Tensor) -> AggregationResult:
        with torch.no_grad():
            return self._run(x)

    def _run(self, x_in: Tensor) -> AggregationResult:
        x = self._validate(x_in)
        n = int(x.shape[0])
        n_rule = self.preconditions(n)
        stages: list[_Stage] = [*self.pre, self]
        basis = Basis(
            x,
            self.f,
            with_offset=any(s.changes_row_sums for s in stages),
            # rules without a kernel choice never compile (no surprise stall on their first call)
            backend=getattr(self, "backend", "eager"),
        )
        if any(s.uses_geometry for s in self.pre):
            basis.geometry(self.name)
        if any(s.needs_finite_inputs for s in stages):
            basis.ensure_finite(self.name)
        diagnostics: dict[str, Any] = {"rule": self.name, "n": n, "f": self.f}
        if self.pre:
            diagnostics["pre"] = [p.name for p in self.pre]
            diagnostics["n_rule"] = n_rule
        points = Points(basis)
        for p in self.pre:
            points = p.apply(points, self.f, diagnostics)
        if self.pre:
            diagnostics["mixing"] = points.coefficients()[:, :n].clone()
        decision = self.decide(points)

        basis_weights: Tensor | None = None
        if decision.weights is not None:
            source = decision.points if decision.points is not None else points
            vector, basis_weights = source.combine(decision.weights)
        elif decision.vector is not None:
            vector = decision.vector
        else:
            raise RuntimeError(f"{self.name}.decide returned neither weights nor a vector")

        if not all_finite(vector):
            basis.raise_nonfinite(self.name)
        if not basis.finite_verified and basis_weights is not None and bool((basis_weights[:n] != 0).all()):
            # every input contributes to a finite output, so none of them holds NaN or Inf
            basis.finite_verified = True
        basis.ensure_finite(self.name)

        weights = None
        if basis_weights is not None:
            weights = basis_weights[:n].clone()
            if basis.size > n:
                diagnostics["start_weight"] = float(basis_weights[n:].sum())
        diagnostics.update(decision.diagnostics)
        geo = basis.computed_geometry
        if geo is not None:
            diagnostics["recentred"] = geo.recentred
        diagnostics["passes"] = basis.passes
        result = AggregationResult(
            vector=vector,
            selected=decision.selected,
            weights=weights,
            scores=decision.scores,
            diagnostics=diagnostics,
        )
        self.commit(result)
        return result
