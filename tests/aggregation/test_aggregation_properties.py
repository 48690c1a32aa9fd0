"""Property tests (hypothesis): invariances, robustness guarantees and distance precision."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from dist_llm_train.aggregation import (
    Aggregator,
    CenteredClip,
    available_aggregators,
    build_aggregator,
    pairwise_sq_distances,
)

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)

# the bound each rule needs: n >= a f + b
BOUND = {
    "mean": (0, 1),
    "median": (2, 1),
    "trimmed-mean": (2, 1),
    "krum": (2, 3),
    "multi-krum": (2, 3),
    "bulyan": (4, 3),
    "geometric-median": (2, 1),
    "centered-clip": (0, 1),
}
# translation-equivariant rules: all of them (CenteredClip when its starting point moves too)
EQUIVARIANT = set(available_aggregators())
# pre-aggregator chains that keep a permutation-invariant rule permutation-invariant (bucketing does so
# only in distribution, tested separately)
PRE_COMBOS: list[tuple[str, ...]] = [("nnm",), ("clip", "nnm")]


@st.composite
def problems(draw: st.DrawFn, rule: str, max_f: int = 3) -> tuple[Tensor, int]:
    a, b = BOUND[rule]
    f = draw(st.integers(0, max_f))
    n = draw(st.integers(max(a * f + b, 1), a * f + b + 5))
    d = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * scale
    return x, f


def build(rule: str, f: int, pre: tuple[str, ...] = ()) -> Aggregator:
    params = {"tau": 1.0, "iterations": 3} if rule == "centered-clip" else {}
    return build_aggregator(rule, f=f, pre=pre, **params)


def run(agg: Aggregator, x: Tensor, start: Tensor | None = None) -> Tensor:
    if isinstance(agg, CenteredClip):
        agg.reset(start=start if start is not None else torch.zeros(x.shape[1], dtype=x.dtype))
    return agg(x).vector


def assert_close(a: Tensor, b: Tensor, scale: float) -> None:
    assert torch.allclose(a, b, rtol=1e-9, atol=1e-9 * max(scale, 1.0)), (a - b).abs().max()


# ----------------------------------------------------------------------------- permutation invariance


@pytest.mark.parametrize("rule", sorted(available_aggregators()))
@SETTINGS
@given(data=st.data())
def test_permutation_invariance(rule: str, data: st.DataObject) -> None:
    x, f = data.draw(problems(rule))
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(data.draw(st.integers(0, 999))))
    agg = build(rule, f)
    start = x.mean(dim=0) + 0.1
    assert_close(run(agg, x[perm], start), run(agg, x, start), float(x.abs().max()))


@pytest.mark.parametrize("pre", PRE_COMBOS)
@pytest.mark.parametrize("rule", ["mean", "median", "krum", "geometric-median"])
@SETTINGS
@given(data=st.data())
def test_permutation_invariance_with_pre_aggregators(
    rule: str, pre: tuple[str, ...], data: st.DataObject
) -> None:
    x, f = data.draw(problems(rule if rule != "mean" else "median", max_f=2))
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(data.draw(st.integers(0, 999))))
    agg = build(rule, f, pre)
    assert_close(run(agg, x[perm]), run(agg, x), float(x.abs().max()))


def test_bucketing_is_permutation_invariant_in_distribution() -> None:
    # n = 4, s = 2: three ways to pair the inputs; for any order of the inputs each pairing should come
    # up about a third of the time, so the distribution of the output does not depend on the order
    x = torch.tensor([[0.0], [1.0], [10.0], [100.0]], dtype=torch.float64)
    for order in ([0, 1, 2, 3], [3, 1, 0, 2]):
        agg = build_aggregator("mean", pre=["bucketing"], pre_params={"bucketing": {"s": 2, "seed": 5}})
        pairings: dict[tuple[tuple[float, ...], ...], int] = {}
        for _ in range(600):
            res = agg(x[order])
            buckets = res.diagnostics["buckets"]
            key = tuple(sorted(tuple(sorted(float(x[order][i, 0]) for i in b)) for b in buckets))
            pairings[key] = pairings.get(key, 0) + 1
            # with s dividing n, bucketing + mean is exactly the mean whatever the shuffle
            assert float(res.vector[0]) == pytest.approx(27.75)
        assert len(pairings) == 3
        assert all(150 <= c <= 250 for c in pairings.values()), pairings


# ----------------------------------------------------------------------------- translation equivariance


@pytest.mark.parametrize("rule", sorted(EQUIVARIANT))
@SETTINGS
@given(data=st.data())
def test_translation_equivariance(rule: str, data: st.DataObject) -> None:
    x, f = data.draw(problems(rule))
    scale = float(x.abs().max())
    shift = (
        torch.randn(x.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(7)) * 10 * scale
    )
    agg = build(rule, f)
    start = x.mean(dim=0) - 0.2 * scale
    assert_close(run(agg, x + shift, start + shift), run(agg, x, start) + shift, 10 * scale)


@pytest.mark.parametrize("pre", [("nnm",), ("bucketing",)])
@pytest.mark.parametrize("rule", ["median", "krum", "geometric-median"])
@SETTINGS
@given(data=st.data())
def test_translation_equivariance_with_nnm_and_bucketing(
    rule: str, pre: tuple[str, ...], data: st.DataObject
) -> None:
    x, f = data.draw(problems(rule, max_f=1))
    if pre == ("bucketing",):
        # buckets of 2 halve the rows the rule sees: stack a second copy, shifted, to keep the bound
        x = torch.cat([x, x[: x.shape[0] - 1] + 0.37 * float(x.std(unbiased=False)) + 1e-3])
    scale = float(x.abs().max())
    shift = torch.full((x.shape[1],), 25.0 * scale, dtype=torch.float64)
    # two aggregators with the same seed draw the same buckets
    assert_close(build(rule, f, pre)(x + shift).vector, build(rule, f, pre)(x).vector + shift, 25 * scale)


def test_norm_clipping_is_not_translation_equivariant() -> None:
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [4.0, 4.0]], dtype=torch.float64)
    shift = torch.tensor([10.0, -3.0], dtype=torch.float64)
    agg = build_aggregator("mean", pre=["clip"], pre_params={"clip": {"threshold": 1.0}})
    assert not torch.allclose(agg(x + shift).vector, agg(x).vector + shift)


# ----------------------------------------------------------------------------- robustness


@st.composite
def attacked(draw: st.DrawFn) -> tuple[Tensor, int, int]:
    f = draw(st.integers(1, 3))
    n = draw(st.integers(2 * f + 1, 2 * f + 6))
    d = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    honest = torch.randn(n - f, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    value = st.floats(-1e300, 1e300, allow_nan=False, allow_infinity=False)
    byz = torch.tensor(
        draw(st.lists(st.lists(value, min_size=d, max_size=d), min_size=f, max_size=f)), dtype=torch.float64
    )
    x = torch.cat([honest, byz])
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    return x[perm], f, n - f


@pytest.mark.parametrize("rule", ["median", "trimmed-mean"])
@settings(max_examples=60, deadline=None, derandomize=True)
@given(case=attacked())
def test_coordinatewise_rules_stay_in_the_honest_range(rule: str, case: tuple[Tensor, int, int]) -> None:
    x, f, _ = case
    # which rows are honest is not needed: any f rows may be the attackers, so check against the
    # range of every subset of n-f rows; the tightest such bound is the (f+1)-th smallest / largest
    out = build_aggregator(rule, f=f)(x).vector
    ordered = torch.sort(x, dim=0).values
    low, high = ordered[f], ordered[x.shape[0] - 1 - f]
    assert bool((out >= low).all()) and bool((out <= high).all())


@st.composite
def far_attack(draw: st.DrawFn, rule: str) -> tuple[Tensor, int, list[int]]:
    a, b = BOUND[rule]
    f = draw(st.integers(1, 3))
    n = draw(st.integers(a * f + b, a * f + b + 4))
    d = draw(st.integers(1, 10))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) + 5.0 * torch.randn(d, generator=g)
    spread = float((x - x.mean(dim=0)).norm(dim=1).max())
    byz = torch.randperm(n, generator=g)[:f]
    together = draw(st.booleans())  # colluding attackers sit on one point, or each far in its own way
    direction = torch.randn(f if not together else 1, d, generator=g)
    direction = direction / direction.norm(dim=1, keepdim=True)
    x[byz] = x.mean(dim=0) + 1e6 * spread * direction
    return x, f, [int(i) for i in byz]


@pytest.mark.parametrize("rule", ["krum", "multi-krum", "bulyan"])
@settings(max_examples=40, deadline=None, derandomize=True)
@given(data=st.data())
def test_selection_rules_never_pick_far_attackers(rule: str, data: st.DataObject) -> None:
    x, f, byz = data.draw(far_attack(rule))
    honest = [i for i in range(x.shape[0]) if i not in byz]
    lo, hi = x[honest].min(dim=0).values, x[honest].max(dim=0).values
    slack = 1e-5 * (lo.abs() + hi.abs() + 1.0)
    # with NNM every honest row mixes only honest inputs, so row indices keep their meaning
    for pre in ((), ("nnm",)):
        res = build_aggregator(rule, f=f, pre=pre)(x)
        assert res.selected is not None
        assert not set(res.selected) & set(byz)
        if res.weights is not None:
            assert float(res.weights[byz].abs().sum()) == 0.0
        assert bool((res.vector >= lo - slack).all()) and bool((res.vector <= hi + slack).all())


# ----------------------------------------------------------------------------- distance precision


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    n=st.integers(2, 12),
    d=st.integers(1, 300),
    seed=st.integers(0, 2**31 - 1),
    log_offset=st.sampled_from([0, 3]),
)
def test_pairwise_distances_match_brute_force_under_a_large_offset(
    n: int, d: int, seed: int, log_offset: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    diffs = torch.randn(n, d, generator=g)
    offset = 10.0**log_offset * float(diffs.abs().max()) * torch.randn(d, generator=g).sign()
    x = (diffs + offset).to(torch.float32)  # the float32 inputs are what both sides see
    x64 = x.to(torch.float64)
    brute = ((x64[:, None, :] - x64[None, :, :]) ** 2).sum(dim=-1)
    ours = pairwise_sq_distances(x)
    off = ~torch.eye(n, dtype=torch.bool)
    rel = ((ours - brute).abs() / brute.clamp_min(1e-300))[off]
    assert float(rel.max()) <= 1e-5
    assert bool((ours.diagonal() == 0).all()) and bool((ours >= 0).all())
