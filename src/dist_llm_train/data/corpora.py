"""Text corpora: where the characters a model trains on come from.

Four corpora, chosen by ``data.corpus``:

- ``python-stdlib`` (default): the ``*.py`` sources of the running interpreter's standard library, found at
  run time, so a run needs neither files nor network. The text is the same on every machine with the
  same Python version and build; it differs between Python versions (3.11 and 3.12 ship different
  sources), which changes the data fingerprint and therefore the token cache and the shards.
- ``files``: your own text, a file or a directory searched with ``data.glob``.
- ``tinyshakespeare``: the char-rnn corpus (1,115,394 characters), a local copy or downloaded once.
- ``wikitext2``: WikiText-2 (tokenized v1, ``<unk>`` for rare words) with its own train/valid/test splits,
  a local copy or downloaded once.

All text is read as UTF-8 with ``errors="replace"`` (undecodable bytes become U+FFFD instead of stopping a
run) and capped at ``data.max_bytes`` UTF-8 bytes. This module only produces text; tokenisation and
splitting happen in :mod:`dist_llm_train.data.dataset`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sysconfig
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from dist_llm_train.config.schema import DataConfig
from dist_llm_train.errors import ConfigError, DataError

TINYSHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINYSHAKESPEARE_MD5 = "6fb458f1232090904fb40fe944165e91"

# The tokenized WikiText-2 (v1) splits as PyTorch's word_language_model example ships them: plain UTF-8
# files, byte-identical to the Salesforce wiki.{train,valid,test}.tokens, fetched without a zip or parquet
# reader. The md5 of valid/test was checked against independent copies; train has no pinned hash here, so
# it is only checked for being non-empty.
WIKITEXT2_URL = (
    "https://raw.githubusercontent.com/pytorch/examples/main/word_language_model/data/wikitext-2/{split}.txt"
)
WIKITEXT2_MD5: dict[str, str | None] = {
    "train": None,
    "valid": "d756d22ab2310e7e60c094bea5c5a8eb",
    "test": "781c9418ab9414bd09e4aad825aae752",
}
WIKITEXT2_SPLITS = ("train", "valid", "test")

STDLIB_SEPARATOR = "# ---- file: {path}\n"

# Directory names (any path component) that hold tests, third-party or build-specific code.
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "lib-dynload", "idle_test"})


@dataclass(frozen=True)
class Corpus:
    """The text of one corpus.

    ``val_text`` is set only when the corpus brings its own validation split (``wikitext2`` with
    ``data.val_split``); otherwise the dataset layer cuts the last ``data.val_fraction`` of ``train_text``.
    ``source`` says where the text came from (a path or URL), for logs and error messages.
    """

    name: str
    train_text: str
    val_text: str | None
    source: str


def load_corpus(cfg: DataConfig) -> Corpus:
    """Load the text that ``cfg`` describes (see the module docstring for each corpus).

    Raises :class:`DataError` when a path is missing, a corpus is empty, or a download fails, and
    :class:`ConfigError` for a setting that does not apply to the chosen corpus (e.g. ``data.val_split``
    with anything but ``wikitext2``).
    """
    if cfg.val_split is not None and cfg.corpus != "wikitext2":
        raise ConfigError(
            f"data.val_split={cfg.val_split!r} only applies to corpus wikitext2 (corpus is {cfg.corpus!r}); "
            "unset it, the validation set is then the last data.val_fraction of the text"
        )
    cache_dir = Path(cfg.cache_dir).expanduser()
    if cfg.corpus == "python-stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        return Corpus("python-stdlib", load_python_stdlib(root, cfg.max_bytes), None, str(root))
    if cfg.corpus == "files":
        if cfg.path is None:
            raise ConfigError("corpus 'files' needs data.path (a text file or a directory of text files)")
        return Corpus("files", load_files(Path(cfg.path), cfg.glob, cfg.max_bytes), None, cfg.path)
    if cfg.corpus == "tinyshakespeare":
        path = resolve_tinyshakespeare(cfg.path, cache_dir)
        return Corpus("tinyshakespeare", read_text(path, cfg.max_bytes), None, str(path))
    if cfg.corpus == "wikitext2":
        return load_wikitext2(cfg.path, cache_dir, cfg.train_split, cfg.val_split, cfg.max_bytes)
    raise ConfigError(
        f"unknown data.corpus {cfg.corpus!r}; use python-stdlib, files, tinyshakespeare or wikitext2"
    )


# ---------------------------------------------------------------------------------------------- helpers


def truncate_utf8(text: str, max_bytes: int | None) -> str:
    """Return the longest prefix of ``text`` whose UTF-8 encoding has at most ``max_bytes`` bytes."""
    if max_bytes is None:
        return text
    encoded = text.encode("utf-8")
    if len(encoded) <= max_bytes:
        return text
    # "ignore" only drops the one character the cut may have split; everything before it is valid UTF-8.
    return encoded[:max_bytes].decode("utf-8", errors="ignore")


def read_text(path: Path, max_bytes: int | None = None) -> str:
    """Read ``path`` as UTF-8 (undecodable bytes become U+FFFD), keeping at most ``max_bytes`` bytes.

    Raises :class:`DataError` when the file is missing, unreadable or holds no text.
    """
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist or is not a file; check data.path")
    try:
        with path.open("rb") as fh:
            # Read 4 spare bytes so a character cut by the cap can be dropped whole by truncate_utf8.
            raw = fh.read() if max_bytes is None else fh.read(max_bytes + 4)
    except OSError as exc:
        raise DataError(f"cannot read data file {str(path)!r}: {exc.strerror or exc}") from exc
    text = truncate_utf8(raw.decode("utf-8", errors="replace"), max_bytes)
    if not text:
        raise DataError(f"data file {str(path)!r} is empty; point data.path at a file with text in it")
    return text


def _ensure_newline(text: str) -> str:
    return text if text.endswith("\n") else text + "\n"


# ----------------------------------------------------------------------------------------- python-stdlib


def _stdlib_excluded(rel: PurePosixPath) -> bool:
    """True for files that are tests, third-party packages or specific to one build of Python."""
    for part in rel.parts[:-1]:
        # "test*" covers test/, tests/, unittest/test/testmock, tkinter/test/test_ttk and friends.
        if part in _STDLIB_SKIP_DIRS or part.startswith("test") or part.startswith("config-"):
            return True
    name = rel.name
    # _sysconfigdata_* records the build machine's paths and flags, so it differs between machines.
    return name.startswith(("test_", "_sysconfigdata")) or name == "conftest.py"


def stdlib_files(root: Path) -> list[PurePosixPath]:
    """The standard-library sources under ``root`` that form the corpus, as sorted relative POSIX paths."""
    if not root.is_dir():
        raise DataError(
            f"the Python standard library was not found at {str(root)!r}; use data.corpus=files with "
            "data.path pointing at some text instead"
        )
    found: list[PurePosixPath] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = PurePosixPath(Path(dirpath).relative_to(root).as_posix())
        # Prune excluded directories so os.walk never descends into site-packages or the test suite; a
        # placeholder file name lets the directory be judged by the same rule as the files inside it.
        dirnames[:] = [d for d in dirnames if not _stdlib_excluded(rel_dir / d / "_.py")]
        for name in filenames:
            rel = rel_dir / name
            if name.endswith(".py") and not _stdlib_excluded(rel):
                found.append(rel)
    return sorted(found, key=str)


def load_python_stdlib(root: Path, max_bytes: int | None) -> str:
    """Concatenate the standard-library sources under ``root`` (see :func:`stdlib_files`).

    Every file is preceded by a ``# ---- file: <path>`` line so a model sees file boundaries. Files are
    taken whole, in sorted path order; a file that would push the total past ``max_bytes`` UTF-8 bytes is
    skipped and smaller later files still fill the budget (only when no file fits at all is the first one
    cut, so the corpus is never empty). The full library is about 12 MB on Python 3.11; raise
    ``data.max_bytes`` for more text (start-up time grows with it: reading is fast, tokenising and BPE
    training dominate).
    """
    parts: list[str] = []
    total = 0
    first_chunk: str | None = None
    for rel in stdlib_files(root):
        header = STDLIB_SEPARATOR.format(path=rel)
        path = root / rel
        try:
            # Decoding with "replace" never shrinks a file, so its size on disk is a lower bound: files
            # that cannot fit are skipped without being read.
            if (
                max_bytes is not None
                and total + len(header) + path.stat().st_size > max_bytes
                and (parts or first_chunk is not None)
            ):
                continue
            body = path.read_bytes().decode("utf-8", errors="replace")
        except OSError:
            # An unreadable file (permissions on an odd install) is skipped rather than failing the run;
            # the fingerprint hashes the resulting text, so runs still agree on what they trained on.
            continue
        chunk = header + _ensure_newline(body)
        size = len(chunk.encode("utf-8"))
        if max_bytes is not None and total + size > max_bytes:
            if first_chunk is None:
                first_chunk = chunk
            continue
        parts.append(chunk)
        total += size
    if not parts and first_chunk is not None:
        parts.append(truncate_utf8(first_chunk, max_bytes))
    text = "".join(parts)
    if not text:
        raise DataError(f"no Python source files found under {str(root)!r}; use data.corpus=files instead")
    return text


# ------------------------------------------------------------------------------------------------- files


def load_files(path: Path, pattern: str, max_bytes: int | None) -> str:
    """Read ``path`` (a text file) or every file under ``path`` (a directory) that matches ``pattern``.

    Directory files are read in sorted relative-path order and joined, each ending in a newline; the
    result is cut to ``max_bytes`` UTF-8 bytes (later files are then not read at all).
    """
    if not path.exists():
        raise DataError(
            f"data.path {str(path)!r} does not exist; give a text file or a directory of text files"
        )
    if path.is_file():
        return read_text(path, max_bytes)
    files = sorted(
        (p for p in path.glob(pattern) if p.is_file()), key=lambda p: p.relative_to(path).as_posix()
    )
    if not files:
        raise DataError(
            f"no files under {str(path)!r} match data.glob={pattern!r}; change data.glob (e.g. '**/*.md')"
        )
    parts: list[str] = []
    total = 0
    for file in files:
        remaining = None if max_bytes is None else max_bytes - total
        if remaining is not None and remaining <= 0:
            break
        try:
            text = read_text(file, remaining)
        except DataError:
            continue  # an empty file among many is not an error; an entirely empty corpus is (below)
        text = truncate_utf8(_ensure_newline(text), remaining)
        parts.append(text)
        total += len(text.encode("utf-8"))
    joined = "".join(parts)
    if not joined.strip():
        raise DataError(
            f"the {len(files)} file(s) under {str(path)!r} matching {pattern!r} hold no text; "
            "point data.path at non-empty text files"
        )
    return joined


# --------------------------------------------------------------------------------------------- downloads


def _md5_file(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_file(url: str, dest: Path, *, md5: str | None = None, timeout_s: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` once; later calls return the cached file.

    The file is streamed into a temporary file beside ``dest`` and moved into place with ``os.replace``
    only after it is complete and (when ``md5`` is given) its checksum matches, so an interrupted or
    corrupt download never leaves a file that looks valid. A cached file whose checksum no longer matches
    is downloaded again. ``timeout_s`` bounds each socket operation; on a slow link raise it, offline
    copy the file by hand and set ``data.path``.
    """
    if dest.is_file() and dest.stat().st_size > 0 and (md5 is None or _md5_file(dest) == md5):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        size = 0
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout_s) as response:
                    for block in iter(lambda: response.read(1 << 20), b""):
                        out.write(block)
                        digest.update(block)
                        size += len(block)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                reason = getattr(exc, "reason", None) or exc
                raise DataError(
                    f"could not download {url} ({reason}); copy the file by hand and set data.path to it"
                ) from exc
            out.flush()
            os.fsync(out.fileno())
        if size == 0:
            raise DataError(f"download of {url} returned no data; copy the file by hand and set data.path")
        if md5 is not None and digest.hexdigest() != md5:
            raise DataError(
                f"download of {url} has md5 {digest.hexdigest()}, expected {md5} (corrupt or changed upstream); "
                "copy a good file by hand and set data.path to it"
            )
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return dest


