"""A discrete-event engine: a heap of timed callbacks run in time order on a :class:`VirtualClock`.

Events at the same time run in the order they were scheduled (a sequence number breaks ties), so a run is
a pure function of its inputs: no dict ordering, object ids or wall-clock time can reorder it.

*Background* events (heartbeats, failure-detector sweeps) keep running while anything else is pending but
cannot keep a run alive on their own: when only background events are left the simulation can make no
further progress (e.g. a synchronous round waits for a worker that never comes back) and :meth:`run`
returns with ``stalled``.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from typing import Any, Literal

from dist_llm_train.errors import PreconditionError
from dist_llm_train.simulation.clock import VirtualClock

__all__ = ["Event", "EventEngine", "RunOutcome"]

RunOutcome = Literal["stopped", "until", "stalled", "empty"]


class Event:
    """A scheduled callback. Cancel it with :meth:`EventEngine.cancel` (it stays in the heap, inert)."""

    __slots__ = ("args", "background", "callback", "cancelled", "done", "seq", "time")

    def __init__(
        self, time: float, seq: int, callback: Callable[..., Any], args: tuple[Any, ...], background: bool
    ) -> None:
        self.time = time
        self.seq = seq
        self.callback = callback
        self.args = args
        self.background = background
        self.cancelled = False
        self.done = False

    def __lt__(self, other: Event) -> bool:
        # (time, seq) is a total order: seq is unique per engine.
        return (self.time, self.seq) < (other.time, other.seq)

    def __repr__(self) -> str:
        name = getattr(self.callback, "__name__", repr(self.callback))
        return f"Event(t={self.time:.6f}, seq={self.seq}, {name})"


class EventEngine:
    """Runs callbacks in virtual-time order.

    Args:
        clock: the clock to advance (a fresh one starting at 0 when omitted); hand the same clock to the
            lease table and the failure detector so they read simulated time.
    """

    def __init__(self, clock: VirtualClock | None = None) -> None:
        self.clock = clock if clock is not None else VirtualClock()
        self._heap: list[Event] = []
        self._seq = 0
        self._foreground = 0  # live (not cancelled, not yet run) foreground events
        self._stop = False
        self.processed = 0

    def now(self) -> float:
        return self.clock.now()

    def at(self, time: float, callback: Callable[..., Any], *args: Any, background: bool = False) -> Event:
        """Run ``callback(*args)`` at virtual time ``time`` (not earlier than now)."""
        if not (math.isfinite(time) and time >= self.clock.now()):
            raise PreconditionError(
                f"EventEngine.at: time={time} must be finite and not earlier than now={self.clock.now()}"
            )
        event = Event(float(time), self._seq, callback, args, background)
        self._seq += 1
        if not background:
            self._foreground += 1
        heapq.heappush(self._heap, event)
        return event

    def after(
        self, delay: float, callback: Callable[..., Any], *args: Any, background: bool = False
    ) -> Event:
        """Run ``callback(*args)`` ``delay`` seconds from now (``delay >= 0``)."""
        if not (math.isfinite(delay) and delay >= 0):
            raise PreconditionError(
                f"EventEngine.after: delay={delay} must be a finite number of seconds >= 0"
            )
        return self.at(self.clock.now() + delay, callback, *args, background=background)

    def cancel(self, event: Event) -> None:
        """Cancel a pending event (no effect if it already ran or was cancelled)."""
        if not (event.cancelled or event.done):
            event.cancelled = True
            if not event.background:
                self._foreground -= 1

    def stop(self) -> None:
        """Make :meth:`run` return after the current event."""
        self._stop = True

    @property
    def pending(self) -> int:
        """Events in the heap (cancelled ones included until they are popped)."""
        return len(self._heap)

    def run(self, until: float | None = None) -> RunOutcome:
        """Process events in order until :meth:`stop` is called, time would pass ``until``, or none is left.

        Returns why it stopped: ``stopped`` (a callback called :meth:`stop`), ``until`` (the next event
        lies beyond ``until``; the clock is moved to ``until``), ``stalled`` (only background events are
        left) or ``empty`` (no events at all).
        """
        self._stop = False
        heap = self._heap
        clock = self.clock
        while heap:
            if self._foreground == 0:
                return "stalled"
            event = heap[0]
            if until is not None and event.time > until:
                clock.advance_to(max(until, clock.now()))
                return "until"
            heapq.heappop(heap)
            if event.cancelled:
                continue
            event.done = True
            if not event.background:
                self._foreground -= 1
            clock.advance_to(event.time)
            self.processed += 1
            event.callback(*event.args)
            if self._stop:
                return "stopped"
        return "empty"
