"""Shared fixtures. Paths to ../shared/data are resolved relative to the repository root."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        raise RuntimeError(f"test data not found at {SHARED_DATA}: CI places ../shared beside the checkout")
    return SHARED_DATA


@pytest.fixture()
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def session_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the whole session, so token arrays are built once and reused across tests."""
    return tmp_path_factory.mktemp("session-cache")


@pytest.fixture()
def tiny_engine_cfg(tmp_path: Path) -> Callable[..., Any]:
    """``tiny_engine_cfg("k=v", ...)``: a one-layer, 16-wide GPT on 20 kB of the embedded corpus, batch 2 x 8
    tokens, for tests that drive a :class:`~dist_llm_train.coordination.WorkerEngine` directly."""
    from dist_llm_train.config import load_config

    base = [
        "model.preset=custom",
        "model.n_layer=1",
        "model.n_head=1",
        "model.n_embd=16",
        "model.block_size=8",
        "data.max_bytes=20000",
        f"data.cache_dir={tmp_path}",
        "training.batch_size=2",
    ]

    def make(*overrides: str) -> Any:
        return load_config(None, [*base, *overrides])

    return make
