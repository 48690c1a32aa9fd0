"""Update-space attacks with a fixed rule (REFERENCES.md §2).

Each class documents the symptom it produces, so a run's curve can be matched to the attack behind it.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from scipy.stats import norm
from torch import Tensor

from dist_llm_train.attacks.base import Attack, check_finite_param, check_positive_param
from dist_llm_train.errors import ConfigError, PreconditionError

__all__ = [
    "ALIE",
    "GaussianNoise",
    "InnerProductManipulation",
    "Mimic",
    "NonFinite",
    "Scaling",
    "SignFlip",
    "Zero",
    "alie_z",
]


def _repeat(vector: Tensor, f: int) -> Tensor:
    # repeat() copies: callers may modify the result without touching the source (or each other's rows
    # sharing one storage, which expand() would do).
    return vector.unsqueeze(0).repeat(f, 1)


class SignFlip(Attack):
    """Send the negated mean of the honest updates (``of="mean"``) or the negated own update (``of="own"``).

    Symptom: with the mean rule and f large enough, the loss rises instead of falling; robust rules usually
    shrug it off because the flipped updates are far from the honest cluster.

    Args:
        of: ``"mean"`` negates the mean of the honest updates (omniscient); ``"own"`` negates ``own``.
    """

    name: ClassVar[str] = "sign-flip"

    def __init__(self, *, of: Literal["mean", "own"] = "mean", seed: int = 0) -> None:
        super().__init__(seed=seed)
        if of not in ("mean", "own"):
            raise ConfigError(f"attack 'sign-flip': of must be 'mean' or 'own', got {of!r}.")
        self.of = of
        self.needs_own = of == "own"
        self.min_honest = 1 if of == "mean" else 0

    def _forge(self, honest: Tensor, own: Tensor | None, f: int, generator: torch.Generator) -> Tensor:
        source = honest.mean(dim=0) if self.of == "mean" else own
        assert source is not None
        return _repeat(-source, f)

    def __repr__(self) -> str:
        return f"SignFlip(of={self.of!r})"


class Scaling(Attack):
    """Send ``scale * own`` (the seed scenario uses 1000).

    Symptom: with the mean rule the loss explodes to NaN/Inf within a few steps; norm-based defences (clipping,
    CenteredClip, Krum) remove it easily.

    Args:
        scale: the factor λ applied to the attacker's own update; any finite number.
    """

    name: ClassVar[str] = "scaling"
    needs_own = True

    def __init__(self, *, scale: float = 1000.0, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.scale = check_finite_param(self.name, "scale", scale)

    def _forge(self, honest: Tensor, own: Tensor | None, f: int, generator: torch.Generator) -> Tensor:
        assert own is not None
        return _repeat(own * self.scale, f)

    def __repr__(self) -> str:
        return f"Scaling(scale={self.scale})"


class GaussianNoise(Attack):
    """Send N(0, std²) per coordinate; each attacker draws its own vector.

    Symptom: with the mean rule, noise of total variance f·std²·d/n² per step; if the loss plateaus higher
    than in a clean run, std is large compared with the honest updates.

    Args:
        std: the standard deviation σ of every coordinate (> 0).
        seed: seeds the attack's generator (used when the call passes none).
    """

    name: ClassVar[str] = "gaussian"

    def __init__(self, *, std: float = 1.0, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.std = check_positive_param(self.name, "std", std)

    def _forge(self, honest: Tensor, own: Tensor | None, f: int, generator: torch.Generator) -> Tensor:
        d = honest.shape[1]
        # Draw on the generator's device (a CPU generator cannot fill a CUDA tensor), then move.
        noise = torch.randn((f, d), generator=generator, device=generator.device, dtype=torch.float32)
        return (noise * self.std).to(device=honest.device, dtype=honest.dtype)

    def __repr__(self) -> str:
        return f"GaussianNoise(std={self.std}, seed={self.seed})"


class Zero(Attack):
    """Send all zeros (a lazy worker that skips computation but still reports)."""

    name: ClassVar[str] = "zero"

    def _forge(self, honest: Tensor, own: Tensor | None, f: int, generator: torch.Generator) -> Tensor:
        return honest.new_zeros((f, honest.shape[1]))


_NONFINITE_VALUES = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class NonFinite(Attack):
    """Send updates made entirely of NaN or ±Inf (a crashed or hostile worker).

    Symptom: a rule without a finiteness check turns the model into NaN at once; the controller should
    reject such updates before they reach the rule.

    Args:
        value: ``"nan"``, ``"inf"`` or ``"-inf"``.
    """

    name: ClassVar[str] = "nonfinite"

    def __init__(self, *, value: Literal["nan", "inf", "-inf"] = "nan", seed: int = 0) -> None:
        super().__init__(seed=seed)
        if value not in _NONFINITE_VALUES:
            raise ConfigError(f"attack 'nonfinite': value must be 'nan', 'inf' or '-inf', got {value!r}.")
        self.value = value

    def _forge(self, honest: Tensor, own: Tensor | None, f: int, generator: torch.Generator) -> Tensor:
        return honest.new_full((f, honest.shape[1]), _NONFINITE_VALUES[self.value])

    def __repr__(self) -> str:
        return f"NonFinite(value={self.value!r})"


def alie_z(n: int, f: int, rule: Literal["paper", "epfml"] = "paper") -> float:
    """The ALIE scale z for ``n`` workers of which ``f`` are Byzantine.

    ``rule="paper"`` (Baruch et al. 2019): the largest z with Φ(z) < (n - s) / n, s = ⌊n/2 + 1⌋ - f, i.e.
    z = Φ⁻¹((n - s) / n) (≈ 0.47 for n = 25, f = 5). ``rule="epfml"`` (the epfml byzantine-robust-noniid code):
    Φ⁻¹((n - f - s) / (n - f)) (≈ 0.25 for n = 25, f = 5).

    Raises:
        PreconditionError: the formula has no finite answer (f is a majority of n); pass z explicitly.
    """
    if isinstance(n, bool) or isinstance(f, bool) or not isinstance(n, int) or not isinstance(f, int):
        raise PreconditionError(f"alie_z needs integer n and f, got n={n!r}, f={f!r}.")
    if rule not in ("paper", "epfml"):
        raise ConfigError(f"attack 'alie': z_rule must be 'paper' or 'epfml', got {rule!r}.")
    if n < 1 or f < 0 or f >= n:
        raise PreconditionError(f"alie_z needs 0 <= f < n, got n={n}, f={f}.")
    s = math.floor(n / 2 + 1) - f
    p = (n - s) / n if rule == "paper" else (n - f - s) / (n - f)
    z = float(norm.ppf(p))
    if not math.isfinite(z):
        raise PreconditionError(
            f"attack 'alie': the {rule} rule gives no finite z for n={n}, f={f} (s = ⌊n/2+1⌋ - f = {s}, "
            f"quantile {p:.4g}); pass z explicitly."
        )
    return z


class ALIE(Attack):
    """ "A Little Is Enough" (Baruch et al. 2019): send μ - z·σ, per coordinate over the honest updates.

    μ and σ are the per-coordinate mean and (unbiased) standard deviation of the honest updates. The small
    shift stays inside the honest spread, so distance- and rank-based rules keep it and it drags them
    consistently in one direction. Symptom: median, trimmed mean and Krum converge to a clearly worse loss
    (or diverge) without any single update looking abnormal.

    Args:
        z: the shift in standard deviations; unset: derived from n = h + f and f by ``z_rule``.
        z_rule: ``"paper"`` (default, z ≈ 0.47 at n=25, f=5) or ``"epfml"`` (z ≈ 0.25); see :func:`alie_z`.
    """

    name: ClassVar[str] = "alie"
    min_honest = 2

    def __init__(
        self, *, z: float | None = None, z_rule: Literal["paper", "epfml"] = "paper", seed: int = 0
    ) -> None:
        super().__init__(seed=seed)
        if z_rule not in ("paper", "epfml"):
            raise ConfigError(f"attack 'alie': z_rule must be 'paper' or 'epfml', got {z_rule!r}.")
        self.z = None if z is None else check_finite_param(self.name, "z", z)
        self.z_rule = z_rule

    def z_for(self, n: int, f: int) -> float:
        """The z this attack uses with n workers in total, f of them Byzantine."""
        return self.z if self.z is not None else alie_z(n, f, self.z_rule)

    def _forge(self, honest: Tensor, own: Tensor | None, f: int, generator: torch.Generator) -> Tensor:
        z = self.z_for(honest.shape[0] + f, f)
        mu = honest.mean(dim=0)
        sigma = honest.std(dim=0, correction=1)
        return _repeat(mu - z * sigma, f)

    def __repr__(self) -> str:
        return f"ALIE(z={self.z}, z_rule={self.z_rule!r})"


class InnerProductManipulation(Attack):
    """Inner product manipulation (Xie et al. 2019): send -ε·(mean of honest).

    Small ε (0.1) with many attackers pulls median and trimmed mean towards zero progress; large ε breaks the
    mean and Krum. Symptom: training stalls (loss flat) rather than diverging.

    Args:
        epsilon: the scale ε (> 0).
    """

    name: ClassVar[str] = "ipm"
    min_honest = 1

    def __init__(self, *, epsilon: float = 0.1, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.epsilon = check_positive_param(self.name, "epsilon", epsilon)

    def _forge(self, honest: Tensor, own: Tensor | None, f: int, generator: torch.Generator) -> Tensor:
        return _repeat(honest.mean(dim=0) * -self.epsilon, f)

    def __repr__(self) -> str:
        return f"InnerProductManipulation(epsilon={self.epsilon})"


class Mimic(Attack):
    """All attackers copy one honest update, over-weighting that worker's data (harmful when non-IID).

    The target is ``honest[index]``; the caller must keep the honest rows in a stable worker order across
    rounds for the attack to keep copying the same worker.

    Args:
        index: row of ``honest`` to copy; unset: chosen once from ``seed`` (the same row every round for the
            same h, independent of any generator passed at call time).
    """

    name: ClassVar[str] = "mimic"
    min_honest = 1

    def __init__(self, *, index: int | None = None, seed: int = 0) -> None:
        super().__init__(seed=seed)
        if index is not None and (isinstance(index, bool) or not isinstance(index, int) or index < 0):
            raise ConfigError(f"attack 'mimic': index must be an integer >= 0 or unset, got {index!r}.")
        self.index = index

    def target(self, h: int) -> int:
        """The honest row copied when there are ``h`` honest updates."""
        if self.index is not None:
            if self.index >= h:
                raise PreconditionError(
                    f"attack 'mimic': index {self.index} is out of range for h={h} honest updates; "
                    f"use 0 <= index < {h}."
                )
            return self.index
        # A fresh generator from the seed: the choice is fixed for the attack's lifetime, not redrawn per round.
        return int(torch.randint(h, (1,), generator=torch.Generator().manual_seed(self.seed)).item())

    def _forge(self, honest: Tensor, own: Tensor | None, f: int, generator: torch.Generator) -> Tensor:
        return _repeat(honest[self.target(honest.shape[0])], f)

    def __repr__(self) -> str:
        return f"Mimic(index={self.index}, seed={self.seed})"
