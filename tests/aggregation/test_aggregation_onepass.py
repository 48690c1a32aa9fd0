"""The one-pass kernels (median start, distances to an iterate, output) against plain definitions."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from dist_llm_train.aggregation import CenteredClip, GeometricMedian, coordinatewise, onepass
from dist_llm_train.errors import NonFiniteError

# ----------------------------------------------------------------------------- plain definitions


def bf_sq(x: Tensor, z: Tensor) -> Tensor:
    diff = x.to(torch.float64) - z.to(torch.float64)
    return (diff * diff).sum(dim=1)


def bf_median(x: Tensor) -> Tensor:
    s = torch.sort(x, dim=0).values
    n = x.shape[0]
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) * 0.5


def bf_centered_clip(x: Tensor, v: Tensor, tau: float, iterations: int) -> Tensor:
    x = x.to(torch.float64)
    v = v.to(torch.float64)
    for _ in range(iterations):
        step = torch.zeros_like(v)
        for row in x:
            dist = float((row - v).norm())
            step += (row - v) * (min(1.0, tau / dist) if dist > 0 else 1.0)
        v = v + step / x.shape[0]
    return v


def bf_geometric_median(x: Tensor, nu: float, iterations: int) -> Tensor:
    x = x.to(torch.float64)
    z = x.mean(dim=0)
    for _ in range(iterations):
        beta = torch.tensor([1.0 / max(nu, float((row - z).norm())) for row in x], dtype=torch.float64)
        z = (beta[:, None] * x).sum(dim=0) / beta.sum()
    return z


def sample(seed: int, n: int, d: int, dtype: torch.dtype) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x[: max(1, n // 4)] += 4.0 * torch.randn(max(1, n // 4), d, generator=g, dtype=torch.float64)
    return x.to(dtype)


def close(a: Tensor, b: Tensor, tol: float) -> bool:
    return bool(torch.allclose(a.to(torch.float64), b.to(torch.float64), rtol=tol, atol=tol))


@pytest.fixture()
def three_threads() -> Iterator[None]:
    # three column ranges whose boundaries fall inside 256-column blocks and 16-column groups
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- kernels


@pytest.mark.usefixtures("three_threads")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("n", "d"), [(2, 1), (7, 15), (7, 17), (7, 1001), (25, 257)])
def test_kernels_match_definitions_on_odd_widths(dtype: torch.dtype, n: int, d: int) -> None:
    x = sample(n * 1000 + d, n, d, dtype)
    before = x.clone()
    tol = 1e-12 if dtype == torch.float64 else 2e-6

    median, sq = onepass.median_and_sq_distances(x, strict=True)
    assert torch.equal(median, coordinatewise.coordinate_median(x, backend="eager"))
    assert torch.equal(median, bf_median(x))
    assert close(sq, bf_sq(x, median), tol)

    g = torch.Generator().manual_seed(d)
    weights = torch.rand(n, generator=g, dtype=torch.float64)
    weights /= weights.sum()
    for origin in (x[n - 1], x.mean(dim=0) + 0.5):
        z = origin.to(torch.float64) + (
            weights[:, None] * (x.to(torch.float64) - origin.to(torch.float64))
        ).sum(0)
        assert close(onepass.sq_distances_to_combination(x, weights, origin, strict=True), bf_sq(x, z), tol)
        assert close(onepass.combination(x, weights, origin, strict=True), z, tol)
    # all weights zero: the distances to the origin itself
    origin = x[0] + 0.25
    zero = torch.zeros(n, dtype=torch.float64)
    assert close(onepass.sq_distances_to_combination(x, zero, origin, strict=True), bf_sq(x, origin), tol)
    assert torch.equal(x, before)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    n=st.sampled_from([4, 7]),  # row counts whose kernels other tests build too
    d=st.integers(1, 300),
    seed=st.integers(0, 2**31 - 1),
    log_offset=st.sampled_from([0, 3]),
)
def test_distances_stay_accurate_under_a_large_shared_offset(
    n: int, d: int, seed: int, log_offset: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    diffs = torch.randn(n, d, generator=g)
    offset = 10.0**log_offset * float(diffs.abs().max()) * torch.randn(d, generator=g).sign()
    x = (diffs + offset).to(torch.float32)  # the float32 inputs are what both sides see
    x64 = x.to(torch.float64)

    median, sq = onepass.median_and_sq_distances(x, strict=True)
    assert float(((sq - bf_sq(x64, median)).abs() / bf_sq(x64, median).clamp_min(1e-30)).max()) <= 1e-5

    # an iterate as CenteredClip forms it: an origin near the data (its start), weights that do not
    # round exactly to float32
    weights = torch.rand(n, generator=g, dtype=torch.float64) / (3 * n)
    start = x[0] + 0.1 * diffs.std() * torch.randn(d, generator=g)
    z = start.to(torch.float64) + (weights[:, None] * (x64 - start.to(torch.float64))).sum(0)
    ours = onepass.sq_distances_to_combination(x, weights, start, strict=True)
    brute = bf_sq(x64, z)
    assert float(((ours - brute).abs() / brute.clamp_min(1e-30)).max()) <= 1e-5


def test_on_basis_picks_an_origin_near_the_data() -> None:
    x = torch.randn(4, 6, dtype=torch.float64)
    start = torch.randn(6, dtype=torch.float64)
    w, origin = onepass.on_basis(torch.tensor([0.1, 0.2, 0.0, 0.3, 0.4], dtype=torch.float64), x, [start])
    assert origin is start and torch.equal(w, torch.tensor([0.1, 0.2, 0.0, 0.3], dtype=torch.float64))
    w, origin = onepass.on_basis(torch.tensor([0.1, 0.6, 0.1, 0.2, 0.0], dtype=torch.float64), x, [start])
    assert torch.equal(origin, x[1])  # the extra is unused: the input with the largest weight
    assert onepass.on_basis(torch.tensor([0.5, 0.5, 0.5, 0.0, 0.0], dtype=torch.float64), x, [start]) is None
    two = [start, start + 1.0]
    assert onepass.on_basis(torch.tensor([0.2, 0.2, 0.2, 0.0, 0.2, 0.2], dtype=torch.float64), x, two) is None


def test_use_compiled_only_where_the_kernels_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onepass, "_COMPILE_FAILED", False)
    small = torch.zeros(5, 10)
    assert not onepass.use_compiled(small, "auto")
    assert onepass.use_compiled(small, "compiled")
    assert not onepass.use_compiled(small, "eager")
    monkeypatch.setattr(coordinatewise, "COMPILE_MIN_NUMEL", 50)
    assert onepass.use_compiled(small, "auto")
    assert not onepass.use_compiled(small.half(), "compiled")
    assert not onepass.use_compiled(torch.zeros(10, 5).T, "compiled")  # not contiguous
    assert not onepass.use_compiled(torch.zeros(1, 10), "compiled")
    assert not onepass.use_compiled(torch.zeros(onepass.MAX_ROWS + 1, 10), "compiled")
    monkeypatch.setattr(onepass, "_COMPILE_FAILED", True)
    assert not onepass.use_compiled(small, "auto")


def test_source_is_generated_per_row_count_and_dtype() -> None:
    src = onepass.kernel_source(6, torch.float32)
    assert "typedef float T;" in src and "N = 6" in src
    assert "(v[2] + v[3]) * T(0.5)" in src  # even n: the mean of the two middle values
    assert "typedef double T;" in onepass.kernel_source(5, torch.float64)
    assert "return v[2];" in onepass.kernel_source(5, torch.float64)


# ----------------------------------------------------------------------------- rules on the kernels


@pytest.mark.parametrize(("seed", "n", "d", "f"), [(0, 7, 33, 1), (1, 7, 300, 2), (2, 4, 17, 1)])
def test_centered_clip_one_pass_matches_definition_across_rounds(seed: int, n: int, d: int, f: int) -> None:
    x = sample(seed, n, d, torch.float64)
    for tau, iterations in ((0.5, 1), (2.0, 3), (100.0, 2)):
        agg = CenteredClip(f, tau=tau, iterations=iterations, method="direct", backend="compiled")
        first = agg(x)  # starts from the coordinate median, computed in the first pass
        expected = bf_centered_clip(x, bf_median(x), tau, iterations)
        assert close(first.vector, expected, 1e-9)
        assert first.diagnostics["kernel"] == "one-pass"
        assert first.diagnostics["passes"] == iterations + 1
        x2 = x + 0.5
        second = agg(x2)  # stateful: from the previous output
        assert close(second.vector, bf_centered_clip(x2, expected, tau, iterations), 1e-9)
        assert second.diagnostics["passes"] == iterations + 1
        assert first.weights is not None
        recombined = first.weights @ x + first.diagnostics["start_weight"] * bf_median(x)
        assert close(recombined, first.vector, 1e-9)


def test_centered_clip_one_pass_in_float32_agrees_with_float64() -> None:
    x64 = sample(5, 25, 1001, torch.float64) + 100.0  # a shared offset 100x the spread
    x32 = x64.to(torch.float32)
    agg = CenteredClip(5, tau=3.0, iterations=3, method="direct", backend="compiled")
    got = agg(x32).vector
    expected = bf_centered_clip(x32.to(torch.float64), bf_median(x32).to(torch.float64), 3.0, 3)
    assert got.dtype == torch.float32
    assert float((got.to(torch.float64) - expected).abs().max()) <= 1e-5 * float(expected.abs().max())


def test_centered_clip_output_and_state_never_alias() -> None:
    x = sample(6, 4, 40, torch.float64)
    agg = CenteredClip(1, tau=0.5, iterations=2, method="direct", backend="compiled")
    first = agg(x)
    state = agg.state
    assert state is not None and torch.equal(state, first.vector)
    first.vector.add_(1000.0)  # a caller may reuse the output in place
    assert torch.equal(agg.state, state)
    second = agg(x)
    assert close(second.vector, bf_centered_clip(x, state, 0.5, 2), 1e-9)
    assert second.vector.data_ptr() != agg.state.data_ptr()


@pytest.mark.parametrize(("n", "d"), [(7, 33), (4, 257)])
def test_geometric_median_one_pass_matches_weiszfeld(n: int, d: int) -> None:
    x = sample(n + d, n, d, torch.float64)
    res = GeometricMedian(1, iterations=4, tol=0.0, method="direct", backend="compiled")(x)
    assert res.diagnostics["kernel"] == "one-pass"
    assert close(res.vector, bf_geometric_median(x, 0.1, 4), 1e-8)


def test_auto_chooses_one_pass_for_few_clipping_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onepass, "_COMPILE_FAILED", False)
    monkeypatch.setattr(coordinatewise, "COMPILE_MIN_NUMEL", 1)
    x = sample(7, 25, 64, torch.float32)
    cc = CenteredClip(5, tau=1.0, iterations=3)(x)
    assert (cc.diagnostics["mode"], cc.diagnostics["kernel"]) == ("direct", "one-pass")
    gm = GeometricMedian(5, iterations=8, tol=0.0)(x)  # 8 direct passes cost more than the Gram pass
    assert (gm.diagnostics["mode"], gm.diagnostics["kernel"]) == ("span", "gram")
    eager = CenteredClip(5, tau=1.0, iterations=3, backend="eager")(x)
    assert eager.diagnostics["kernel"] != "one-pass"
    assert close(cc.vector, eager.vector, 1e-5)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("fresh", [True, False])
def test_one_pass_names_non_finite_rows(bad: float, fresh: bool) -> None:
    x = sample(8, 7, 50, torch.float32)
    x[3, 17] = bad
    agg = CenteredClip(1, tau=1.0, iterations=2, method="direct", backend="compiled")
    if not fresh:
        agg.reset(start=torch.zeros(50))
    with pytest.raises(NonFiniteError, match=r"rows 3\)"):
        agg(x)
    with pytest.raises(NonFiniteError, match=r"rows 3\)"):
        GeometricMedian(1, iterations=2, method="direct", backend="compiled")(x)


def test_build_failure_falls_back_to_blocked_ops(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    monkeypatch.setenv("CXX", "no-such-compiler-for-this-test")
    monkeypatch.setenv("DIST_LLM_TRAIN_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(onepass, "_COMPILE_FAILED", False)
    monkeypatch.setattr(coordinatewise, "_COMPILE_FAILED", True)  # the median falls back to its eager network
    monkeypatch.setattr(coordinatewise, "COMPILE_MIN_NUMEL", 1)
    onepass._library.cache_clear()
    try:
        x = sample(9, 4, 40, torch.float64)
        with caplog.at_level(logging.WARNING, logger=onepass.__name__):
            res = CenteredClip(1, tau=0.5, iterations=2, method="direct")(x)
        assert "blocked torch ops" in caplog.text
        assert res.diagnostics["kernel"] == "blocked"
        assert close(res.vector, bf_centered_clip(x, bf_median(x), 0.5, 2), 1e-9)
        assert not onepass.available()
        with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
            CenteredClip(1, tau=0.5, iterations=2, method="direct", backend="compiled")(x)
    finally:
        onepass._library.cache_clear()
