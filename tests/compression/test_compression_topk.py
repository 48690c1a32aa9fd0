"""Top-k sparsification: exact selection, DGC's sampled threshold, value precisions, wire size."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from dist_llm_train.compression import (
    Encoded,
    TopKCodec,
    build_codec,
    exact_topk_indices,
    sampled_topk_indices,
)
from dist_llm_train.compression.topk import count_bounds
from dist_llm_train.errors import ConfigError


def _kept_dominates_dropped(x: torch.Tensor, idx: torch.Tensor) -> bool:
    mask = torch.zeros(x.numel(), dtype=torch.bool)
    mask[idx] = True
    mags = x.abs()
    if mask.all() or not mask.any():
        return True
    return float(mags[mask].min()) >= float(mags[~mask].max())


def test_exact_topk_keeps_exactly_the_k_largest_magnitudes() -> None:
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(0))
    codec = build_codec("topk", ratio=0.01)
    enc = codec.encode(x)
    out = codec.decode(Encoded.from_frames([bytes(f) for f in enc.to_frames()]))
    kept = out != 0
    assert int(kept.sum()) == 1000
    expected = torch.zeros_like(kept)
    expected[torch.topk(x.abs(), 1000).indices] = True
    assert torch.equal(kept, expected)
    assert torch.equal(out[kept], x[kept])  # fp32 values are sent exactly
    # 1000 values x 4 bytes + ~1.3 bytes per varint gap + header: well under 5.6 bytes per kept entry
    assert enc.nbytes < 1000 * 5.6
    assert enc.params["index_coding"] == "varint"


@pytest.mark.parametrize(
    "kind", ["normal", "heavy_tailed", "block_sparse", "mostly_zero", "ties", "sorted_ramp", "periodic"]
)
def test_sampled_topk_count_is_within_dgc_bounds(kind: str) -> None:
    g = torch.Generator().manual_seed(1)
    n = 1_000_000 if kind == "normal" else 200_000
    if kind == "normal":
        x = torch.randn(n, generator=g)
    elif kind == "heavy_tailed":
        x = torch.randn(n, generator=g) ** 3
    elif kind == "block_sparse":  # one "layer" holds all the signal: stride sampling sees only its share
        x = torch.randn(n, generator=g) * 1e-3
        x[5000:7000] = torch.randn(2000, generator=g)
    elif kind == "mostly_zero":  # fewer non-zeros than k: the threshold falls to 0
        x = torch.zeros(n)
        x[torch.randperm(n, generator=g)[:500]] = 1.0
    elif kind == "ties":
        x = torch.randint(-2, 3, (n,), generator=g).float()
    elif kind == "sorted_ramp":
        x = torch.linspace(-1, 1, n)
    else:  # period equal to the sample stride: every sampled entry is the same
        x = torch.zeros(n)
        x[::100] = 5.0
        x += torch.randn(n, generator=g) * 0.01
    k = n // 100
    gen = torch.Generator().manual_seed(2)
    idx = sampled_topk_indices(x, k, generator=gen)
    lo, hi = count_bounds(k)
    assert lo <= idx.numel() <= hi
    assert bool((idx[1:] > idx[:-1]).all())  # sorted, unique
    assert _kept_dominates_dropped(x, idx)


def test_sampled_topk_overlaps_exact_set() -> None:
    x = torch.randn(1_000_000, generator=torch.Generator().manual_seed(3))
    k = 10_000
    codec = build_codec("topk", k=k, selection="sampled", seed=5)
    sampled = codec.select(x)
    exact = exact_topk_indices(x, k)
    overlap = torch.isin(exact, sampled).float().mean().item()
    assert overlap >= 0.9
    assert count_bounds(k)[0] <= sampled.numel() <= count_bounds(k)[1]


def test_exact_topk_edge_cases() -> None:
    x = torch.tensor([3.0, -1.0, 2.0])
    assert exact_topk_indices(x, 5).tolist() == [0, 1, 2]
    assert exact_topk_indices(x, 0).tolist() == []
    codec = build_codec("topk", k=10)
    assert torch.equal(codec.decode(codec.encode(x)), x)
    assert TopKCodec(ratio=1e-9).target_k(50) == 1


@pytest.mark.parametrize(("values", "tol"), [("fp16", 1e-3), ("int8", 2e-2)])
def test_value_precisions(values: str, tol: float) -> None:
    x = torch.randn(50_000, generator=torch.Generator().manual_seed(4))
    full = build_codec("topk", ratio=0.02)
    narrow = build_codec("topk", ratio=0.02, values=values, chunk_size=256)
    a, enc = full.decode(full.encode(x)), narrow.encode(x)
    b = narrow.decode(Encoded.from_frames([bytes(f) for f in enc.to_frames()]))
    assert torch.equal(a != 0, b != 0)
    kept = a != 0
    rel = ((a[kept] - b[kept]).abs() / a[kept].abs()).max().item()
    assert rel < tol
    assert enc.nbytes < full.encode(x).nbytes


def test_topk_wire_size_is_small() -> None:
    x = torch.randn(1_000_000, generator=torch.Generator().manual_seed(6))
    enc = build_codec("topk", ratio=0.01, values="int8").encode(x)
    # 10k values: 1 byte each + scales + ~1.3 index bytes each: > 150x smaller than float32
    assert 4 * x.numel() / enc.nbytes > 150


@pytest.mark.parametrize("seed", range(6))
def test_sampled_topk_repicks_when_the_sample_misleads(seed: int) -> None:
    """Every even entry is large: a sample of the evens puts the threshold too high (too few kept, the
    threshold is lowered), a sample of the odds puts it too low (too many, the candidates are cut to k)."""
    g = torch.Generator().manual_seed(100 + seed)
    n, k = 1000, 100
    x = torch.rand(n, generator=g) * 0.1
    x[::2] += 1.0
    idx = sampled_topk_indices(x, k, sample_ratio=0.5, generator=torch.Generator().manual_seed(seed))
    lo, hi = count_bounds(k)
    assert lo <= idx.numel() <= hi
    assert _kept_dominates_dropped(x, idx)


def test_cpu_threshold_pass_matches_torch_across_chunk_boundaries() -> None:
    from dist_llm_train.compression.topk import _CHUNK, _at_or_above

    x = torch.randn(2 * _CHUNK + 12_345, generator=torch.Generator().manual_seed(8))
    x[_CHUNK - 1] = x[_CHUNK] = 10.0  # hits on both sides of a chunk boundary
    for thr in (0.0, 2.0, 9.0, 11.0):
        t = torch.tensor(thr)
        assert torch.equal(_at_or_above(x, t), torch.nonzero(x.abs() >= t).view(-1))


# ---------------------------------------------------------------------------------- layerwise, warm-up
def test_layerwise_keeps_the_ratio_of_every_segment_even_when_one_dominates() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1000, generator=g)
    x[:100] *= 1e-3  # a small-gradient tensor that a global top-k would starve
    global_codec = build_codec("topk", ratio=0.1)
    layerwise = build_codec("topk", ratio=0.1, layerwise=True, segments=[100, 900])
    assert int((global_codec.decode(global_codec.encode(x))[:100] != 0).sum()) == 0
    kept = layerwise.decode(layerwise.encode(x))
    assert int((kept[:100] != 0).sum()) == 10 and int((kept[100:] != 0).sum()) == 90
    # Within each segment it is the exact top-k of that segment, and the payload is the usual format.
    for lo, hi, k in ((0, 100, 10), (100, 1000, 90)):
        expected = set((torch.topk(x[lo:hi].abs(), k).indices + lo).tolist())
        assert set(torch.nonzero(kept[lo:hi]).flatten().add(lo).tolist()) == expected
    encoded = layerwise.encode(x)
    assert encoded.nbytes == sum(len(bytes(f)) for f in encoded.to_frames())


def test_layerwise_rejects_segments_that_do_not_cover_the_update() -> None:
    codec = build_codec("topk", ratio=0.1, layerwise=True, segments=[10, 20])
    with pytest.raises(ConfigError, match="segments cover 30 entries but the update has 31"):
        codec.encode(torch.randn(31))
    with pytest.raises(ConfigError, match="layerwise needs 'segments'"):
        build_codec("topk", ratio=0.1, layerwise=True)
    with pytest.raises(ConfigError, match="layerwise needs 'ratio'"):
        build_codec("topk", k=3, layerwise=True, segments=[10])


def test_warmup_shrinks_the_kept_share_geometrically_to_the_ratio() -> None:
    codec = build_codec("topk", ratio=0.01, warmup_steps=100, warmup_ratio=0.25)
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    kept = {}
    for step in (0, 50, 100, 500):
        codec.set_step(step)
        kept[step] = int(codec.encode(x).params["k"])
    assert kept == {0: 2500, 50: 500, 100: 100, 500: 100}  # 0.25 * (0.01 / 0.25) ** 0.5 = 0.05
    with pytest.raises(ConfigError, match="warmup_steps needs 'ratio'"):
        build_codec("topk", k=5, warmup_steps=10)


def test_worker_engine_passes_segments_and_the_server_version(tiny_engine_cfg: Callable[..., Any]) -> None:
    from dist_llm_train.coordination import WorkerEngine, WorkItem
    from dist_llm_train.data import prepare_data
    from dist_llm_train.models import build_model

    cfg = tiny_engine_cfg(
        "compression.codec=topk", "compression.params={ratio: 0.05, layerwise: true, warmup_steps: 10}"
    )
    data = prepare_data(cfg.data, block_size=8)
    model = build_model(cfg.model, data.tokenizer.vocab_size)
    engine = WorkerEngine(model, data.train, cfg)
    inner = engine.codec.codec
    assert inner.segments == [p.numel() for p in model.parameters()]
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    early = engine.encode(engine.compute(params, 0, WorkItem(0, len(data.train), 1, 7)).vector)
    late = engine.encode(engine.compute(params, 10, WorkItem(0, len(data.train), 1, 7)).vector)
    assert int(early.params["k"]) > 4 * int(late.params["k"])
