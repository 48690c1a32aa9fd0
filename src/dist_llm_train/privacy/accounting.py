"""Privacy accounting for the Poisson-subsampled Gaussian mechanism (add/remove one sample or worker).

Backed by Opacus' maintained accountants (``opacus.accountants``): RDP (Mironov et al. 2017/2019) and PRV
(Gopi et al. 2021). Nothing here re-derives the mechanism's privacy curve; this module only chooses the
accountant, the RDP orders and the RDP → (ε, δ) conversion, and makes those choices explicit parameters:

- ``rdp_conversion="opacus"`` (default): Opacus' conversion (Balle et al. 2020, Prop. 12:
  ε = rdp_α + log((α-1)/α) - (log δ + log α)/(α-1)). Current TF Privacy and ``dp-accounting`` use the same
  one; with the default orders it reproduces both libraries' test values in REFERENCES.md §5, including the
  TF Privacy ones (0.72422 at order 19, 1.41550 at order 13).
- ``rdp_conversion="classic"``: the original ε = rdp_α - log δ/(α-1) (Mironov 2017), always a larger,
  looser ε (e.g. 0.94 instead of 0.72422). Only for comparing with older papers and code.
- ``orders``: the RDP orders α to minimise over; default :data:`DEFAULT_ORDERS` (Opacus'
  ``RDPAccountant.DEFAULT_ALPHAS``, the same list as TF Privacy's default).

PRV is tighter than RDP (6.777 vs 7.327 for q=0.04, σ=1.5, ~2250 steps) but slower (about a second per
evaluation against milliseconds).

Opacus imports its whole training engine, which takes seconds, so it is imported on first use: workers
that only clip never pay for it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from dist_llm_train.errors import ConfigError

__all__ = [
    "DEFAULT_ORDERS",
    "PrivacyAccountant",
    "compute_epsilon",
    "noise_multiplier_for",
]

AccountantName = Literal["rdp", "prv"]
RdpConversion = Literal["opacus", "classic"]

# Opacus RDPAccountant.DEFAULT_ALPHAS (== TF Privacy's default orders); copied so that reading it does not
# import Opacus; a test keeps the two in sync.
DEFAULT_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(12, 64)]
)

# Opacus' get_noise_multiplier gives up above this σ ("budget too low"); same bound here.
_MAX_SIGMA = 1e6

History = list[tuple[float, float, int]]  # (noise_multiplier, sample_rate, steps), Opacus' layout


def _check_sample_rate(sample_rate: object) -> float:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)) or not 0 < sample_rate <= 1:
        raise ConfigError(
            f"sample_rate must be in (0, 1] (expected batch / dataset size, or expected workers / total "
            f"workers), got {sample_rate!r}."
        )
    return float(sample_rate)


def _check_noise(noise_multiplier: object) -> float:
    if (
        isinstance(noise_multiplier, bool)
        or not isinstance(noise_multiplier, (int, float))
        or not (math.isfinite(noise_multiplier) and noise_multiplier >= 0)
    ):
        raise ConfigError(f"privacy.noise_multiplier must be finite and >= 0, got {noise_multiplier!r}.")
    return float(noise_multiplier)


def _check_steps(steps: object, name: str = "steps") -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ConfigError(f"{name} must be an integer >= 0, got {steps!r}.")
    return int(steps)


def _check_delta(delta: object) -> float:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise ConfigError(
            f"privacy.delta must be in (0, 1), got {delta!r}; use well below 1/(number of samples or workers)."
        )
    return float(delta)


def _check_options(
    accountant: object, rdp_conversion: object, orders: Sequence[float] | None
) -> tuple[float, ...] | None:
    if accountant not in ("rdp", "prv"):
        raise ConfigError(f"privacy.accountant must be 'rdp' or 'prv', got {accountant!r}.")
    if rdp_conversion not in ("opacus", "classic"):
        raise ConfigError(f"rdp_conversion must be 'opacus' or 'classic', got {rdp_conversion!r}.")
    if accountant == "prv" and (orders is not None or rdp_conversion != "opacus"):
        raise ConfigError(
            "orders and rdp_conversion apply to the 'rdp' accountant only; drop them for 'prv'."
        )
    if orders is None:
        return None
    checked = tuple(float(a) for a in orders)
    if not checked or any(not (math.isfinite(a) and a > 1) for a in checked):
        raise ConfigError(f"orders must be a non-empty list of RDP orders α > 1, got {orders!r}.")
    return checked


def _epsilon(
    history: History,
    delta: float,
    accountant: AccountantName,
    rdp_conversion: RdpConversion,
    orders: tuple[float, ...] | None,
    eps_error: float,
) -> float:
    history = [(sigma, q, n) for sigma, q, n in history if n > 0]
    if not history:
        return 0.0
    if any(sigma == 0.0 for sigma, _, _ in history):
        return math.inf  # an un-noised release has no finite guarantee
    if accountant == "prv":
        from opacus.accountants import PRVAccountant

        prv = PRVAccountant()
        prv.history = list(history)
        return float(prv.get_epsilon(delta=delta, eps_error=eps_error))

    from opacus.accountants.analysis import rdp as rdp_analysis

    alphas = list(orders if orders is not None else DEFAULT_ORDERS)
    rdp = sum(
        rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=n, orders=alphas)
        for sigma, q, n in history
    )
    if rdp_conversion == "opacus":
        eps, _ = rdp_analysis.get_privacy_spent(orders=alphas, rdp=rdp, delta=delta)
        return float(eps)
    alpha = np.asarray(alphas)
    classic = np.asarray(rdp) - math.log(delta) / (alpha - 1)
    return float(np.nanmin(classic))


def compute_epsilon(
    sample_rate: float,
    noise_multiplier: float,
    steps: int,
    delta: float,
    accountant: AccountantName = "rdp",
    *,
    rdp_conversion: RdpConversion = "opacus",
    orders: Sequence[float] | None = None,
    eps_error: float = 0.01,
) -> float:
    """ε after ``steps`` compositions of the Poisson-subsampled Gaussian mechanism at rate q and noise σ.

    Args:
        sample_rate: q, the probability that one sample (or worker) takes part in a step.
        noise_multiplier: σ, noise standard deviation over the clipping bound; 0 gives ε = inf.
        steps: number of noised steps (aggregations).
        delta: δ of the (ε, δ) guarantee; choose it well below 1/N for N samples (or workers).
        accountant: ``"rdp"`` (fast, a bit loose) or ``"prv"`` (tighter, ~1 s per call).
        rdp_conversion: RDP → (ε, δ) conversion, ``"opacus"`` or ``"classic"`` (see module docstring).
        orders: RDP orders to optimise over (RDP only); default :data:`DEFAULT_ORDERS`.
        eps_error: PRV only: the allowed error in ε.
    """
    q = _check_sample_rate(sample_rate)
    sigma = _check_noise(noise_multiplier)
    n = _check_steps(steps)
    d = _check_delta(delta)
    alphas = _check_options(accountant, rdp_conversion, orders)
    return _epsilon([(sigma, q, n)], d, accountant, rdp_conversion, alphas, eps_error)


def noise_multiplier_for(
    target_epsilon: float,
    sample_rate: float,
    steps: int | None = None,
    delta: float = 1e-5,
    accountant: AccountantName = "rdp",
    *,
    epochs: float | None = None,
    rdp_conversion: RdpConversion = "opacus",
    orders: Sequence[float] | None = None,
    epsilon_tolerance: float = 0.01,
) -> float:
    """The noise multiplier σ that keeps ε ≤ ``target_epsilon`` after ``steps`` steps (or ``epochs`` epochs).

    Same search as Opacus' ``get_noise_multiplier`` (double σ until ε ≤ target, then bisect until the ε of the
    returned σ is within ``epsilon_tolerance`` below the target), so results agree with Opacus. The returned
    σ always satisfies the target; a smaller tolerance gives a slightly smaller σ and a longer search.

    Args:
        target_epsilon: the ε to stay within (> 0).
        sample_rate: q per step.
        steps: number of steps; give exactly one of ``steps`` and ``epochs``.
        delta: δ of the guarantee.
        accountant, rdp_conversion, orders: as in :func:`compute_epsilon`.
        epochs: passes over the data; steps = ⌊epochs / q⌋.
        epsilon_tolerance: how far below the target the achieved ε may end (> 0).

    Raises:
        ConfigError: both or neither of steps/epochs, or a target so small that σ would exceed 1e6.
    """
    if (
        isinstance(target_epsilon, bool)
        or not isinstance(target_epsilon, (int, float))
        or not (math.isfinite(target_epsilon) and target_epsilon > 0)
    ):
        raise ConfigError(f"privacy.target_epsilon must be finite and > 0, got {target_epsilon!r}.")
    if not (isinstance(epsilon_tolerance, (int, float)) and epsilon_tolerance > 0):
        raise ConfigError(f"epsilon_tolerance must be > 0, got {epsilon_tolerance!r}.")
    q = _check_sample_rate(sample_rate)
    d = _check_delta(delta)
    alphas = _check_options(accountant, rdp_conversion, orders)
    if (steps is None) == (epochs is None):
        raise ConfigError("noise_multiplier_for needs exactly one of steps and epochs.")
    if steps is None:
        assert epochs is not None
        if not (isinstance(epochs, (int, float)) and math.isfinite(epochs) and epochs > 0):
            raise ConfigError(f"epochs must be > 0, got {epochs!r}.")
        # The tiny slack keeps e.g. 3 / 0.1 = 29.999999999999996 from losing a step to rounding.
        n = math.floor(epochs / q * (1 + 1e-12))
    else:
        n = _check_steps(steps)
    if n == 0:
        return 0.0

    def eps_at(sigma: float) -> float:
        # Trial σ far from the answer put the optimal order at the end of the list, and Opacus warns about
        # it on every trial; only the final σ matters, and compute_epsilon on it still warns if relevant.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Optimal order is the (smallest|largest) alpha")
            return _epsilon([(sigma, q, n)], d, accountant, rdp_conversion, alphas, 0.01)

    sigma_low, sigma_high = 0.0, 10.0
    eps_high = math.inf
    while eps_high > target_epsilon:
        sigma_high *= 2
        if sigma_high > _MAX_SIGMA:
            raise ConfigError(
                f"target_epsilon={target_epsilon} is not reachable with noise_multiplier <= {_MAX_SIGMA:g} "
                f"for sample_rate={q}, {n} steps, delta={d}; raise the target or lower the steps or sample rate."
            )
        eps_high = eps_at(sigma_high)
    while target_epsilon - eps_high > epsilon_tolerance:
        sigma = (sigma_low + sigma_high) / 2
        eps = eps_at(sigma)
        if eps < target_epsilon:
            sigma_high, eps_high = sigma, eps
        else:
            sigma_low = sigma
    return sigma_high


class PrivacyAccountant:
    """Privacy spent so far by one run: record each noised step, ask for ε at any time.

    The coordinator calls :meth:`step` once per noised aggregation; consecutive steps with the same
    (q, σ) are stored as one entry, so memory stays small for long runs. :meth:`state_dict` /
    :meth:`load_state_dict` carry the history through checkpoints.

    Args:
        accountant: ``"rdp"`` or ``"prv"`` (see :func:`compute_epsilon`).
        delta: the δ at which :meth:`epsilon` reports by default.
        rdp_conversion, orders: as in :func:`compute_epsilon`.
    """

    def __init__(
        self,
        accountant: AccountantName = "rdp",
        delta: float = 1e-5,
        *,
        rdp_conversion: RdpConversion = "opacus",
        orders: Sequence[float] | None = None,
    ) -> None:
        self.orders = _check_options(accountant, rdp_conversion, orders)
        self.accountant: AccountantName = accountant
        self.rdp_conversion: RdpConversion = rdp_conversion
        self.delta = _check_delta(delta)
        self.history: History = []

    def step(self, sample_rate: float, noise_multiplier: float, steps: int = 1) -> None:
        """Record ``steps`` noised steps at sample rate q and noise multiplier σ."""
        q = _check_sample_rate(sample_rate)
        sigma = _check_noise(noise_multiplier)
        n = _check_steps(steps)
        if n == 0:
            return
        if self.history and self.history[-1][:2] == (sigma, q):
            self.history[-1] = (sigma, q, self.history[-1][2] + n)
        else:
            self.history.append((sigma, q, n))

    @property
    def steps(self) -> int:
        """Total number of noised steps recorded."""
        return sum(n for _, _, n in self.history)

    def epsilon(self, delta: float | None = None, *, eps_error: float = 0.01) -> float:
        """ε spent so far at ``delta`` (default: the accountant's δ); 0 before any step."""
        d = self.delta if delta is None else _check_delta(delta)
        return _epsilon(self.history, d, self.accountant, self.rdp_conversion, self.orders, eps_error)

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state for checkpoints (JSON/msgpack-able)."""
        return {
            "accountant": self.accountant,
            "delta": self.delta,
            "rdp_conversion": self.rdp_conversion,
            "orders": None if self.orders is None else list(self.orders),
            "history": [list(entry) for entry in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict` (replaces the current history)."""
        try:
            orders = _check_options(state["accountant"], state["rdp_conversion"], state["orders"])
            delta = _check_delta(state["delta"])
            history = [
                (_check_noise(s), _check_sample_rate(q), _check_steps(n)) for s, q, n in state["history"]
            ]
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"PrivacyAccountant.load_state_dict: malformed state ({exc}).") from exc
        self.accountant = state["accountant"]
        self.rdp_conversion = state["rdp_conversion"]
        self.orders, self.delta, self.history = orders, delta, history

    def __repr__(self) -> str:
        return f"PrivacyAccountant(accountant={self.accountant!r}, delta={self.delta}, steps={self.steps})"
