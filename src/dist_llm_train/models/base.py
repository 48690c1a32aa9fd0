"""The one training interface every model exposes: :class:`LanguageModel` and its :class:`Batch`.

The trainer, the workers and the simulator only ever talk to this interface, so a built-in GPT, a
Hugging Face GPT-2 and a Hugging Face BERT are interchangeable: they turn a window of token ids into a
:class:`Batch`, score it with the same cross-entropy and report the same ``tokens``/``correct`` counts.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dist_llm_train.errors import DataError, PreconditionError

Objective = Literal["causal", "mlm"]

IGNORE_INDEX = -100
# Device types with torch's fused AdamW and SGD kernels (torch >= 2.4): one pass over all parameters, no
# full-size temporaries. The trainer's and the parameter server's optimisers use them where they exist.
FUSED_OPTIMIZER_DEVICES = ("cpu", "cuda")
"""Target value of positions that are not scored (PyTorch's ``cross_entropy`` default ``ignore_index``)."""

# BERT's recipe (Devlin et al. 2019, section 3.1): of the selected positions 80% become [MASK], 10% a random
# token and 10% stay unchanged, so the model cannot rely on [MASK] marking every position it is scored on.
MASK_FRACTION = 0.8
RANDOM_FRACTION = 0.1


@dataclass(frozen=True, slots=True)
class Batch:
    """One training/evaluation batch.

    Args:
        inputs: token ids fed to the model, ``LongTensor[B, T]``.
        targets: ids the model is scored against, ``LongTensor[B, T]``; :data:`IGNORE_INDEX` (-100)
            marks positions that are not scored (every unmasked position of an MLM batch).
    """

    inputs: Tensor
    targets: Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Return the batch on ``device`` (``non_blocking=True`` overlaps the copy when memory is pinned)."""
        return Batch(
            self.inputs.to(device, non_blocking=non_blocking),
            self.targets.to(device, non_blocking=non_blocking),
        )


def mask_tokens(
    tokens: Tensor,
    *,
    vocab_size: int,
    mask_token_id: int,
    probability: float,
    generator: torch.Generator | None = None,
) -> Batch:
    """BERT masking of ``tokens`` (``LongTensor[B, T]``): returns the corrupted inputs and the MLM targets.

    Each position is selected independently with ``probability``; selected positions become
    ``mask_token_id`` (80%), a uniformly random id in ``[0, vocab_size)`` (10%) or stay unchanged (10%).
    Targets hold the original id at selected positions and -100 elsewhere. At least one position is
    selected so the loss is always defined, even for a tiny batch at a low rate.

    All random numbers are drawn from ``generator`` on the generator's own device and then moved to the
    tokens' device, so a generator seeded per step gives the same masks on CPU and on GPU.
    """
    if not 0.0 < probability < 1.0:
        raise PreconditionError(
            f"mlm probability must lie in (0, 1), got {probability}; set model.mlm_probability."
        )
    draw_device = generator.device if generator is not None else tokens.device
    shape = tokens.shape
    selected = torch.rand(shape, generator=generator, device=draw_device) < probability
    # A fallback position is drawn unconditionally and only used when nothing was selected: this keeps the
    # random stream identical for every batch and needs no host sync (no data-dependent branch).
    fallback = torch.randint(tokens.numel(), (1,), generator=generator, device=draw_device)
    flat = selected.view(-1)
    flat[fallback] = flat[fallback] | ~selected.any()
    decision = torch.rand(shape, generator=generator, device=draw_device)
    random_ids = torch.randint(vocab_size, shape, generator=generator, device=draw_device)

    selected = selected.to(tokens.device)
    decision = decision.to(tokens.device)
    random_ids = random_ids.to(tokens.device)
    use_mask = selected & (decision < MASK_FRACTION)
    use_random = selected & (decision >= MASK_FRACTION) & (decision < MASK_FRACTION + RANDOM_FRACTION)

    inputs = torch.where(use_mask, torch.full_like(tokens, mask_token_id), tokens)
    inputs = torch.where(use_random, random_ids, inputs)
    targets = torch.where(selected, tokens, torch.full_like(tokens, IGNORE_INDEX))
    return Batch(inputs, targets)


class LanguageModel(nn.Module, abc.ABC):
    """A language model behind the training interface shared by every model in this package.

    Subclasses implement :meth:`forward` (token ids → logits over the tokenizer vocabulary); everything
    else (batching, masking, loss, metrics, optimizer groups) lives here so that all models are scored
    identically.

    Attributes:
        objective: ``"causal"`` (predict the next token) or ``"mlm"`` (predict masked tokens, BERT).
        block_size: longest input the model accepts (its position table); windows are ``block_size + 1``
            tokens long because inputs and targets are shifted by one.
        vocab_size: tokenizer vocabulary; logits have this many columns. An MLM model's embedding has one
            extra row, the [MASK] id ``mask_token_id == vocab_size``.
        mlm_probability: fraction of positions an MLM batch scores (ignored for causal models). If MLM
            loss plateaus high, too few positions are scored per step; if accuracy on unmasked text is
            poor, too many are.
        shapes: the resolved architecture (see :func:`~dist_llm_train.models.resolve_model_shapes`);
            store it in checkpoints so a model can be rebuilt without the original config.
    """

    def __init__(
        self,
        *,
        objective: Objective,
        vocab_size: int,
        block_size: int,
        mlm_probability: float = 0.15,
        shapes: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.objective: Objective = objective
        self.vocab_size = int(vocab_size)
        self.block_size = int(block_size)
        self.mlm_probability = float(mlm_probability)
        self.shapes: dict[str, Any] = dict(shapes or {})

    @property
    def mask_token_id(self) -> int | None:
        """The [MASK] id of an MLM model (``vocab_size``, one past the tokenizer's ids); None if causal."""
        return self.vocab_size if self.objective == "mlm" else None

    @abc.abstractmethod
    def forward(self, inputs: Tensor) -> Tensor:
        """Logits ``FloatTensor[B, T, vocab_size]`` for token ids ``LongTensor[B, T]`` with ``T <= block_size``."""

    def _check_inputs(self, inputs: Tensor) -> None:
        if inputs.dim() != 2:
            raise PreconditionError(
                f"model inputs must be a [batch, time] tensor, got shape {tuple(inputs.shape)}."
            )
        if inputs.shape[1] > self.block_size:
            raise PreconditionError(
                f"input length {inputs.shape[1]} exceeds the model's block_size {self.block_size}; "
                "cut windows to block_size + 1 tokens or raise model.block_size."
            )

    def make_batch(self, tokens: Tensor, generator: torch.Generator | None = None) -> Batch:
        """Turn windows ``LongTensor[B, T+1]`` into a :class:`Batch` for this model's objective.

        causal: ``inputs = tokens[:, :-1]``, ``targets = tokens[:, 1:]``. mlm: ``inputs = tokens[:, :-1]``
        with BERT masking (see :func:`mask_tokens`), targets the original ids at the masked positions.
        ``generator`` drives the masking; seed it per step so every worker and every replay masks alike
        (``None`` draws from torch's global RNG, which is not reproducible across processes). Causal
        batches draw no random numbers.
        """
        if tokens.dim() != 2 or tokens.shape[1] < 2:
            raise PreconditionError(
                f"make_batch needs token windows of shape [batch, T+1] with T >= 1, got {tuple(tokens.shape)}."
            )
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise PreconditionError(f"token windows must hold integer ids, got dtype {tokens.dtype}.")
        if tokens.shape[1] - 1 > self.block_size:
            raise PreconditionError(
                f"token windows of length {tokens.shape[1]} are longer than block_size + 1 = "
                f"{self.block_size + 1}; cut windows to block_size + 1 tokens or raise model.block_size."
            )
        tokens = tokens.long()
        lo, hi = (int(v) for v in torch.aminmax(tokens))  # one host sync for both bounds
        if lo < 0 or hi >= self.vocab_size:
            raise DataError(
                f"token ids span [{lo}, {hi}] but the model's vocabulary has {self.vocab_size} ids; build the "
                "model with the tokenizer's vocab_size (a tokenizer/checkpoint mismatch gives this error)."
            )
        inputs = tokens[:, :-1]
        if self.objective == "causal":
            return Batch(inputs.contiguous(), tokens[:, 1:].contiguous())
        assert self.mask_token_id is not None
        return mask_tokens(
            inputs.contiguous(),
            vocab_size=self.vocab_size,
            mask_token_id=self.mask_token_id,
            probability=self.mlm_probability,
            generator=generator,
        )

    def loss_and_metrics(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean cross-entropy over scored targets and the counts ``{"tokens", "correct"}``.

        ``tokens`` is the number of scored targets and ``correct`` how many of them the argmax predicts;
        both are detached integer tensors, so summing them over steps/workers gives exact accuracy.
        """
        logits = self(batch.inputs)
        flat_logits = logits.reshape(-1, logits.shape[-1])
        flat_targets = batch.targets.reshape(-1)
        # Cross-entropy in fp32 even under autocast: a bf16 log-softmax over a 50k vocabulary loses the
        # small differences that late-training loss curves are made of.
        loss = F.cross_entropy(flat_logits.float(), flat_targets, ignore_index=IGNORE_INDEX)
        with torch.no_grad():
            scored = flat_targets != IGNORE_INDEX
            correct = (flat_logits.argmax(dim=-1) == flat_targets) & scored
            metrics = {"tokens": scored.sum(), "correct": correct.sum()}
        return loss, metrics

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters (a tied weight counts once).

        ``exclude_embeddings=True`` leaves out tables that are only looked up (position and token-type
        embeddings, and the token embedding unless it is tied to the output projection, where it does
        matmul work). This is nanoGPT's ``get_num_params(non_embedding=True)``; use it for 6·N FLOP
        estimates.
        """
        params = {id(p): p for p in self.parameters()}
        if not exclude_embeddings:
            return sum(p.numel() for p in params.values())
        lookup_only: set[int] = set()
        used_elsewhere: set[int] = set()
        for module in self.modules():
            direct = {id(p) for p in module.parameters(recurse=False)}
            (lookup_only if isinstance(module, nn.Embedding) else used_elsewhere).update(direct)
        excluded = lookup_only - used_elsewhere
        return sum(p.numel() for key, p in params.items() if key not in excluded)

    def configure_optimizer(
        self,
        weight_decay: float,
        lr: float,
        betas: tuple[float, float],
        device_type: str,
    ) -> torch.optim.AdamW:
        """AdamW with weight decay on matrices and embeddings (≥2-D) only, nanoGPT style.

        Biases and LayerNorm gains are not decayed: shrinking them towards zero only fights the
        normalisation. On ``cuda`` and ``cpu`` the fused kernel does the step (one pass over all parameters, no
        temporaries; on a CPU several times faster than the per-tensor loop, see benchmarks/server_step.py).
        If training diverges late, lower ``lr`` before raising ``weight_decay``.
        """
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for param in self.parameters():  # parameters() yields a tied weight once
            if param.requires_grad:
                (decay if param.dim() >= 2 else no_decay).append(param)
        groups = [
            {"params": decay, "weight_decay": float(weight_decay)},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type in FUSED_OPTIMIZER_DEVICES)
