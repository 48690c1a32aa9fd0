"""Fixtures for the simulator tests: one tiny GPT config on a slice of tinyshakespeare, data prepared once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from dist_llm_train.config import RunConfig, load_config
from dist_llm_train.data import PreparedData, prepare_data

BLOCK = 32


@pytest.fixture(scope="session")
def sim_cfg(shared_data: Path, session_cache_dir: Path) -> Callable[..., RunConfig]:
    """``sim_cfg("sync.mode=async", ...)``: the tiny simulation config with overrides applied."""
    base = [
        "data.corpus=tinyshakespeare",
        f"data.path={shared_data / 'tinyshakespeare' / 'input.txt'}",
        "data.max_bytes=60000",
        "data.shard_tokens=2048",
        f"data.cache_dir={session_cache_dir}",
        "model.preset=custom",
        "model.n_layer=2",
        "model.n_head=2",
        "model.n_embd=32",
        f"model.block_size={BLOCK}",
        "training.batch_size=4",
        "training.eval_batches=2",
        "training.warmup_steps=2",
        "training.max_steps=6",
        "training.threads=1",
        "sync.mode=async",
    ]

    def make(*overrides: str) -> RunConfig:
        return load_config(None, [*base, *overrides])

    return make


@pytest.fixture(scope="session")
def sim_data(sim_cfg: Callable[..., RunConfig]) -> PreparedData:
    return prepare_data(sim_cfg().data, block_size=BLOCK)
