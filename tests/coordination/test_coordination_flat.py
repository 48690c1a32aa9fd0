"""The finiteness check the coordinator and the parameter server admit updates with."""

from __future__ import annotations

import pytest
import torch

from dist_llm_train.coordination.flat import all_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_one_non_finite_value_anywhere_is_found(dtype: torch.dtype, bad: float) -> None:
    x = torch.randn(10_001, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert all_finite(x)
    for position in (0, 5_000, 10_000):
        y = x.clone()
        y[position] = bad
        assert not all_finite(y), (dtype, bad, position)


def test_huge_finite_values_that_overflow_the_reduction_are_still_finite() -> None:
    # x · x (and the sum) overflow to inf here; the exact check must then decide.
    x = torch.full((1000,), 3e38)
    assert not torch.isfinite(torch.dot(x, x)) and not torch.isfinite(x.sum())
    assert all_finite(x)
    assert all_finite(torch.full((1000,), 60_000.0, dtype=torch.float16))


def test_shapes_strides_and_dtypes() -> None:
    assert all_finite(torch.empty(0))
    assert all_finite(torch.arange(10))  # integers are always finite
    matrix = torch.randn(30, 40)
    assert all_finite(matrix)
    matrix[7, 9] = float("nan")
    assert not all_finite(matrix)
    assert not all_finite(matrix.t())  # not contiguous
    assert not all_finite(matrix[:, 9])  # a strided column holding the NaN
    assert all_finite(matrix[:, 10])
