"""Property tests (hypothesis) of the coordinate-wise kernels on small random inputs."""

from __future__ import annotations

import hypothesis.strategies as st
import torch
from hypothesis import given, settings
from torch import Tensor

from dist_llm_train.aggregation.coordinatewise import coordinate_median, coordinate_trimmed_mean

FINITE = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False, width=32)
FEW_VALUES = st.sampled_from([-1.5, -0.0, 0.0, 2.0, 7.25])  # ties, and both signed zeros


@st.composite
def stacks(draw: st.DrawFn) -> Tensor:
    n = draw(st.integers(1, 40))
    d = draw(st.integers(1, 6))
    values = draw(st.sampled_from([FINITE, FEW_VALUES]))
    data = draw(st.lists(values, min_size=n * d, max_size=n * d))
    return torch.tensor(data, dtype=torch.float32).reshape(n, d)


@settings(max_examples=60, deadline=None)
@given(x=stacks(), seed=st.integers(0, 2**31 - 1))
def test_median_matches_sort_and_ignores_row_order(x: Tensor, seed: int) -> None:
    n = x.shape[0]
    before = x.clone()
    s = torch.sort(x, dim=0).values
    want = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) * 0.5
    got = coordinate_median(x, backend="eager")
    assert torch.equal(got, want)
    assert torch.equal(x, before)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    # Equal values compare equal (0.0 == -0.0), so the row order may only change the sign of a zero.
    assert bool((coordinate_median(x[perm], backend="eager") == got).all())


@settings(max_examples=60, deadline=None)
@given(x=stacks(), data=st.data())
def test_trimmed_mean_between_kept_extremes_and_close_to_sort(x: Tensor, data: st.DataObject) -> None:
    n = x.shape[0]
    f = data.draw(st.integers(0, (n - 1) // 2))
    before = x.clone()
    got = coordinate_trimmed_mean(x, f, backend="eager").double()
    s = torch.sort(x, dim=0).values.double()
    lo, hi = s[f], s[n - 1 - f]
    slack = 1e-6 * torch.maximum(lo.abs(), hi.abs())
    assert bool((got >= lo - slack).all()) and bool((got <= hi + slack).all())
    want = s[f : n - f].mean(dim=0)
    assert bool(((got - want).abs() <= 8 * (n - 2 * f) * 2.0**-23 * torch.maximum(lo.abs(), hi.abs())).all())
    assert torch.equal(x, before)
