"""Each attack against its definition (REFERENCES.md §2) on small tensors with exact values."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import norm

from dist_llm_train.attacks import (
    ALIE,
    Attack,
    LabelFlip,
    alie_z,
    available_attacks,
    build_attack,
)
from dist_llm_train.errors import ConfigError, PreconditionError

HONEST = torch.tensor([[1.0, 2.0, -3.0], [3.0, 0.0, -1.0], [2.0, 4.0, -2.0]])
OWN = torch.tensor([0.5, -1.0, 2.0])


def _median_agg(x: torch.Tensor) -> torch.Tensor:
    return x.median(dim=0).values


def _make(name: str) -> Attack:
    if name == "label-flip":
        return build_attack(name, vocab_size=11)
    if name.startswith("optimal-"):
        return build_attack(name, aggregator=_median_agg, grid_points=4, refine_steps=2)
    return build_attack(name)


def test_registry_lists_every_attack() -> None:
    assert available_attacks() == sorted(
        [
            "sign-flip",
            "scaling",
            "gaussian",
            "zero",
            "nonfinite",
            "alie",
            "ipm",
            "mimic",
            "label-flip",
            "optimal-alie",
            "optimal-ipm",
        ]
    )


def test_sign_flip_of_mean_and_of_own() -> None:
    out = build_attack("sign-flip")(HONEST, None, 2)
    expected = -torch.tensor([2.0, 2.0, -2.0])
    assert torch.equal(out, expected.repeat(2, 1))
    out_own = build_attack("sign-flip", of="own")(HONEST, OWN, 3)
    assert torch.equal(out_own, (-OWN).repeat(3, 1))


def test_scaling_default_is_1000_times_own() -> None:
    assert torch.equal(build_attack("scaling")(HONEST, OWN, 2), (1000.0 * OWN).repeat(2, 1))
    assert torch.equal(build_attack("scaling", scale=-3.0)(HONEST, OWN, 1), (-3.0 * OWN).unsqueeze(0))


def test_zero_and_nonfinite() -> None:
    assert torch.equal(build_attack("zero")(HONEST, None, 2), torch.zeros(2, 3))
    assert torch.isnan(build_attack("nonfinite")(HONEST, None, 2)).all()
    assert torch.equal(build_attack("nonfinite", value="inf")(HONEST, None, 1), torch.full((1, 3), math.inf))
    assert torch.equal(
        build_attack("nonfinite", value="-inf")(HONEST, None, 1), torch.full((1, 3), -math.inf)
    )


def test_gaussian_draws_per_attacker_are_seeded_and_distinct() -> None:
    attack = build_attack("gaussian", std=2.0, seed=7)
    gen = torch.Generator().manual_seed(3)
    out = attack(HONEST, None, 4, generator=gen)
    expected = torch.randn((4, 3), generator=torch.Generator().manual_seed(3)) * 2.0
    assert torch.equal(out, expected)
    assert not torch.equal(out[0], out[1])
    # Without a generator the attack's own seed decides; the same seed gives the same first draw.
    first = build_attack("gaussian", std=2.0, seed=7)(HONEST, None, 2)
    again = build_attack("gaussian", std=2.0, seed=7)(HONEST, None, 2)
    assert torch.equal(first, again)


def test_gaussian_has_the_requested_std() -> None:
    out = build_attack("gaussian", std=0.5)(torch.zeros(1, 100_000), None, 2)
    assert abs(out.std().item() - 0.5) < 0.01
    assert abs(out.mean().item()) < 0.01


def test_ipm_is_minus_epsilon_mean() -> None:
    out = build_attack("ipm")(HONEST, None, 2)
    assert torch.allclose(out, (-0.1 * torch.tensor([2.0, 2.0, -2.0])).repeat(2, 1))
    assert torch.allclose(
        build_attack("ipm", epsilon=3.0)(HONEST, None, 1)[0], torch.tensor([-6.0, -6.0, 6.0])
    )


def test_mimic_copies_the_chosen_honest_row() -> None:
    assert torch.equal(build_attack("mimic", index=1)(HONEST, None, 3), HONEST[1].repeat(3, 1))
    seeded = build_attack("mimic", seed=5)
    row = seeded.target(3)
    expected = int(torch.randint(3, (1,), generator=torch.Generator().manual_seed(5)).item())
    assert row == expected
    # The seeded choice is fixed across rounds, whatever generator a round passes.
    for s in range(3):
        out = seeded(HONEST, None, 2, generator=torch.Generator().manual_seed(s))
        assert torch.equal(out, HONEST[row].repeat(2, 1))
    with pytest.raises(PreconditionError, match="out of range"):
        build_attack("mimic", index=3)(HONEST, None, 1)


def test_alie_definition_with_explicit_z() -> None:
    out = build_attack("alie", z=1.5)(HONEST, None, 2)
    mu = torch.tensor([2.0, 2.0, -2.0])
    sigma = torch.tensor([1.0, 2.0, 1.0])  # unbiased std of the columns
    assert torch.allclose(out, (mu - 1.5 * sigma).repeat(2, 1))


def test_alie_default_z_matches_paper_and_epfml_values() -> None:
    assert alie_z(25, 5) == pytest.approx(0.4677, abs=5e-4)
    assert alie_z(25, 5, "epfml") == pytest.approx(0.2533, abs=5e-4)
    # Φ(z) = (n - s)/n with s = ⌊n/2+1⌋ - f = 8 for n=25, f=5.
    assert alie_z(25, 5) == pytest.approx(norm.ppf(17 / 25))
    honest = torch.randn(20, 6, generator=torch.Generator().manual_seed(0))
    out = build_attack("alie")(honest, None, 5)
    expected = honest.mean(0) - alie_z(25, 5) * honest.std(0)
    assert torch.allclose(out, expected.repeat(5, 1))
    epfml = build_attack("alie", z_rule="epfml")
    assert isinstance(epfml, ALIE)
    assert epfml.z_for(25, 5) == pytest.approx(0.2533, abs=5e-4)


def test_alie_rejects_a_byzantine_majority_without_explicit_z() -> None:
    with pytest.raises(PreconditionError, match="pass z explicitly"):
        alie_z(10, 6)
    assert build_attack("alie", z=1.0)(HONEST, None, 6).shape == (6, 3)


def test_label_flip_is_a_seeded_derangement() -> None:
    flip = LabelFlip(vocab_size=50, seed=3)
    ids = torch.arange(50)
    mapped = flip.transform_targets(ids)
    assert not (mapped == ids).any()
    assert sorted(mapped.tolist()) == list(range(50))
    assert torch.equal(LabelFlip(vocab_size=50, seed=3).permutation, flip.permutation)
    assert not torch.equal(LabelFlip(vocab_size=50, seed=4).permutation, flip.permutation)


@settings(max_examples=30, deadline=None)
@given(vocab=st.integers(min_value=2, max_value=300), seed=st.integers(min_value=0, max_value=2**31))
def test_label_flip_changes_every_token(vocab: int, seed: int) -> None:
    flip = LabelFlip(vocab_size=vocab, seed=seed)
    targets = torch.randint(vocab, (4, 9), generator=torch.Generator().manual_seed(seed))
    before = targets.clone()
    flipped = flip.transform_targets(targets)
    assert torch.equal(targets, before)
    assert flipped.dtype == targets.dtype and flipped.shape == targets.shape
    assert not (flipped == targets).any()
    # A permutation: the flip is invertible, so no information is lost, only poisoned.
    inverse = torch.argsort(flip.permutation)
    assert torch.equal(inverse[flipped], targets)


def test_label_flip_keeps_ignore_index_and_update_path_forwards_own() -> None:
    attack = build_attack("label-flip", vocab_size=8, seed=1)
    assert attack.is_data_attack
    assert isinstance(attack, LabelFlip)
    targets = torch.tensor([[0, -100, 7], [-100, 3, 3]])
    flipped = attack.transform_targets(targets)
    assert torch.equal(flipped[targets < 0], targets[targets < 0])
    assert torch.equal(attack(HONEST, OWN, 2), OWN.repeat(2, 1))
    with pytest.raises(PreconditionError, match="outside the vocabulary"):
        attack.transform_targets(torch.tensor([8]))
    with pytest.raises(PreconditionError, match="integer"):
        attack.transform_targets(torch.tensor([1.0]))


@pytest.mark.parametrize("name", sorted(available_attacks()))
def test_no_attack_modifies_its_inputs_or_aliases_them(name: str) -> None:
    honest = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    own = torch.randn(5, generator=torch.Generator().manual_seed(2))
    honest_before, own_before = honest.clone(), own.clone()
    out = _make(name)(honest, own, 3)
    assert out.shape == (3, 5)
    assert out.dtype == honest.dtype
    assert torch.equal(honest, honest_before) and torch.equal(own, own_before)
    out.add_(1.0)  # the result must own its memory
    assert torch.equal(honest, honest_before) and torch.equal(own, own_before)
    assert _make(name)(honest, own, 0).shape == (0, 5)


def test_float64_inputs_give_float64_outputs() -> None:
    honest = HONEST.double()
    for name in ("sign-flip", "gaussian", "zero", "alie", "ipm", "mimic"):
        assert build_attack(name)(honest, None, 2).dtype == torch.float64


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("nope", {}, "unknown attack"),
        ("scaling", {"lam": 3.0}, "does not take"),
        ("scaling", {"scale": math.inf}, "finite"),
        ("gaussian", {"std": 0.0}, "> 0"),
        ("gaussian", {"std": -1.0}, "> 0"),
        ("ipm", {"epsilon": -0.1}, "> 0"),
        ("sign-flip", {"of": "median"}, "'mean' or 'own'"),
        ("nonfinite", {"value": "big"}, "'nan', 'inf' or '-inf'"),
        ("alie", {"z_rule": "other"}, "'paper' or 'epfml'"),
        ("alie", {"z": math.nan}, "finite"),
        ("mimic", {"index": -1}, ">= 0"),
        ("label-flip", {}, "needs parameter"),
        ("label-flip", {"vocab_size": 1}, ">= 2"),
        ("optimal-alie", {}, "needs aggregator"),
        ("optimal-ipm", {"aggregator": _median_agg, "scale_range": (2.0, 1.0)}, "low < high"),
        ("optimal-ipm", {"aggregator": _median_agg, "grid_points": 2}, ">= 3"),
        ("gaussian", {"seed": 1.5}, "seed"),
    ],
)
def test_bad_params_are_config_errors(name: str, params: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_attack(name, **params)


def test_bad_calls_are_precondition_errors() -> None:
    with pytest.raises(PreconditionError, match="own"):
        build_attack("scaling")(HONEST, None, 1)
    with pytest.raises(PreconditionError, match=r"shape \[d\]"):
        build_attack("scaling")(HONEST, torch.zeros(4), 1)
    with pytest.raises(PreconditionError, match=r"\[h, d\]"):
        build_attack("zero")(torch.zeros(3), None, 1)
    with pytest.raises(PreconditionError, match="f must be"):
        build_attack("zero")(HONEST, None, -1)
    with pytest.raises(PreconditionError, match="at least 2 honest"):
        build_attack("alie")(HONEST[:1], None, 1)
    with pytest.raises(PreconditionError, match="at least 1 honest"):
        build_attack("ipm")(HONEST[:0], None, 1)
