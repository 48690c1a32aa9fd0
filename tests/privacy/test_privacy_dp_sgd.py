"""Example-level DP-SGD on a tiny GPT-style language model, against an explicit per-sample loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dist_llm_train.errors import ConfigError, NonFiniteError, PreconditionError
from dist_llm_train.privacy import dp_sgd_gradients, per_sample_gradients

# torch.func has no batching rule for the CPU flash-attention kernel and falls back to a per-sample loop for
# that one op: correct (these tests check it), only slower, and it warns each time.
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

VOCAB, BLOCK, EMBD, HEADS = 19, 8, 32, 2


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(EMBD)
        self.qkv = nn.Linear(EMBD, 3 * EMBD)
        self.proj = nn.Linear(EMBD, EMBD)
        self.ln2 = nn.LayerNorm(EMBD)
        self.mlp = nn.Sequential(nn.Linear(EMBD, 4 * EMBD), nn.GELU(), nn.Linear(4 * EMBD, EMBD))

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(EMBD, dim=2)
        q, k, v = (z.view(b, t, HEADS, c // HEADS).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """GPT-style: token + position embeddings, causal attention, tied output head, a causal-mask buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(VOCAB, EMBD)
        self.wpe = nn.Embedding(BLOCK, EMBD)
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.ln_f = nn.LayerNorm(EMBD)
        self.head = nn.Linear(EMBD, VOCAB, bias=False)
        self.head.weight = self.wte.weight  # weight tying, as in GPT-2
        self.register_buffer("positions", torch.arange(BLOCK), persistent=False)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.wte(idx) + self.wpe(self.positions[: idx.shape[1]])
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over one sequence's tokens."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@pytest.fixture(scope="module")
def setup() -> tuple[TinyGPT, Tensor, Tensor]:
    torch.manual_seed(0)
    model = TinyGPT()
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(VOCAB, (6, BLOCK + 1), generator=gen)
    return model, tokens[:, :-1], tokens[:, 1:]


def _reference(model: nn.Module, x: Tensor, y: Tensor, clip: float, expected: float) -> dict[str, Tensor]:
    """The textbook loop: one backward per sample, clip, sum, divide."""
    params = dict(model.named_parameters())
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    for i in range(x.shape[0]):
        model.zero_grad(set_to_none=True)
        lm_loss(model(x[i : i + 1]), y[i : i + 1]).backward()
        grads = {name: p.grad.detach().clone() for name, p in params.items() if p.grad is not None}
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for name, g in grads.items():
            total[name] += g * factor
    model.zero_grad(set_to_none=True)
    return {name: t / expected for name, t in total.items()}


@pytest.mark.parametrize("clip", [1e-2, 1e3], ids=["all-clipped", "none-clipped"])
def test_matches_explicit_per_sample_loop(setup: tuple[TinyGPT, Tensor, Tensor], clip: float) -> None:
    model, x, y = setup
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    got = dp_sgd_gradients(model, lm_loss, x, y, clip_norm=clip, noise_multiplier=0.0, expected_batch_size=8)
    want = _reference(model, x, y, clip, expected=8)
    assert set(got) == set(want)
    assert "head.weight" not in got  # tied to wte.weight: one parameter, one gradient
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-5, rtol=0), name
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) and p.grad is None


def test_chunked_vmap_gives_the_same_result(setup: tuple[TinyGPT, Tensor, Tensor]) -> None:
    model, x, y = setup
    whole = per_sample_gradients(model, lm_loss, x, y)
    chunked = per_sample_gradients(model, lm_loss, x, y, chunk_size=4)
    for name in whole:
        assert whole[name].shape[0] == x.shape[0]
        assert torch.allclose(whole[name], chunked[name], atol=1e-6)


def test_noise_is_sigma_c_over_expected_batch(setup: tuple[TinyGPT, Tensor, Tensor]) -> None:
    model, x, y = setup
    clean = dp_sgd_gradients(model, lm_loss, x, y, 0.5, 0.0, expected_batch_size=4)
    noisy = dp_sgd_gradients(
        model, lm_loss, x, y, 0.5, 3.0, expected_batch_size=4, generator=torch.Generator().manual_seed(0)
    )
    diff = torch.cat([(noisy[n] - clean[n]).flatten() for n in clean])
    # Noise N(0, (σC)²) = N(0, 1.5²) on the sum, divided by 4 → std 0.375 over ~10k coordinates.
    assert diff.numel() > 10_000
    assert float(diff.std()) == pytest.approx(0.375, rel=0.03)
    again = dp_sgd_gradients(
        model, lm_loss, x, y, 0.5, 3.0, expected_batch_size=4, generator=torch.Generator().manual_seed(0)
    )
    assert all(torch.equal(again[n], noisy[n]) for n in noisy)


def test_empty_batch_is_pure_noise(setup: tuple[TinyGPT, Tensor, Tensor]) -> None:
    model, x, y = setup
    out = dp_sgd_gradients(model, lm_loss, x[:0], y[:0], 1.0, 0.0, expected_batch_size=4)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in out.values())


def test_frozen_parameters_get_no_gradient(setup: tuple[TinyGPT, Tensor, Tensor]) -> None:
    model, x, y = setup
    model.wpe.weight.requires_grad_(False)
    try:
        got = dp_sgd_gradients(model, lm_loss, x, y, 1e3, 0.0, expected_batch_size=6)
        want = _reference(model, x, y, 1e3, expected=6)
    finally:
        model.wpe.weight.requires_grad_(True)
    assert "wpe.weight" not in got
    for name in want:
        if name != "wpe.weight":
            assert torch.allclose(got[name], want[name], atol=1e-5, rtol=0), name


def test_bad_inputs(setup: tuple[TinyGPT, Tensor, Tensor]) -> None:
    model, x, y = setup
    with pytest.raises(ConfigError, match="clip_norm"):
        dp_sgd_gradients(model, lm_loss, x, y, 0.0, 1.0, 4)
    with pytest.raises(ConfigError, match="noise_multiplier"):
        dp_sgd_gradients(model, lm_loss, x, y, 1.0, math.nan, 4)
    with pytest.raises(ConfigError, match="expected_batch_size"):
        dp_sgd_gradients(model, lm_loss, x, y, 1.0, 1.0, 0)
    with pytest.raises(PreconditionError, match="same number of samples"):
        dp_sgd_gradients(model, lm_loss, x, y[:3], 1.0, 1.0, 4)

    def nan_loss(logits: Tensor, targets: Tensor) -> Tensor:
        return lm_loss(logits, targets) * math.nan

    with pytest.raises(NonFiniteError):
        dp_sgd_gradients(model, nan_loss, x, y, 1.0, 1.0, 4)
