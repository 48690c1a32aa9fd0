"""The controller's checkpoint: server parameters, server optimiser, version and run progress.

Reuses the trainer's atomic, sha256-verified format (:mod:`dist_llm_train.training.checkpoint`), so a
controller checkpoint is also a model checkpoint any tool of this package can read::

    RUN_DIR/checkpoints/step-00000120/model.safetensors      the server's parameters as a model state dict
    RUN_DIR/checkpoints/step-00000120/optimizer.safetensors  the server optimiser's state tensors
    RUN_DIR/checkpoints/step-00000120/state.json             config, model shapes, tokenizer, data
                                                             fingerprint, and ``controller``: coordinator
                                                             statistics, task-pool progress, counters

``step`` is the server version. A run resumed from it continues at that version with the same optimiser
moments and learning-rate schedule position; the workers notice the restart (their requests are answered
``not-registered``), register again and pull the restored parameters.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from dist_llm_train.coordination import CoordinatorStats, ParameterServer, flatten_params, load_flat_params
from dist_llm_train.errors import CheckpointError
from dist_llm_train.models import LanguageModel
from dist_llm_train.training.checkpoint import (
    load_checkpoint,
    load_model_state,
    resolve_checkpoint,
    save_checkpoint,
    unflatten_optimizer_state,
)

__all__ = [
    "ControllerCheckpoint",
    "has_checkpoint",
    "load_controller_checkpoint",
    "restore_stats",
    "save_controller_checkpoint",
]


class _OptimizerStateView:
    """Presents a saved ``optimizer.state_dict()`` where :func:`save_checkpoint` expects an optimiser.

    The parameter server keeps its optimiser private and hands out a deep copy of its state; the
    checkpoint writer only ever calls ``state_dict()`` on what it is given.
    """

    def __init__(self, state: dict[str, Any]) -> None:
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        return self._state


@dataclass
class ControllerCheckpoint:
    """A verified controller checkpoint: where it is, the server version, and the controller's JSON state."""

    path: Path
    version: int
    controller: dict[str, Any]
    state: dict[str, Any]


def has_checkpoint(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a complete checkpoint (``checkpoints/latest``)."""
    return (Path(run_dir) / "checkpoints" / "latest").is_file()


def save_controller_checkpoint(
    run_dir: Path,
    *,
    server: ParameterServer,
    model: LanguageModel,
    state: dict[str, Any],
    controller: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write the server's parameters and optimiser plus ``state`` (config, shapes, tokenizer, data
    fingerprint) and ``controller`` (progress counters) atomically; keep the newest ``keep`` checkpoints.

    ``model`` is a scratch copy of the architecture: its weights are overwritten with the server's
    parameters so that the checkpoint holds a normal model state dict (tied weights, buffers included).
    """
    server_state = server.state_dict()
    load_flat_params(model, server_state["params"])
    optimizer = cast(torch.optim.Optimizer, _OptimizerStateView(server_state["optimizer"]))
    return save_checkpoint(
        Path(run_dir),
        step=int(server_state["version"]),
        model_state=model.state_dict(),
        optimizer=optimizer,
        state={**state, "controller": controller},
        keep=keep,
    )


def load_controller_checkpoint(
    run_dir: Path,
    *,
    server: ParameterServer,
    model: LanguageModel,
    model_shapes: dict[str, Any],
    data_fingerprint: str,
) -> ControllerCheckpoint:
    """Restore ``server`` (parameters, optimiser, version) from the latest checkpoint in ``run_dir``.

    Refuses, with a :class:`CheckpointError` naming the difference, a checkpoint written for another model
    or other data, and one without optimiser state (it could not continue the same trajectory).
    """
    checkpoint = load_checkpoint(resolve_checkpoint(Path(run_dir)))
    saved_shapes = checkpoint.state.get("model_shapes")
    if saved_shapes != model_shapes:
        raise CheckpointError(
            f"checkpoint {checkpoint.path} was written for model {saved_shapes}, but the config asks for "
            f"{model_shapes}: resume with the config the run started with (RUN_DIR/config.yaml)"
        )
    if checkpoint.state.get("data_fingerprint") != data_fingerprint:
        raise CheckpointError(
            f"checkpoint {checkpoint.path} was trained on different data or tokenizer settings: resume with "
            "the data config the run started with (RUN_DIR/config.yaml)"
        )
    meta = checkpoint.state.get("optimizer") or {}
    if not meta:
        raise CheckpointError(
            f"checkpoint {checkpoint.path} holds no optimizer state, so it cannot be resumed"
        )
    load_model_state(model, checkpoint)
    try:
        server.load_state_dict(
            {
                "params": flatten_params(model),
                "version": checkpoint.step,
                "optimizer": unflatten_optimizer_state(checkpoint.optimizer_tensors, meta),
            }
        )
    except (ValueError, KeyError) as exc:
        raise CheckpointError(
            f"server optimizer state in {checkpoint.path} does not fit this run ({exc}): resume with the "
            "sync.server_optimizer the run started with"
        ) from exc
    controller = checkpoint.state.get("controller") or {}
    if not isinstance(controller, dict):
        raise CheckpointError(f"checkpoint {checkpoint.path} has a malformed 'controller' section")
    return ControllerCheckpoint(checkpoint.path, checkpoint.step, controller, checkpoint.state)


def restore_stats(stats: CoordinatorStats, saved: dict[str, Any]) -> None:
    """Load the counters of ``CoordinatorStats.as_dict()`` back into ``stats`` (resume keeps totals)."""

    def counter(key: str, *, int_keys: bool = False) -> Counter[Any]:
        raw = saved.get(key) or {}
        return Counter({(int(k) if int_keys else str(k)): int(v) for k, v in raw.items()})

    stats.submitted = int(saved.get("submitted", 0))
    stats.accepted = int(saved.get("accepted", 0))
    stats.rejected = counter("rejected")
    stats.staleness = counter("staleness", int_keys=True)
    stats.accepted_by_worker = counter("accepted_by_worker")
    stats.rejected_by_worker = counter("rejected_by_worker")
    for name in (
        "steps",
        "noop_steps",
        "tokens",
        "wire_bytes",
        "byzantine_submitted",
        "byzantine_rejected",
        "byzantine_aggregated",
        "byzantine_excluded",
        "honest_excluded",
    ):
        setattr(stats, name, int(saved.get(name, 0)))
