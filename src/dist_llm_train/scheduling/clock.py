"""Clocks: the one place the scheduling package learns what time it is.

Leases and failure detectors never call ``time.time()``; they read a :class:`Clock` handed to them. The real
runtime passes a :class:`MonotonicClock`; tests and the discrete-event simulator pass a :class:`ManualClock`
and move it with :meth:`ManualClock.advance` or :meth:`ManualClock.set`, so no test needs to sleep and a
simulated hour costs microseconds.
"""

from __future__ import annotations

import math
import time
from typing import Protocol, runtime_checkable

from dist_llm_train.errors import PreconditionError

__all__ = ["Clock", "ManualClock", "MonotonicClock"]


@runtime_checkable
class Clock(Protocol):
    """Anything with ``now() -> float`` (seconds; only differences matter, never the epoch)."""

    def now(self) -> float: ...


class MonotonicClock:
    """Wall time for the real runtime: ``time.monotonic()``, which never jumps when NTP adjusts the clock.

    A wall clock (``time.time()``) stepping back by a second would make every lease look a second younger
    and every heartbeat a second older; monotonic time cannot.
    """

    def now(self) -> float:
        return time.monotonic()


class ManualClock:
    """A clock that moves only when told to: tests and the virtual-time simulator.

    ``start`` is the initial reading in seconds. Time never goes backwards: :meth:`advance` with a negative
    step or :meth:`set` to an earlier time raises PreconditionError, because leases and detectors assume a
    monotone clock (a step back would resurrect expired leases).
    """

    def __init__(self, start: float = 0.0) -> None:
        if not math.isfinite(start):
            raise PreconditionError(f"ManualClock: start={start} must be a finite number of seconds")
        self._now = float(start)

    def now(self) -> float:
        return self._now

    def advance(self, dt: float) -> float:
        """Move forward by ``dt`` seconds (``dt >= 0``) and return the new time."""
        if not (math.isfinite(dt) and dt >= 0.0):
            raise PreconditionError(f"ManualClock.advance: dt={dt} must be a finite number of seconds >= 0")
        self._now += float(dt)
        return self._now

    def set(self, t: float) -> float:
        """Jump to time ``t`` (``t >= now()``), e.g. the simulator's next event time; returns ``t``."""
        if not (math.isfinite(t) and t >= self._now):
            raise PreconditionError(
                f"ManualClock.set: t={t} must be finite and not earlier than the current time {self._now}"
            )
        self._now = float(t)
        return self._now

    def __repr__(self) -> str:
        return f"ManualClock(now={self._now})"
