"""CapabilityTracker (bias-corrected EWMA, priors) and the clocks."""

from __future__ import annotations

import pytest

from dist_llm_train.errors import PreconditionError
from dist_llm_train.scheduling import CapabilityTracker, Clock, ManualClock, MonotonicClock


def test_first_observation_is_exact_thanks_to_bias_correction() -> None:
    tracker = CapabilityTracker(beta=0.8)
    tracker.observe("w", tokens=1000, seconds=2.0)
    assert tracker.throughput("w") == pytest.approx(500.0)
    assert tracker.mean_duration("w") == pytest.approx(2.0)


def test_bias_corrected_ewma_values() -> None:
    beta = 0.8
    tracker = CapabilityTracker(beta=beta, duration_beta=0.5)
    tracker.observe("w", 100, 1.0)  # 100 tok/s, 1 s
    tracker.observe("w", 400, 2.0)  # 200 tok/s, 2 s
    # m2 = beta (1 - beta) x1 + (1 - beta) x2, divided by 1 - beta^2.
    assert tracker.throughput("w") == pytest.approx((beta * 100 + 200) / (1 + beta))
    assert tracker.mean_duration("w") == pytest.approx((0.5 * 1.0 + 2.0) / 1.5)
    tracker.observe("w", 300, 1.0)
    expected = (beta**2 * 100 + beta * 200 + 300) / (1 + beta + beta**2)
    assert tracker.throughput("w") == pytest.approx(expected)
    assert tracker.observations("w") == 3
    assert tracker.expected_duration("w", 1000) == pytest.approx(1000 / expected)


def test_beta_zero_keeps_latest_and_estimates_converge() -> None:
    latest = CapabilityTracker(beta=0.0)
    latest.observe("w", 100, 1.0)
    latest.observe("w", 300, 1.0)
    assert latest.throughput("w") == 300.0
    smooth = CapabilityTracker(beta=0.9)
    for _ in range(200):
        smooth.observe("w", 700, 1.0)
    assert smooth.throughput("w") == pytest.approx(700.0)


def test_unknown_workers_get_prior() -> None:
    tracker = CapabilityTracker(default_throughput=250.0)
    assert tracker.throughput("new") == 250.0 and tracker.mean_duration("new") is None
    tracker.observe("a", 100, 1.0)
    tracker.observe("b", 300, 1.0)
    assert tracker.prior() == pytest.approx(200.0)
    assert tracker.throughput("new") == pytest.approx(200.0)
    assert not tracker.known("new") and tracker.workers() == ["a", "b"]
    tracker.forget("a")
    assert tracker.throughput("a") == pytest.approx(300.0)  # back to the prior, now b's mean


@pytest.mark.parametrize(
    "kwargs,args",
    [
        ({"beta": 1.0}, None),
        ({"beta": -0.1}, None),
        ({"default_throughput": 0.0}, None),
        ({}, ("w", 100, 0.0)),
        ({}, ("w", 0, 1.0)),
        ({}, ("w", 100, float("inf"))),
    ],
)
def test_invalid_inputs(kwargs: dict, args: tuple | None) -> None:
    with pytest.raises(PreconditionError):
        tracker = CapabilityTracker(**kwargs)
        if args is not None:
            tracker.observe(*args)


def test_manual_clock() -> None:
    clock = ManualClock(5.0)
    assert isinstance(clock, Clock)
    assert clock.advance(2.5) == 7.5 and clock.now() == 7.5
    assert clock.set(10.0) == 10.0
    with pytest.raises(PreconditionError):
        clock.advance(-1.0)
    with pytest.raises(PreconditionError):
        clock.set(9.0)


def test_monotonic_clock_never_goes_back() -> None:
    clock = MonotonicClock()
    assert isinstance(clock, Clock)
    readings = [clock.now() for _ in range(1000)]
    assert readings == sorted(readings)
