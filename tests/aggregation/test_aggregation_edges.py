"""Edge cases, validation, preconditions at their exact bounds, state, and the registry."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from dist_llm_train.aggregation import (
    NNM,
    Aggregator,
    Bucketing,
    CenteredClip,
    Krum,
    NormClip,
    available_aggregators,
    available_preaggregators,
    build_aggregator,
    build_aggregator_from_config,
)
from dist_llm_train.config.schema import AggregationConfig
from dist_llm_train.errors import ConfigError, NonFiniteError, PreconditionError

RULES = sorted(available_aggregators())
# smallest n each rule accepts for f, as (a, b) in n >= a f + b
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
BOUND_TEXT = {
    "median": "2f+1",
    "trimmed-mean": "2f+1",
    "krum": "2f+3",
    "multi-krum": "2f+3",
    "bulyan": "4f+3",
}
BOUND_TEXT["geometric-median"] = "2f+1"
PRE_COMBOS: list[tuple[str, ...]] = [(), ("nnm",), ("bucketing",), ("clip",), ("clip", "nnm", "bucketing")]


def data(n: int, d: int = 6, seed: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)).to(dtype)


def valid_n(rule: str, f: int) -> int:
    a, b = BOUND[rule]
    return max(a * f + b + 2, 6)


# ----------------------------------------------------------------------------- single input, f = 0


@pytest.mark.parametrize("pre", [(), ("nnm",), ("bucketing",), ("clip",)])
@pytest.mark.parametrize("rule", RULES)
def test_single_input_with_f_zero_is_returned(rule: str, pre: tuple[str, ...]) -> None:
    x = data(1, 7)
    res = build_aggregator(rule, f=0, pre=pre)(x)
    assert torch.equal(res.vector, x[0])
    assert res.vector.data_ptr() != x.data_ptr()


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("rule", RULES)
def test_empty_input_raises_a_clear_error(rule: str) -> None:
    with pytest.raises(PreconditionError, match=rf"{rule} got no inputs"):
        build_aggregator(rule)(torch.empty(0, 5))


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ([torch.zeros(3), torch.zeros(3)], "expects a torch.Tensor"),
        (torch.zeros(5), "2-D tensor"),
        (torch.zeros(2, 3, 4), "2-D tensor"),
        (torch.zeros(3, 4, dtype=torch.int64), "floating-point"),
        (torch.zeros(3, 0), "dimension 0"),
    ],
)
def test_malformed_inputs_are_rejected(bad: object, message: str) -> None:
    with pytest.raises(PreconditionError, match=message):
        build_aggregator("median")(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("pre", [(), ("clip",), ("nnm",), ("bucketing",)])
@pytest.mark.parametrize("rule", RULES)
def test_non_finite_rows_are_named(rule: str, pre: tuple[str, ...]) -> None:
    f = 1
    n = valid_n(rule, f) * (2 if "bucketing" in pre else 1)
    x = data(n)
    x[2, 1] = math.nan
    x[4, 0] = math.inf
    with pytest.raises(NonFiniteError, match=r"in 2 of \d+ input rows \(rows 2, 4\)"):
        build_aggregator(rule, f=f, pre=pre)(x)


def test_overflow_on_finite_inputs_is_reported_as_such() -> None:
    x = torch.full((4, 3), 3e38)
    with pytest.raises(NonFiniteError, match="overflowed"):
        build_aggregator("krum", f=0)(x)
    # the median of an odd count never adds the inputs up, so huge finite values are fine
    assert torch.equal(build_aggregator("median")(x[:3]).vector, torch.full((3,), 3e38))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("rule", RULES)
def test_output_keeps_the_input_dtype(rule: str, dtype: torch.dtype) -> None:
    x = data(valid_n(rule, 1), dtype=dtype)
    res = build_aggregator(rule, f=1)(x)
    assert res.vector.dtype == dtype and res.vector.shape == (6,)
    assert bool(torch.isfinite(res.vector).all())


def test_inputs_that_require_grad_are_accepted() -> None:
    x = data(7).requires_grad_(True)
    res = build_aggregator("geometric-median", f=1)(x)
    assert not res.vector.requires_grad


# ----------------------------------------------------------------------------- inputs untouched


@pytest.mark.parametrize("pre", PRE_COMBOS)
@pytest.mark.parametrize("rule", RULES)
def test_inputs_are_never_modified(rule: str, pre: tuple[str, ...]) -> None:
    f = 1
    n = valid_n(rule, f) * (2 if "bucketing" in pre else 1)
    for dtype in (torch.float32, torch.float64):
        x = data(n, 9, seed=3, dtype=dtype) + 100.0
        x[0] += 1e4  # one far row, so the Gram matrix is recomputed about a core row
        before = x.clone()
        agg = build_aggregator(
            rule, f=f, pre=pre, **({"tau": 0.5, "iterations": 3} if rule == "centered-clip" else {})
        )
        for _ in range(2):
            res = agg(x)
            assert torch.equal(x, before)
            res.vector.add_(1.0)  # the output never aliases the input
            assert torch.equal(x, before)


# ----------------------------------------------------------------------------- clipping


@pytest.mark.parametrize("params", [{"threshold": 0.5}, {"threshold": 3.0}, {"relative": 0.3}, {}])
def test_clipping_preserves_direction(params: dict[str, float]) -> None:
    x = data(9, 20, seed=4) * torch.linspace(0.1, 10.0, 9)[:, None]
    clip = NormClip(**params)
    agg = build_aggregator("mean", pre=[clip])
    res = agg(x)
    clipped = res.diagnostics["mixing"].to(x.dtype) @ x  # the rows the rule averaged
    limit = res.diagnostics["clip_threshold"]
    for row, original in zip(clipped, x, strict=True):
        cos = torch.nn.functional.cosine_similarity(row, original, dim=0)
        assert float(cos) > 0.99
        assert float(row.norm()) <= limit * (1 + 1e-5) or float(original.norm()) <= limit
    norms = x.to(torch.float64).norm(dim=1)
    # a row whose norm is the limit itself (the median row) may land either side by rounding
    clearly_over = int((norms > limit * (1 + 1e-6)).sum())
    borderline = int(((norms - limit).abs() <= limit * 1e-6).sum())
    assert clearly_over <= res.diagnostics["clip_count"] <= clearly_over + borderline


def test_clip_parameters_are_validated() -> None:
    with pytest.raises(ConfigError, match="either threshold"):
        NormClip(threshold=1.0, relative=1.0)
    with pytest.raises(ConfigError, match="threshold must be a finite number > 0"):
        NormClip(threshold=-1.0)
    assert NormClip().relative == 1.0


# ----------------------------------------------------------------------------- preconditions


@pytest.mark.parametrize("f", [1, 2, 3])
@pytest.mark.parametrize("rule", sorted(BOUND_TEXT))
def test_preconditions_at_their_exact_bounds(rule: str, f: int) -> None:
    a, b = BOUND[rule]
    need = a * f + b
    agg = build_aggregator(rule, f=f)
    agg(data(need))
    with pytest.raises(PreconditionError) as err:
        agg(data(need - 1))
    msg = str(err.value)
    assert f"{rule} needs n >= {BOUND_TEXT[rule]}" in msg
    assert f"(n={need - 1}, f={f} needs n >= {need})" in msg


def test_krum_and_bulyan_bounds_for_f_zero_beyond_one_input() -> None:
    build_aggregator("krum")(data(3))
    with pytest.raises(PreconditionError, match=r"krum needs n >= 2f\+3 \(n=2, f=0 needs n >= 3\)"):
        build_aggregator("krum")(data(2))
    with pytest.raises(PreconditionError, match=r"bulyan needs n >= 4f\+3 \(n=2, f=0"):
        build_aggregator("bulyan")(data(2))


@pytest.mark.parametrize("f", [0, 1, 2])
def test_multi_krum_m_range(f: int) -> None:
    n = 2 * f + 5
    top = n - f - 2
    assert build_aggregator("multi-krum", f=f, m=top)(data(n)).diagnostics["m"] == top
    assert build_aggregator("multi-krum", f=f, m=1)(data(n)).selected is not None
    with pytest.raises(
        PreconditionError, match=rf"1 <= m <= n-f-2 \(n={n}, f={f} allows m <= {top}, got m={top + 1}\)"
    ):
        build_aggregator("multi-krum", f=f, m=top + 1)(data(n))
    with pytest.raises(ConfigError, match="m must be an integer >= 1"):
        build_aggregator("multi-krum", f=f, m=0)
    assert len(build_aggregator("multi-krum", f=f)(data(n)).selected or []) == top


def test_nnm_bound_and_bucketing_note() -> None:
    build_aggregator("mean", f=2, pre=["nnm"])(data(3))
    with pytest.raises(PreconditionError, match=r"nnm needs n >= f\+1 \(n=2, f=2"):
        build_aggregator("mean", f=2, pre=["nnm"])(data(2))
    agg = build_aggregator("krum", f=1, pre=["bucketing"])
    agg(data(9))  # 5 buckets: Krum's bound 2f+3 = 5 holds
    with pytest.raises(PreconditionError, match="after bucketing turned 8 inputs into 4"):
        agg(data(8))


def test_f_is_validated() -> None:
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ConfigError, match="f must be a non-negative integer"):
            build_aggregator("median", f=bad)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- state


def test_centered_clip_state_and_reset() -> None:
    x = data(7, 5)
    agg = CenteredClip(1, tau=0.2)
    assert agg.state is None
    first = agg(x).vector
    assert agg.state is not None and torch.equal(agg.state, first)
    second = agg(x).vector
    fresh = CenteredClip(1, tau=0.2)
    fresh.reset(start=first)
    assert torch.allclose(fresh(x).vector, second)
    agg.reset()
    assert agg.state is None and torch.equal(agg(x).vector, first)
    with pytest.raises(PreconditionError, match="call reset"):
        agg(data(7, 6))


def test_centered_clip_parameters_are_validated() -> None:
    with pytest.raises(ConfigError, match="tau must be a finite number > 0"):
        CenteredClip(tau=0.0)
    with pytest.raises(ConfigError, match="iterations must be an integer >= 1"):
        CenteredClip(iterations=0)
    with pytest.raises(ConfigError, match="init must be"):
        CenteredClip(init="origin")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="method must be"):
        build_aggregator("geometric-median", method="fast")


def test_bucketing_is_seeded_and_reset_restarts_the_shuffle() -> None:
    x = data(10)
    a = Krum(1, pre=[Bucketing(s=2, seed=3)])
    b = Krum(1, pre=[Bucketing(s=2, seed=3)])
    runs = [a(x).diagnostics["buckets"] for _ in range(3)]
    assert runs == [b(x).diagnostics["buckets"] for _ in range(3)]
    assert runs[0] != runs[1] or runs[1] != runs[2]
    a.reset()
    assert a(x).diagnostics["buckets"] == runs[0]
    with pytest.raises(ConfigError, match="s must be an integer >= 1"):
        Bucketing(s=0)


# ----------------------------------------------------------------------------- precision under attack


def test_far_attackers_trigger_recentring_and_keep_distances_exact() -> None:
    g = torch.Generator().manual_seed(11)
    x = torch.randn(9, 40, generator=g) + 3.0
    x[[1, 5]] = 1e6 * torch.randn(2, 40, generator=g)  # their pull on the mean would swamp float32
    x64 = x.to(torch.float64)
    res = build_aggregator("multi-krum", f=2)(x)
    ref = build_aggregator("multi-krum", f=2)(x64)
    assert res.diagnostics["recentred"] is True
    assert res.selected == ref.selected
    assert torch.allclose(res.scores, ref.scores, rtol=1e-5)
    gm = build_aggregator("geometric-median", f=2, nu=1e-3)(x)
    assert torch.allclose(
        gm.vector.to(torch.float64), build_aggregator("geometric-median", f=2, nu=1e-3)(x64).vector, atol=1e-4
    )


def test_weights_describe_the_output() -> None:
    x = data(11, 8, dtype=torch.float64)
    for rule in ("mean", "krum", "multi-krum", "geometric-median"):
        for pre in ((), ("nnm",), ("clip", "nnm")):
            res = build_aggregator(rule, f=2, pre=pre)(x)
            assert res.weights is not None and res.weights.shape == (11,)
            assert torch.allclose(res.weights @ x, res.vector)
    assert build_aggregator("median", f=2)(x).weights is None


# ----------------------------------------------------------------------------- registry


def test_registry_names() -> None:
    assert set(available_aggregators()) == set(BOUND)
    assert set(available_preaggregators()) == {"nnm", "bucketing", "clip"}
    assert isinstance(build_aggregator("Trimmed_Mean", f=1), Aggregator)
    with pytest.raises(ConfigError, match="unknown aggregator 'kurm'; choose one of: mean"):
        build_aggregator("kurm")
    with pytest.raises(ConfigError, match="unknown pre-aggregator 'nn'"):
        build_aggregator("mean", pre=["nn"])


def test_registry_parameters() -> None:
    with pytest.raises(ConfigError, match="unknown parameter 'mm' for multi-krum; allowed: m"):
        build_aggregator("multi-krum", mm=2)
    with pytest.raises(ConfigError, match="unknown parameter 'k' for krum; it takes no parameters"):
        build_aggregator("krum", k=2)
    with pytest.raises(ConfigError, match="pre_params has parameters for 'bucketing'"):
        build_aggregator("mean", pre=["nnm"], pre_params={"bucketing": {"s": 3}})
    with pytest.raises(ConfigError, match="unknown parameter 'size' for bucketing; allowed: s, seed"):
        build_aggregator("mean", pre=["bucketing"], pre_params={"bucketing": {"size": 3}})
    agg = build_aggregator("median", f=1, pre=[NNM(), "bucketing"], pre_params={"bucketing": {"s": 3}})
    assert [p.name for p in agg.pre] == ["nnm", "bucketing"]


def test_build_from_config() -> None:
    cfg = AggregationConfig(
        rule="centered-clip",
        f=1,
        params={"tau": 0.5, "iterations": 2},
        pre=["bucketing"],
        pre_params={"bucketing": {"s": 2, "seed": 4}},
    )
    agg = build_aggregator_from_config(cfg)
    assert isinstance(agg, CenteredClip) and agg.tau == 0.5 and agg.iterations == 2
    assert isinstance(agg.pre[0], Bucketing) and agg.pre[0].s == 2
    assert agg(data(6)).diagnostics["n_rule"] == 3
