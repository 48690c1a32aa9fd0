"""Built-in decoder-only GPT (nanoGPT style) behind the :class:`LanguageModel` interface.

Token + learned position embeddings, pre-LayerNorm blocks of causal self-attention
(``F.scaled_dot_product_attention(is_causal=True)``, flash/memory-efficient kernels where available) and a
4x GELU MLP, a final LayerNorm and an output projection tied to the token embedding. Initialisation is
GPT-2's: N(0, 0.02) everywhere, residual output projections scaled by 1/sqrt(2 * n_layer) so the residual
stream's variance does not grow with depth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from dist_llm_train.models.base import LanguageModel

INIT_STD = 0.02


@dataclass(frozen=True, slots=True)
class GPTShapes:
    """Architecture of a :class:`GPT`.

    Args:
        vocab_size: tokenizer vocabulary (rows of the tied embedding / columns of the logits).
        block_size: context length; the position table has this many rows.
        n_layer: transformer blocks. Depth buys quality per parameter but costs sequential latency.
        n_head: attention heads; ``n_embd`` must be divisible by it.
        n_embd: residual width. Parameters grow as 12 * n_layer * n_embd**2.
        dropout: dropout on attention weights, residual branches and embeddings. Raise it (0.1-0.2) when
            validation loss turns up while training loss keeps falling; keep 0 for short runs.
        bias: biases in Linear and LayerNorm layers. ``False`` is slightly faster and often as good.
    """

    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    bias: bool = True


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused QKV projection."""

    def __init__(self, shapes: GPTShapes) -> None:
        super().__init__()
        self.n_head = shapes.n_head
        self.dropout = shapes.dropout
        self.c_attn = nn.Linear(shapes.n_embd, 3 * shapes.n_embd, bias=shapes.bias)
        self.c_proj = nn.Linear(shapes.n_embd, shapes.n_embd, bias=shapes.bias)
        self.resid_dropout = nn.Dropout(shapes.dropout)

    def forward(self, x: Tensor) -> Tensor:
        batch, time, channels = x.shape
        q, k, v = self.c_attn(x).split(channels, dim=2)
        head_dim = channels // self.n_head
        q, k, v = (t.view(batch, time, self.n_head, head_dim).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(batch, time, channels)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: n_embd → 4·n_embd → GELU → n_embd."""

    def __init__(self, shapes: GPTShapes) -> None:
        super().__init__()
        self.c_fc = nn.Linear(shapes.n_embd, 4 * shapes.n_embd, bias=shapes.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * shapes.n_embd, shapes.n_embd, bias=shapes.bias)
        self.dropout = nn.Dropout(shapes.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, shapes: GPTShapes) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(shapes.n_embd, bias=shapes.bias)
        self.attn = CausalSelfAttention(shapes)
        self.ln_2 = nn.LayerNorm(shapes.n_embd, bias=shapes.bias)
        self.mlp = MLP(shapes)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(LanguageModel):
    """Decoder-only transformer trained on next-token prediction (``objective == "causal"``).

    Parameter names follow nanoGPT/GPT-2 (``transformer.wte``, ``transformer.h.0.attn.c_attn`` ...), so
    checkpoints and per-layer telemetry read the same as in those projects.
    """

    def __init__(self, shapes: GPTShapes, *, resolved: dict[str, Any] | None = None) -> None:
        super().__init__(
            objective="causal", vocab_size=shapes.vocab_size, block_size=shapes.block_size, shapes=resolved
        )
        self.gpt_shapes = shapes
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(shapes.vocab_size, shapes.n_embd),
                "wpe": nn.Embedding(shapes.block_size, shapes.n_embd),
                "drop": nn.Dropout(shapes.dropout),
                "h": nn.ModuleList(Block(shapes) for _ in range(shapes.n_layer)),
                "ln_f": nn.LayerNorm(shapes.n_embd, bias=shapes.bias),
            }
        )
        self.lm_head = nn.Linear(shapes.n_embd, shapes.vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017): one matrix embeds tokens and scores them, which saves
        # vocab_size * n_embd parameters and trains the rare-token rows through the output gradient.
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        residual_std = INIT_STD / math.sqrt(2 * shapes.n_layer)
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)

    def forward(self, inputs: Tensor) -> Tensor:
        self._check_inputs(inputs)
        time = inputs.shape[1]
        positions = self.transformer.wpe.weight[:time]
        x = self.transformer.drop(self.transformer.wte(inputs) + positions)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))
