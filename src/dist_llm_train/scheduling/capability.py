"""Per-worker throughput and task-duration estimates from completed tasks (bias-corrected EWMA)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from dist_llm_train.errors import PreconditionError

__all__ = ["CapabilityTracker", "Ewma"]


@dataclass
class Ewma:
    """Exponentially weighted mean with Adam's bias correction.

    ``m_t = beta * m_{t-1} + (1 - beta) * x_t`` starts at 0, so it under-reads by the factor
    ``1 - beta**t`` for the first observations; :attr:`value` divides that out. Without the correction a
    new worker measured once at 1000 tokens/s would read as 200 tokens/s under ``beta=0.8`` and be starved
    until several more tasks came back.
    """

    beta: float
    _m: float = 0.0
    count: int = 0

    def update(self, x: float) -> None:
        self._m = self.beta * self._m + (1.0 - self.beta) * x
        self.count += 1

    @property
    def value(self) -> float:
        if self.count == 0:
            raise PreconditionError("Ewma.value: no observation yet")
        if self.beta == 0.0:
            return self._m
        return self._m / (1.0 - self.beta**self.count)


def _check_beta(name: str, beta: float) -> float:
    if not (math.isfinite(beta) and 0.0 <= beta < 1.0):
        raise PreconditionError(f"CapabilityTracker: {name}={beta} must be in [0, 1)")
    return float(beta)


class CapabilityTracker:
    """Measured speed of each worker, fed by completed tasks, read by the schedulers.

    Every accepted task result calls :meth:`observe` with the tokens the task covered and the seconds it
    took; the tracker keeps a bias-corrected EWMA of the throughput samples ``tokens / seconds`` and of the
    task durations. A worker with no observation yet gets a prior: the mean throughput of the workers
    already measured (so a newcomer is treated as average, neither starved nor flooded), or
    ``default_throughput`` before anyone was measured.

    ``beta`` (throughput) and ``duration_beta`` (task durations; default: ``beta``) set the memory, about
    ``1 / (1 - beta)`` observations:

    - assignments flip between workers after every single slow task (a GC pause, a co-tenant's burst) and
      lease expiries follow noisy estimates: the estimate chases noise, raise ``beta`` (0.9-0.95);
    - a worker that slowed down for good (thermal throttling, a shared GPU) keeps receiving its old share
      for many tasks, or a recovered worker stays under-used: the estimate lags, lower ``beta`` (0.5-0.7);
    - ``beta = 0`` keeps only the latest observation.

    ``default_throughput`` (tokens/s) matters only before the first result arrives, and only relative to
    link transfer times; set it near the expected speed of one worker.
    """

    def __init__(
        self,
        beta: float = 0.8,
        *,
        duration_beta: float | None = None,
        default_throughput: float = 1000.0,
    ) -> None:
        self.beta = _check_beta("beta", beta)
        self.duration_beta = _check_beta("duration_beta", beta if duration_beta is None else duration_beta)
        if not (math.isfinite(default_throughput) and default_throughput > 0):
            raise PreconditionError(
                f"CapabilityTracker: default_throughput={default_throughput} must be a finite tokens/s > 0"
            )
        self.default_throughput = float(default_throughput)
        self._throughput: dict[str, Ewma] = {}
        self._duration: dict[str, Ewma] = {}

    def observe(self, worker_id: str, tokens: float, seconds: float) -> None:
        """Record that ``worker_id`` processed ``tokens`` tokens in ``seconds`` seconds (both > 0)."""
        if not (math.isfinite(tokens) and tokens > 0):
            raise PreconditionError(
                f"CapabilityTracker.observe({worker_id!r}): tokens={tokens} must be a finite number > 0"
            )
        if not (math.isfinite(seconds) and seconds > 0):
            raise PreconditionError(
                f"CapabilityTracker.observe({worker_id!r}): seconds={seconds} must be a finite duration > 0; "
                "a zero or negative duration means the runtime measured the task with a non-monotone clock"
            )
        if worker_id not in self._throughput:
            self._throughput[worker_id] = Ewma(self.beta)
            self._duration[worker_id] = Ewma(self.duration_beta)
        self._throughput[worker_id].update(tokens / seconds)
        self._duration[worker_id].update(seconds)

    def known(self, worker_id: str) -> bool:
        """Whether ``worker_id`` has at least one observation."""
        return worker_id in self._throughput

    def observations(self, worker_id: str) -> int:
        """How many results ``worker_id`` has reported (0 for an unknown worker)."""
        ewma = self._throughput.get(worker_id)
        return 0 if ewma is None else ewma.count

    def workers(self) -> list[str]:
        """Measured workers, in the order they were first observed."""
        return list(self._throughput)

    def prior(self) -> float:
        """Throughput assumed for an unmeasured worker: mean of measured workers, else the default."""
        if not self._throughput:
            return self.default_throughput
        return math.fsum(e.value for e in self._throughput.values()) / len(self._throughput)

    def throughput(self, worker_id: str) -> float:
        """Estimated tokens per second of ``worker_id`` (the prior if it has not reported yet)."""
        ewma = self._throughput.get(worker_id)
        return self.prior() if ewma is None else ewma.value

    def expected_duration(self, worker_id: str, tokens: float) -> float:
        """Seconds ``worker_id`` is expected to need for ``tokens`` tokens: ``tokens / throughput``."""
        return tokens / self.throughput(worker_id)

    def mean_duration(self, worker_id: str) -> float | None:
        """Smoothed duration of this worker's recent tasks in seconds (``None`` before its first result).

        Useful for sizing leases: a lease much shorter than this expires under a healthy worker.
        """
        ewma = self._duration.get(worker_id)
        return None if ewma is None else ewma.value

    def forget(self, worker_id: str) -> None:
        """Drop a worker's history (it left; if it rejoins it starts from the prior again)."""
        self._throughput.pop(worker_id, None)
        self._duration.pop(worker_id, None)
