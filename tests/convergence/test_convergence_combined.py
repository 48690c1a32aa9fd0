"""Everything at once: adaptive staleness + robust aggregation + compression + worker-level DP on a
heterogeneous cluster in which one worker crashes mid-task, and nothing is lost.

The ``hetero-3tier`` tiers (2 workers at 2x, 2 at 0.5x, 2 at 0.25x; 100 Mbit/s, 20 ms) with one 0.5x worker
crashing 3 s in (mid-task) and rejoining 5 s later as a fresh process. Adaptive bounds (floor 4) over
buffers of 3 updates, aggregated by centered clip (tau 1: top-k's zeros would bias a coordinate-wise
rule), top-k 5 % with error feedback, and DP-FedAvg noise once per step (z = 0.01: a mechanics check, the
resulting epsilon is enormous). Heartbeats every 1 s and a 3 s timeout evict the crashed worker, which
releases its lease; its task goes back to the queue and is trained by someone else.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable

import pytest

from dist_llm_train.simulation import Simulation, SimulationReport, parse_topology

Simulate = Callable[..., tuple[Simulation, SimulationReport]]

STEPS = 150
CRASH_AT_S = 3.0
CONFIG = (
    "sync.mode=adaptive",
    "sync.max_staleness=4",
    "sync.buffer_size=3",
    f"training.max_steps={STEPS}",
    "training.beta1=0.5",
    "aggregation.rule=centered-clip",
    "aggregation.f=1",
    "aggregation.params={tau: 1.0}",
    "compression.codec=topk",
    "compression.params={ratio: 0.05}",
    "privacy.mode=worker",
    "privacy.clip_norm=1.0",
    "privacy.noise_multiplier=0.01",
    "scheduling.heartbeat_interval_s=1",
    "scheduling.failure_timeout_s=3",
    "scheduling.lease_s=30",
)
TOPOLOGY = parse_topology(
    {
        "name": "hetero-3tier-crash",
        "workers": [
            {
                "name": "gpu",
                "bandwidth_mbps": 100,
                "latency_ms": 20,
                "speed": 2.0,
                "speed_jitter": 0.05,
                "count": 2,
            },
            {"name": "cpu", "bandwidth_mbps": 100, "latency_ms": 20, "speed": 0.5, "speed_jitter": 0.1},
            {
                "name": "cpu-crashy",
                "bandwidth_mbps": 100,
                "latency_ms": 20,
                "speed": 0.5,
                "speed_jitter": 0.1,
                "crash": [{"at_s": CRASH_AT_S, "down_s": 5.0}],
            },
            {
                "name": "slow",
                "bandwidth_mbps": 100,
                "latency_ms": 20,
                "speed": 0.25,
                "speed_jitter": 0.2,
                "count": 2,
            },
        ],
    }
)

# Measured 2.630 (from 4.190); with z = 0.001 instead of 0.01 the same run ended at 2.885.
FINAL_LOSS_MAX = 3.0
# fp32 bytes over top-k 5 % payload bytes: values + delta-coded indices + header, about 1/(0.05 x 1.3).
COMPRESSION_MIN = 10.0


@pytest.mark.slow
def test_everything_combined_trains_and_loses_no_task(simulate: Simulate) -> None:
    sim, report = simulate(CONFIG, TOPOLOGY, eval_every=50)
    assert report.mode == "adaptive" and report.server_steps == STEPS
    assert report.aggregator.startswith("centered-clip") and report.codec == "topk"
    assert math.isfinite(report.final_val_loss) and report.final_val_loss <= FINAL_LOSS_MAX
    assert report.compression_ratio is not None and report.compression_ratio >= COMPRESSION_MIN
    accountant = sim.coordinator.accountant
    assert sim.coordinator.privacy is not None and accountant is not None
    assert 0 < accountant.epsilon() < math.inf
    # Every slow update was admitted: nothing computed was thrown away at admission either.
    assert report.rejected == {} and report.accepted == report.submitted

    crashy = next(w for w in report.workers if w.name == "cpu-crashy")
    assert crashy.crashes == 1 and crashy.evictions == 1 and crashy.rejoins == 1
    assert crashy.lost_compute_s > 0, "it died mid-task"
    assert crashy.accepted > 0

    # Follow every task through the lease log. Each lease (grant) ends in exactly one of complete, release
    # (eviction) or expire, or is still held when the run stops; a released or expired task goes back to
    # the queue; no task is completed twice and no late result had to be refused.
    events: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for _, event, task, worker in sim.task_log:
        events[task].append((event, worker))
    in_flight = 0
    for task, history in events.items():
        kinds = [event for event, _ in history]
        assert kinds.count("complete") <= 1, f"task {task} applied twice: {history}"
        assert not any(k.startswith("refused") for k in kinds), history
        held = False
        for kind in kinds:
            assert held == (kind != "grant"), f"task {task}: {kind} out of order in {history}"
            held = kind == "grant"
        if held:
            in_flight += 1
            assert "complete" not in kinds
    leases = report.leases
    completed = sum(1 for h in events.values() for e, _ in h if e == "complete")
    assert completed == report.submitted == leases.completions
    assert in_flight <= len(report.workers)
    assert leases.grants == leases.completions + leases.released + leases.expired + in_flight
    assert leases.requeued == leases.released + leases.expired >= 1

    # The task the crash interrupted was released by the eviction and trained again, once.
    interrupted = [t for t, h in events.items() if ("release", "cpu-crashy") in h]
    assert interrupted, "the eviction released the crashed worker's lease"
    assert all(sum(e == "complete" for e, _ in events[t]) == 1 for t in interrupted), {
        t: events[t] for t in interrupted
    }
