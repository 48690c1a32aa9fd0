"""Label flipping for language models: a data attack, not an update transform.

The attacker trains honestly but on poisoned targets: every target token ``t`` is replaced by ``π(t)`` for a
fixed permutation π of the vocabulary. π is a derangement (no token maps to itself), so every target
changes. The worker applies :meth:`LabelFlip.transform_targets` to its batches and sends the update computed
on them; the update path (``__call__``) therefore just forwards ``own``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from dist_llm_train.attacks.base import Attack
from dist_llm_train.errors import ConfigError, PreconditionError

__all__ = ["LabelFlip"]

# A uniform random permutation is a derangement with probability ≈ 1/e, so a handful of draws suffice;
# the cap only turns a broken generator into an error instead of a hang.
_MAX_DRAWS = 1000


class LabelFlip(Attack):
    """Train on targets remapped by a fixed, seeded derangement of the vocabulary.

    Symptom: with the mean rule the model's loss on clean validation text rises towards (or above) the
    unigram entropy as f grows; because the poisoned updates have ordinary norms, norm-based defences do
    not notice, while distance-based rules need the flipped workers to be a clear minority.

    Args:
        vocab_size: size of the vocabulary the targets index (>= 2; a one-token vocabulary has no
            derangement). Must match the model's output size.
        seed: fixes the permutation; the same seed always gives the same mapping.
    """

    name: ClassVar[str] = "label-flip"
    is_data_attack: ClassVar[bool] = True
    needs_own = True

    def __init__(self, vocab_size: int, seed: int = 0) -> None:
        super().__init__(seed=seed)
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
            raise ConfigError(
                f"attack 'label-flip': vocab_size must be an integer >= 2 (the model's vocabulary size), "
                f"got {vocab_size!r}."
            )
        self.vocab_size = vocab_size
        self.permutation = self._derangement(vocab_size, seed)

    @staticmethod
    def _derangement(size: int, seed: int) -> Tensor:
        # Rejection sampling keeps the result uniform over all derangements (Sattolo's algorithm would only
        # produce single cycles).
        generator = torch.Generator().manual_seed(seed)
        identity = torch.arange(size)
        for _ in range(_MAX_DRAWS):
            perm = torch.randperm(size, generator=generator)
            if not bool((perm == identity).any()):
                return perm
        raise RuntimeError(f"no derangement of {size} tokens found in {_MAX_DRAWS} draws")  # pragma: no cover

    def transform_targets(self, targets: Tensor) -> Tensor:
        """Return a new tensor with every target token ``t`` replaced by ``π(t)``.

        Negative entries (ignore indices such as -100 used for masked-LM padding) are kept as they are, so
        the loss still skips them. ``targets`` is not modified.

        Raises:
            PreconditionError: ``targets`` is not an integer tensor or holds a token id >= vocab_size.
        """
        if not isinstance(targets, Tensor) or targets.is_floating_point() or targets.is_complex():
            raise PreconditionError(
                "label-flip: targets must be an integer (LongTensor) tensor of token ids."
            )
        if targets.dtype == torch.bool:
            raise PreconditionError("label-flip: targets must be token ids, got a bool tensor.")
        if targets.numel() and int(targets.max()) >= self.vocab_size:
            raise PreconditionError(
                f"label-flip: target id {int(targets.max())} is outside the vocabulary of size "
                f"{self.vocab_size}; build the attack with the model's vocab_size."
            )
        perm = self.permutation.to(targets.device)
        valid = targets >= 0
        flipped = perm[targets.clamp(min=0).long()].to(targets.dtype)
        return torch.where(valid, flipped, targets)

    def _forge(self, honest: Tensor, own: Tensor | None, f: int, generator: torch.Generator) -> Tensor:
        assert own is not None
        return own.unsqueeze(0).repeat(f, 1)

    def __repr__(self) -> str:
        return f"LabelFlip(vocab_size={self.vocab_size}, seed={self.seed})"
