"""``sync.worker_optimizer=adamw``: workers take scheduled AdamW steps and push the parameter change.

The server must add the aggregated change (SGD at lr 1) rather than re-normalise it, and the workers'
inner learning rate must follow the training schedule at each update's base version, as the server's
AdamW does in the gradient modes.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from dist_llm_train.config import RunConfig, load_config
from dist_llm_train.coordination import WorkerEngine, WorkItem, build_server
from dist_llm_train.coordination.flat import flatten_params
from dist_llm_train.data import prepare_data
from dist_llm_train.errors import ConfigError
from dist_llm_train.models import build_model
from dist_llm_train.training.schedule import lr_at

WORKER_ADAMW = ("sync.worker_optimizer=adamw", "sync.server_optimizer=sgd", "sync.server_momentum=0")


def test_worker_adamw_needs_a_server_that_adds_changes() -> None:
    with pytest.raises(ConfigError, match=r"sync\.server_optimizer=sgd"):
        load_config(None, ["sync.mode=adaptive", "sync.worker_optimizer=adamw"])
    cfg = load_config(None, ["sync.mode=adaptive", "sync.local_steps=3", *WORKER_ADAMW])
    assert cfg.sync.local_updates and cfg.sync.steps_per_update(grad_accum_steps=2) == 3
    plain = load_config(None, ["sync.mode=adaptive", "sync.local_steps=3"])
    assert not plain.sync.local_updates and plain.sync.steps_per_update(grad_accum_steps=2) == 2
    assert load_config(None, ["sync.mode=local-sgd"]).sync.local_updates


def test_server_adds_the_aggregated_change_at_lr_one() -> None:
    cfg = load_config(None, ["sync.mode=adaptive", "training.lr=3e-4", *WORKER_ADAMW])
    server = build_server(cfg, torch.zeros(4), total_steps=100)
    assert server.optimizer_name == "sgd"
    assert server.current_lr() == 1.0
    server.apply(torch.tensor([1.0, -2.0, 0.5, 0.0]))
    assert torch.equal(server.params, torch.tensor([-1.0, 2.0, -0.5, 0.0]))


def _engine(tiny_engine_cfg: Callable[..., RunConfig]) -> tuple[WorkerEngine, torch.Tensor, int]:
    cfg = tiny_engine_cfg(
        "training.lr=1e-2",
        "training.min_lr=1e-3",
        "training.warmup_steps=10",
        "training.max_steps=100",
        "training.weight_decay=0",
        "training.grad_clip=null",
        "sync.mode=adaptive",
        "sync.local_steps=1",
        *WORKER_ADAMW,
    )
    data = prepare_data(cfg.data, block_size=8)
    torch.manual_seed(0)
    model = build_model(cfg.model, data.tokenizer.vocab_size)
    return WorkerEngine(model, data.train, cfg), flatten_params(model), len(data.train)


@pytest.mark.parametrize("base_version", [0, 10, 60])
def test_inner_adamw_step_follows_the_schedule_at_the_base_version(
    tiny_engine_cfg: Callable[..., RunConfig], base_version: int
) -> None:
    engine, params, n_tokens = _engine(tiny_engine_cfg)
    update = engine.compute(params.clone(), base_version, WorkItem(0, n_tokens, 1, 5))
    expected_lr = lr_at(base_version, lr=1e-2, min_lr=1e-3, warmup_steps=10, decay_steps=100)
    # AdamW's first (bias-corrected) step moves every coordinate with a gradient by lr * g / (|g| + eps):
    # the largest change is the scheduled learning rate itself.
    assert float(update.vector.abs().max()) == pytest.approx(expected_lr, rel=1e-3)
    assert update.tokens == 2 * 8


def test_local_steps_leave_the_callers_parameters_alone(
    tiny_engine_cfg: Callable[..., RunConfig],
) -> None:
    # The worker process computes a second task at the version it holds without pulling again: the
    # parameters it passes must still be that version's after the inner optimiser stepped the model.
    engine, params, n_tokens = _engine(tiny_engine_cfg)
    held = params.clone()
    update = engine.compute(params, 0, WorkItem(0, n_tokens, 1, 5))
    assert float(update.vector.abs().max()) > 0
    assert torch.equal(params, held)
