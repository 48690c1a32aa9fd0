"""The single-process trainer: exact resume and a short run whose validation loss falls."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dist_llm_train.config import load_config
from dist_llm_train.errors import CheckpointError, UserError
from dist_llm_train.telemetry import read_metrics
from dist_llm_train.training import Trainer
from dist_llm_train.training.checkpoint import load_checkpoint


def _cfg(run_dir: Path, cache: Path, steps: int, *extra: str):
    return load_config(
        None,
        [
            "model.preset=custom",
            "model.n_layer=2",
            "model.n_head=2",
            "model.n_embd=32",
            "model.block_size=32",
            "data.max_bytes=200000",
            f"data.cache_dir={cache}",
            f"training.run_dir={run_dir}",
            f"training.max_steps={steps}",
            "training.batch_size=4",
            "training.eval_interval=1000",
            "training.eval_batches=2",
            "training.warmup_steps=2",
            "training.device=cpu",
            "telemetry.progress=false",
            *extra,
        ],
    )


def test_resume_is_bitwise_exact(tmp_path: Path, session_cache_dir: Path) -> None:
    n = 6
    schedule = f"training.lr_decay_steps={2 * n}"
    straight = Trainer(_cfg(tmp_path / "a", session_cache_dir, 2 * n, schedule))
    straight.train()

    first = Trainer(_cfg(tmp_path / "b", session_cache_dir, n, schedule))
    first.train()
    resumed = Trainer(_cfg(tmp_path / "b", session_cache_dir, 2 * n, schedule), resume=True)
    assert resumed.start_step == n
    resumed.train()

    a = load_checkpoint(tmp_path / "a").model_state
    b = load_checkpoint(tmp_path / "b").model_state
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # the resumed run really changed the weights after step n (the comparison is not vacuous)
    assert any(not torch.equal(first.model.state_dict()[k].cpu(), b[k]) for k in b)


def test_run_dir_contents_and_falling_loss(tmp_path: Path, session_cache_dir: Path) -> None:
    cfg = _cfg(tmp_path / "run", session_cache_dir, 120, "training.lr=3e-3", "training.eval_batches=8")
    result = Trainer(cfg).train()
    run = tmp_path / "run"
    assert (run / "config.yaml").is_file()
    assert (run / "tokenizer.json").is_file()
    assert (run / "summary.json").is_file()
    assert load_checkpoint(run).step == 120
    evals = read_metrics(run / "metrics.jsonl", "eval")
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 120
    assert result.initial_eval is not None
    # byte-level: initial loss is about ln(256) = 5.55; 120 steps of a tiny model reach well below 3.6
    assert result.initial_eval.loss > 5.0
    assert result.final_eval.loss < 3.6
    assert result.initial_eval.loss - result.final_eval.loss > 1.5
    assert result.final_eval.bits_per_byte == pytest.approx(result.final_eval.loss / 0.6931471805599453)


def test_run_dir_with_checkpoint_is_never_overwritten(tmp_path: Path, session_cache_dir: Path) -> None:
    Trainer(_cfg(tmp_path / "r", session_cache_dir, 2)).train()
    with pytest.raises(UserError, match="--resume"):
        Trainer(_cfg(tmp_path / "r", session_cache_dir, 2))
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        Trainer(_cfg(tmp_path / "empty", session_cache_dir, 2), resume=True)


def test_resume_with_another_model_is_refused(tmp_path: Path, session_cache_dir: Path) -> None:
    Trainer(_cfg(tmp_path / "r", session_cache_dir, 2)).train()
    with pytest.raises(CheckpointError, match="model config the run started with"):
        Trainer(_cfg(tmp_path / "r", session_cache_dir, 4, "model.n_embd=48"), resume=True)
