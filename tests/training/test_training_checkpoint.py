from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dist_llm_train.errors import CheckpointError
from dist_llm_train.training.checkpoint import (
    load_checkpoint,
    load_model_state,
    load_optimizer_state,
    save_checkpoint,
)


def _model_and_optimizer(width: int = 8) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.LayerNorm(width))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, width)).square().sum().backward()
    optimizer.step()
    return model, optimizer


def test_round_trip_is_exact(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer()
    save_checkpoint(
        tmp_path, step=3, model_state=model.state_dict(), optimizer=optimizer, state={"note": "x"}
    )
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.step == 3
    assert ckpt.state["note"] == "x"
    fresh, fresh_opt = _model_and_optimizer()
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    load_model_state(fresh, ckpt)
    load_optimizer_state(fresh_opt, ckpt)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    sa, sb = optimizer.state_dict()["state"], fresh_opt.state_dict()["state"]
    for key in sa:
        for name in sa[key]:
            assert torch.equal(torch.as_tensor(sa[key][name]), torch.as_tensor(sb[key][name]))


def test_latest_pointer_and_retention(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer()
    for step in (1, 2, 3):
        save_checkpoint(
            tmp_path, step=step, model_state=model.state_dict(), optimizer=optimizer, state={}, keep=2
        )
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert kept == ["step-00000002", "step-00000003"]
    assert load_checkpoint(tmp_path).step == 3


def test_corrupt_weights_are_detected(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer()
    path = save_checkpoint(tmp_path, step=1, model_state=model.state_dict(), optimizer=optimizer, state={})
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(tmp_path)


def test_truncated_state_and_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        load_checkpoint(tmp_path)
    model, optimizer = _model_and_optimizer()
    path = save_checkpoint(tmp_path, step=1, model_state=model.state_dict(), optimizer=optimizer, state={})
    (path / "state.json").write_text('{"format": 1, "step"')
    with pytest.raises(CheckpointError, match=r"unreadable state\.json"):
        load_checkpoint(tmp_path)
    (path / "state.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(CheckpointError, match="format-1"):
        load_checkpoint(tmp_path)


def test_mismatched_model_is_a_clear_error(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer(width=8)
    save_checkpoint(tmp_path, step=1, model_state=model.state_dict(), optimizer=optimizer, state={})
    other, _ = _model_and_optimizer(width=6)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_model_state(other, load_checkpoint(tmp_path))


def test_leftover_temporary_directory_is_ignored(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer()
    save_checkpoint(tmp_path, step=1, model_state=model.state_dict(), optimizer=optimizer, state={})
    crashed = tmp_path / "checkpoints" / ".step-00000002.tmp"
    crashed.mkdir()
    (crashed / "model.safetensors").write_bytes(b"half")
    assert load_checkpoint(tmp_path).step == 1
