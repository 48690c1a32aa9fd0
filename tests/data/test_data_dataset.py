"""Dataset: splits, the token cache, shards and deterministic batches."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_llm_train.config.schema import DataConfig
from dist_llm_train.data import dataset as dataset_mod
from dist_llm_train.data.dataset import (
    Shard,
    get_batch,
    iter_eval_batches,
    make_shards,
    prepare_data,
    split_text,
    token_dtype,
)
from dist_llm_train.data.tokenizers import ByteTokenizer, Tokenizer
from dist_llm_train.errors import ConfigError, DataError

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
SHAKESPEARE = SHARED / "tinyshakespeare" / "input.txt"
WIKITEXT = SHARED / "wikitext-2"


def _shakespeare_cfg(tmp_path: Path, **kw: object) -> DataConfig:
    base: dict[str, object] = {
        "corpus": "tinyshakespeare",
        "path": str(SHAKESPEARE),
        "max_bytes": 200_000,
        "cache_dir": str(tmp_path / "cache"),
        "shard_tokens": 4096,
    }
    base.update(kw)
    return DataConfig(**base)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ split


def test_split_text_at_character_boundary() -> None:
    text = "ab€d" * 25  # 100 characters, multi-byte ones included
    train, val = split_text(text, 0.1)
    assert train + val == text
    assert len(val) == 10
    assert split_text(text, 0.1) == (train, val)
    with pytest.raises(ConfigError):
        split_text(text, 1.0)


def test_token_dtype() -> None:
    assert token_dtype(256) == np.uint16
    assert token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32


# ------------------------------------------------------------------------------------------------ prepare


def test_prepare_char_shakespeare_split_and_bytes(tmp_path: Path) -> None:
    data = prepare_data(_shakespeare_cfg(tmp_path, tokenizer="char", val_fraction=0.1), block_size=64)
    text = SHAKESPEARE.read_text(encoding="utf-8")[:200_000]
    cut = int(len(text) * 0.9)
    assert isinstance(data.train, np.memmap) and isinstance(data.val, np.memmap)
    assert data.train.dtype == np.uint16
    assert len(data.train) == cut and len(data.val) == len(text) - cut
    assert data.tokenizer.decode(data.train) == text[:cut]
    assert data.train_bytes == cut and data.val_bytes == len(text) - cut
    assert not data.train.flags.writeable  # memory-mapped read-only


def test_prepare_reuses_cache_without_retokenising(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    original = ByteTokenizer.encode

    def counting(self: Tokenizer, text: str) -> np.ndarray:
        calls["n"] += 1
        return original(self, text)  # type: ignore[arg-type]

    monkeypatch.setattr(ByteTokenizer, "encode", counting)
    cfg = _shakespeare_cfg(tmp_path)
    first = prepare_data(cfg)
    assert calls["n"] == 2 and not first.from_cache
    files = sorted(first.cache_path.iterdir())  # type: ignore[union-attr]
    assert {p.name for p in files} == {"train.npy", "val.npy", "meta.json", "tokenizer.json"}
    mtimes = {p.name: p.stat().st_mtime_ns for p in files}
    second = prepare_data(cfg)
    assert calls["n"] == 2 and second.from_cache
    assert {p.name: p.stat().st_mtime_ns for p in files} == mtimes
    assert second.fingerprint == first.fingerprint
    assert np.array_equal(second.train, first.train) and np.array_equal(second.val, first.val)
    assert second.shards == first.shards
    # Settings that change the data change the fingerprint (a new cache entry, not a stale hit).
    other = prepare_data(_shakespeare_cfg(tmp_path, val_fraction=0.2))
    assert other.fingerprint != first.fingerprint and calls["n"] == 4


def test_prepare_rebuilds_a_damaged_cache(tmp_path: Path) -> None:
    cfg = _shakespeare_cfg(tmp_path)
    first = prepare_data(cfg)
    assert first.cache_path is not None
    expected = np.array(first.train)
    (first.cache_path / "train.npy").write_bytes(b"truncated")
    again = prepare_data(cfg)
    assert not again.from_cache
    assert np.array_equal(again.train, expected)


def test_prepare_is_deterministic_across_cache_dirs(tmp_path: Path) -> None:
    a = prepare_data(_shakespeare_cfg(tmp_path, cache_dir=str(tmp_path / "a")))
    b = prepare_data(_shakespeare_cfg(tmp_path, cache_dir=str(tmp_path / "b")))
    assert a.fingerprint == b.fingerprint
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    assert a.shards == b.shards


def test_prepare_wikitext2_uses_its_own_validation_split(tmp_path: Path) -> None:
    cfg = DataConfig(
        corpus="wikitext2",
        path=str(WIKITEXT),
        train_split="valid",
        val_split="test",
        max_bytes=100_000,
        cache_dir=str(tmp_path),
    )
    data = prepare_data(cfg, block_size=128)
    assert len(data.train) == data.train_bytes <= 100_000  # byte tokenizer: one token per byte
    test_text = (WIKITEXT / "test.txt").read_text(encoding="utf-8")
    assert data.tokenizer.decode(data.val) == test_text[: len(data.tokenizer.decode(data.val))]
    assert data.val_bytes == len(data.val)


def test_prepare_bpe_small_vocab(tmp_path: Path) -> None:
    data = prepare_data(_shakespeare_cfg(tmp_path, tokenizer="bpe", vocab_size=400), block_size=32)
    assert data.tokenizer.vocab_size == 400
    assert data.train.dtype == np.uint16
    assert int(data.train.max()) < 400
    assert len(data.train) < 0.8 * data.train_bytes
    text = SHAKESPEARE.read_text(encoding="utf-8")[:200_000]
    assert data.tokenizer.decode(data.train) + data.tokenizer.decode(data.val) == text


def test_prepare_default_stdlib_corpus(tmp_path: Path) -> None:
    data = prepare_data(
        DataConfig(max_bytes=40_000, cache_dir=str(tmp_path), shard_tokens=8192), block_size=64
    )
    assert data.corpus == "python-stdlib"
    assert data.train_bytes + data.val_bytes <= 40_000
    assert len(data.train) == data.train_bytes and data.tokenizer.is_byte_level


def test_prepare_too_small_for_block_size(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("x" * 2000, encoding="utf-8")
    cfg = DataConfig(corpus="files", path=str(tmp_path / "t.txt"), cache_dir=str(tmp_path / "c"))
    with pytest.raises(
        DataError, match=r"validation split holds 200 tokens but block_size=256 needs at least 257"
    ):
        prepare_data(cfg, block_size=256)


# ------------------------------------------------------------------------------------------------ shards


@settings(max_examples=60, deadline=None)
@given(
    n_tokens=st.integers(1, 200_000),
    shard_tokens=st.integers(256, 20_000),
    min_tokens=st.integers(1, 256),
)
def test_shards_contiguous_disjoint_covering(n_tokens: int, shard_tokens: int, min_tokens: int) -> None:
    if n_tokens < min_tokens:
        with pytest.raises(DataError, match="one window needs"):
            make_shards(n_tokens, shard_tokens, min_tokens)
        return
    shards = make_shards(n_tokens, shard_tokens, min_tokens)
    assert [s.shard_id for s in shards] == list(range(len(shards)))
    assert shards[0].start == 0 and shards[-1].end == n_tokens
    for a, b in itertools.pairwise(shards):
        assert a.end == b.start
    for s in shards[:-1]:
        assert s.n_tokens == shard_tokens
    assert shards[-1].n_tokens >= min_tokens
    assert shards[-1].n_tokens < shard_tokens + min_tokens
    assert make_shards(n_tokens, shard_tokens, min_tokens) == shards


def test_shards_merge_short_tail() -> None:
    assert make_shards(1000, 300, 101) == [Shard(0, 0, 300), Shard(1, 300, 600), Shard(2, 600, 1000)]
    assert make_shards(1000, 300, 100) == [
        Shard(0, 0, 300),
        Shard(1, 300, 600),
        Shard(2, 600, 900),
        Shard(3, 900, 1000),
    ]
    assert make_shards(50, 300, 10) == [Shard(0, 0, 50)]
    with pytest.raises(ConfigError, match=r"data.shard_tokens=300 is smaller"):
        make_shards(1000, 300, 301)


# ------------------------------------------------------------------------------------------------ batches


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    return np.arange(10_000, dtype=np.uint16)


def test_get_batch_shape_and_targets(tokens: np.ndarray) -> None:
    batch = get_batch(tokens, 8, 16, seed=1, step=0)
    assert batch.dtype == torch.int64 and batch.shape == (8, 17)
    # Consecutive tokens (tokens[i] == i): every window is a contiguous slice of the array.
    assert torch.equal(batch[:, 1:] - batch[:, :-1], torch.ones(8, 16, dtype=torch.int64))


def test_get_batch_depends_only_on_seed_and_step(tokens: np.ndarray) -> None:
    a = get_batch(tokens, 4, 32, seed=7, step=5)
    get_batch(tokens, 4, 32, seed=7, step=6)  # other calls in between change nothing
    b = get_batch(tokens, 4, 32, seed=7, step=5)
    assert torch.equal(a, b)
    assert not torch.equal(a, get_batch(tokens, 4, 32, seed=7, step=6))
    assert not torch.equal(a, get_batch(tokens, 4, 32, seed=8, step=5))
    assert torch.equal(get_batch(tokens, 4, 32, seed=-3, step=1), get_batch(tokens, 4, 32, seed=-3, step=1))


@settings(max_examples=40, deadline=None)
@given(
    start=st.integers(0, 5000),
    length=st.integers(9, 5000),
    step=st.integers(0, 10**9),
    seed=st.integers(-(2**40), 2**40),
)
def test_get_batch_stays_inside_range(
    tokens: np.ndarray, start: int, length: int, step: int, seed: int
) -> None:
    end = start + length
    batch = get_batch(tokens, 6, 8, seed=seed, step=step, start=start, end=end)
    assert int(batch.min()) >= start and int(batch.max()) < end


def test_get_batch_reaches_last_token(tokens: np.ndarray) -> None:
    # Range of exactly block_size + 1 tokens: the single valid window must be returned.
    batch = get_batch(tokens, 3, 8, seed=0, step=0, start=100, end=109)
    assert torch.equal(batch, torch.arange(100, 109).repeat(3, 1))


def test_get_batch_errors(tokens: np.ndarray) -> None:
    with pytest.raises(
        DataError, match=r"holds 8 tokens but block_size=8 needs at least 9.*smaller model.block_size"
    ):
        get_batch(tokens, 2, 8, seed=0, step=0, start=0, end=8)
    with pytest.raises(ConfigError, match="batch_size=0"):
        get_batch(tokens, 0, 8, seed=0, step=0)
    with pytest.raises(ValueError, match="not inside the array"):
        get_batch(tokens, 2, 8, seed=0, step=0, start=0, end=20_000)
    with pytest.raises(ValueError, match="step=-1"):
        get_batch(tokens, 2, 8, seed=0, step=-1)


def test_eval_batches_repeat_exactly(tokens: np.ndarray) -> None:
    first = list(iter_eval_batches(tokens, 4, 16, n_batches=3, seed=11))
    second = list(iter_eval_batches(tokens, 4, 16, n_batches=3, seed=11))
    assert len(first) == 3
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(first[0], get_batch(tokens, 4, 16, seed=11, step=0))
    with pytest.raises(DataError):
        iter_eval_batches(tokens[:10], 4, 16, n_batches=3, seed=11)  # fails at the call, not at next()


def test_get_batch_on_memmap(tmp_path: Path) -> None:
    data = prepare_data(_shakespeare_cfg(tmp_path), block_size=32)
    shard = data.shards[1]
    batch = get_batch(data.train, 4, 32, seed=3, step=9, start=shard.start, end=shard.end)
    text = data.tokenizer.decode(batch[0])
    assert text in SHAKESPEARE.read_text(encoding="utf-8")
    assert os.path.getsize(data.cache_path / "train.npy") > len(data.train) * 2  # type: ignore[operator]
    assert dataset_mod.token_dtype(data.vocab_size) == data.train.dtype
