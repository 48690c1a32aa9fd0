"""Learning-rate schedule: linear warm-up then cosine decay to ``min_lr`` (nanoGPT's schedule)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dist_llm_train.config import TrainingConfig


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> float:
    """Learning rate for optimiser step ``step`` (0-based).

    Warm-up rises linearly to ``lr`` over ``warmup_steps``; then a half cosine falls to ``min_lr`` at
    ``decay_steps`` and stays there. Symptom → setting: loss spikes early → longer warm-up; loss flattens
    long before the end → larger ``min_lr`` or longer ``decay_steps``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_lr
    span = max(1, decay_steps - warmup_steps)
    progress = (step - warmup_steps) / span
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def training_lr(tc: TrainingConfig, step: int) -> float:
    """The ``training`` section's schedule at ``step``: what the single-process trainer and workers with
    their own optimiser (``sync.worker_optimizer``) use."""
    return lr_at(
        step,
        lr=tc.lr,
        min_lr=tc.min_lr,
        warmup_steps=tc.warmup_steps,
        decay_steps=tc.lr_decay_steps or tc.max_steps,
    )
