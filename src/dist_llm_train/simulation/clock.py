"""The virtual clock: simulated seconds that advance only when the event engine says so.

It satisfies the scheduling package's :class:`~dist_llm_train.scheduling.clock.Clock` protocol (``now()``),
so the very lease tables and failure detectors the real runtime drives with a monotonic clock run here on
simulated time: a simulated hour of heartbeats costs microseconds, and two runs with one seed read the
same times.
"""

from __future__ import annotations

import math

from dist_llm_train.errors import PreconditionError

__all__ = ["VirtualClock"]


class VirtualClock:
    """Simulated seconds since the start of a run. Only the :class:`~.engine.EventEngine` moves it.

    Time never goes backwards (:meth:`advance_to` refuses an earlier time): leases and detectors assume a
    monotone clock, and a step back would resurrect expired leases.
    """

    __slots__ = ("_now",)

    def __init__(self, start: float = 0.0) -> None:
        if not math.isfinite(start) or start < 0:
            raise PreconditionError(f"VirtualClock: start={start} must be a finite number of seconds >= 0")
        self._now = float(start)

    def now(self) -> float:
        """The current simulated time in seconds."""
        return self._now

    def advance_to(self, t: float) -> None:
        """Jump to time ``t`` (the next event's time); ``t`` must not be earlier than :meth:`now`."""
        if not t >= self._now:  # also catches NaN
            raise PreconditionError(
                f"VirtualClock.advance_to: t={t} is earlier than the current time {self._now}; "
                "events must be scheduled at or after now"
            )
        self._now = float(t)

    def __repr__(self) -> str:
        return f"VirtualClock(now={self._now})"
