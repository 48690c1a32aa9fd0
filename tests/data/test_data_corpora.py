"""Corpora: the embedded stdlib corpus, files, tinyshakespeare, wikitext2 and the download code."""

from __future__ import annotations

import hashlib
import http.server
import sysconfig
import threading
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest

from dist_llm_train.config.schema import DataConfig
from dist_llm_train.data.corpora import (
    STDLIB_SEPARATOR,
    download_file,
    load_corpus,
    load_python_stdlib,
    resolve_tinyshakespeare,
    stdlib_files,
)
from dist_llm_train.errors import ConfigError, DataError

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
SHAKESPEARE = SHARED / "tinyshakespeare" / "input.txt"
WIKITEXT = SHARED / "wikitext-2"
STDLIB = Path(sysconfig.get_paths()["stdlib"])


# ------------------------------------------------------------------------------------------ python-stdlib


def test_stdlib_files_exclude_tests_and_third_party() -> None:
    files = stdlib_files(STDLIB)
    assert files == sorted(files, key=str)
    names = {str(p) for p in files}
    assert {"os.py", "json/__init__.py", "asyncio/base_events.py"} <= names
    for rel in files:
        parts = rel.parts
        assert rel.suffix == ".py"
        assert not any(p.startswith("test") for p in parts[:-1]), rel
        assert "site-packages" not in parts and "__pycache__" not in parts and "idle_test" not in parts
        assert not rel.name.startswith(("test_", "_sysconfigdata"))
    assert PurePosixPath("unittest/case.py") in files  # unittest itself is library code, its tests are not


def test_stdlib_corpus_is_deterministic_and_capped() -> None:
    cap = 300_000
    first = load_python_stdlib(STDLIB, cap)
    second = load_python_stdlib(STDLIB, cap)
    assert first == second
    size = len(first.encode("utf-8"))
    assert 0.8 * cap < size <= cap
    # Whole files only, in sorted order: the text ends where a file ends, every file has its separator.
    assert first.startswith(STDLIB_SEPARATOR.format(path=stdlib_files(STDLIB)[0]))
    assert first.endswith("\n")
    headers = [line for line in first.splitlines() if line.startswith("# ---- file: ")]
    assert len(headers) > 5
    assert not any("/test" in h or h.startswith("# ---- file: test") for h in headers)
    paths = [h.removeprefix("# ---- file: ") for h in headers]
    assert paths == sorted(paths)
    for rel in paths[:20]:
        body = (STDLIB / rel).read_text(encoding="utf-8", errors="replace")
        assert STDLIB_SEPARATOR.format(path=rel) + body in first


def test_stdlib_tiny_cap_still_yields_text() -> None:
    text = load_python_stdlib(STDLIB, 1024)
    assert 0 < len(text.encode("utf-8")) <= 1024
    assert text.startswith("# ---- file: ")


def test_stdlib_via_config() -> None:
    corpus = load_corpus(DataConfig(max_bytes=50_000))
    assert corpus.name == "python-stdlib"
    assert corpus.val_text is None
    assert len(corpus.train_text.encode("utf-8")) <= 50_000


def test_stdlib_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="standard library was not found"):
        stdlib_files(tmp_path / "nope")


# ------------------------------------------------------------------------------------------------- files


def test_files_directory_with_glob(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first\n", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("third", encoding="utf-8")
    (tmp_path / "skip.md").write_text("not matched", encoding="utf-8")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9\n")  # latin-1, not UTF-8
    corpus = load_corpus(DataConfig(corpus="files", path=str(tmp_path)))
    assert corpus.train_text == "first\nsecond\ncaf\ufffd\nthird\n"  # sorted: a, b, bad, sub/c
    only_sub = load_corpus(DataConfig(corpus="files", path=str(tmp_path), glob="sub/*.txt"))
    assert only_sub.train_text == "third\n"


def test_files_single_file_and_cap(tmp_path: Path) -> None:
    f = tmp_path / "one.txt"
    f.write_text("é" * 2000, encoding="utf-8")  # 4000 bytes, 2 bytes per character
    corpus = load_corpus(DataConfig(corpus="files", path=str(f), max_bytes=1025))
    assert corpus.train_text == "é" * 512  # the split character at byte 1025 is dropped whole


def test_files_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(DataError, match="missing"):
        load_corpus(DataConfig(corpus="files", path=str(missing)))
    with pytest.raises(DataError, match=r"match data.glob"):
        load_corpus(DataConfig(corpus="files", path=str(tmp_path)))
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="hold no text"):
        load_corpus(DataConfig(corpus="files", path=str(tmp_path)))
    with pytest.raises(DataError, match="is empty"):
        load_corpus(DataConfig(corpus="files", path=str(tmp_path / "empty.txt")))
    with pytest.raises(ConfigError, match=r"needs data.path"):
        load_corpus(DataConfig(corpus="files"))
    with pytest.raises(ConfigError, match="only applies to corpus wikitext2"):
        load_corpus(DataConfig(corpus="files", path=str(tmp_path), val_split="test"))


# --------------------------------------------------------------------------------------- tinyshakespeare


def test_tinyshakespeare_from_shared_copy(tmp_path: Path) -> None:
    for path in (SHAKESPEARE, SHAKESPEARE.parent):
        corpus = load_corpus(
            DataConfig(corpus="tinyshakespeare", path=str(path), max_bytes=None, cache_dir=str(tmp_path))
        )
        assert len(corpus.train_text) == 1_115_394
        assert corpus.train_text.startswith("First Citizen:")
    capped = load_corpus(DataConfig(corpus="tinyshakespeare", path=str(SHAKESPEARE), max_bytes=100_000))
    assert len(capped.train_text) == 100_000  # ASCII: characters == bytes


