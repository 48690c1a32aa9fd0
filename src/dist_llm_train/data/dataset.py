"""Token arrays, shards and batches: what a trainer or worker actually reads.

:func:`prepare_data` turns a :class:`DataConfig` into two memory-mapped token arrays (train, validation),
the tokenizer, byte counts for bits-per-byte, a fingerprint and the list of shards. Everything is a pure
function of the configuration and the corpus text, so every machine that prepares the same settings
gets the same arrays, the same fingerprint and the same shard ids, and a controller can hand out a shard
by id alone.

Batches are pure functions too: :func:`get_batch` draws windows with a generator seeded from
``(seed, step)`` only, so the batch of step ``s`` is the same before and after a resume and on any worker.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dist_llm_train.config.schema import DataConfig
from dist_llm_train.data.corpora import Corpus, load_corpus
from dist_llm_train.data.tokenizers import Tokenizer, build_tokenizer, write_atomic
from dist_llm_train.errors import ConfigError, DataError, PreconditionError

# Bump when the layout or meaning of cached token arrays changes, so old caches are not reused.
_CACHE_FORMAT = 1
# Separates the evaluation stream from training steps that happen to use the same seed.
_EVAL_STREAM = 0x45564131


@dataclass(frozen=True)
class Shard:
    """A contiguous token range ``[start, end)`` of the training array: one schedulable unit of data."""

    shard_id: int
    start: int
    end: int

    @property
    def n_tokens(self) -> int:
        return self.end - self.start


@dataclass
class PreparedData:
    """Everything a trainer needs from the data side of a run.

    ``train``/``val`` are read-only memory-mapped token arrays (uint16 when the vocabulary fits, else
    uint32). ``train_bytes``/``val_bytes`` are the UTF-8 sizes of the text behind them, for bits per
    byte = ``loss_nats * n_tokens / (n_bytes * ln 2)``. ``fingerprint`` identifies corpus, tokenizer and
    split: two machines with equal fingerprints hold identical arrays.
    """

    train: np.ndarray
    val: np.ndarray
    tokenizer: Tokenizer
    train_bytes: int
    val_bytes: int
    fingerprint: str
    shards: list[Shard]
    corpus: str = ""
    source: str = ""
    cache_path: Path | None = None
    from_cache: bool = field(default=False)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


def token_dtype(vocab_size: int) -> np.dtype[Any]:
    """Storage dtype for ids below ``vocab_size``: uint16 up to 65535 ids, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """Split ``text`` into (train, validation) with the last ``val_fraction`` of characters as validation.

    The cut is at a character (not token) boundary so both sides are tokenised independently and no token
    straddles the split.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={val_fraction} must be in (0, 1)")
    cut = int(len(text) * (1.0 - val_fraction))
    return text[:cut], text[cut:]


def make_shards(n_tokens: int, shard_tokens: int, min_tokens: int) -> list[Shard]:
    """Cut ``[0, n_tokens)`` into contiguous shards of ``shard_tokens`` tokens, ids 0, 1, 2, ...

    The remainder becomes a last, shorter shard when it has at least ``min_tokens`` tokens (normally
    ``block_size + 1``, the least one training window needs); otherwise it is merged into the previous
    shard. Shards are disjoint and cover the array exactly. More, smaller shards (lower
    ``data.shard_tokens``) spread work over more workers but cost more scheduling round trips.
    """
    if min_tokens < 1:
        raise PreconditionError(f"make_shards: min_tokens={min_tokens} must be at least 1")
    if shard_tokens < min_tokens:
        raise ConfigError(
            f"data.shard_tokens={shard_tokens} is smaller than the {min_tokens} tokens one window needs "
            f"(block_size + 1); raise data.shard_tokens to at least {min_tokens} or lower model.block_size"
        )
    if n_tokens < min_tokens:
        raise DataError(
            f"the training split has {n_tokens} tokens but one window needs {min_tokens} (block_size + 1); "
            "use a larger corpus (data.max_bytes, data.path) or a smaller model.block_size"
        )
    full, rest = divmod(n_tokens, shard_tokens)
    bounds = [(i * shard_tokens, (i + 1) * shard_tokens) for i in range(full)]
    if rest:
        if rest >= min_tokens or not bounds:
            bounds.append((full * shard_tokens, n_tokens))
        else:
            bounds[-1] = (bounds[-1][0], n_tokens)
    return [Shard(i, s, e) for i, (s, e) in enumerate(bounds)]


# --------------------------------------------------------------------------------------------- prepare


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _fingerprint(cfg: DataConfig, corpus: Corpus, train_text: str, val_text: str, tok: Tokenizer) -> str:
    spec = {
        "format": _CACHE_FORMAT,
        "corpus": corpus.name,
        "train_sha256": _sha256_text(train_text),
        "val_sha256": _sha256_text(val_text),
        "train_split": cfg.train_split if corpus.name == "wikitext2" else None,
        "val_split": cfg.val_split,
        "val_fraction": None if corpus.val_text is not None else cfg.val_fraction,
        "tokenizer": tok.fingerprint(),
    }
    blob = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("ascii")).hexdigest()[:32]


def _save_npy_atomic(path: Path, arr: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, arr, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_cached(directory: Path, fingerprint: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]] | None:
    """The cached arrays for ``fingerprint``, or None when absent or inconsistent (then rebuilt)."""
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("fingerprint") != fingerprint:
            return None
        train = np.load(directory / "train.npy", mmap_mode="r", allow_pickle=False)
        val = np.load(directory / "val.npy", mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None
    if train.shape != (meta["n_train"],) or val.shape != (meta["n_val"],) or train.dtype != meta["dtype"]:
        return None
    return train, val, meta


def _tokenize(tok: Tokenizer, text: str, dtype: np.dtype[Any]) -> np.ndarray:
    ids = tok.encode(text)
    if ids.size and int(ids.max()) >= tok.vocab_size:
        raise DataError(f"tokenizer produced id {int(ids.max())} outside its vocabulary of {tok.vocab_size}")
    return ids.astype(dtype)


def prepare_data(cfg: DataConfig, *, block_size: int | None = None) -> PreparedData:
    """Load the corpus, build the tokenizer, tokenise both splits (or reuse the cache) and cut shards.

    Validation text: the ``data.val_split`` split for wikitext2, else the last ``data.val_fraction`` of
    the text. Token arrays are cached as ``.npy`` under ``<data.cache_dir>/tokens/<fingerprint>/``
    (written atomically, opened memory-mapped), so a second start with the same settings skips
    tokenisation; delete that directory to force a rebuild.

    ``block_size``: the model's context length. With it, a last shard shorter than ``block_size + 1``
    tokens is merged into the previous one and a too-small corpus fails here with a clear message. Without
    it, a remainder shorter than half a shard is merged.
    """
    corpus = load_corpus(cfg)
    if corpus.val_text is not None:
        train_text, val_text = corpus.train_text, corpus.val_text
    else:
        train_text, val_text = split_text(corpus.train_text, cfg.val_fraction)
    if not train_text or not val_text:
        raise DataError(
            f"corpus {corpus.name!r} ({len(corpus.train_text)} characters) is too small to split into "
            f"training and validation text with data.val_fraction={cfg.val_fraction}; use more text"
        )
    tok = build_tokenizer(cfg, train_text)
    fingerprint = _fingerprint(cfg, corpus, train_text, val_text, tok)
    directory = Path(cfg.cache_dir).expanduser() / "tokens" / fingerprint
    train_bytes = len(train_text.encode("utf-8"))
    val_bytes = len(val_text.encode("utf-8"))

    cached = _load_cached(directory, fingerprint)
    from_cache = cached is not None
    if cached is not None:
        train, val, _ = cached
    else:
        dtype = token_dtype(tok.vocab_size)
        train_ids = _tokenize(tok, train_text, dtype)
        val_ids = _tokenize(tok, val_text, dtype)
        directory.mkdir(parents=True, exist_ok=True)
        _save_npy_atomic(directory / "train.npy", train_ids)
        _save_npy_atomic(directory / "val.npy", val_ids)
        tok.save(directory / "tokenizer.json")
        meta = {
            "fingerprint": fingerprint,
            "corpus": corpus.name,
            "source": corpus.source,
            "tokenizer": tok.kind,
            "vocab_size": tok.vocab_size,
            "dtype": dtype.name,
            "n_train": int(train_ids.size),
            "n_val": int(val_ids.size),
            "train_bytes": train_bytes,
            "val_bytes": val_bytes,
        }
        # meta.json last: its presence marks a complete cache entry.
        write_atomic(directory / "meta.json", json.dumps(meta, indent=1).encode("utf-8"))
        train = np.load(directory / "train.npy", mmap_mode="r", allow_pickle=False)
        val = np.load(directory / "val.npy", mmap_mode="r", allow_pickle=False)

    n_train = int(train.shape[0])
    if block_size is not None:
        _check_range(n_train, block_size, "training split")
        _check_range(int(val.shape[0]), block_size, "validation split")
        min_tokens = block_size + 1
    else:
        min_tokens = max(1, min(cfg.shard_tokens // 2, n_train))
    shards = make_shards(n_train, cfg.shard_tokens, min_tokens)
    return PreparedData(
        train=train,
        val=val,
        tokenizer=tok,
        train_bytes=train_bytes,
        val_bytes=val_bytes,
        fingerprint=fingerprint,
        shards=shards,
        corpus=corpus.name,
        source=corpus.source,
        cache_path=directory,
        from_cache=from_cache,
    )


# --------------------------------------------------------------------------------------------- batches


def _check_range(n_available: int, block_size: int, what: str) -> None:
    if n_available < block_size + 1:
        raise DataError(
            f"the {what} holds {n_available} tokens but block_size={block_size} needs at least "
            f"{block_size + 1}; use a smaller model.block_size or a larger corpus (data.max_bytes, data.path)"
        )


def _resolve_range(tokens: np.ndarray, batch_size: int, block_size: int, start: int, end: int | None) -> int:
    if tokens.ndim != 1:
        raise PreconditionError(f"tokens must be a 1-D array, got shape {tuple(tokens.shape)}")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be at least 1")
    if block_size < 1:
        raise ConfigError(f"block_size={block_size} must be at least 1")
    n = int(tokens.shape[0])
    stop = n if end is None else end
    if not 0 <= start <= stop <= n:
        raise PreconditionError(f"token range [{start}, {stop}) is not inside the array of {n} tokens")
    _check_range(stop - start, block_size, f"token range [{start}, {stop})")
    return stop


def _windows(
    tokens: np.ndarray, batch_size: int, block_size: int, rng: np.random.Generator, start: int, stop: int
) -> torch.Tensor:
    # The last valid offset is stop - block_size - 1: a window holds block_size + 1 tokens (inputs and
    # the targets shifted by one).
    offsets = rng.integers(start, stop - block_size, size=batch_size, dtype=np.int64)
    index = offsets[:, None] + np.arange(block_size + 1, dtype=np.int64)
    return torch.from_numpy(np.asarray(tokens[index]).astype(np.int64))


def _seed_words(seed: int) -> int:
    # SeedSequence rejects negative entropy; modulo 2**64 keeps negative seeds usable and distinct.
    return seed % (1 << 64)


def get_batch(
    tokens: np.ndarray,
    batch_size: int,
    block_size: int,
    seed: int,
    step: int,
    start: int = 0,
    end: int | None = None,
) -> torch.Tensor:
    """``batch_size`` random windows of ``block_size + 1`` tokens from ``tokens[start:end]``.

    Returns an int64 tensor of shape ``[batch_size, block_size + 1]``: inputs are ``[:, :-1]``, targets
    ``[:, 1:]``. The windows depend only on ``(seed, step)`` and the range, never on earlier calls, so a
    resumed run or another worker reproduces the batch of any step exactly. Raises :class:`DataError`
    when the range holds fewer than ``block_size + 1`` tokens.
    """
    if step < 0:
        raise PreconditionError(f"get_batch: step={step} must be non-negative")
    stop = _resolve_range(tokens, batch_size, block_size, start, end)
    rng = np.random.default_rng([_seed_words(seed), step])
    return _windows(tokens, batch_size, block_size, rng, start, stop)


def iter_eval_batches(
    tokens: np.ndarray,
    batch_size: int,
    block_size: int,
    n_batches: int,
    seed: int,
    start: int = 0,
    end: int | None = None,
) -> Iterator[torch.Tensor]:
    """``n_batches`` batches like :func:`get_batch`, identical at every evaluation for the same seed.

    The generator stream is separate from training steps, so evaluating with the training seed does not
    repeat training batches' offsets. More ``n_batches`` lowers the noise of the validation loss.
    """
    if n_batches < 1:
        raise ConfigError(f"n_batches={n_batches} must be at least 1 (training.eval_batches)")
    # Validate now, not at the first next(): a bad range should fail where the call is made.
    stop = _resolve_range(tokens, batch_size, block_size, start, end)

    def batches() -> Iterator[torch.Tensor]:
        for i in range(n_batches):
            rng = np.random.default_rng([_seed_words(seed), _EVAL_STREAM, i])
            yield _windows(tokens, batch_size, block_size, rng, start, stop)

    return batches()
