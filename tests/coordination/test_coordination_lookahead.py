"""``sync.lookahead``: gradients taken where a stale update will land (DANA-style delay compensation).

The worker extrapolates the pulled parameters by ``lookahead · s`` versions along their last per-version
change (``s``: its recent staleness) and computes the gradient there; with the option off, or before it
has seen two versions and one staleness, the gradient is taken at the pulled parameters exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from dist_llm_train.config import RunConfig
from dist_llm_train.coordination import WorkerEngine, WorkItem
from dist_llm_train.coordination.flat import flatten_params
from dist_llm_train.data import prepare_data
from dist_llm_train.errors import ConfigError
from dist_llm_train.models import build_model


def _engine(tiny_engine_cfg: Callable[..., RunConfig], *overrides: str) -> tuple[WorkerEngine, torch.Tensor]:
    cfg = tiny_engine_cfg("sync.mode=adaptive", "training.grad_clip=null", *overrides)
    data = prepare_data(cfg.data, block_size=8)
    torch.manual_seed(0)
    model = build_model(cfg.model, data.tokenizer.vocab_size)
    return WorkerEngine(model, data.train, cfg), flatten_params(model)


def _evaluated_at(engine: WorkerEngine, params: torch.Tensor, version: int) -> torch.Tensor:
    """Compute one update from ``params`` at ``version``; return the parameters the gradient was taken at."""
    n = len(engine.train_tokens)
    engine.compute(params, version, WorkItem(0, n, 1, version))
    return flatten_params(engine.model)


def test_lookahead_extrapolates_by_the_observed_staleness(
    tiny_engine_cfg: Callable[..., RunConfig],
) -> None:
    engine, p0 = _engine(tiny_engine_cfg, "sync.lookahead=1")
    step = torch.linspace(-1e-2, 1e-2, p0.numel())
    p1, p3 = p0 + step, p0 + 3 * step
    # Nothing to extrapolate from yet: the first pull, then a second one before any staleness is known.
    assert torch.equal(_evaluated_at(engine, p0, 0), p0)
    assert torch.equal(_evaluated_at(engine, p1, 1), p1)
    engine.observe_staleness(2)
    # Two versions since the last pull: the per-version change is `step`; staleness 2 → two steps ahead.
    torch.testing.assert_close(_evaluated_at(engine, p3, 3), p3 + 2 * step)
    # The staleness estimate averages: (2 + 0) / 2 = 1 version ahead; the same version keeps the velocity.
    engine.observe_staleness(0)
    torch.testing.assert_close(_evaluated_at(engine, p3, 3), p3 + step)
    # A server that went back (a resumed checkpoint) invalidates the velocity.
    assert torch.equal(_evaluated_at(engine, p1, 1), p1)


def test_the_gradient_is_the_one_at_the_extrapolated_parameters(
    tiny_engine_cfg: Callable[..., RunConfig],
) -> None:
    ahead, p0 = _engine(tiny_engine_cfg, "sync.lookahead=0.5")
    plain, _ = _engine(tiny_engine_cfg)
    step = torch.full_like(p0, 1e-2)
    n = len(ahead.train_tokens)
    for engine in (ahead, plain):
        engine.compute(p0, 0, WorkItem(0, n, 1, 0))
        engine.observe_staleness(2)
    from_ahead = ahead.compute(p0 + step, 1, WorkItem(0, n, 1, 7)).vector
    at_pulled = plain.compute(p0 + step, 1, WorkItem(0, n, 1, 7)).vector
    at_target = plain.compute(p0 + 2 * step, 1, WorkItem(0, n, 1, 7)).vector
    torch.testing.assert_close(from_ahead, at_target)
    assert not torch.allclose(from_ahead, at_pulled)


def test_lookahead_is_bounded() -> None:
    from dist_llm_train.config import load_config

    with pytest.raises(ConfigError, match="lookahead"):
        load_config(None, ["sync.lookahead=-1"])
    with pytest.raises(ConfigError, match="lookahead"):
        load_config(None, ["sync.lookahead=9"])
