"""Exactness of the coordinate-wise kernels against a sort-based reference, and their error contract."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import Tensor

from dist_llm_train.aggregation import coordinatewise as cw
from dist_llm_train.aggregation.coordinatewise import coordinate_median, coordinate_trimmed_mean
from dist_llm_train.errors import PreconditionError


def ref_median(x: Tensor) -> Tensor:
    s = torch.sort(x, dim=0).values
    n = x.shape[0]
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) * 0.5


def ref_trimmed(x: Tensor, f: int) -> Tensor:
    n = x.shape[0]
    return torch.sort(x, dim=0).values[f : n - f].mean(dim=0)


def assert_trimmed_close(got: Tensor, x: Tensor, f: int) -> None:
    # Same multiset of n-2f values summed in another order: error within a few ulps of the largest term.
    n = x.shape[0]
    want = ref_trimmed(x, f)
    s = torch.sort(x, dim=0).values
    scale = torch.maximum(s[f].abs(), s[n - 1 - f].abs())  # the largest value that is averaged
    tol = 4 * (n - 2 * f) * torch.finfo(x.dtype).eps * scale
    assert got.shape == want.shape and got.dtype == want.dtype
    assert bool(((got - want).abs() <= tol).all()), float((got - want).abs().max())
    if n - 2 * f <= 2:
        assert torch.equal(got, want)


def sample(n: int, d: int, kind: str, gen: torch.Generator) -> Tensor:
    if kind == "ties":  # few distinct values: many equal entries per column
        return torch.randint(-2, 3, (n, d), generator=gen).float()
    if kind == "byzantine":  # f huge outliers on either side
        x = torch.randn(n, d, generator=gen)
        x[: max(1, n // 4)] *= 1e30
        return x
    return torch.randn(n, d, generator=gen) * 3 + 1


@pytest.mark.parametrize("kind", ["normal", "ties", "byzantine"])
def test_eager_exact_for_every_n_and_f(kind: str) -> None:
    gen = torch.Generator().manual_seed(1)
    for n in range(1, 41):
        x = sample(n, 13, kind, gen)
        before = x.clone()
        assert torch.equal(coordinate_median(x, backend="eager"), ref_median(x)), n
        for f in range(0, (n - 1) // 2 + 1):  # includes f at the bound 2f = n-1 or n-2
            assert_trimmed_close(coordinate_trimmed_mean(x, f, backend="eager"), x, f)
        assert torch.equal(x, before)


@pytest.mark.parametrize("n", [2, 3, 24, 25, 33])
def test_eager_many_chunks_and_threads(n: int) -> None:
    # Wider than several chunks (2047 columns for n <= 32) so the thread split and the short tail run.
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, 3 * 2047 + 11, generator=gen)
    before = x.clone()
    assert torch.equal(coordinate_median(x, backend="eager"), ref_median(x))
    f = (n - 1) // 3
    assert_trimmed_close(coordinate_trimmed_mean(x, f, backend="eager"), x, f)
    assert torch.equal(x, before)


def test_generated_network_exact_for_every_n() -> None:
    # The source torch.compile fuses, run op by op: checks the pruned Batcher network for every n.
    gen = torch.Generator().manual_seed(2)
    for n in range(2, 41):
        for kind in ("normal", "ties"):
            x = sample(n, 17, kind, gen)
            m = n // 2
            ranks = (m,) if n % 2 else (m - 1, m)
            assert torch.equal(cw._source_kernel(n, ranks)(x), ref_median(x)), (n, kind)
            for f in sorted({1, (n - 1) // 2}):
                if f > 0 and 2 * f < n:
                    got = cw._source_kernel(n, tuple(range(f, n - f)))(x)
                    assert_trimmed_close(got, x, f)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_backend_matches_reference() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(7, 1000, generator=gen)
    before = x.clone()
    got = coordinate_median(x, backend="compiled")
    assert torch.equal(got, ref_median(x))
    assert torch.equal(x, before)
    y = torch.randn(7, 333, generator=gen)  # another width reuses the dynamic-shape kernel
    assert torch.equal(coordinate_median(y, backend="compiled"), ref_median(y))


def test_auto_falls_back_to_eager_when_compile_fails(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(n: int, ranks: tuple[int, ...]) -> None:
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(cw, "_compiled_kernel", broken)
    monkeypatch.setattr(cw, "_COMPILE_FAILED", False)
    monkeypatch.setattr(cw, "COMPILE_MIN_NUMEL", 1)
    x = torch.randn(5, 100, generator=torch.Generator().manual_seed(4))
    with caplog.at_level(logging.WARNING, logger=cw.__name__):
        assert torch.equal(coordinate_median(x), ref_median(x))
    assert "eager" in caplog.text
    assert cw._COMPILE_FAILED
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        coordinate_median(x, backend="compiled")


def test_auto_picks_compiled_only_for_large_float_cpu_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cw, "_COMPILE_FAILED", False)
    monkeypatch.setattr(cw, "COMPILE_MIN_NUMEL", 100)
    big = torch.empty(2, 50)
    assert cw._auto_compiles(big)
    assert not cw._auto_compiles(torch.empty(2, 10))
    assert cw._auto_compiles(torch.empty(2, 10), size_hint=cw.COMPILE_MIN_NUMEL)  # a chunk of a big one
    assert not cw._auto_compiles(big.half())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_dtypes(dtype: torch.dtype) -> None:
    x = torch.randn(9, 50, generator=torch.Generator().manual_seed(5)).to(dtype)
    got = coordinate_median(x)
    assert got.dtype == dtype and torch.equal(got, ref_median(x))
    assert torch.equal(coordinate_median(x[:8]), ref_median(x[:8]))
    tm = coordinate_trimmed_mean(x, 2)
    assert tm.dtype == dtype
    torch.testing.assert_close(tm.double(), ref_trimmed(x.double(), 2), rtol=1e-2, atol=1e-2)


def test_layouts_and_edge_shapes() -> None:
    gen = torch.Generator().manual_seed(6)
    xt = torch.randn(40, 6, generator=gen).t()  # [6, 40] with column stride 6
    assert torch.equal(coordinate_median(xt), ref_median(xt))
    assert_trimmed_close(coordinate_trimmed_mean(xt, 2), xt.contiguous(), 2)
    one = torch.randn(1, 5, generator=gen)
    out = coordinate_median(one)
    assert torch.equal(out, one[0]) and out.data_ptr() != one.data_ptr()
    assert torch.equal(coordinate_trimmed_mean(one, 0), one[0])
    assert coordinate_median(torch.empty(3, 0)).shape == (0,)
    g = torch.randn(4, 3, requires_grad=True)
    assert not coordinate_median(g).requires_grad


def test_sorted_path_used_for_accelerators() -> None:
    gen = torch.Generator().manual_seed(7)
    for n in (1, 2, 5, 6, 25):
        x = torch.randn(n, 21, generator=gen)
        s = torch.sort(x, dim=0).values
        m = n // 2
        assert torch.equal(cw._sorted_rows_mean(s, (m,) if n % 2 else (m - 1, m)), ref_median(x))
        if n >= 5:
            assert torch.equal(cw._sorted_rows_mean(s, tuple(range(2, n - 2))), ref_trimmed(x, 2))


@pytest.mark.parametrize(
    ("n", "f", "match"),
    [(5, 3, "2f < n"), (4, 2, "2f < n"), (5, -1, "0 <= f"), (5, 1.0, "integer f"), (5, True, "integer f")],
)
def test_trimmed_mean_rejects_bad_f(n: int, f: object, match: str) -> None:
    with pytest.raises(PreconditionError, match=match):
        coordinate_trimmed_mean(torch.zeros(n, 3), f)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.zeros(5), "2-D tensor"),
        (torch.zeros(0, 3), "n >= 1"),
        (torch.zeros(3, 4, dtype=torch.int64), "floating-point"),
        ([[1.0, 2.0]], "torch.Tensor"),
    ],
)
def test_rejects_bad_input(x: object, match: str) -> None:
    with pytest.raises(PreconditionError, match=match):
        coordinate_median(x)  # type: ignore[arg-type]
    with pytest.raises(PreconditionError, match=match):
        coordinate_trimmed_mean(x, 0)  # type: ignore[arg-type]


def test_rejects_unknown_backend() -> None:
    with pytest.raises(PreconditionError, match="backend"):
        coordinate_median(torch.zeros(3, 2), backend="fast")  # type: ignore[arg-type]
