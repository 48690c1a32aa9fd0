"""The discrete-event core: ordering, determinism, cancellation, stall detection; link arithmetic."""

from __future__ import annotations

import numpy as np
import pytest

from dist_llm_train.errors import PreconditionError
from dist_llm_train.scheduling import Clock, LeaseTable, Task
from dist_llm_train.simulation import EventEngine, VirtualClock, percentiles, serialization_s, transfer


def test_events_run_in_time_order_with_fifo_ties() -> None:
    engine = EventEngine()
    seen: list[tuple[float, str]] = []

    def note(tag: str) -> None:
        seen.append((engine.now(), tag))

    engine.at(2.0, note, "c")
    engine.at(1.0, note, "a")
    engine.at(2.0, note, "d")  # same time as "c", scheduled later: runs after it
    engine.at(1.0, note, "b")
    assert engine.run() == "empty"
    assert seen == [(1.0, "a"), (1.0, "b"), (2.0, "c"), (2.0, "d")]


def test_callbacks_schedule_more_events_and_zero_delay_runs_after_current_time_peers() -> None:
    engine = EventEngine()
    order: list[str] = []

    def first() -> None:
        order.append("first")
        engine.after(0.0, lambda: order.append("spawned"))

    engine.at(1.0, first)
    engine.at(1.0, lambda: order.append("peer"))
    engine.run()
    assert order == ["first", "peer", "spawned"]
    assert engine.now() == 1.0


def test_same_program_gives_same_trace() -> None:
    def trace(seed: int) -> list[tuple[float, int]]:
        rng = np.random.default_rng(seed)
        engine = EventEngine()
        out: list[tuple[float, int]] = []
        for i in range(200):
            engine.at(float(rng.integers(0, 20)), lambda i=i: out.append((engine.now(), i)))
        engine.run()
        return out

    assert trace(3) == trace(3)
    assert trace(3) != trace(4)
    times = [t for t, _ in trace(3)]
    assert times == sorted(times)


def test_cancel_stop_until_and_stall() -> None:
    engine = EventEngine()
    ran: list[str] = []
    doomed = engine.at(1.0, ran.append, "doomed")
    engine.cancel(doomed)
    engine.cancel(doomed)  # idempotent
    engine.at(2.0, lambda: (ran.append("stop"), engine.stop()))
    engine.at(3.0, ran.append, "later")
    assert engine.run() == "stopped" and ran == ["stop"]
    assert engine.run(until=2.5) == "until" and engine.now() == 2.5
    assert engine.run() == "empty" and ran == ["stop", "later"]

    # Only background events left (a heartbeat that re-arms forever): the run is stalled, not endless.
    def beat() -> None:
        engine.after(1.0, beat, background=True)

    engine.after(1.0, beat, background=True)
    engine.after(5.0, ran.append, "work")
    assert engine.run() == "stalled"
    assert ran[-1] == "work" and engine.now() == 8.0


def test_virtual_clock_drives_scheduling_objects_and_never_goes_back() -> None:
    engine = EventEngine()
    assert isinstance(engine.clock, Clock)
    leases = LeaseTable(5.0, engine.clock)
    lease = leases.grant(Task(0, 0, 0, 10, 1), "w")
    expired: list[int] = []
    engine.at(4.9, lambda: expired.extend(t.task_id for t in leases.expire()))
    engine.at(5.0, lambda: expired.extend(t.task_id for t in leases.expire()))
    engine.run()
    assert expired == [0] and not leases.complete(lease.lease_id, "w")
    with pytest.raises(PreconditionError):
        engine.at(1.0, print)
    with pytest.raises(PreconditionError):
        VirtualClock(3.0).advance_to(2.0)


def test_transfer_time_arithmetic() -> None:
    # 1 MB over 8 Mbit/s: exactly 1 s of serialisation, plus 50 ms latency.
    tr = transfer(1_000_000, 8e6, 0.05)
    assert tr.seconds == pytest.approx(1.05) and tr.sender_s == pytest.approx(1.0)
    assert tr.attempts == 1 and tr.wire_bytes == 1_000_000
    assert serialization_s(125, 1e3) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    jittered = [transfer(1000, 1e6, 0.1, jitter_s=0.02, rng=rng).seconds for _ in range(400)]
    # propagation uniform in 100 ± 20 ms, plus 8 ms of serialisation
    assert min(jittered) >= 0.088 - 1e-12 and max(jittered) <= 0.128 + 1e-12
    assert np.mean(jittered) == pytest.approx(0.108, abs=0.003)
    assert transfer(1000, 1e6, 0.001, jitter_s=0.02, rng=rng).seconds >= 0.008  # never below 0 propagation


def test_lost_transmissions_cost_serialisation_plus_rto_each() -> None:
    rng = np.random.default_rng(1)
    results = [transfer(1000, 1e6, 0.1, loss=0.5, rto_s=0.3, rng=rng) for _ in range(400)]
    for tr in results:
        lost = tr.attempts - 1
        assert tr.seconds == pytest.approx(0.1 + 0.008 + lost * (0.008 + 0.3))
        assert tr.wire_bytes == 1000 * tr.attempts
    mean_attempts = np.mean([tr.attempts for tr in results])
    assert mean_attempts == pytest.approx(2.0, rel=0.15)  # geometric with p = 0.5
    with pytest.raises(PreconditionError, match="rng"):
        transfer(10, 1e6, 0.0, loss=0.1)


def test_percentiles_nearest_rank() -> None:
    assert percentiles({}) == {}
    hist = {0: 50, 1: 40, 5: 9, 9: 1}
    assert percentiles(hist) == {"p50": 0.0, "p90": 1.0, "p99": 5.0, "max": 9.0}
