"""BERT masking (:func:`mask_tokens`): rates, the 80/10/10 split, invariants and determinism."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_llm_train.errors import PreconditionError
from dist_llm_train.models import IGNORE_INDEX, mask_tokens

VOCAB = 1000
MASK_ID = VOCAB


def test_selection_rate_and_80_10_10_split_on_a_large_batch() -> None:
    tokens = torch.randint(0, VOCAB, (256, 512), generator=torch.Generator().manual_seed(0))
    batch = mask_tokens(
        tokens,
        vocab_size=VOCAB,
        mask_token_id=MASK_ID,
        probability=0.15,
        generator=torch.Generator().manual_seed(1),
    )
    selected = batch.targets != IGNORE_INDEX
    n_selected = selected.sum().item()
    # 131,072 positions: the standard error of the rate is 0.001, so 0.005 is a 5-sigma band.
    assert abs(n_selected / tokens.numel() - 0.15) < 0.005
    masked = (batch.inputs == MASK_ID) & selected
    unchanged = (batch.inputs == tokens) & selected
    replaced = selected & ~masked & ~unchanged
    # ~19,700 selected: standard errors 0.003 (80%) and 0.002 (10%); a random id equals the original w.p. 1/V.
    assert abs(masked.sum().item() / n_selected - 0.8) < 0.015
    assert abs(replaced.sum().item() / n_selected - 0.1 * (1 - 1 / VOCAB)) < 0.01
    assert abs(unchanged.sum().item() / n_selected - 0.1 * (1 + 1 / VOCAB)) < 0.01
    assert torch.equal(batch.targets[selected], tokens[selected])
    assert torch.equal(batch.inputs[~selected], tokens[~selected])
    assert batch.inputs[replaced].max().item() < VOCAB
    # Replacement ids are spread over the whole vocabulary, not a constant.
    assert batch.inputs[replaced].unique().numel() > 500


def test_other_rates_are_honoured() -> None:
    tokens = torch.randint(0, VOCAB, (64, 512), generator=torch.Generator().manual_seed(2))
    batch = mask_tokens(
        tokens,
        vocab_size=VOCAB,
        mask_token_id=MASK_ID,
        probability=0.4,
        generator=torch.Generator().manual_seed(3),
    )
    assert abs((batch.targets != IGNORE_INDEX).float().mean().item() - 0.4) < 0.01


def test_same_generator_seed_gives_the_same_masks_and_different_seeds_differ() -> None:
    tokens = torch.randint(0, VOCAB, (8, 64), generator=torch.Generator().manual_seed(4))

    def masked(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        batch = mask_tokens(tokens, vocab_size=VOCAB, mask_token_id=MASK_ID, probability=0.15, generator=gen)
        return batch.inputs, batch.targets

    first, again, other = masked(7), masked(7), masked(8)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[1], other[1])


def test_at_least_one_position_is_always_selected() -> None:
    tokens = torch.randint(0, VOCAB, (1, 3), generator=torch.Generator().manual_seed(5))
    positions = set()
    for seed in range(200):
        batch = mask_tokens(
            tokens,
            vocab_size=VOCAB,
            mask_token_id=MASK_ID,
            probability=0.01,
            generator=torch.Generator().manual_seed(seed),
        )
        selected = (batch.targets != IGNORE_INDEX).view(-1)
        assert selected.sum().item() >= 1
        positions.update(selected.nonzero().view(-1).tolist())
    assert positions == {0, 1, 2}  # the forced position is drawn uniformly, not always the first


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 4),
    time=st.integers(1, 40),
    vocab=st.integers(2, 50),
    probability=st.floats(0.01, 0.99),
    seed=st.integers(0, 2**31 - 1),
)
def test_masking_invariants(batch: int, time: int, vocab: int, probability: float, seed: int) -> None:
    tokens = torch.randint(0, vocab, (batch, time), generator=torch.Generator().manual_seed(seed))
    out = mask_tokens(
        tokens,
        vocab_size=vocab,
        mask_token_id=vocab,
        probability=probability,
        generator=torch.Generator().manual_seed(seed),
    )
    selected = out.targets != IGNORE_INDEX
    assert out.inputs.shape == tokens.shape and out.targets.shape == tokens.shape
    assert out.inputs.dtype == torch.long and out.targets.dtype == torch.long
    assert selected.any()
    assert torch.equal(out.targets[selected], tokens[selected])
    assert torch.equal(out.inputs[~selected], tokens[~selected])
    assert out.inputs.min().item() >= 0 and out.inputs.max().item() <= vocab
    assert tokens.max().item() < vocab  # the input itself was not modified in place


def test_probability_outside_the_open_unit_interval_is_refused() -> None:
    tokens = torch.zeros(2, 4, dtype=torch.long)
    for probability in (0.0, 1.0):
        with pytest.raises(PreconditionError, match=r"mlm probability must lie in \(0, 1\)"):
            mask_tokens(tokens, vocab_size=VOCAB, mask_token_id=MASK_ID, probability=probability)
