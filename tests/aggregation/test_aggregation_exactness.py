"""Every rule and pre-aggregator against a plain, loop-based implementation of its definition."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor

from dist_llm_train.aggregation import (
    NNM,
    Bulyan,
    CenteredClip,
    CoordinateMedian,
    GeometricMedian,
    Krum,
    Mean,
    MultiKrum,
    NormClip,
    TrimmedMean,
    build_aggregator,
    geometry,
    sorting,
)
from dist_llm_train.aggregation.sorting import closest_to_median_mean, sort_columns, sorting_network

# ----------------------------------------------------------------------------- brute force definitions


def bf_sqdist(a: Tensor, b: Tensor) -> float:
    # the difference itself, squared and summed: no Gram identity, no centring
    diff = a.to(torch.float64) - b.to(torch.float64)
    return float((diff * diff).sum())


def bf_median(x: Tensor) -> Tensor:
    n, d = x.shape
    out = torch.empty(d, dtype=torch.float64)
    for k in range(d):
        col = sorted(float(v) for v in x[:, k])
        out[k] = col[n // 2] if n % 2 else (col[n // 2 - 1] + col[n // 2]) / 2
    return out


def bf_trimmed_mean(x: Tensor, f: int) -> Tensor:
    n, d = x.shape
    out = torch.empty(d, dtype=torch.float64)
    for k in range(d):
        col = sorted(float(v) for v in x[:, k])
        kept = col[f : n - f]
        out[k] = sum(kept) / len(kept)
    return out


def bf_neighbour_distances(x: Tensor, rows: list[int], i: int) -> list[float]:
    return sorted(bf_sqdist(x[i], x[j]) for j in rows if j != i)


def bf_krum_order(x: Tensor, rows: list[int], k: int) -> list[int]:
    """Rows by Krum score; equal scores by the remaining sorted distances, then by index."""
    keys = []
    for i in rows:
        near = bf_neighbour_distances(x, rows, i)
        keys.append((sum(near[:k]), *near[k:], i))
    return [int(key[-1]) for key in sorted(keys)]


def bf_krum_scores(x: Tensor, f: int) -> list[float]:
    n = x.shape[0]
    rows = list(range(n))
    return [sum(bf_neighbour_distances(x, rows, i)[: n - f - 2]) for i in rows]


def bf_krum(x: Tensor, f: int) -> int:
    return bf_krum_order(x, list(range(x.shape[0])), x.shape[0] - f - 2)[0]


def bf_multi_krum(x: Tensor, f: int, m: int) -> tuple[Tensor, list[int]]:
    order = bf_krum_order(x, list(range(x.shape[0])), x.shape[0] - f - 2)[:m]
    return x[order].to(torch.float64).mean(dim=0), order


def bf_bulyan_select(x: Tensor, f: int) -> list[int]:
    """θ = n-2f picks, each the Krum winner of the rows left, with m-f-2 neighbours (at least f and 1)."""
    n = x.shape[0]
    remaining = list(range(n))
    chosen: list[int] = []
    while len(chosen) < n - 2 * f:
        winner = bf_krum_order(x, remaining, max(1, f, len(remaining) - f - 2))[0]
        remaining.remove(winner)
        chosen.append(winner)
    return chosen


def bf_closest_to_median_mean(sel: Tensor, beta: int) -> Tensor:
    sel = sel.to(torch.float64)
    med = bf_median(sel)
    out = torch.empty(sel.shape[1], dtype=torch.float64)
    for k in range(sel.shape[1]):
        vals = [float(v) for v in sel[:, k]]
        closest = sorted(vals, key=lambda v, k=k: abs(v - float(med[k])))[:beta]
        out[k] = sum(closest) / beta
    return out


def bf_bulyan(x: Tensor, f: int) -> tuple[Tensor, list[int]]:
    chosen = bf_bulyan_select(x, f)
    beta = x.shape[0] - 4 * f
    return bf_closest_to_median_mean(x[chosen], beta), chosen


def bf_geometric_median(x: Tensor, nu: float, iterations: int, tol: float) -> Tensor:
    x = x.to(torch.float64)
    z = x.mean(dim=0)

    def objective(z: Tensor) -> float:
        total = 0.0
        for row in x:
            r = math.sqrt(bf_sqdist(row, z))
            total += r if r >= nu else r * r / (2 * nu) + nu / 2
        return total

    previous = None
    for _ in range(iterations):
        obj = objective(z)
        if previous is not None and abs(previous - obj) <= tol * obj:
            break
        betas = [1.0 / max(nu, math.sqrt(bf_sqdist(row, z))) for row in x]
        z = sum(b * row for b, row in zip(betas, x, strict=True)) / sum(betas)
        previous = obj
    return z


def bf_centered_clip(x: Tensor, v: Tensor, tau: float, iterations: int) -> Tensor:
    x = x.to(torch.float64)
    v = v.to(torch.float64)
    for _ in range(iterations):
        step = torch.zeros_like(v)
        for row in x:
            dist = math.sqrt(bf_sqdist(row, v))
            step += (row - v) * (min(1.0, tau / dist) if dist > 0 else 1.0)
        v = v + step / x.shape[0]
    return v


def bf_nnm(x: Tensor, f: int) -> Tensor:
    n = x.shape[0]
    out = torch.empty(x.shape, dtype=torch.float64)
    for i in range(n):
        others = sorted((bf_sqdist(x[i], x[j]), j) for j in range(n) if j != i)
        group = [i] + [j for _, j in others[: n - f - 1]]
        out[i] = x[group].to(torch.float64).mean(dim=0)
    return out


def bf_clip(x: Tensor, threshold: float) -> Tensor:
    out = x.to(torch.float64).clone()
    for i in range(x.shape[0]):
        norm = math.sqrt(sum(float(v) ** 2 for v in x[i]))
        if norm > threshold:
            out[i] *= threshold / norm
    return out


# ----------------------------------------------------------------------------- helpers


def sample(seed: int, n: int, d: int, dtype: torch.dtype = torch.float64) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    # a few rows further out, so the rules have something to reject
    x[: max(1, n // 5)] += 4.0 * torch.randn(max(1, n // 5), d, generator=g, dtype=torch.float64)
    return x.to(dtype)


CASES = [(0, 7, 5, 1), (1, 11, 9, 2), (2, 15, 4, 3), (3, 19, 6, 4), (4, 10, 3, 0), (5, 9, 12, 1)]


def close(a: Tensor, b: Tensor, tol: float = 1e-10) -> bool:
    return bool(torch.allclose(a.to(torch.float64), b.to(torch.float64), rtol=tol, atol=tol))


# ----------------------------------------------------------------------------- rules


@pytest.mark.parametrize(("seed", "n", "d", "f"), CASES)
def test_median_and_trimmed_mean_match_sorting(seed: int, n: int, d: int, f: int) -> None:
    x = sample(seed, n, d)
    assert close(CoordinateMedian(f)(x).vector, bf_median(x))
    assert close(TrimmedMean(f)(x).vector, bf_trimmed_mean(x, f))


@pytest.mark.parametrize("n", [2, 4, 6])
def test_median_is_the_midpoint_for_even_n(n: int) -> None:
    x = torch.arange(n, dtype=torch.float64)[:, None].repeat(1, 3)
    assert torch.equal(CoordinateMedian()(x).vector, torch.full((3,), (n - 1) / 2, dtype=torch.float64))


@pytest.mark.parametrize(("seed", "n", "d", "f"), CASES)
def test_krum_matches_explicit_neighbour_loops(seed: int, n: int, d: int, f: int) -> None:
    x = sample(seed, n, d)
    res = Krum(f)(x)
    scores = bf_krum_scores(x, f)
    k = bf_krum(x, f)
    assert res.selected == [k]
    assert torch.equal(res.vector, x[k])
    assert close(res.scores, torch.tensor(scores, dtype=torch.float64), 1e-9)
    assert res.weights is not None and float(res.weights[k]) == 1.0 and float(res.weights.sum()) == 1.0


@pytest.mark.parametrize(("seed", "n", "d", "f"), CASES)
def test_multi_krum_matches_definition(seed: int, n: int, d: int, f: int) -> None:
    x = sample(seed, n, d)
    for m in sorted({1, max(1, (n - f - 2) // 2), n - f - 2}):
        res = MultiKrum(f, m=m)(x)
        ref, order = bf_multi_krum(x, f, m)
        assert res.selected == order
        assert close(res.vector, ref)
        assert res.weights is not None
        assert close(res.weights[order], torch.full((m,), 1.0 / m, dtype=torch.float64))
    assert MultiKrum(f)(x).selected == bf_multi_krum(x, f, n - f - 2)[1]


@pytest.mark.parametrize(("seed", "n", "d", "f"), [(0, 7, 5, 1), (1, 11, 9, 2), (2, 15, 4, 3), (6, 9, 7, 1)])
def test_bulyan_matches_recursive_definition(seed: int, n: int, d: int, f: int) -> None:
    x = sample(seed, n, d)
    res = Bulyan(f)(x)
    ref, chosen = bf_bulyan(x, f)
    assert res.selected == chosen
    assert close(res.vector, ref)


def test_bulyan_recursive_selection_differs_from_one_shot_top_scores() -> None:
    # the pitfall: taking the θ best scores of one Krum round is not Bulyan's selection
    differing = 0
    for seed in range(40):
        x = sample(100 + seed, 11, 3)
        res = Bulyan(2)(x)
        scores = bf_krum_scores(x, 2)
        one_shot = sorted(range(11), key=lambda i: (scores[i], i))[:7]
        assert res.selected == bf_bulyan(x, 2)[1]
        differing += set(one_shot) != set(res.selected)
    assert differing > 0


@pytest.mark.parametrize(("seed", "n", "d", "f"), CASES)
@pytest.mark.parametrize("method", ["span", "direct"])
def test_geometric_median_matches_weiszfeld(seed: int, n: int, d: int, f: int, method: str) -> None:
    x = sample(seed, n, d)
    for nu, iterations, tol in ((0.1, 8, 1e-6), (0.5, 3, 0.0), (1e-3, 20, 1e-9)):
        res = GeometricMedian(f, nu=nu, iterations=iterations, tol=tol, method=method)(x)
        assert close(res.vector, bf_geometric_median(x, nu, iterations, tol), 1e-8)


@pytest.mark.parametrize(("seed", "n", "d", "f"), CASES)
@pytest.mark.parametrize("method", ["span", "direct"])
def test_centered_clip_matches_definition_across_rounds(
    seed: int, n: int, d: int, f: int, method: str
) -> None:
    x = sample(seed, n, d)
    for tau, iterations in ((0.5, 1), (2.0, 3), (100.0, 2)):
        start = torch.randn(d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        agg = CenteredClip(f, tau=tau, iterations=iterations, method=method)
        agg.reset(start=start)
        first = agg(x)
        expected = bf_centered_clip(x, start, tau, iterations)
        assert close(first.vector, expected, 1e-9)
        # stateful: the next call starts from the previous output
        x2 = x + 0.5
        second = agg(x2)
        assert close(second.vector, bf_centered_clip(x2, expected, tau, iterations), 1e-9)
        # the weights (inputs plus start) reproduce the output
        assert first.weights is not None
        recombined = first.weights @ x + first.diagnostics["start_weight"] * start
        assert close(recombined, first.vector, 1e-9)


def test_centered_clip_inits() -> None:
    x = sample(7, 9, 4)
    med = CenteredClip(tau=0.3)(x).vector
    assert close(med, bf_centered_clip(x, bf_median(x), 0.3, 1), 1e-9)
    zero = CenteredClip(tau=0.3, init="zero")(x).vector
    assert close(zero, bf_centered_clip(x, torch.zeros(4, dtype=torch.float64), 0.3, 1), 1e-9)
    mean = CenteredClip(tau=0.3, init="mean")(x).vector
    assert close(mean, bf_centered_clip(x, x.mean(dim=0), 0.3, 1), 1e-9)


def test_mean_is_the_average() -> None:
    x = sample(8, 6, 5)
    res = Mean()(x)
    assert close(res.vector, x.mean(dim=0))
    assert res.weights is not None and close(res.weights, torch.full((6,), 1 / 6, dtype=torch.float64))


# ----------------------------------------------------------------------------- pre-aggregators


@pytest.mark.parametrize(("seed", "n", "d", "f"), CASES)
def test_nnm_matches_neighbour_means(seed: int, n: int, d: int, f: int) -> None:
    x = sample(seed, n, d)
    mixed = bf_nnm(x, f)
    assert close(Mean(f, pre=[NNM()])(x).vector, mixed.mean(dim=0))
    assert close(CoordinateMedian(f, pre=[NNM()])(x).vector, bf_median(mixed))
    if n >= 2 * f + 3:
        res = Krum(f, pre=[NNM()])(x)
        # NNM often makes rows identical (same neighbour set), so compare the chosen vector, not the index
        k = bf_krum(mixed, f)
        assert res.selected is not None
        assert close(res.vector, mixed[k])
        # the effective weights map the NNM mixture back to the caller's inputs
        assert res.weights is not None and close(res.weights @ x, mixed[k])
    if n >= 4 * f + 3:
        assert close(Bulyan(f, pre=[NNM()])(x).vector, bf_bulyan(mixed, f)[0])
    gm = GeometricMedian(f, pre=[NNM()], iterations=5, tol=0.0)(x).vector
    assert close(gm, bf_geometric_median(mixed, 0.1, 5, 0.0), 1e-8)


@pytest.mark.parametrize("threshold", [0.5, 2.0, 50.0])
def test_clip_matches_definition_and_composes(threshold: float) -> None:
    x = sample(9, 9, 6)
    clipped = bf_clip(x, threshold)
    assert close(Mean(pre=[NormClip(threshold=threshold)])(x).vector, clipped.mean(dim=0))
    assert close(CoordinateMedian(1, pre=[NormClip(threshold=threshold)])(x).vector, bf_median(clipped))
    res = Krum(1, pre=[NormClip(threshold=threshold)])(x)
    assert res.selected == [bf_krum(clipped, 1)]
    # clip then NNM: the clipped rows' distances come from the unclipped Gram matrix plus offsets
    assert close(
        Mean(1, pre=[NormClip(threshold=threshold), NNM()])(x).vector, bf_nnm(clipped, 1).mean(dim=0)
    )
    gm = GeometricMedian(1, pre=[NormClip(threshold=threshold)], tol=0.0, method="span")(x).vector
    assert close(gm, bf_geometric_median(clipped, 0.1, 8, 0.0), 1e-8)


def test_clip_relative_to_median_norm() -> None:
    x = sample(10, 8, 5)
    norms = sorted(float(r.norm()) for r in x)
    median = (norms[3] + norms[4]) / 2
    res = Mean(pre=[NormClip(relative=0.5)])(x)
    assert close(res.vector, bf_clip(x, 0.5 * median).mean(dim=0))
    assert res.diagnostics["clip_threshold"] == pytest.approx(0.5 * median)


def test_bucketing_averages_the_reported_buckets() -> None:
    x = sample(11, 9, 4)
    for rule in ("mean", "median", "krum", "geometric-median"):
        agg = build_aggregator(rule, f=0, pre=["bucketing"], pre_params={"bucketing": {"s": 2}})
        res = agg(x)
        buckets = res.diagnostics["buckets"]
        assert sorted(i for b in buckets for i in b) == list(range(9))
        assert [len(b) for b in buckets] == [2, 2, 2, 2, 1]
        means = torch.stack([x[b].mean(dim=0) for b in buckets])
        expected = {
            "mean": lambda m: m.mean(dim=0),
            "median": bf_median,
            "krum": lambda m: m[bf_krum(m, 0)],
            "geometric-median": lambda m: bf_geometric_median(m, 0.1, 8, 1e-6),
        }[rule](means)
        assert close(res.vector, expected, 1e-8)


# ----------------------------------------------------------------------------- blocked d-sized passes


def test_rules_are_exact_across_many_column_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    # shrink the chunk budget so every d-sized pass runs over several blocks, the last one partial
    monkeypatch.setattr(geometry, "_CPU_CHUNK_BYTES", 1)
    monkeypatch.setattr(sorting, "_COLUMNS_PER_OP", 1000)
    n, d, f = 11, 2600, 2
    x = sample(12, n, d)
    assert geometry.column_chunk(n + 1, d, x.device) == 1024
    assert close(Krum(f)(x).scores, torch.tensor(bf_krum_scores(x, f), dtype=torch.float64), 1e-9)
    res = Bulyan(f)(x)
    assert res.selected == bf_bulyan_select(x, f)
    assert close(res.vector, bf_closest_to_median_mean(x[res.selected], n - 4 * f))
    g = torch.Generator().manual_seed(0)
    start = torch.randn(d, dtype=torch.float64, generator=g)
    for method in ("span", "direct"):
        cc = CenteredClip(f, tau=5.0, iterations=2, method=method)
        cc.reset(start=start)
        assert close(cc(x).vector, bf_centered_clip(x, start, 5.0, 2), 1e-9)
        gm = GeometricMedian(f, iterations=4, tol=0.0, method=method)(x).vector
        assert close(gm, bf_geometric_median(x, 0.1, 4, 0.0), 1e-8)
    assert close(Mean(f, pre=[NNM()])(x).vector, bf_nnm(x, f).mean(dim=0))
    assert close(CoordinateMedian(f, pre=[NNM()])(x).vector, bf_median(bf_nnm(x, f)))
    half = x.to(torch.bfloat16)
    assert torch.equal(Krum(f)(half).vector, half[bf_krum(half.to(torch.float64), f)])


def test_float32_rules_agree_with_float64_reference() -> None:
    x64 = sample(13, 13, 50)
    x32 = x64.to(torch.float32)
    f = 2
    assert Krum(f)(x32).selected == Krum(f)(x64).selected
    assert Bulyan(f)(x32).selected == Bulyan(f)(x64).selected
    assert close(Bulyan(f)(x32).vector, Bulyan(f)(x32.to(torch.float64)).vector, 1e-5)
    gm32 = GeometricMedian(f)(x32).vector
    assert close(gm32, bf_geometric_median(x32.to(torch.float64), 0.1, 8, 1e-6), 1e-5)


# ----------------------------------------------------------------------------- sorting network


@pytest.mark.parametrize("n", range(1, 17))
def test_sorting_network_sorts_every_zero_one_input(n: int) -> None:
    # 0-1 principle: a comparator network sorts everything iff it sorts all 2^n vectors of 0s and 1s
    cols = torch.tensor(list(itertools.product((0.0, 1.0), repeat=n)), dtype=torch.float32).T.contiguous()
    rows = sort_columns(cols.clone())
    assert torch.equal(torch.stack(rows), torch.sort(cols, dim=0).values)
    assert len(sorting_network(n)) <= n * n


@pytest.mark.parametrize("n", [17, 25, 33, 64, 65, 80])
def test_sorting_of_larger_row_counts(n: int) -> None:
    block = torch.randn(n, 300, generator=torch.Generator().manual_seed(n))
    assert torch.equal(torch.stack(sort_columns(block.clone())), torch.sort(block, dim=0).values)


@pytest.mark.parametrize(
    ("theta", "beta"), [(3, 3), (3, 1), (7, 3), (8, 4), (15, 5), (16, 6), (17, 9), (21, 1)]
)
def test_closest_to_median_mean_matches_brute_force(theta: int, beta: int) -> None:
    block = torch.randn(
        theta, 200, dtype=torch.float64, generator=torch.Generator().manual_seed(theta * beta)
    )
    assert close(closest_to_median_mean(block.clone(), beta), bf_closest_to_median_mean(block, beta))


def test_score_ties_are_broken_by_geometry_not_by_arrival_order() -> None:
    # n = 3, f = 0: one neighbour counts, so the mutual nearest pair (0 and 1) always ties; the point
    # whose next-nearest other is closer (1) must win whatever the order of the rows
    x = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
    for perm in itertools.permutations(range(3)):
        assert float(Krum(0)(x[list(perm)]).vector[0]) == 1.0
        assert float(MultiKrum(0, m=1)(x[list(perm)]).vector[0]) == 1.0


@pytest.mark.parametrize(("theta", "beta"), [(3, 1), (7, 3), (8, 4), (15, 5), (16, 6)])
def test_generated_window_kernel_matches_brute_force_and_eager(theta: int, beta: int) -> None:
    # the straight-line code that torch.compile fuses for large inputs, run here without compiling
    block = torch.randn(theta, 300, dtype=torch.float64, generator=torch.Generator().manual_seed(theta))
    generated = sorting.window_kernel(theta, beta)(*block.unbind(0))
    assert close(generated, bf_closest_to_median_mean(block, beta))
    assert torch.equal(generated, sorting.closest_to_median_mean_rows(block, range(theta), beta, "eager"))
