"""Tokenizers: text ⇄ integer ids, serialisable so a run directory or checkpoint describes itself.

Three kinds, chosen by ``data.tokenizer``:

- ``byte``: the UTF-8 bytes, vocabulary 256. Needs no training, round-trips any valid string exactly and
  makes loss per token equal loss per byte. Sequences are long (one token per byte), so a model sees
  less text per ``block_size``.
- ``char``: one id per distinct character of the training text (sorted by code point, nanoGPT's
  ``stoi``), plus one ``<unk>`` id (the last one) for characters first seen later, e.g. in a
  validation split; ``<unk>`` decodes to U+FFFD. Round-trips the training text exactly. Small vocabulary
  on small corpora (65 characters for tinyshakespeare); grows with the corpus' alphabet.
- ``bpe``: byte-level BPE trained locally with Hugging Face ``tokenizers`` to ``data.vocab_size`` ids
  (fewer when the text has too few repeated pairs). No normalisation, no special tokens, so decoding is
  exact. Shorter sequences than ``byte``/``char``; training costs a second or two per few MB of text and is
  cached under ``<data.cache_dir>/tokenizers`` keyed by the text, the vocabulary size and the library
  version (a new ``tokenizers`` release retrains rather than silently reusing a different tokenizer).

Every tokenizer serialises to a JSON dict with :meth:`Tokenizer.to_json` and back with
:func:`tokenizer_from_json`; :meth:`Tokenizer.save` / :meth:`Tokenizer.load` do the same through a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from dist_llm_train.config.schema import DataConfig
from dist_llm_train.errors import ConfigError, DataError

IdArray = npt.NDArray[np.int64]

_FORMAT_VERSION = 1


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``: readers see all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _ids_array(ids: Any, vocab_size: int) -> IdArray:
    """``ids`` (list, numpy array or torch tensor) as int64, checked against the vocabulary."""
    if hasattr(ids, "detach"):  # a torch tensor, possibly on an accelerator
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"token ids must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= vocab_size):
        bad = int(arr.min()) if int(arr.min()) < 0 else int(arr.max())
        raise DataError(
            f"token id {bad} is outside the tokenizer's vocabulary of {vocab_size}; the ids come from a "
            "model or file built with a different tokenizer"
        )
    return arr


class Tokenizer(ABC):
    """Base of all tokenizers.

    ``vocab_size`` is the number of ids (a model's embedding needs exactly this many rows);
    ``is_byte_level`` is True when every token is exactly one UTF-8 byte, so loss per token already is
    loss per byte.
    """

    kind: ClassVar[str]
    is_byte_level: ClassVar[bool] = False

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of distinct ids; every id is in ``[0, vocab_size)``."""

    @abstractmethod
    def encode(self, text: str) -> IdArray:
        """Ids of ``text`` as a 1-D int64 array."""

    @abstractmethod
    def decode(self, ids: Any) -> str:
        """Text of ``ids`` (list, array or tensor); invalid byte sequences become U+FFFD."""

    @abstractmethod
    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict from which :func:`tokenizer_from_json` rebuilds this tokenizer."""

    def fingerprint(self) -> str:
        """SHA-256 of the canonical JSON form: equal fingerprints mean identical encodings."""
        blob = json.dumps(self.to_json(), sort_keys=True, ensure_ascii=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode("ascii")).hexdigest()

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_json` to ``path`` (atomically)."""
        write_atomic(Path(path), json.dumps(self.to_json(), ensure_ascii=False).encode("utf-8"))

    @staticmethod
    def load(path: str | os.PathLike[str]) -> Tokenizer:
        """Read a tokenizer written by :meth:`save`; raises :class:`DataError` if missing or malformed."""
        return load_tokenizer(path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids (vocabulary 256)."""

    kind = "byte"
    is_byte_level = True

    @property
    def vocab_size(self) -> int:
        return 256

    def encode(self, text: str) -> IdArray:
        # A lone surrogate cannot be UTF-8 encoded; "replace" turns it into "?" instead of failing a run.
        return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Any) -> str:
        return _ids_array(ids, 256).astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def to_json(self) -> dict[str, Any]:
        return {"kind": "byte", "format": _FORMAT_VERSION}


class CharTokenizer(Tokenizer):
    """One id per character of the training text, in code-point order, plus ``<unk>`` as the last id."""

    kind = "char"
    unk_token: ClassVar[str] = "<unk>"

    def __init__(self, chars: str) -> None:
        """``chars``: the vocabulary; duplicates are removed and the order becomes code-point order."""
        ordered = sorted(set(chars))
        if not ordered:
            raise DataError("a char tokenizer needs a non-empty training text")
        self.chars = "".join(ordered)
        self._codes = np.array([ord(c) for c in ordered], dtype=np.uint32)
        # Decoding table: one code point per id, U+FFFD for <unk>.
        self._decode_codes = np.append(self._codes, np.uint32(0xFFFD))

    @classmethod
    def train(cls, text: str) -> CharTokenizer:
        """The tokenizer whose vocabulary is the set of characters in ``text``."""
        return cls(text)

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 1

    @property
    def unk_id(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> IdArray:
        codes = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype="<u4")
        pos = np.minimum(np.searchsorted(self._codes, codes), len(self._codes) - 1)
        return np.where(self._codes[pos] == codes, pos, self.unk_id).astype(np.int64)

    def decode(self, ids: Any) -> str:
        arr = _ids_array(ids, self.vocab_size)
        return self._decode_codes[arr].astype("<u4").tobytes().decode("utf-32-le", errors="replace")

    def to_json(self) -> dict[str, Any]:
        return {"kind": "char", "format": _FORMAT_VERSION, "chars": self.chars}


class BPETokenizer(Tokenizer):
    """Byte-level BPE (Hugging Face ``tokenizers``), without normalisation or special tokens."""

    kind = "bpe"

    def __init__(self, hf_tokenizer: Any) -> None:
        """``hf_tokenizer``: a trained ``tokenizers.Tokenizer`` with a ByteLevel pre-tokenizer and decoder."""
        self._tok = hf_tokenizer

    @classmethod
    def train(cls, text: str, vocab_size: int) -> BPETokenizer:
        """Train on ``text`` up to ``vocab_size`` ids (256 byte ids + merges seen at least twice)."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if vocab_size < 257:
            raise ConfigError(f"data.vocab_size={vocab_size} is too small for BPE; it needs 257 or more")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
            show_progress=False,
        )
        lines = text.splitlines(keepends=True)
        tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> IdArray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode(self, ids: Any) -> str:
        return str(self._tok.decode(_ids_array(ids, self.vocab_size).tolist(), skip_special_tokens=False))

    def to_json(self) -> dict[str, Any]:
        import tokenizers

        return {
            "kind": "bpe",
            "format": _FORMAT_VERSION,
            "library_version": tokenizers.__version__,
            "hf": json.loads(self._tok.to_str()),
        }


def tokenizer_from_json(d: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from :meth:`Tokenizer.to_json`; raises :class:`DataError` for an unknown form."""
    kind = d.get("kind") if isinstance(d, dict) else None
    try:
        if kind == "byte":
            return ByteTokenizer()
        if kind == "char":
            return CharTokenizer(str(d["chars"]))
        if kind == "bpe":
            from tokenizers import Tokenizer as HFTokenizer

            return BPETokenizer(HFTokenizer.from_str(json.dumps(d["hf"])))
    except DataError:
        raise
    except Exception as exc:  # HF raises a bare Exception for a malformed tokenizer JSON
        raise DataError(f"the saved {kind} tokenizer is malformed ({exc}); delete it to rebuild it") from exc
    raise DataError(f"unknown tokenizer kind {kind!r} in saved tokenizer; expected byte, char or bpe")


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Read a tokenizer file written by :meth:`Tokenizer.save`."""
    p = Path(path)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DataError(f"tokenizer file {str(p)!r} does not exist") from exc
    except (OSError, ValueError) as exc:
        raise DataError(
            f"tokenizer file {str(p)!r} is unreadable or not JSON ({exc}); delete it to rebuild"
        ) from exc
    return tokenizer_from_json(d)


def bpe_cache_path(cache_dir: Path, train_text: str, vocab_size: int) -> Path:
    """Where the BPE tokenizer for this text and size is cached (the key includes the library version)."""
    import tokenizers

    digest = hashlib.sha256()
    digest.update(train_text.encode("utf-8", errors="replace"))
    digest.update(f"|vocab={vocab_size}|tokenizers={tokenizers.__version__}|fmt={_FORMAT_VERSION}".encode())
    return cache_dir / "tokenizers" / f"bpe-{digest.hexdigest()[:24]}.json"


def build_tokenizer(cfg: DataConfig, train_text: str) -> Tokenizer:
    """The tokenizer ``cfg.tokenizer`` for ``train_text`` (trained or loaded from the cache for ``bpe``)."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    if cfg.tokenizer == "char":
        return CharTokenizer.train(train_text)
    if cfg.tokenizer == "bpe":
        path = bpe_cache_path(Path(cfg.cache_dir).expanduser(), train_text, cfg.vocab_size)
        if path.is_file():
            try:
                cached = load_tokenizer(path)
            except DataError:
                cached = None  # a damaged cache entry is rebuilt, not fatal
            if isinstance(cached, BPETokenizer):
                return cached
        tok = BPETokenizer.train(train_text, cfg.vocab_size)
        tok.save(path)
        return tok
    raise ConfigError(f"unknown data.tokenizer {cfg.tokenizer!r}; use byte, char or bpe")