def test_tinyshakespeare_missing_copy(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="tinyshakespeare not found"):
        resolve_tinyshakespeare(str(tmp_path), tmp_path)


def test_tinyshakespeare_download_via_file_url(tmp_path: Path) -> None:
    path = resolve_tinyshakespeare(None, tmp_path, url=SHAKESPEARE.as_uri())
    assert path == tmp_path / "downloads" / "tinyshakespeare" / "input.txt"
    assert (
        hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()
        == "6fb458f1232090904fb40fe944165e91"
    )
    # Second call: the cached file is used even though the URL is now unreachable.
    again = resolve_tinyshakespeare(None, tmp_path, url=(tmp_path / "gone.txt").as_uri())
    assert again == path


# --------------------------------------------------------------------------------------------- downloads


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "served"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a, **k: _Handler(*a, directory=str(root), **k)
    )
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_download_over_local_http(http_root: tuple[str, Path], tmp_path: Path) -> None:
    base, root = http_root
    payload = b"hello corpus\n" * 1000
    (root / "data.txt").write_bytes(payload)
    md5 = hashlib.md5(payload, usedforsecurity=False).hexdigest()
    dest = tmp_path / "cache" / "data.txt"
    assert download_file(f"{base}/data.txt", dest, md5=md5) == dest
    assert dest.read_bytes() == payload
    assert [p.name for p in dest.parent.iterdir()] == ["data.txt"]  # no temporary file left behind


def test_download_checksum_mismatch_leaves_nothing(http_root: tuple[str, Path], tmp_path: Path) -> None:
    base, root = http_root
    (root / "data.txt").write_bytes(b"tampered")
    dest = tmp_path / "cache" / "data.txt"
    with pytest.raises(DataError, match=r"expected 0+"):
        download_file(f"{base}/data.txt", dest, md5="0" * 32)
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []


def test_download_http_error_and_corrupt_cache_refetch(http_root: tuple[str, Path], tmp_path: Path) -> None:
    base, root = http_root
    dest = tmp_path / "cache" / "x.txt"
    with pytest.raises(DataError, match=r"could not download .*set data.path"):
        download_file(f"{base}/absent.txt", dest)
    good = b"good bytes"
    (root / "x.txt").write_bytes(good)
    dest.write_bytes(b"stale partial")  # a cached file with the wrong checksum is fetched again
    download_file(f"{base}/x.txt", dest, md5=hashlib.md5(good, usedforsecurity=False).hexdigest())
    assert dest.read_bytes() == good


# --------------------------------------------------------------------------------------------- wikitext2


def test_wikitext2_local_splits(tmp_path: Path) -> None:
    cfg = DataConfig(
        corpus="wikitext2", path=str(WIKITEXT), train_split="valid", val_split="test", max_bytes=None
    )
    corpus = load_corpus(cfg)
    assert len(corpus.train_text.encode("utf-8")) == 1_121_681
    assert len(corpus.val_text.encode("utf-8")) == 1_256_449  # type: ignore[union-attr]
    assert " = Homarus gammarus = " in corpus.train_text


def test_wikitext2_tokens_names(tmp_path: Path) -> None:
    (tmp_path / "wiki.train.tokens").write_text(" = A = \n text \n", encoding="utf-8")
    (tmp_path / "wiki.valid.tokens").write_text(" = B = \n", encoding="utf-8")
    corpus = load_corpus(DataConfig(corpus="wikitext2", path=str(tmp_path), val_split="valid"))
    assert corpus.train_text.startswith(" = A =")
    assert corpus.val_text == " = B = \n"


def test_wikitext2_missing_train_split_says_how_to_train_without_it() -> None:
    with pytest.raises(DataError, match=r"split 'train' is missing.*data.train_split=valid"):
        load_corpus(DataConfig(corpus="wikitext2", path=str(WIKITEXT)))


def test_wikitext2_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a WikiText-2 split"):
        load_corpus(DataConfig(corpus="wikitext2", path=str(WIKITEXT), train_split="validation"))
    with pytest.raises(ConfigError, match=r"equals data.train_split"):
        load_corpus(
            DataConfig(corpus="wikitext2", path=str(WIKITEXT), train_split="valid", val_split="valid")
        )
    with pytest.raises(DataError, match="does not exist"):
        load_corpus(DataConfig(corpus="wikitext2", path=str(tmp_path / "none")))


def test_wikitext2_download_from_local_server(http_root: tuple[str, Path], tmp_path: Path) -> None:
    from dist_llm_train.data.corpora import load_wikitext2

    base, root = http_root
    for split in ("valid", "test"):
        (root / f"{split}.txt").write_bytes((WIKITEXT / f"{split}.txt").read_bytes())
    corpus = load_wikitext2(None, tmp_path, "valid", "test", 10_000, url_template=base + "/{split}.txt")
    assert len(corpus.train_text.encode("utf-8")) <= 10_000
    assert (tmp_path / "downloads" / "wikitext-2" / "valid.txt").is_file()
    # The pinned checksums of the public files hold for the copies served here.
    assert (tmp_path / "downloads" / "wikitext-2" / "test.txt").stat().st_size == 1_256_449
