"""Error feedback: the decoded updates sum to the input sum minus the residual, so nothing is lost."""

from __future__ import annotations

import pytest
import torch

from dist_llm_train.compression import ErrorFeedback, build_codec
from dist_llm_train.errors import PreconditionError


def _gradients(steps: int, d: int, seed: int) -> list[torch.Tensor]:
    # A persistent direction plus noise, like minibatch gradients: the sum grows linearly in T.
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(d, generator=g) * 0.2
    return [mean + torch.randn(d, generator=g) for _ in range(steps)]


def _relative_errors(codec_name: str, params: dict, with_ef: bool, steps: int = 400, d: int = 4000):
    codec = build_codec(codec_name, **params)
    ef = ErrorFeedback(codec)
    sum_in = torch.zeros(d, dtype=torch.float64)
    sum_out = torch.zeros(d, dtype=torch.float64)
    history = {}
    for t, grad in enumerate(_gradients(steps, d, seed=0), start=1):
        enc = ef.encode(grad) if with_ef else codec.encode(grad)
        sum_in += grad.double()
        sum_out += codec.decode(enc).double()
        if t in (25, 100, 200, 400):
            gap = float(torch.linalg.vector_norm(sum_in - sum_out))
            history[t] = (gap / float(torch.linalg.vector_norm(sum_in)), gap, ef.residual_norm)
    return history


def test_topk_1pct_with_error_feedback_running_sums_converge() -> None:
    hist = _relative_errors("topk", {"ratio": 0.01}, with_ef=True)
    for _rel, gap, residual in hist.values():
        # Σ decoded = Σ g − e exactly, so the gap in the running sums is the residual norm itself.
        assert gap == pytest.approx(residual, rel=1e-3, abs=1e-3)
    assert hist[100][0] < 0.6 * hist[25][0]
    assert hist[400][0] < 0.5 * hist[100][0]
    assert hist[400][0] < 0.1
    without = _relative_errors("topk", {"ratio": 0.01}, with_ef=False)
    assert without[400][0] > 0.8  # without EF the dropped 99 % is simply lost
    assert without[400][0] > 5 * hist[400][0]
    # the residual saturates (top-k is a contraction), so the absolute gap stops growing
    assert hist[400][2] < 1.2 * hist[100][2]


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("topk", {"ratio": 0.01, "selection": "sampled", "values": "int8"}),
        ("int8", {"chunk_size": 512}),
        ("powersgd", {"rank": 2, "shapes": [[20, 100]]}),
    ],
)
def test_other_biased_codecs_converge_with_error_feedback(name: str, params: dict) -> None:
    hist = _relative_errors(name, params, with_ef=True, steps=200, d=2000)
    assert hist[200][0] < 0.5 * hist[25][0]
    assert hist[200][0] < 0.2
    for _rel, gap, residual in hist.values():
        assert gap == pytest.approx(residual, rel=1e-3, abs=1e-3)


def test_reset_and_shape_checks() -> None:
    ef = ErrorFeedback(build_codec("topk", k=1))
    assert ef.residual is None and ef.residual_norm == 0.0
    ef.encode(torch.tensor([[3.0, 1.0], [-2.0, 0.5]]))
    assert ef.residual.tolist() == [0.0, 1.0, -2.0, 0.5]
    assert ef.residual_norm == pytest.approx((1 + 4 + 0.25) ** 0.5)
    # the residual enters the next step: -2 + -2 = -4 now wins
    out = ef.decode(ef.encode(torch.tensor([[0.0, 0.0], [-2.0, 0.0]])))
    assert out.tolist() == [[0.0, 0.0], [-4.0, 0.0]]
    with pytest.raises(PreconditionError, match="call reset"):
        ef.encode(torch.ones(5))
    ef.reset()
    assert ef.residual is None
    ef.encode(torch.ones(5))
    assert ef.name == "topk"


def test_none_codec_keeps_zero_residual_without_corrupting_the_payload() -> None:
    ef = ErrorFeedback(build_codec("none"))
    x = torch.arange(6.0)
    enc = ef.encode(x)
    assert ef.residual_norm == 0.0
    assert ef.decode(enc).tolist() == x.tolist()


def test_wraps_only_codecs() -> None:
    with pytest.raises(PreconditionError, match="wraps a Codec"):
        ErrorFeedback("topk")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("topk", {"ratio": 0.05}),
        ("int8", {}),
        ("powersgd", {"rank": 2, "shapes": [[20, 100]]}),
    ],
)
def test_a_deferred_residual_gives_the_same_payloads_and_residuals(name: str, params: dict) -> None:
    now, later = ErrorFeedback(build_codec(name, **params)), ErrorFeedback(build_codec(name, **params))
    for step, grad in enumerate(_gradients(12, 2000, seed=3)):
        expected = now.encode(grad)
        got = later.encode(grad, defer_residual=True)
        assert later._pending is not None  # the residual really was left for later
        for a, b in zip(expected.buffers, got.buffers, strict=True):
            assert torch.equal(a, b), f"payload differs at step {step}"
        if step % 3 == 0:
            later.settle()  # as a worker does after sending; otherwise the next encode settles it
            assert later._pending is None
        assert torch.equal(now.residual, later.residual)  # reading the residual settles it


def test_reset_drops_a_deferred_residual() -> None:
    ef = ErrorFeedback(build_codec("topk", k=1))
    ef.encode(torch.tensor([3.0, 1.0, -2.0]), defer_residual=True)
    ef.reset()
    ef.settle()
    assert ef.residual is None
    assert ef.decode(ef.encode(torch.tensor([0.0, 1.0, 0.0]))).tolist() == [0.0, 1.0, 0.0]
