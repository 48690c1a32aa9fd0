"""Self-describing, atomically written checkpoints (safetensors weights + JSON state).

Layout of ``RUN_DIR/checkpoints/``::

    step-000600/model.safetensors      weights (fp32, as trained)
    step-000600/optimizer.safetensors  optimiser state tensors (exact, for bitwise resume)
    step-000600/state.json             full config, step, model shapes, tokenizer, data fingerprint,
                                       extra state, and the sha256 of both tensor files
    latest                             name of the newest complete checkpoint directory

A checkpoint directory is written under a temporary name and renamed into place, and ``latest`` is
replaced atomically afterwards, so a crash at any moment leaves the previous checkpoint intact and never a
half-written one that looks complete. The sha256 in ``state.json`` catches later corruption.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dist_llm_train.errors import CheckpointError

CHECKPOINT_FORMAT = 1
LATEST_POINTER = "latest"


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns: tensors plus the JSON state, already verified."""

    path: Path
    model_state: dict[str, torch.Tensor]
    optimizer_tensors: dict[str, torch.Tensor]
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def flatten_optimizer_state(
    optimizer: torch.optim.Optimizer,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and a JSON-able remainder."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, param_state in sd["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param_id}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(param_id), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        param_id, _, key = name.partition(".")
        state.setdefault(int(param_id), {})[key] = value
    for param_id, values in meta.get("scalars", {}).items():
        state.setdefault(int(param_id), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    run_dir: Path,
    *,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step`` atomically and point ``latest`` at it; keep the newest ``keep``."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    final = root / name
    tmp = root / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    # safetensors refuses tensors that share memory (tied embeddings): save each under its own name.
    weights = {k: v.detach().clone().contiguous().cpu() for k, v in model_state.items()}
    save_file(weights, str(tmp / "model.safetensors"))
    optim_tensors, optim_meta = flatten_optimizer_state(optimizer) if optimizer is not None else ({}, {})
    save_file(optim_tensors, str(tmp / "optimizer.safetensors"))
    full_state = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        **state,
        "optimizer": optim_meta,
        "sha256": {
            "model.safetensors": _sha256(tmp / "model.safetensors"),
            "optimizer.safetensors": _sha256(tmp / "optimizer.safetensors"),
        },
    }
    _write_text_atomic(tmp / "state.json", json.dumps(full_state, indent=2, sort_keys=True))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_text_atomic(root / LATEST_POINTER, name + "\n")
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resolve_checkpoint(path: Path) -> Path:
    """Accept a run directory, its ``checkpoints/`` folder, or one checkpoint directory."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    for root in (path / "checkpoints", path):
        pointer = root / LATEST_POINTER
        if pointer.is_file():
            target = root / pointer.read_text(encoding="utf-8").strip()
            if (target / "state.json").is_file():
                return target
            raise CheckpointError(
                f"{pointer} names {target.name}, which is missing: the run directory is damaged"
            )
    raise CheckpointError(
        f"no checkpoint found at {path}: pass a run directory that holds checkpoints/latest"
    )


def load_checkpoint(path: Path) -> Checkpoint:
    """Load and verify a checkpoint; any damage is a :class:`CheckpointError`, never a raw traceback."""
    directory = resolve_checkpoint(path)
    try:
        state = json.loads((directory / "state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {directory} has an unreadable state.json: it is corrupt") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {directory} is not a dist-llm-train format-{CHECKPOINT_FORMAT} checkpoint"
        )
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for filename in ("model.safetensors", "optimizer.safetensors"):
        file = directory / filename
        if not file.is_file():
            raise CheckpointError(f"checkpoint {directory} lacks {filename}")
        expected = state.get("sha256", {}).get(filename)
        if expected != _sha256(file):
            raise CheckpointError(f"checkpoint file {file} does not match its recorded sha256: it is corrupt")
        try:
            tensors[filename] = load_file(str(file))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"checkpoint file {file} cannot be read: {exc}") from exc
    return Checkpoint(
        path=directory,
        model_state=tensors["model.safetensors"],
        optimizer_tensors=tensors["optimizer.safetensors"],
        state=state,
    )


def load_model_state(model: torch.nn.Module, checkpoint: Checkpoint) -> None:
    """Copy weights into ``model``, with a clear error when names or shapes differ."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(checkpoint.model_state))
    unexpected = sorted(set(checkpoint.model_state) - set(expected))
    mismatched = [
        f"{k} {tuple(checkpoint.model_state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in checkpoint.model_state and checkpoint.model_state[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        detail = (mismatched or missing or unexpected)[:3]
        raise CheckpointError(
            f"checkpoint {checkpoint.path} does not fit this model ({len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(mismatched)} mis-shaped tensors, e.g. {detail}): "
            "use the model config the checkpoint was written with"
        )
    model.load_state_dict(checkpoint.model_state, strict=True)


def load_optimizer_state(optimizer: torch.optim.Optimizer, checkpoint: Checkpoint) -> None:
    meta = checkpoint.state.get("optimizer") or {}
    if not meta:
        raise CheckpointError(
            f"checkpoint {checkpoint.path} holds no optimizer state, so it cannot be resumed"
        )
    try:
        optimizer.load_state_dict(unflatten_optimizer_state(checkpoint.optimizer_tensors, meta))
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"optimizer state in {checkpoint.path} does not fit this model: {exc}") from exc
