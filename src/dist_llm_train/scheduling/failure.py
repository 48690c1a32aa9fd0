"""Failure detectors: which workers have gone silent, judged from their heartbeats on an injected clock.

- :class:`FixedTimeoutDetector` suspects a worker once ``timeout_s`` passed since its last heartbeat
  (prime-rl: heartbeat every 2 s, evict after 6 s; Flower: 2 × 30 s). Simple and predictable, but one
  number must fit every link: too low evicts healthy workers on a jittery WAN, too high leaves a dead
  worker's tasks waiting.
- :class:`PhiAccrualDetector` (Hayashibara et al. 2004, in Akka's formulation) learns each worker's
  heartbeat intervals and reports suspicion ``phi = -log10 P(a heartbeat is still to come this late)``;
  a worker is suspected when phi reaches ``threshold``. Workers behind jittery links get a longer grace
  on their own, steady ones are caught sooner.

Both only read ``clock.now()``: the runtime passes a monotonic clock, tests and the simulator a manual one.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass

from scipy.optimize import brentq

from dist_llm_train.config.schema import SchedulingConfig
from dist_llm_train.errors import ConfigError, PreconditionError
from dist_llm_train.scheduling.clock import Clock

__all__ = [
    "FailureDetector",
    "FixedTimeoutDetector",
    "PhiAccrualDetector",
    "build_failure_detector",
    "phi_from_normal",
]

_LN10 = math.log(10.0)


def _check(name: str, value: float, *, allow_zero: bool = False) -> float:
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise PreconditionError(f"{name}={value} must be a finite number {bound}")
    return float(value)


class FailureDetector(ABC):
    """Common interface. A worker is known from its first :meth:`heartbeat` until :meth:`remove`.

    A worker the detector never heard of (or removed) is not alive and has no suspicion level; only known
    workers appear in :meth:`suspects`.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._last: dict[str, float] = {}

    def heartbeat(self, worker_id: str) -> None:
        """Record a heartbeat (or any message proving the worker is alive) from ``worker_id`` now."""
        self._last[worker_id] = self.clock.now()

    def remove(self, worker_id: str) -> None:
        """Forget ``worker_id`` (evicted or left); a later heartbeat starts it afresh."""
        self._last.pop(worker_id, None)

    def workers(self) -> list[str]:
        """Known workers, in order of first heartbeat."""
        return list(self._last)

    def silence(self, worker_id: str) -> float:
        """Seconds since ``worker_id``'s last heartbeat (KeyError for an unknown worker)."""
        return self.clock.now() - self._last[worker_id]

    @abstractmethod
    def is_alive(self, worker_id: str) -> bool:
        """Whether ``worker_id`` is known and not suspected now."""

    def suspects(self) -> list[str]:
        """Known workers suspected now, in order of first heartbeat; evict them and release their leases."""
        return [w for w in self._last if not self.is_alive(w)]

    def __contains__(self, worker_id: object) -> bool:
        return worker_id in self._last


class FixedTimeoutDetector(FailureDetector):
    """Suspect a worker when ``now - last_heartbeat >= timeout_s`` (alive strictly before that).

    ``timeout_s`` should span a few heartbeat intervals (the config's ``failure_timeout_s``, default 3 ×
    ``heartbeat_interval_s``): healthy workers evicted during network hiccups → raise it; dead workers'
    tasks waiting too long → lower it, or shorten the heartbeat interval with it.
    """

    def __init__(self, timeout_s: float, clock: Clock) -> None:
        super().__init__(clock)
        self.timeout_s = _check("FixedTimeoutDetector: timeout_s", timeout_s)

    def is_alive(self, worker_id: str) -> bool:
        last = self._last.get(worker_id)
        return last is not None and self.clock.now() - last < self.timeout_s


