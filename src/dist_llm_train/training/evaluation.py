"""Validation metrics shared by the single-process trainer and the distributed parameter server."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from dist_llm_train.data import iter_eval_batches
from dist_llm_train.models import LanguageModel

EVAL_SEED = 20_231_114  # fixed: every evaluation of every run scores the same windows


@dataclass(frozen=True)
class EvalResult:
    loss: float
    perplexity: float
    bits_per_byte: float | None
    mlm_accuracy: float | None
    tokens: int

    def as_dict(self, prefix: str = "val_") -> dict[str, float | int | None]:
        return {f"{prefix}{k}": v for k, v in asdict(self).items()}


@torch.no_grad()
def evaluate(
    model: LanguageModel,
    tokens: np.ndarray,
    *,
    batch_size: int,
    n_batches: int,
    device: torch.device,
    byte_level: bool,
) -> EvalResult:
    """Mean loss over ``n_batches`` fixed windows of ``tokens`` (token-weighted), plus derived metrics.

    Bits per byte is reported only for byte-level tokenizers, where one token is one byte.
    """
    was_training = model.training
    model.eval()
    total_loss = 0.0
    total_tokens = 0
    total_correct = 0
    generator = torch.Generator().manual_seed(EVAL_SEED)
    for window in iter_eval_batches(tokens, batch_size, model.block_size, n_batches, EVAL_SEED):
        batch = model.make_batch(window, generator).to(device)
        loss, metrics = model.loss_and_metrics(batch)
        count = int(metrics["tokens"])
        total_loss += float(loss) * count
        total_tokens += count
        total_correct += int(metrics["correct"])
    model.train(was_training)
    mean_loss = total_loss / max(1, total_tokens)
    return EvalResult(
        loss=mean_loss,
        perplexity=math.exp(min(mean_loss, 50.0)),
        bits_per_byte=mean_loss / math.log(2) if byte_level else None,
        mlm_accuracy=total_correct / max(1, total_tokens) if model.objective == "mlm" else None,
        tokens=total_tokens,
    )
