"""Failure detectors on a manual clock: fixed timeout boundary, phi growth, jitter tolerance, config."""

from __future__ import annotations

import math
import random

import pytest
from scipy.stats import norm

from dist_llm_train.config.schema import SchedulingConfig
from dist_llm_train.errors import ConfigError, PreconditionError
from dist_llm_train.scheduling import (
    FixedTimeoutDetector,
    ManualClock,
    PhiAccrualDetector,
    build_failure_detector,
    phi_from_normal,
)


@pytest.mark.parametrize("timeout", [0.5, 6.0, 60.0])
def test_fixed_timeout_suspects_at_timeout_not_before(timeout: float) -> None:
    clock = ManualClock()
    detector = FixedTimeoutDetector(timeout, clock)
    detector.heartbeat("a")
    detector.heartbeat("b")
    clock.advance(timeout * 0.75)
    detector.heartbeat("b")
    clock.set(timeout - 1e-6)
    assert detector.is_alive("a") and detector.suspects() == []
    clock.set(timeout)
    assert not detector.is_alive("a") and detector.is_alive("b")
    assert detector.suspects() == ["a"]
    detector.heartbeat("a")  # a heartbeat clears the suspicion
    assert detector.suspects() == []
    assert detector.silence("b") == pytest.approx(timeout * 0.25)


def test_unknown_and_removed_workers_are_not_alive() -> None:
    clock = ManualClock()
    detector = FixedTimeoutDetector(6.0, clock)
    assert not detector.is_alive("ghost") and detector.suspects() == []
    detector.heartbeat("a")
    detector.remove("a")
    assert not detector.is_alive("a") and "a" not in detector and detector.workers() == []
    with pytest.raises(PreconditionError):
        FixedTimeoutDetector(0.0, clock)


def test_phi_matches_normal_tail_like_akka() -> None:
    # Akka's PhiAccrualFailureDetectorSpec checks 1 - 10**-phi against the normal CDF to 1e-3.
    for elapsed in [0.0, 6.0, 15.0, 20.0, 25.0, 35.0, 40.0]:
        cdf = 1.0 - 10.0 ** -phi_from_normal(elapsed, 0.0, 10.0)
        assert cdf == pytest.approx(norm.cdf(elapsed / 10.0), abs=1e-3)
    assert math.isfinite(phi_from_normal(1e6, 0.0, 1.0))  # no overflow to inf far in the tail
    assert phi_from_normal(-1e6, 0.0, 1.0) == 0.0


def regular(detector: PhiAccrualDetector, clock: ManualClock, worker: str, n: int, interval: float) -> None:
    for _ in range(n):
        detector.heartbeat(worker)
        clock.advance(interval)
    detector.heartbeat(worker)


def test_phi_low_under_regular_heartbeats_and_grows_with_silence() -> None:
    clock = ManualClock()
    detector = PhiAccrualDetector(first_heartbeat_estimate_s=1.0, clock=clock)
    regular(detector, clock, "w", 50, 1.0)
    mean, std = detector.interval_stats("w")
    assert mean == pytest.approx(1.0) and std < 0.1
    assert detector.phi("w") < 1e-6
    clock.advance(1.0)  # the next heartbeat is due now: phi = -log10(1/2)
    assert detector.phi("w") == pytest.approx(math.log10(2.0), abs=1e-9)
    assert detector.is_alive("w")
    previous = detector.phi("w")
    for _ in range(20):
        clock.advance(0.05)
        current = detector.phi("w")
        assert current > previous
        previous = current
    assert not detector.is_alive("w") and detector.suspects() == ["w"]


def test_suspicion_time_follows_min_std_and_threshold() -> None:
    clock = ManualClock()
    detector = PhiAccrualDetector(threshold=8.0, min_std_s=0.1, acceptable_pause_s=0.5, clock=clock)
    regular(detector, clock, "w", 200, 1.0)
    start = clock.now()
    # With history mean 1 s and the 0.1 s floor on std, phi = 8 at 1 + 0.5 + y* * 0.1 s, y* ~ 5.2.
    clock.set(start + 1.5 + 0.50)
    assert detector.is_alive("w")
    clock.set(start + 1.5 + 0.54)
    assert not detector.is_alive("w")


def test_jittery_heartbeats_tolerated_and_given_longer_grace() -> None:
    rng = random.Random(3)
    clock = ManualClock()
    jittery = PhiAccrualDetector(min_std_s=0.05, first_heartbeat_estimate_s=2.0, clock=clock)
    jittery.heartbeat("w")
    for _ in range(300):
        clock.advance(rng.uniform(1.0, 3.0))  # 2 s +- 50 %
        assert jittery.is_alive("w")  # never falsely suspected
        jittery.heartbeat("w")
    steady_clock = ManualClock()
    steady = PhiAccrualDetector(min_std_s=0.05, first_heartbeat_estimate_s=2.0, clock=steady_clock)
    regular(steady, steady_clock, "w", 300, 2.0)
    # 3.5 s of silence: far outside the steady worker's pattern, ordinary for the jittery one.
    clock.advance(3.5)
    steady_clock.advance(3.5)
    assert jittery.is_alive("w") and jittery.phi("w") < 3.0
    assert not steady.is_alive("w")


def test_heartbeat_after_suspicion_does_not_teach_outages() -> None:
    clock = ManualClock()
    detector = PhiAccrualDetector(clock=clock)
    regular(detector, clock, "w", 30, 1.0)
    before = detector.interval_stats("w")
    clock.advance(120.0)
    assert not detector.is_alive("w")
    detector.heartbeat("w")  # back after an outage: alive again, but the 120 s gap is not recorded
    assert detector.is_alive("w") and detector.interval_stats("w") == before


def test_first_heartbeat_seeds_history_and_unknown_phi_raises() -> None:
    clock = ManualClock()
    detector = PhiAccrualDetector(first_heartbeat_estimate_s=2.0, clock=clock)
    with pytest.raises(KeyError):
        detector.phi("w")
    assert not detector.is_alive("w")
    detector.heartbeat("w")
    assert detector.interval_stats("w") == pytest.approx((2.0, 0.5))
    assert detector.phi("w") < 1e-3
    detector.remove("w")
    assert not detector.is_alive("w") and detector.suspects() == []


@pytest.mark.parametrize("interval,timeout", [(2.0, 6.0), (1.0, 10.0), (30.0, 60.0)])
def test_build_phi_detector_agrees_with_timeout_on_regular_heartbeats(
    interval: float, timeout: float
) -> None:
    cfg = SchedulingConfig(
        failure_detector="phi-accrual", heartbeat_interval_s=interval, failure_timeout_s=timeout
    )
    clock = ManualClock()
    detector = build_failure_detector(cfg, clock)
    assert isinstance(detector, PhiAccrualDetector)
    regular(detector, clock, "w", 150, interval)
    last = clock.now()
    clock.set(last + timeout * 0.999)
    assert detector.is_alive("w")
    clock.set(last + timeout * 1.001)
    assert not detector.is_alive("w")


def test_build_timeout_detector_and_config_check() -> None:
    clock = ManualClock()
    detector = build_failure_detector(
        SchedulingConfig(failure_detector="timeout", failure_timeout_s=6.0), clock
    )
    assert isinstance(detector, FixedTimeoutDetector) and detector.timeout_s == 6.0
    with pytest.raises(ConfigError, match="failure_timeout_s"):
        build_failure_detector(SchedulingConfig(heartbeat_interval_s=5.0, failure_timeout_s=5.0), clock)