def phi_from_normal(elapsed_s: float, mean_s: float, std_s: float) -> float:
    """Akka's phi: ``-log10`` of the probability that a heartbeat interval exceeds ``elapsed_s``.

    Intervals are modelled as normal(``mean_s``, ``std_s``) and the tail uses the logistic approximation of
    the normal CDF Akka uses, ``P(X > t) ≈ 1 / (1 + exp(y (1.5976 + 0.070566 y²)))`` with
    ``y = (t - mean) / std``. Akka evaluates this in two branches to keep precision; here it is written as
    ``log10(1 + exp(z))`` through a stable log-sum-exp, which is the same value in both branches and stays
    finite (Akka's overflows to infinity after about 20 standard deviations).
    """
    y = (elapsed_s - mean_s) / std_s
    z = y * (1.5976 + 0.070566 * y * y)
    # log(1 + e^z) without overflow for large z or loss of precision for very negative z.
    log1pexp = z + math.log1p(math.exp(-z)) if z > 0 else math.log1p(math.exp(z))
    return log1pexp / _LN10


@dataclass
class _History:
    intervals: deque[float]
    mean: float = 0.0
    std: float = 0.0
    last: float = 0.0

    def add(self, interval: float) -> None:
        self.intervals.append(interval)
        n = len(self.intervals)
        # Recomputed from the window (at most `window` values, once per heartbeat): exact, no drift.
        self.mean = math.fsum(self.intervals) / n
        var = math.fsum((x - self.mean) ** 2 for x in self.intervals) / n
        self.std = math.sqrt(var)


class PhiAccrualDetector(FailureDetector):
    """Phi-accrual failure detector (Hayashibara et al. 2004), following Akka's ``PhiAccrualFailureDetector``.

    Each worker keeps its last ``window`` heartbeat intervals; suspicion after ``t`` seconds of silence is
    ``phi = -log10 P(interval > t)`` under a normal fit with mean ``mean + acceptable_pause_s`` and standard
    deviation ``max(std, min_std_s)``. Suspected when ``phi >= threshold``. As in Akka, the first heartbeat
    seeds the history with two intervals ``first_heartbeat_estimate_s ± estimate/4``, and a heartbeat that
    arrives after the worker was already suspected is not added to the history (one long outage would
    otherwise teach the detector to tolerate outages).

    Parameters, and which symptom calls for which change:

    - ``threshold`` (8.0, Akka's default; phi = 8 means a 1e-8 chance the worker is merely slow): healthy
      workers suspected → raise it (10-12); dead workers noticed late → lower it (3-5, more false alarms).
    - ``window`` (100 intervals): after a worker's link changes for good, suspicion keeps following the old
      pattern for about this many heartbeats → lower it; phi jumps around on a steady link → raise it.
    - ``min_std_s`` (0.1 s): with very regular heartbeats the fitted spread collapses and a few ms of
      delay would push phi past the threshold; this floor keeps the detector from becoming trigger-happy.
      Healthy workers on quiet links suspected after one late heartbeat → raise it.
    - ``acceptable_pause_s`` (0 s): a pause tolerated on top of the learned mean, e.g. a GC or a
      checkpoint write that blocks heartbeats; set it to the longest such pause.
    - ``first_heartbeat_estimate_s`` (1 s): the expected interval before any is measured; set it to the
      heartbeat interval so a new worker is judged fairly from the start.
    """

    def __init__(
        self,
        threshold: float = 8.0,
        window: int = 100,
        min_std_s: float = 0.1,
        acceptable_pause_s: float = 0.0,
        first_heartbeat_estimate_s: float = 1.0,
        *,
        clock: Clock,
    ) -> None:
        super().__init__(clock)
        self.threshold = _check("PhiAccrualDetector: threshold", threshold)
        if window < 2:
            raise PreconditionError(f"PhiAccrualDetector: window={window} must be >= 2 intervals")
        self.window = int(window)
        self.min_std_s = _check("PhiAccrualDetector: min_std_s", min_std_s)
        self.acceptable_pause_s = _check(
            "PhiAccrualDetector: acceptable_pause_s", acceptable_pause_s, allow_zero=True
        )
        self.first_heartbeat_estimate_s = _check(
            "PhiAccrualDetector: first_heartbeat_estimate_s", first_heartbeat_estimate_s
        )
        self._history: dict[str, _History] = {}

    def heartbeat(self, worker_id: str) -> None:
        now = self.clock.now()
        history = self._history.get(worker_id)
        if history is None:
            history = _History(deque(maxlen=self.window))
            estimate = self.first_heartbeat_estimate_s
            history.add(estimate - estimate / 4.0)
            history.add(estimate + estimate / 4.0)
            self._history[worker_id] = history
        elif self._phi_at(history, now) < self.threshold:
            history.add(now - history.last)
        history.last = now
        super().heartbeat(worker_id)

    def remove(self, worker_id: str) -> None:
        super().remove(worker_id)
        self._history.pop(worker_id, None)

    def _phi_at(self, history: _History, now: float) -> float:
        return phi_from_normal(
            now - history.last, history.mean + self.acceptable_pause_s, max(history.std, self.min_std_s)
        )

    def phi(self, worker_id: str) -> float:
        """Suspicion level of ``worker_id`` now (0 right after a heartbeat; KeyError for unknown workers)."""
        history = self._history.get(worker_id)
        if history is None:
            raise KeyError(f"no heartbeat from worker {worker_id!r} (never seen, or removed)")
        return self._phi_at(history, self.clock.now())

    def is_alive(self, worker_id: str) -> bool:
        history = self._history.get(worker_id)
        return history is not None and self._phi_at(history, self.clock.now()) < self.threshold

    def interval_stats(self, worker_id: str) -> tuple[float, float]:
        """(mean, standard deviation) in seconds of the worker's recorded heartbeat intervals."""
        history = self._history[worker_id]
        return history.mean, history.std


