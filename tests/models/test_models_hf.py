"""Hugging Face presets (hf-gpt2, hf-bert-mlm) behind the LanguageModel interface."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from dist_llm_train.config.schema import ModelConfig
from dist_llm_train.errors import ConfigError
from dist_llm_train.models import IGNORE_INDEX, LanguageModel, build_model, resolve_model_shapes

VOCAB = 256


def small(preset: str, **overrides: object) -> ModelConfig:
    fields: dict[str, object] = {"preset": preset, "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16}
    fields.update(overrides)
    return ModelConfig(**fields)


def train_steps(model: LanguageModel, tokens: torch.Tensor, steps: int) -> list[float]:
    batch = model.make_batch(tokens, torch.Generator().manual_seed(0))  # one fixed batch (and mask)
    optimizer = model.configure_optimizer(weight_decay=0.1, lr=1e-2, betas=(0.9, 0.95), device_type="cpu")
    losses = []
    for _ in range(steps):
        loss, _ = model.loss_and_metrics(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_hf_gpt2_default_preset_shapes_and_initial_loss() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="hf-gpt2"), VOCAB)
    assert model.objective == "causal" and model.block_size == 128 and model.vocab_size == VOCAB
    # Same architecture as the built-in gpt-tiny (4 layers, 4 heads, 128 wide, block 128, tied).
    assert model.num_parameters() == 842_496
    assert model.hf.config._attn_implementation == "sdpa"
    assert model.hf.lm_head.weight is model.hf.transformer.wte.weight
    tokens = torch.randint(0, VOCAB, (2, 129), generator=torch.Generator().manual_seed(1))
    batch = model.make_batch(tokens, None)
    with torch.no_grad():
        logits = model(batch.inputs)
        loss, metrics = model.loss_and_metrics(batch)
    assert logits.shape == (2, 128, VOCAB)
    assert abs(loss.item() - math.log(VOCAB)) < 0.3
    assert metrics["tokens"].item() == 256


def test_hf_gpt2_is_causal() -> None:
    torch.manual_seed(2)
    model = build_model(small("hf-gpt2"), VOCAB).eval()
    inputs = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    changed = inputs.clone()
    changed[:, 9] = (changed[:, 9] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(inputs), model(changed)
    torch.testing.assert_close(before[:, :9], after[:, :9], rtol=0, atol=1e-6)
    assert (before[:, 9:] - after[:, 9:]).abs().max() > 1e-3


def test_hf_gpt2_training_reduces_loss() -> None:
    torch.manual_seed(4)
    model = build_model(small("hf-gpt2"), 64)
    tokens = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(5))
    losses = train_steps(model, tokens, 25)
    assert losses[-1] < losses[0] - 1.0, losses


def test_bert_preset_shapes_mask_row_and_initial_loss() -> None:
    torch.manual_seed(6)
    model = build_model(ModelConfig(preset="hf-bert-mlm"), VOCAB)
    assert model.objective == "mlm" and model.mask_token_id == VOCAB
    bert = model.hf
    assert bert.config._attn_implementation == "sdpa"
    assert bert.config.num_hidden_layers == 4 and bert.config.num_attention_heads == 4
    assert bert.config.hidden_size == 128 and bert.config.intermediate_size == 512
    assert bert.config.max_position_embeddings == 128
    assert bert.bert.embeddings.word_embeddings.weight.shape == (VOCAB + 1, 128)
    assert bert.bert.embeddings.word_embeddings.padding_idx is None
    # Lookup-only tables: positions (128x128) and token types (2x128); the word table is tied to the decoder.
    assert model.num_parameters() - model.num_parameters(exclude_embeddings=True) == 128 * 128 + 2 * 128
    tokens = torch.randint(0, VOCAB, (4, 129), generator=torch.Generator().manual_seed(7))
    batch = model.make_batch(tokens, torch.Generator().manual_seed(8))
    assert (batch.inputs == VOCAB).any()  # [MASK] appears in the inputs
    with torch.no_grad():
        logits = model(batch.inputs)
        loss, metrics = model.loss_and_metrics(batch)
    assert logits.shape == (4, 128, VOCAB)  # the [MASK] column is never a target and is dropped
    assert metrics["tokens"].item() == (batch.targets != IGNORE_INDEX).sum().item()
    assert abs(loss.item() - math.log(VOCAB)) < 0.3


def test_bert_make_batch_is_deterministic_per_generator() -> None:
    model = build_model(small("hf-bert-mlm", mlm_probability=0.3), VOCAB)
    tokens = torch.randint(0, VOCAB, (8, 17), generator=torch.Generator().manual_seed(9))
    first = model.make_batch(tokens, torch.Generator().manual_seed(10))
    again = model.make_batch(tokens, torch.Generator().manual_seed(10))
    other = model.make_batch(tokens, torch.Generator().manual_seed(11))
    assert torch.equal(first.inputs, again.inputs) and torch.equal(first.targets, again.targets)
    assert not torch.equal(first.targets, other.targets)
    selected = first.targets != IGNORE_INDEX
    assert torch.equal(first.targets[selected], tokens[:, :-1][selected])
    assert 0.15 < selected.float().mean().item() < 0.45


def test_bert_training_reduces_loss_and_raises_accuracy() -> None:
    torch.manual_seed(12)
    model = build_model(small("hf-bert-mlm", mlm_probability=0.3), 64)
    tokens = torch.randint(0, 64, (8, 17), generator=torch.Generator().manual_seed(13))
    losses = train_steps(model, tokens, 30)
    assert losses[-1] < losses[0] - 1.0, losses
    batch = model.make_batch(tokens, torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, metrics = model.loss_and_metrics(batch)
    assert metrics["correct"].item() / metrics["tokens"].item() > 0.5


def test_hf_builds_are_bitwise_reproducible() -> None:
    for preset in ("hf-gpt2", "hf-bert-mlm"):
        states = []
        for _ in range(2):
            torch.manual_seed(99)
            states.append(build_model(small(preset), VOCAB).state_dict())
        assert states[0].keys() == states[1].keys()
        assert all(torch.equal(states[0][k], states[1][k]) for k in states[0]), preset


def test_hf_optimizer_groups_skip_biases_and_layernorms() -> None:
    model = build_model(small("hf-bert-mlm"), VOCAB)
    decay, no_decay = model.configure_optimizer(0.1, 1e-3, (0.9, 0.99), "cpu").param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith(("bias", "LayerNorm.weight")) for p in no_decay["params"])
    assert all(p.dim() >= 2 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_hf_presets_reject_bias_false() -> None:
    with pytest.raises(ConfigError, match=r"model\.bias=false is not supported by preset 'hf-gpt2'"):
        build_model(ModelConfig(preset="hf-gpt2", bias=False), VOCAB)


def test_hf_presets_resolve_their_family_and_objective() -> None:
    assert resolve_model_shapes(ModelConfig(preset="hf-bert-mlm"))["objective"] == "mlm"
    assert resolve_model_shapes(ModelConfig(preset="hf-gpt2"))["family"] == "hf-gpt2"


def test_missing_transformers_is_a_config_error_with_the_install_hint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` raise ImportError
    for preset in ("hf-gpt2", "hf-bert-mlm"):
        with pytest.raises(ConfigError, match=r"pip install 'dist-llm-train\[hf\]'"):
            build_model(ModelConfig(preset=preset), VOCAB)
    # The built-in presets do not need it.
    assert build_model(small("custom"), VOCAB).objective == "causal"