# --------------------------------------------------------------------------------------- tinyshakespeare


def resolve_tinyshakespeare(path: str | None, cache_dir: Path, url: str = TINYSHAKESPEARE_URL) -> Path:
    """The tinyshakespeare file: ``path`` (the file, or a directory holding ``input.txt``) or a download.

    Downloads go to ``<cache_dir>/downloads/tinyshakespeare/input.txt`` and are md5-checked.
    """
    if path is not None:
        local = Path(path).expanduser()
        if local.is_dir():
            local = local / "input.txt"
        if not local.is_file():
            raise DataError(
                f"tinyshakespeare not found at {str(local)!r}; set data.path to input.txt (or its directory), "
                "or unset data.path to download it"
            )
        return local
    return download_file(
        url, cache_dir / "downloads" / "tinyshakespeare" / "input.txt", md5=TINYSHAKESPEARE_MD5
    )


# --------------------------------------------------------------------------------------------- wikitext2


def _check_split(name: str, setting: str) -> None:
    if name not in WIKITEXT2_SPLITS:
        raise ConfigError(f"{setting}={name!r} is not a WikiText-2 split; use one of train, valid, test")


def _wikitext2_split_path(root: Path, split: str) -> Path | None:
    for candidate in (root / f"{split}.txt", root / f"wiki.{split}.tokens"):
        if candidate.is_file():
            return candidate
    return None


