"""Worker momentum must weight every gradient alike (a regression test of a convergence finding).

``WorkerEngine`` documents worker momentum as ``m <- beta m + (1 - beta) g``. It used to start ``m`` at the
first gradient instead of at zero; summed over the rounds that follow, the first gradient then carried
weight ``1/(1 - beta)`` (10 at beta = 0.9) while every later gradient carried at most 1: the first round's
direction was applied ten times over. On the convergence model this cost 0.61 nats after 80 synchronous
steps (SGD lr 1.0 with worker momentum 0.9: 3.316; the same with m started at zero: 2.708, identical to
server-side heavy-ball momentum with lr 0.1), and it kept worker momentum out of the Byzantine defence of
``test_convergence_attacks.py``, which now uses it. PyTorch's SGD starts its buffer at the first gradient
too, but without the (1 - beta) factor, so there every gradient weighs 1/(1 - beta).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dist_llm_train.config import RunConfig
from dist_llm_train.coordination import WorkerEngine, WorkItem
from dist_llm_train.data import PreparedData
from dist_llm_train.models import build_model

BETA = 0.9
ROUNDS = 300


class _ScriptedEngine(WorkerEngine):
    """A worker whose 'gradients' are given, so the momentum arithmetic can be checked exactly."""

    def __init__(self, *args: object, gradients: list[torch.Tensor], **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._script = iter(gradients)

    def _gradient(self, item: WorkItem) -> tuple[torch.Tensor, float]:
        return next(self._script).clone(), 0.0


def test_worker_momentum_weights_the_first_gradient_like_any_other(
    conv_cfg: Callable[..., RunConfig], conv_data: PreparedData
) -> None:
    cfg = conv_cfg(f"sync.worker_momentum={BETA}")
    model = build_model(cfg.model, conv_data.vocab_size)
    params = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    d = params.numel()
    first, second = torch.zeros(d), torch.zeros(d)
    first[0], second[1] = 1.0, 1.0
    # Gradient e0 in round 1, e1 in round 2, nothing after: the sum of everything sent measures the total
    # weight each gradient received.
    script = [first, second] + [torch.zeros(d)] * (ROUNDS - 2)
    engine = _ScriptedEngine(model, conv_data.train, cfg, gradients=script)
    total = torch.zeros(d)
    for round_ in range(ROUNDS):
        total += engine.compute(params, round_, WorkItem(0, 1000, 1, round_)).vector
    weight_first, weight_second = float(total[0]), float(total[1])
    assert abs(weight_second - 1.0) < 1e-3  # an ordinary gradient: (1 - beta) x sum of beta^k
    assert abs(weight_first - weight_second) < 1e-3, (
        f"the first gradient was applied with total weight {weight_first:.2f}, a later one with "
        f"{weight_second:.2f}: momentum should start at zero (or weight every gradient alike)"
    )
