"""Hugging Face ``transformers`` models behind the :class:`LanguageModel` interface (extra ``hf``).

Models are built from a config only: no weights are downloaded and no network is touched (the attention
implementation is named explicitly, so transformers never probes the Hub). The wrappers compute the loss
from the logits in :class:`LanguageModel` so every model shares one metric code path.

``transformers`` is imported inside the builders, never at module import, because importing it costs
seconds and most runs use the built-in GPT.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from torch import Tensor, nn

from dist_llm_train.errors import ConfigError
from dist_llm_train.models.base import LanguageModel

# Named explicitly so transformers neither guesses (and warns) nor looks anything up; SDPA uses the same
# fused kernels as the built-in GPT.
ATTN_IMPLEMENTATION = "sdpa"


def import_transformers() -> ModuleType:
    """Import ``transformers`` or raise a :class:`ConfigError` that says how to install it."""
    try:
        return importlib.import_module("transformers")
    except ImportError as exc:
        raise ConfigError(
            "model presets 'hf-gpt2' and 'hf-bert-mlm' need the transformers library; install it with "
            "pip install 'dist-llm-train[hf]' or pick a built-in preset (gpt-tiny, gpt-small, gpt2-124m)."
        ) from exc


class HFCausalLM(LanguageModel):
    """A Hugging Face causal LM (e.g. ``GPT2LMHeadModel``) trained on next-token prediction."""

    def __init__(
        self, model: nn.Module, *, vocab_size: int, block_size: int, resolved: dict[str, Any]
    ) -> None:
        super().__init__(objective="causal", vocab_size=vocab_size, block_size=block_size, shapes=resolved)
        self.hf = model

    def forward(self, inputs: Tensor) -> Tensor:
        self._check_inputs(inputs)
        return self.hf(input_ids=inputs, use_cache=False).logits


class HFMaskedLM(LanguageModel):
    """A Hugging Face masked LM (e.g. ``BertForMaskedLM``) trained with BERT masking.

    The wrapped model's vocabulary is ``vocab_size + 1``: the extra last id is [MASK]. Its logit column is
    dropped in :meth:`forward` because [MASK] is never a target, so logits match the tokenizer vocabulary
    like every other model's and the initial loss is ln(vocab_size).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        vocab_size: int,
        block_size: int,
        mlm_probability: float,
        resolved: dict[str, Any],
    ) -> None:
        super().__init__(
            objective="mlm",
            vocab_size=vocab_size,
            block_size=block_size,
            mlm_probability=mlm_probability,
            shapes=resolved,
        )
        self.hf = model

    def forward(self, inputs: Tensor) -> Tensor:
        self._check_inputs(inputs)
        return self.hf(input_ids=inputs).logits[..., : self.vocab_size]


def build_hf_gpt2(resolved: dict[str, Any], vocab_size: int) -> HFCausalLM:
    """``GPT2LMHeadModel(GPT2Config(...))`` with randomly initialised weights from ``resolved`` shapes."""
    transformers = import_transformers()
    config = transformers.GPT2Config(
        vocab_size=vocab_size,
        n_positions=resolved["block_size"],
        n_embd=resolved["n_embd"],
        n_layer=resolved["n_layer"],
        n_head=resolved["n_head"],
        resid_pdrop=resolved["dropout"],
        embd_pdrop=resolved["dropout"],
        attn_pdrop=resolved["dropout"],
        use_cache=False,
        # GPT-2's BOS/EOS id 50256 only matters for generation and lies outside small vocabularies.
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=True,
        attn_implementation=ATTN_IMPLEMENTATION,
    )
    model = transformers.GPT2LMHeadModel(config)
    return HFCausalLM(model, vocab_size=vocab_size, block_size=resolved["block_size"], resolved=resolved)


def build_hf_bert_mlm(resolved: dict[str, Any], vocab_size: int) -> HFMaskedLM:
    """``BertForMaskedLM(BertConfig(...))`` with an extra [MASK] row, randomly initialised."""
    transformers = import_transformers()
    config = transformers.BertConfig(
        vocab_size=vocab_size + 1,  # + [MASK], whose id is vocab_size
        hidden_size=resolved["n_embd"],
        num_hidden_layers=resolved["n_layer"],
        num_attention_heads=resolved["n_head"],
        intermediate_size=4 * resolved["n_embd"],
        max_position_embeddings=resolved["block_size"],
        hidden_dropout_prob=resolved["dropout"],
        attention_probs_dropout_prob=resolved["dropout"],
        # No padding in fixed-length windows; a pad id of 0 would freeze the embedding of a real token.
        pad_token_id=None,
        tie_word_embeddings=True,
        attn_implementation=ATTN_IMPLEMENTATION,
    )
    model = transformers.BertForMaskedLM(config)
    return HFMaskedLM(
        model,
        vocab_size=vocab_size,
        block_size=resolved["block_size"],
        mlm_probability=resolved["mlm_probability"],
        resolved=resolved,
    )
