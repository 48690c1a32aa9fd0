"""Pick the torch device and CPU thread count a run asked for."""

from __future__ import annotations

import torch

from dist_llm_train.errors import UserError


def resolve_device(name: str) -> torch.device:
    """``auto`` takes CUDA when torch sees a GPU, else the CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "device 'cuda' was requested but this torch build sees no GPU: install a CUDA build of torch "
            "(see README, 'GPU') or use --device cpu"
        )
    return torch.device(name)


def configure_threads(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)