def _phi_crossing(threshold: float) -> float:
    """Standard deviations above the mean where :func:`phi_from_normal` reaches ``threshold``."""
    return float(brentq(lambda y: phi_from_normal(y, 0.0, 1.0) - threshold, -40.0, 40.0))


def build_failure_detector(cfg: SchedulingConfig, clock: Clock) -> FailureDetector:
    """The detector the config names, calibrated so both kinds agree on steady heartbeats.

    ``timeout``: :class:`FixedTimeoutDetector` with ``failure_timeout_s``. ``phi-accrual``:
    :class:`PhiAccrualDetector` (threshold 8) with ``first_heartbeat_estimate_s = heartbeat_interval_s``,
    ``min_std_s = heartbeat_interval_s / 10`` and ``acceptable_pause_s`` chosen so that a worker whose
    heartbeats were perfectly regular is suspected exactly ``failure_timeout_s`` after its last one (once
    about a dozen intervals have diluted the start-up estimate's spread); jitter in its history then
    stretches that grace for that worker alone.
    """
    interval, timeout = cfg.heartbeat_interval_s, cfg.failure_timeout_s
    if timeout <= interval:
        raise ConfigError(
            f"scheduling.failure_timeout_s={timeout} must exceed scheduling.heartbeat_interval_s={interval} "
            "(else every healthy worker is suspected between two heartbeats); use about 3 intervals"
        )
    if cfg.failure_detector == "timeout":
        return FixedTimeoutDetector(timeout, clock)
    threshold = 8.0
    min_std = interval / 10.0
    # Regular heartbeats: mean = interval, std clamps to min_std, so phi crosses the threshold at
    # interval + pause + y* · min_std; solve for the pause that puts the crossing at failure_timeout_s.
    pause = max(0.0, timeout - interval - _phi_crossing(threshold) * min_std)
    return PhiAccrualDetector(
        threshold=threshold,
        min_std_s=min_std,
        acceptable_pause_s=pause,
        first_heartbeat_estimate_s=interval,
        clock=clock,
    )
