"""White-box optimal ALIE / IPM: the searched scale must do at least as much damage as the fixed one.

The defender's rules here are local callables (plain mean; true coordinate median returned through a
``.vector`` attribute, as the aggregation package's results are), so these tests do not depend on that
package's progress.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from dist_llm_train.attacks import OptimalScaleAttack, alie_z, build_attack

H, F, D = 20, 5, 64


@dataclass
class _Result:
    vector: torch.Tensor


def _mean(x: torch.Tensor) -> _Result:
    return _Result(x.mean(dim=0))


def _median(x: torch.Tensor) -> _Result:
    # n = 25 is odd, so torch.median's lower middle value is the true median.
    assert x.shape[0] % 2 == 1
    return _Result(x.median(dim=0).values)


class _StatefulClip:
    """A CenteredClip-like rule whose state moves on every call (to check the attack leaves it alone)."""

    def __init__(self) -> None:
        self.center = torch.zeros(D)
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> _Result:
        self.calls += 1
        diff = x - self.center
        scale = torch.clamp(1.0 / diff.norm(dim=1, keepdim=True).clamp_min(1e-12), max=1.0)
        self.center = self.center + (diff * scale).mean(dim=0)
        return _Result(self.center.clone())


@pytest.fixture(scope="module")
def honest() -> torch.Tensor:
    return torch.randn(H, D, generator=torch.Generator().manual_seed(0)) + 0.5


def _deviation(rule: Callable[[torch.Tensor], _Result], honest: torch.Tensor, byz: torch.Tensor) -> float:
    out = rule(torch.cat([honest, byz]))
    return float((out.vector - honest.mean(0)).norm())


@pytest.mark.parametrize("rule", [_mean, _median], ids=["mean", "median"])
def test_optimal_alie_beats_fixed_alie(rule: Callable[[torch.Tensor], _Result], honest: torch.Tensor) -> None:
    attack = build_attack("optimal-alie", aggregator=rule)
    byz = attack(honest, None, F)
    assert isinstance(attack, OptimalScaleAttack)
    assert attack.last_scale is not None and attack.last_deviation is not None
    optimal = _deviation(rule, honest, byz)
    fixed = _deviation(rule, honest, build_attack("alie")(honest, None, F))
    assert optimal == pytest.approx(attack.last_deviation, rel=1e-5)
    assert optimal > fixed * 1.01
    # The sent vectors are ALIE vectors at the chosen scale.
    expected = honest.mean(0) - attack.last_scale * honest.std(0)
    assert torch.allclose(byz, expected.repeat(F, 1), atol=1e-6)
    assert attack.deviation(honest, F, alie_z(H + F, F)) == pytest.approx(fixed, rel=1e-5)


@pytest.mark.parametrize("rule", [_mean, _median], ids=["mean", "median"])
def test_optimal_ipm_beats_fixed_ipm(rule: Callable[[torch.Tensor], _Result], honest: torch.Tensor) -> None:
    attack = build_attack("optimal-ipm", aggregator=rule)
    byz = attack(honest, None, F)
    assert isinstance(attack, OptimalScaleAttack) and attack.last_scale is not None
    optimal = _deviation(rule, honest, byz)
    fixed = _deviation(rule, honest, build_attack("ipm")(honest, None, F))
    assert optimal > fixed * 1.01
    assert torch.allclose(byz, (-attack.last_scale * honest.mean(0)).repeat(F, 1), atol=1e-6)


def test_against_the_mean_the_search_goes_to_the_upper_bound(honest: torch.Tensor) -> None:
    # Damage against the mean grows linearly with the scale, so the best scale is the range's top.
    attack = build_attack("optimal-ipm", aggregator=_mean, scale_range=(0.0, 3.0))
    attack(honest, None, F)
    assert attack.last_scale == pytest.approx(3.0)


def test_refinement_finds_an_interior_maximum() -> None:
    # A rule whose damage peaks at τ = 0.37 (not on the grid): output = the attackers' value clipped to the
    # honest spread, zeroed past 0.37 → the maximum is interior and only refinement can approach it.
    honest = torch.zeros(4, 1)
    honest[:, 0] = torch.tensor([-1.0, 1.0, -1.0, 1.0])  # mean 0, std ≈ 1.155

    def peaked(x: torch.Tensor) -> torch.Tensor:
        tau = float(-x[-1, 0]) / float(honest.std(0)[0])
        return torch.tensor([tau if tau <= 0.37 else 0.0])

    coarse = build_attack(
        "optimal-alie", aggregator=peaked, scale_range=(0.0, 1.0), grid_points=5, refine_steps=0
    )
    coarse(honest, None, 1)
    fine = build_attack(
        "optimal-alie", aggregator=peaked, scale_range=(0.0, 1.0), grid_points=5, refine_steps=30
    )
    fine(honest, None, 1)
    assert coarse.last_scale == pytest.approx(0.25)
    assert fine.last_scale is not None and 0.36 < fine.last_scale <= 0.37


def test_stateful_defender_is_not_advanced_by_the_search(honest: torch.Tensor) -> None:
    rule = _StatefulClip()
    attack = build_attack("optimal-alie", aggregator=rule, grid_points=5, refine_steps=3)
    attack(honest, None, F)
    assert rule.calls == 0 and torch.equal(rule.center, torch.zeros(D))


def test_evaluation_budget_is_grid_plus_refine(honest: torch.Tensor) -> None:
    calls = []

    def counting(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return x.median(dim=0).values

    build_attack("optimal-ipm", aggregator=counting, grid_points=7, refine_steps=5)(honest, None, F)
    assert len(calls) == 12


@pytest.mark.parametrize("rule_name", ["trimmed-mean", "krum"])
@pytest.mark.parametrize(("name", "fixed_name"), [("optimal-alie", "alie"), ("optimal-ipm", "ipm")])
def test_against_the_aggregation_package(
    rule_name: str, name: str, fixed_name: str, honest: torch.Tensor
) -> None:
    from dist_llm_train.aggregation import build_aggregator

    rule = build_aggregator(rule_name, f=F)
    attack = build_attack(name, aggregator=rule)
    optimal = _deviation(rule, honest, attack(honest, None, F))
    fixed = _deviation(rule, honest, build_attack(fixed_name)(honest, None, F))
    assert optimal > fixed * 1.01


@pytest.mark.parametrize(("rule_name", "needed"), [("median", 4), ("trimmed-mean", 4), ("bulyan", 12)])
def test_the_attack_waits_for_enough_honest_updates_for_the_defenders_rule(
    rule_name: str, needed: int, honest: torch.Tensor
) -> None:
    """The search runs the defender's rule on honest + f rows: with too few honest updates the rule's own
    precondition (n >= 2f + 1 for the median, 4f + 3 for Bulyan) would fail inside the attack."""
    from dist_llm_train.aggregation import build_aggregator
    from dist_llm_train.errors import PreconditionError

    attack = build_attack("optimal-ipm", aggregator=build_aggregator(rule_name, f=3), grid_points=3)
    assert attack.required_honest(3) == needed
    with pytest.raises(PreconditionError, match=f"needs at least {needed} honest updates"):
        attack(honest[: needed - 1], None, 3)
    assert attack(honest[:needed], None, 3).shape == (3, D)
