"""Tokenizers: exact round-trips, serialisation, the BPE cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_llm_train.config.schema import DataConfig
from dist_llm_train.data.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    Tokenizer,
    bpe_cache_path,
    build_tokenizer,
    load_tokenizer,
    tokenizer_from_json,
)
from dist_llm_train.errors import DataError

SHAKESPEARE = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare" / "input.txt"


@pytest.fixture(scope="module")
def shakespeare() -> str:
    return SHAKESPEARE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def bpe(shakespeare: str) -> BPETokenizer:
    return BPETokenizer.train(shakespeare[:200_000], 512)


@settings(max_examples=60, deadline=None)
@given(st.text())
def test_byte_round_trip_any_string(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == np.int64
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_byte_decode_invalid_utf8_is_replaced_not_raised() -> None:
    assert ByteTokenizer().decode([0xFF, 0x41]) == "\ufffdA"


def test_decode_rejects_ids_outside_vocabulary() -> None:
    with pytest.raises(DataError, match="outside the tokenizer's vocabulary of 256"):
        ByteTokenizer().decode([300])


def test_char_round_trip_and_unknown(shakespeare: str) -> None:
    tok = CharTokenizer.train(shakespeare)
    assert tok.vocab_size == 65 + 1  # nanoGPT's 65 characters plus <unk>
    ids = tok.encode(shakespeare)
    assert len(ids) == len(shakespeare)
    assert tok.decode(ids) == shakespeare
    # nanoGPT's stoi: sorted characters, so "\n" is 0 and " " is 1.
    assert tok.encode("\n ").tolist() == [0, 1]
    unk = tok.encode("a€b")
    assert unk[1] == tok.unk_id == tok.vocab_size - 1
    assert tok.decode(unk) == "a\ufffdb"


@settings(max_examples=30, deadline=None)
@given(st.text(min_size=1))
def test_char_round_trip_on_its_training_text(text: str) -> None:
    tok = CharTokenizer.train(text)
    assert tok.decode(tok.encode(text)) == text


def test_bpe_round_trip_and_compression(bpe: BPETokenizer, shakespeare: str) -> None:
    assert bpe.vocab_size == 512
    sample = shakespeare[500_000:560_000]  # text the tokenizer was not trained on
    ids = bpe.encode(sample)
    assert bpe.decode(ids) == sample
    # BPE must actually merge: clearly fewer tokens than bytes.
    assert len(ids) < 0.7 * len(sample.encode("utf-8"))
    odd = "  leading spaces\ttabs\r\nCRLF ünïcødé 🙂 \x00 end  "
    assert bpe.decode(bpe.encode(odd)) == odd


@settings(max_examples=25, deadline=None)
@given(st.text())
def test_bpe_round_trip_any_string(bpe: BPETokenizer, text: str) -> None:
    assert bpe.decode(bpe.encode(text)) == text


@pytest.mark.parametrize("kind", ["byte", "char", "bpe"])
def test_json_and_file_round_trip(kind: str, bpe: BPETokenizer, tmp_path: Path) -> None:
    tok: Tokenizer = {"byte": ByteTokenizer(), "char": CharTokenizer.train("hello wörld"), "bpe": bpe}[kind]
    again = tokenizer_from_json(tok.to_json())
    assert type(again) is type(tok)
    assert again.vocab_size == tok.vocab_size
    assert again.fingerprint() == tok.fingerprint()
    tok.save(tmp_path / "tok.json")
    loaded = Tokenizer.load(tmp_path / "tok.json")
    text = "hello wörld"
    assert loaded.encode(text).tolist() == tok.encode(text).tolist()


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match="not JSON"):
        load_tokenizer(tmp_path / "bad.json")
    with pytest.raises(DataError, match="unknown tokenizer kind"):
        tokenizer_from_json({"kind": "wordpiece"})


def test_bpe_training_is_deterministic(shakespeare: str) -> None:
    text = shakespeare[:100_000]
    a = BPETokenizer.train(text, 400)
    b = BPETokenizer.train(text, 400)
    assert a.fingerprint() == b.fingerprint()


def test_build_tokenizer_caches_bpe(shakespeare: str, tmp_path: Path) -> None:
    cfg = DataConfig(tokenizer="bpe", vocab_size=300, cache_dir=str(tmp_path))
    text = shakespeare[:50_000]
    first = build_tokenizer(cfg, text)
    path = bpe_cache_path(tmp_path, text, 300)
    assert path.is_file()
    mtime = path.stat().st_mtime_ns
    second = build_tokenizer(cfg, text)
    assert path.stat().st_mtime_ns == mtime  # loaded, not retrained and rewritten
    assert second.fingerprint() == first.fingerprint()
    # A different vocabulary size is a different cache entry.
    assert bpe_cache_path(tmp_path, text, 301) != path
    # A damaged cache entry is rebuilt instead of failing.
    path.write_text("garbage", encoding="utf-8")
    assert build_tokenizer(cfg, text).fingerprint() == first.fingerprint()


def test_build_tokenizer_kinds() -> None:
    assert isinstance(build_tokenizer(DataConfig(tokenizer="byte"), "abc"), ByteTokenizer)
    char = build_tokenizer(DataConfig(tokenizer="char"), "cab")
    assert isinstance(char, CharTokenizer)
    assert char.chars == "abc"
    assert ByteTokenizer.is_byte_level and not char.is_byte_level
