from __future__ import annotations

import itertools

import pytest

from dist_llm_train.training.schedule import lr_at


def test_warmup_cosine_endpoints() -> None:
    kw = {"lr": 1.0, "min_lr": 0.1, "warmup_steps": 10, "decay_steps": 110}
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)
    assert lr_at(110, **kw) == pytest.approx(0.1)
    assert lr_at(10_000, **kw) == pytest.approx(0.1)
    values = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_no_warmup() -> None:
    assert lr_at(0, lr=2.0, min_lr=0.0, warmup_steps=0, decay_steps=100) == pytest.approx(2.0)
