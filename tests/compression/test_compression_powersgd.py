"""PowerSGD: exact on low-rank matrices, improves with warm start, follows the DDP hook's layout rules."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dist_llm_train.compression import Encoded, PowerSGDCodec, build_codec
from dist_llm_train.errors import PreconditionError


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


@pytest.mark.parametrize(("true_rank", "r"), [(3, 3), (2, 4), (1, 1)])
def test_low_rank_matrix_is_reconstructed_exactly(true_rank: int, r: int) -> None:
    g = torch.Generator().manual_seed(true_rank)
    m = torch.randn(64, true_rank, generator=g) @ torch.randn(true_rank, 48, generator=g)
    codec = build_codec("powersgd", rank=r)
    enc = codec.encode(m)
    out = codec.decode(Encoded.from_frames([bytes(f) for f in enc.to_frames()]))
    assert _relative_error(out, m) < 1e-5
    assert enc.params["ranks"] == [r]
    assert enc.buffer("p").numel() == 64 * r and enc.buffer("q").numel() == 48 * r


def _decaying_spectrum_matrix(n: int, m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    v, _ = torch.linalg.qr(torch.randn(m, m, generator=g))
    s = 0.8 ** torch.arange(min(n, m), dtype=torch.float32)
    return (u[:, : s.numel()] * s) @ v[:, : s.numel()].T, s


def test_warm_start_error_shrinks_on_a_fixed_matrix() -> None:
    """Warm start turns repeated compression of one matrix into subspace iteration: the error falls
    towards the best rank-r error (Eckart-Young); without warm start it stays at one step from noise."""
    mat, s = _decaying_spectrum_matrix(60, 40, seed=0)
    best = float(torch.linalg.vector_norm(s[2:]) / torch.linalg.vector_norm(s))
    warm = build_codec("powersgd", rank=2, seed=1)
    cold = build_codec("powersgd", rank=2, seed=1, warm_start=False)
    warm_err = [_relative_error(warm.decode(warm.encode(mat)), mat) for _ in range(12)]
    cold_err = [_relative_error(cold.decode(cold.encode(mat)), mat) for _ in range(12)]
    assert warm_err[0] == pytest.approx(cold_err[0])  # same seed, same first draw
    assert all(b <= a * (1 + 1e-4) for a, b in itertools.pairwise(warm_err))
    assert warm_err[-1] < 0.9 * warm_err[0]
    assert warm_err[-1] == pytest.approx(best, rel=0.02)
    assert min(cold_err[1:]) > warm_err[-1] * 1.05
    warm.reset()
    assert _relative_error(warm.decode(warm.encode(mat)), mat) == pytest.approx(cold_err[1], rel=1e-5)


def test_parameter_partition_follows_the_ddp_hook() -> None:
    shapes = [[64, 32], [32], [16, 3, 3, 3], [2, 2], [8, 1000], [16, 1000], [0, 5]]
    codec = build_codec("powersgd", rank=4, shapes=shapes)
    # Compressed iff (n + m)·r·2 < n·m with r = min(n, m, 4): 1-D and empty -> dense; [16,3,3,3] is a 16x27
    # matrix, 344 < 432 -> rank 4; 2x2 at rank 2: 16 >= 4 -> dense; 8x1000: 8064 >= 8000 -> dense.
    assert codec.ranks_for(shapes) == [4, 0, 4, 0, 0, 4, 0]
    g = torch.Generator().manual_seed(3)
    total = sum(math.prod(s) for s in shapes)
    flat = torch.randn(total, generator=g)
    enc = codec.encode(flat)
    out = codec.decode(Encoded.from_frames([bytes(f) for f in enc.to_frames()]))
    offset = 0
    for shape, r in zip(shapes, enc.params["ranks"], strict=True):
        size = math.prod(shape)
        if r == 0:
            assert torch.equal(out[offset : offset + size], flat[offset : offset + size])
        offset += size
    assert enc.buffer("dense").numel() == 32 + 4 + 8000
    assert enc.buffer("p").numel() == (64 + 16 + 16) * 4
    assert enc.buffer("q").numel() == (32 + 27 + 1000) * 4
    assert enc.nbytes == 4 * (8036 + 384 + 4236) + len(enc.to_frames()[0])


def test_shapes_must_cover_the_update() -> None:
    codec = build_codec("powersgd", rank=1, shapes=[[4, 4], [3]])
    with pytest.raises(PreconditionError, match="add up to 19 values but the update has 20"):
        codec.encode(torch.zeros(20))


def test_degenerate_inputs() -> None:
    codec = PowerSGDCodec(rank=2, shapes=[[10, 8]])
    zeros = torch.zeros(80)
    assert torch.equal(codec.decode(codec.encode(zeros)), zeros)
    # the zero step left Q = 0; the next non-zero matrix must still be approximated, not stuck at zero
    mat = torch.outer(torch.arange(1.0, 11.0), torch.linspace(-1, 1, 8))
    out = codec.decode(codec.encode(mat.reshape(-1))).view(10, 8)
    assert _relative_error(out, mat) < 1e-5
    one_d = build_codec("powersgd", rank=3)
    v = torch.randn(7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(one_d.decode(one_d.encode(v)), v)