def load_wikitext2(
    path: str | None,
    cache_dir: Path,
    train_split: str,
    val_split: str | None,
    max_bytes: int | None,
    url_template: str = WIKITEXT2_URL,
) -> Corpus:
    """WikiText-2 splits from a local directory (``path``) or a download cached under ``cache_dir``.

    ``path`` holds ``{train,valid,test}.txt`` or ``wiki.{train,valid,test}.tokens``. Only the splits that
    are used are read (or downloaded); each is capped at ``max_bytes`` on its own. When the training split
    is not available (as on machines with only the validation and test files), train on another split
    with ``data.train_split=valid data.val_split=test``.
    """
    _check_split(train_split, "data.train_split")
    if val_split is not None:
        _check_split(val_split, "data.val_split")
        if val_split == train_split:
            raise ConfigError(
                f"data.val_split equals data.train_split ({train_split!r}): validation would measure the "
                "training text; pick another split or unset data.val_split"
            )
    splits = [train_split] if val_split is None else [train_split, val_split]
    files: dict[str, Path] = {}
    if path is not None:
        root = Path(path).expanduser()
        if not root.is_dir():
            raise DataError(
                f"wikitext2 directory {str(root)!r} does not exist; set data.path to the directory holding "
                "train.txt/valid.txt/test.txt, or unset it to download"
            )
        for split in splits:
            found = _wikitext2_split_path(root, split)
            if found is None:
                hint = (
                    "; to train without it set data.train_split=valid (and data.val_split=test)"
                    if split == "train"
                    else ""
                )
                raise DataError(
                    f"wikitext2 split {split!r} is missing: neither {split}.txt nor wiki.{split}.tokens "
                    f"is in {str(root)!r}{hint}"
                )
            files[split] = found
        source = str(root)
    else:
        target = cache_dir / "downloads" / "wikitext-2"
        for split in splits:
            files[split] = download_file(
                url_template.format(split=split), target / f"{split}.txt", md5=WIKITEXT2_MD5[split]
            )
        source = url_template.format(split="{" + ",".join(splits) + "}")
    train = read_text(files[train_split], max_bytes)
    val = read_text(files[val_split], max_bytes) if val_split is not None else None
    return Corpus("wikitext2", train, val, source)
