"""Clipping and worker-level DP-FedAvg noise."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_llm_train.errors import ConfigError, NonFiniteError, PreconditionError
from dist_llm_train.privacy import WorkerLevelDP, clip_update


def test_clip_scales_down_long_updates_and_keeps_short_ones() -> None:
    u = torch.tensor([3.0, 4.0])
    clipped, norm = clip_update(u, 1.0)
    assert norm == pytest.approx(5.0)
    assert torch.allclose(clipped, torch.tensor([0.6, 0.8]))
    short, short_norm = clip_update(u, 10.0)
    assert torch.equal(short, u) and short_norm == pytest.approx(5.0)
    assert short.data_ptr() != u.data_ptr()  # a copy even when nothing changes
    zero, zero_norm = clip_update(torch.zeros(3), 1.0)
    assert torch.equal(zero, torch.zeros(3)) and zero_norm == 0.0


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(min_value=0, max_value=2**31),
    clip=st.floats(min_value=1e-3, max_value=1e3),
    scale=st.floats(min_value=1e-3, max_value=1e4),
)
def test_clip_preserves_direction_bounds_norm_and_never_modifies_input(
    seed: int, clip: float, scale: float
) -> None:
    u = torch.randn(257, generator=torch.Generator().manual_seed(seed)) * scale
    before = u.clone()
    clipped, norm = clip_update(u, clip)
    assert torch.equal(u, before)
    assert norm == pytest.approx(float(before.double().norm()), rel=1e-6)
    assert float(clipped.norm()) <= clip * (1 + 1e-5)
    assert float(torch.nn.functional.cosine_similarity(clipped, before, dim=0)) > 0.99
    if norm <= clip:
        assert torch.equal(clipped, before)


def test_clip_rejects_bad_inputs() -> None:
    with pytest.raises(NonFiniteError):
        clip_update(torch.tensor([1.0, math.nan]), 1.0)
    with pytest.raises(NonFiniteError):
        clip_update(torch.tensor([math.inf]), 1.0)
    with pytest.raises(ConfigError, match="clip_norm"):
        clip_update(torch.ones(2), 0.0)
    with pytest.raises(PreconditionError):
        clip_update(torch.ones(2, dtype=torch.long), 1.0)


def test_noise_has_std_z_times_s_over_expected_workers() -> None:
    dp = WorkerLevelDP(
        clip_norm=2.0, noise_multiplier=1.5, expected_workers=4, generator=torch.Generator().manual_seed(0)
    )
    assert dp.noise_std == pytest.approx(3.0)
    out = dp.noise(torch.zeros(100_000))
    # Noise on the sum is N(0, (zS)²) = N(0, 9); after dividing by 4 the std is 0.75.
    assert float(out.std()) == pytest.approx(0.75, rel=0.02)
    assert abs(float(out.mean())) < 0.01


def test_aggregate_is_sum_plus_noise_over_expected_count() -> None:
    rows = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.3, 0.4], [0.0, 0.0, 10.0]])
    before = rows.clone()
    a = WorkerLevelDP(1.0, 0.7, expected_workers=5, generator=torch.Generator().manual_seed(3))
    b = WorkerLevelDP(1.0, 0.7, expected_workers=5, generator=torch.Generator().manual_seed(3))
    out = a.aggregate(rows)
    assert torch.equal(rows, before)
    clipped_sum = (
        torch.tensor([0.6, 0.8, 0.0]) + torch.tensor([0.0, 0.3, 0.4]) + torch.tensor([0.0, 0.0, 1.0])
    )
    noise = torch.randn(3, generator=torch.Generator().manual_seed(3)) * 0.7
    assert torch.allclose(out, (clipped_sum + noise) / 5, atol=1e-6)
    # noise() on an already-summed vector gives the same answer with the same generator state.
    assert torch.allclose(b.noise(clipped_sum), out, atol=1e-6)


def test_aggregate_reclips_rows_that_skipped_clipping() -> None:
    dp = WorkerLevelDP(1.0, 0.0, expected_workers=2)
    out = dp.aggregate(torch.tensor([[100.0, 0.0], [0.0, 0.5]]))
    assert torch.allclose(out, torch.tensor([0.5, 0.25]))


def test_worker_clip_is_clip_update() -> None:
    dp = WorkerLevelDP(1.0, 1.0, expected_workers=3)
    u = torch.tensor([0.0, 2.0])
    assert torch.equal(dp.clip(u), torch.tensor([0.0, 1.0]))
    assert torch.equal(u, torch.tensor([0.0, 2.0]))


def test_worker_dp_rejects_bad_settings_and_inputs() -> None:
    with pytest.raises(ConfigError, match="noise_multiplier"):
        WorkerLevelDP(1.0, -1.0, expected_workers=3)
    with pytest.raises(ConfigError, match="expected_workers"):
        WorkerLevelDP(1.0, 1.0, expected_workers=0)
    with pytest.raises(ConfigError, match="clip_norm"):
        WorkerLevelDP(math.inf, 1.0, expected_workers=2)
    dp = WorkerLevelDP(1.0, 1.0, expected_workers=2)
    with pytest.raises(NonFiniteError):
        dp.aggregate(torch.tensor([[1.0, math.nan]]))
    with pytest.raises(PreconditionError, match=r"\[k, d\]"):
        dp.aggregate(torch.ones(3))
