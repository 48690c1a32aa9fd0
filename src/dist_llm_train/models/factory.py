"""Presets and the model factory: :func:`resolve_model_shapes` and :func:`build_model`.

Parameter counts of the built-in presets with the byte tokenizer (vocab 256, tied embeddings, bias on):
``gpt-tiny`` 842,496 (≈0.84M), ``gpt-small`` 10,844,160 (≈10.8M); ``gpt2-124m`` with GPT-2's vocab 50257 has
124,439,808 (GPT-2 small). If a run underfits, move up a preset before training longer; if steps are too
slow for the workers' hardware, move down or shorten ``block_size`` (attention cost grows with it).
"""

from __future__ import annotations

from typing import Any, Literal

from dist_llm_train.config.schema import ModelConfig
from dist_llm_train.errors import ConfigError
from dist_llm_train.models.base import LanguageModel, Objective
from dist_llm_train.models.gpt import GPT, GPTShapes

Family = Literal["gpt", "hf-gpt2", "hf-bert"]

# Each preset: the family that builds it, its objective and default shapes (None: must come from the config).
PRESETS: dict[str, dict[str, Any]] = {
    "gpt-tiny": {
        "family": "gpt",
        "objective": "causal",
        "n_layer": 4,
        "n_head": 4,
        "n_embd": 128,
        "block_size": 128,
    },
    "gpt-small": {
        "family": "gpt",
        "objective": "causal",
        "n_layer": 6,
        "n_head": 6,
        "n_embd": 384,
        "block_size": 256,
    },
    "gpt2-124m": {
        "family": "gpt",
        "objective": "causal",
        "n_layer": 12,
        "n_head": 12,
        "n_embd": 768,
        "block_size": 1024,
    },
    "hf-gpt2": {
        "family": "hf-gpt2",
        "objective": "causal",
        "n_layer": 4,
        "n_head": 4,
        "n_embd": 128,
        "block_size": 128,
    },
    "hf-bert-mlm": {
        "family": "hf-bert",
        "objective": "mlm",
        "n_layer": 4,
        "n_head": 4,
        "n_embd": 128,
        "block_size": 128,
    },
    "custom": {
        "family": "gpt",
        "objective": "causal",
        "n_layer": None,
        "n_head": None,
        "n_embd": None,
        "block_size": None,
    },
}

SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "block_size")


def resolve_model_shapes(cfg: ModelConfig) -> dict[str, Any]:
    """The complete architecture of ``cfg``: preset values, overridden by every field set in ``cfg``.

    Returns a JSON-serialisable dict with ``preset``, ``family`` (gpt / hf-gpt2 / hf-bert), ``objective``,
    ``n_layer``, ``n_head``, ``n_embd``, ``block_size``, ``dropout``, ``bias`` and ``mlm_probability``.
    Store it in checkpoints; :func:`model_config_from_shapes` turns it back into a :class:`ModelConfig`.

    Raises:
        ConfigError: unknown preset, a missing shape for ``custom``, ``n_embd`` not divisible by ``n_head``
            after merging, or ``bias=False`` for a Hugging Face preset (those always have biases).
    """
    preset = PRESETS.get(cfg.preset)
    if preset is None:
        raise ConfigError(f"unknown model.preset {cfg.preset!r}; choose one of {', '.join(PRESETS)}.")
    resolved: dict[str, Any] = {
        "preset": cfg.preset,
        "family": preset["family"],
        "objective": preset["objective"],
    }
    for name in SHAPE_FIELDS:
        value = getattr(cfg, name)
        resolved[name] = int(value) if value is not None else preset[name]
        if resolved[name] is None:
            raise ConfigError(f"model.preset {cfg.preset!r} needs model.{name}; set it in the config.")
    if resolved["n_embd"] % resolved["n_head"]:
        raise ConfigError(
            f"model.n_embd ({resolved['n_embd']}) must be divisible by model.n_head ({resolved['n_head']}) "
            f"for preset {cfg.preset!r}; change one of them so that n_embd / n_head is a whole head size."
        )
    if preset["family"] != "gpt" and not cfg.bias:
        raise ConfigError(
            f"model.bias=false is not supported by preset {cfg.preset!r} (Hugging Face models always have "
            "biases); remove model.bias or use a built-in gpt preset."
        )
    resolved["dropout"] = float(cfg.dropout)
    resolved["bias"] = bool(cfg.bias)
    resolved["mlm_probability"] = float(cfg.mlm_probability)
    return resolved


def model_config_from_shapes(resolved: dict[str, Any]) -> ModelConfig:
    """The :class:`ModelConfig` that rebuilds the model described by a :func:`resolve_model_shapes` dict."""
    fields = set(ModelConfig.model_fields)
    try:
        return ModelConfig(**{k: v for k, v in resolved.items() if k in fields})
    except ValueError as exc:
        raise ConfigError(f"the stored model shapes are not a valid model config: {exc}") from exc


def build_model(cfg: ModelConfig, vocab_size: int) -> LanguageModel:
    """Build the model ``cfg`` describes for a tokenizer with ``vocab_size`` ids, randomly initialised.

    Call ``torch.manual_seed(seed)`` first for a reproducible initialisation (two builds after the same
    seed are bitwise equal). The model is on the CPU in fp32; move it with ``.to(device)``.

    Raises:
        ConfigError: see :func:`resolve_model_shapes`; a ``vocab_size`` below 2; a Hugging Face preset
            without ``transformers`` installed.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
        raise ConfigError(f"vocab_size must be an integer >= 2, got {vocab_size!r}; check the tokenizer.")
    # The model keeps its vocabulary next to the shapes so a checkpoint of ``model.shapes`` is self-describing.
    resolved = {**resolve_model_shapes(cfg), "vocab_size": vocab_size}
    family: Family = resolved["family"]
    objective: Objective = resolved["objective"]
    if family == "gpt":
        shapes = GPTShapes(
            vocab_size=vocab_size,
            block_size=resolved["block_size"],
            n_layer=resolved["n_layer"],
            n_head=resolved["n_head"],
            n_embd=resolved["n_embd"],
            dropout=resolved["dropout"],
            bias=resolved["bias"],
        )
        model: LanguageModel = GPT(shapes, resolved=resolved)
    elif family == "hf-gpt2":
        from dist_llm_train.models.hf import build_hf_gpt2

        model = build_hf_gpt2(resolved, vocab_size)
    else:
        from dist_llm_train.models.hf import build_hf_bert_mlm

        model = build_hf_bert_mlm(resolved, vocab_size)
    assert model.objective == objective
    return model
