"""Built-in GPT: presets, shapes, causality, initial loss, training, optimizer groups, determinism, errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from dist_llm_train.config.schema import ModelConfig
from dist_llm_train.errors import ConfigError, DataError, PreconditionError
from dist_llm_train.models import (
    GPT,
    PRESETS,
    Batch,
    LanguageModel,
    build_model,
    model_config_from_shapes,
    resolve_model_shapes,
)

BYTE_VOCAB = 256


def gpt_param_count(vocab: int, block: int, n_layer: int, n_embd: int, bias: bool = True) -> int:
    """Closed form for the tied-embedding GPT: 12·d² weights per block plus biases and LayerNorms."""
    d = n_embd
    per_block = 12 * d * d + (13 * d if bias else 2 * d)  # biases: qkv 3d, proj d, fc 4d, proj d; LN 2x(d+d)
    final_ln = 2 * d if bias else d
    return vocab * d + block * d + n_layer * per_block + final_ln


def tiny_custom(**overrides: object) -> ModelConfig:
    fields: dict[str, object] = {
        "preset": "custom",
        "n_layer": 2,
        "n_head": 2,
        "n_embd": 32,
        "block_size": 16,
    }
    fields.update(overrides)
    return ModelConfig(**fields)


@pytest.mark.parametrize(
    ("preset", "expected"),
    [("gpt-tiny", 842_496), ("gpt-small", 10_844_160)],
)
def test_small_presets_have_the_documented_parameter_counts(preset: str, expected: int) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset=preset), BYTE_VOCAB)
    shapes = PRESETS[preset]
    assert isinstance(model, GPT)
    assert model.num_parameters() == expected
    assert expected == gpt_param_count(BYTE_VOCAB, shapes["block_size"], shapes["n_layer"], shapes["n_embd"])
    # Only the position table is a pure lookup; the token table is tied to the output projection.
    assert model.num_parameters(exclude_embeddings=True) == expected - shapes["block_size"] * shapes["n_embd"]
    assert model.block_size == shapes["block_size"]
    assert model.vocab_size == BYTE_VOCAB
    assert model.objective == "causal"
    assert model.mask_token_id is None


def test_gpt2_124m_matches_gpt2_small() -> None:
    with torch.device("meta"):  # shapes only: a real fp32 init of 124M parameters takes ~10 s here
        model = build_model(ModelConfig(preset="gpt2-124m"), 50257)
    total = model.num_parameters()
    assert total == gpt_param_count(50257, 1024, 12, 768) == 124_439_808
    assert abs(total - 124e6) / 124e6 < 0.01
    assert model.transformer.wte.weight is model.lm_head.weight
    assert model.num_parameters(exclude_embeddings=True) == 124_439_808 - 1024 * 768


def test_custom_bias_false_drops_every_bias() -> None:
    model = build_model(tiny_custom(bias=False), 64)
    assert model.num_parameters() == gpt_param_count(64, 16, 2, 32, bias=False)
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())


@pytest.mark.parametrize("preset", ["gpt-tiny", "gpt-small"])
def test_logits_shape_and_initial_loss_is_uniform(preset: str) -> None:
    torch.manual_seed(1)
    model = build_model(ModelConfig(preset=preset), BYTE_VOCAB)
    tokens = torch.randint(
        0, BYTE_VOCAB, (2, model.block_size + 1), generator=torch.Generator().manual_seed(2)
    )
    batch = model.make_batch(tokens, None)
    with torch.no_grad():
        logits = model(batch.inputs)
        loss, metrics = model.loss_and_metrics(batch)
    assert logits.shape == (2, model.block_size, BYTE_VOCAB)
    assert abs(loss.item() - math.log(BYTE_VOCAB)) < 0.3
    assert metrics["tokens"].item() == 2 * model.block_size
    assert 0 <= metrics["correct"].item() <= metrics["tokens"].item()


def test_causal_batch_shifts_targets_by_one() -> None:
    model = build_model(tiny_custom(), 64)
    tokens = torch.arange(2 * 9).view(2, 9) % 64
    batch = model.make_batch(tokens, None)
    assert torch.equal(batch.inputs, tokens[:, :-1])
    assert torch.equal(batch.targets, tokens[:, 1:])
    assert batch.inputs.is_contiguous() and batch.targets.is_contiguous()


def test_future_tokens_do_not_change_earlier_logits() -> None:
    torch.manual_seed(3)
    model = build_model(tiny_custom(), 64).eval()
    inputs = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(4))
    changed = inputs.clone()
    changed[:, 10] = (changed[:, 10] + 7) % 64
    with torch.no_grad():
        before, after = model(inputs), model(changed)
    torch.testing.assert_close(before[:, :10], after[:, :10], rtol=0, atol=1e-6)
    assert (before[:, 10:] - after[:, 10:]).abs().max() > 1e-3


def test_metrics_count_correct_predictions() -> None:
    model = build_model(tiny_custom(), 64)
    tokens = torch.randint(0, 64, (3, 17), generator=torch.Generator().manual_seed(5))
    batch = model.make_batch(tokens, None)
    with torch.no_grad():
        loss, metrics = model.loss_and_metrics(batch)
        logits = model(batch.inputs)
    expected_correct = (logits.argmax(-1) == batch.targets).sum()
    assert metrics["correct"].item() == expected_correct.item()
    assert metrics["tokens"].item() == 3 * 16
    reference = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), batch.targets.reshape(-1))
    torch.testing.assert_close(loss, reference)


def test_adamw_steps_on_a_fixed_batch_reduce_the_loss() -> None:
    torch.manual_seed(6)
    model = build_model(tiny_custom(), 64)
    tokens = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(7))
    batch = model.make_batch(tokens, None)
    optimizer = model.configure_optimizer(weight_decay=0.1, lr=1e-2, betas=(0.9, 0.95), device_type="cpu")
    losses = []
    for _ in range(25):
        loss, _ = model.loss_and_metrics(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses


def test_configure_optimizer_decays_only_matrices() -> None:
    model = build_model(tiny_custom(), 64)
    optimizer = model.configure_optimizer(weight_decay=0.1, lr=1e-3, betas=(0.9, 0.99), device_type="cpu")
    assert isinstance(optimizer, torch.optim.AdamW)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert all(name.endswith("bias") or ".ln_" in name for name in not_decayed)
    assert "transformer.wte.weight" in decayed  # tied with lm_head.weight: listed once, under its first name
    assert "transformer.wpe.weight" in decayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == model.num_parameters()
    assert optimizer.defaults["fused"]  # the one-pass kernel on CPU as on CUDA
    assert optimizer.defaults["lr"] == 1e-3 and optimizer.defaults["betas"] == (0.9, 0.99)


def test_dropout_is_active_only_in_training_mode() -> None:
    model = build_model(tiny_custom(dropout=0.5), 64)
    inputs = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        model.train()
        assert not torch.equal(model(inputs), model(inputs))
        model.eval()
        assert torch.equal(model(inputs), model(inputs))


def test_two_builds_after_the_same_seed_are_bitwise_equal() -> None:
    states = []
    for _ in range(2):
        torch.manual_seed(1234)
        states.append(build_model(ModelConfig(preset="gpt-tiny"), BYTE_VOCAB).state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    torch.manual_seed(4321)
    other = build_model(ModelConfig(preset="gpt-tiny"), BYTE_VOCAB).state_dict()
    assert not torch.equal(other["lm_head.weight"], states[0]["lm_head.weight"])


def test_residual_projections_use_scaled_init() -> None:
    torch.manual_seed(9)
    model = build_model(ModelConfig(preset="gpt-tiny"), BYTE_VOCAB)
    expected = 0.02 / math.sqrt(2 * 4)
    for name, param in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert abs(param.std().item() - expected) < 0.1 * expected, name
        elif name.endswith("c_fc.weight"):
            assert abs(param.std().item() - 0.02) < 0.002, name
        elif name.endswith("bias"):
            assert torch.count_nonzero(param) == 0, name


def test_resolve_model_shapes_applies_overrides_and_round_trips() -> None:
    cfg = ModelConfig(preset="gpt-small", n_layer=2, block_size=64, dropout=0.1, bias=False)
    resolved = resolve_model_shapes(cfg)
    assert resolved == {
        "preset": "gpt-small",
        "family": "gpt",
        "objective": "causal",
        "n_layer": 2,
        "n_head": 6,
        "n_embd": 384,
        "block_size": 64,
        "dropout": 0.1,
        "bias": False,
        "mlm_probability": 0.15,
    }
    json.dumps(resolved)
    rebuilt = model_config_from_shapes(resolved)
    assert resolve_model_shapes(rebuilt) == resolved
    model = build_model(cfg, 300)
    assert model.shapes == {**resolved, "vocab_size": 300}
    assert resolve_model_shapes(model_config_from_shapes(model.shapes)) == resolved


@pytest.mark.parametrize(
    ("cfg", "fragment"),
    [
        (ModelConfig.model_construct(preset="gpt-huge"), "unknown model.preset 'gpt-huge'"),
        (ModelConfig.model_construct(preset="custom", n_layer=2, n_head=2, n_embd=32), "model.block_size"),
        (ModelConfig(preset="gpt-tiny", n_embd=130), "divisible by model.n_head (4)"),
        (ModelConfig(preset="gpt-small", n_head=5), "model.n_embd (384)"),
    ],
)
def test_bad_presets_and_shapes_raise_config_error(cfg: ModelConfig, fragment: str) -> None:
    # model_construct skips pydantic's validation, as a config assembled by code can; defaults still apply.
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        build_model(cfg, BYTE_VOCAB)


@pytest.mark.parametrize("vocab_size", [0, 1, True, 2.5])
def test_bad_vocab_size_raises_config_error(vocab_size: object) -> None:
    with pytest.raises(ConfigError, match="vocab_size must be an integer >= 2"):
        build_model(ModelConfig(), vocab_size)  # type: ignore[arg-type]


def test_make_batch_rejects_bad_windows() -> None:
    model = build_model(tiny_custom(), 64)
    with pytest.raises(DataError, match=r"span \[0, 64\]"):
        model.make_batch(torch.tensor([[0, 1, 64]]), None)
    with pytest.raises(PreconditionError, match="longer than block_size"):
        model.make_batch(torch.zeros(1, 18, dtype=torch.long), None)
    with pytest.raises(PreconditionError, match=r"\[batch, T\+1\]"):
        model.make_batch(torch.zeros(5, dtype=torch.long), None)
    with pytest.raises(PreconditionError, match="integer ids"):
        model.make_batch(torch.zeros(1, 4), None)
    with pytest.raises(PreconditionError, match="exceeds the model's block_size 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_batch_moves_both_tensors() -> None:
    batch = Batch(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long))
    moved = batch.to("meta")
    assert moved.inputs.device.type == "meta" and moved.targets.device.type == "meta"


def test_importing_the_package_does_not_import_transformers() -> None:
    code = (
        "import sys\n"
        "from dist_llm_train.config.schema import ModelConfig\n"
        "from dist_llm_train.models import build_model\n"
        "build_model(ModelConfig(preset='gpt-tiny'), 256)\n"
        "print('transformers' in sys.modules)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120, env=env
    )
    assert result.stdout.strip() == "False"


def test_language_model_is_the_common_base() -> None:
    assert isinstance(build_model(tiny_custom(), 64), LanguageModel)
