"""Language models behind one training interface.

:func:`build_model` turns a :class:`~dist_llm_train.config.schema.ModelConfig` into a
:class:`LanguageModel`: the built-in nanoGPT-style :class:`GPT` (presets ``gpt-tiny``, ``gpt-small``,
``gpt2-124m``, ``custom``) or a Hugging Face GPT-2 / BERT (presets ``hf-gpt2``, ``hf-bert-mlm``; extra ``hf``).
Importing this package does not import ``transformers``; the Hugging Face builders do, on first use.
"""

from __future__ import annotations

from dist_llm_train.models.base import IGNORE_INDEX, Batch, LanguageModel, Objective, mask_tokens
from dist_llm_train.models.factory import PRESETS, build_model, model_config_from_shapes, resolve_model_shapes
from dist_llm_train.models.gpt import GPT, GPTShapes

__all__ = [
    "GPT",
    "IGNORE_INDEX",
    "PRESETS",
    "Batch",
    "GPTShapes",
    "LanguageModel",
    "Objective",
    "build_model",
    "mask_tokens",
    "model_config_from_shapes",
    "resolve_model_shapes",
]
