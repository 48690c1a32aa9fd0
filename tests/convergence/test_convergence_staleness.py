"""Adaptive vs fixed staleness bounds, on a homogeneous and on a heterogeneous cluster.

Pure asynchrony (one update per server step, the 1/tau staleness policy), 400 AdamW server steps, six
workers on a LAN so that compute alone decides staleness:

- homogeneous: six workers at speed 1. Each update arrives about 5 versions old (the other five push
  while it computes), so the floor bound is 6 for both modes.
- heterogeneous: the ``hetero-3tier`` speeds 2, 2, 0.5, 0.5, 0.25, 0.25 (an 8x spread). The fast tier's
  updates arrive about 2 versions old, the 0.5x tier's about 10, the 0.25x tier's about 21: a fixed bound
  of 6 rejects the slow tiers, while the adaptive bound (1.5 x each worker's measured staleness, floor 6)
  admits them.

Adam's beta1 is 0.5 here: asynchrony acts like extra momentum (Mitliagkas et al. 2016), and with 0.9 the
stale updates overshoot and the runs sat on the unigram plateau (3.35 nats) for 200+ steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from dist_llm_train.coordination import AdaptiveBound, AsyncCoordinator
from dist_llm_train.simulation import Simulation, SimulationReport, Topology

RunSim = Callable[..., SimulationReport]
Simulate = Callable[..., tuple[Simulation, SimulationReport]]

HOMOGENEOUS = [1.0] * 6
HETEROGENEOUS = [2.0, 2.0, 0.5, 0.5, 0.25, 0.25]
FLOOR = 6
STEPS = 400
BASE = (f"sync.max_staleness={FLOOR}", f"training.max_steps={STEPS}", "training.beta1=0.5")

# Cross-entropy of the best context-free (unigram) model on the validation text is 3.347 nats; every run
# must end clearly below it, i.e. have learned from context. Measured final losses: homogeneous fixed
# 2.943, adaptive 2.901; heterogeneous fixed 2.732, adaptive 2.808.
FINAL_LOSS_MAX = 3.10
# The criterion. Measured acceptance under the 8x spread: adaptive 1.000, fixed 0.733.
ADAPTIVE_ACCEPTANCE_MIN = 0.80
# Homogeneous: both modes admit nearly everything (measured fixed 0.983, adaptive 1.000).
HOMOGENEOUS_ACCEPTANCE_MIN = 0.95
# Virtual time for the same 400 steps, adaptive over fixed, under the spread: measured 8.5 s / 11.6 s =
# 0.73 (the fixed bound throws away the slow tiers' finished compute).
ADAPTIVE_TIME_RATIO_MAX = 0.85


def _overrides(mode: str) -> tuple[str, ...]:
    return (f"sync.mode={mode}", *BASE)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["async", "adaptive"])
def test_both_bounds_converge_on_a_homogeneous_cluster(
    run_sim: RunSim, lan_topology: Callable[..., Topology], mode: str
) -> None:
    report = run_sim(_overrides(mode), lan_topology(HOMOGENEOUS, name="homogeneous"), eval_every=STEPS)
    assert report.mode == mode and report.server_steps == STEPS
    assert report.acceptance_rate >= HOMOGENEOUS_ACCEPTANCE_MIN, report.rejected
    assert math.isfinite(report.final_val_loss) and report.final_val_loss <= FINAL_LOSS_MAX
    # Every accepted update respected the bound the fixed mode configures (its staleness is at most 6).
    if mode == "async":
        assert max(report.staleness) <= FLOOR


@pytest.mark.slow
def test_adaptive_admits_the_slow_tiers_that_a_fixed_bound_rejects(
    run_sim: RunSim, simulate: Simulate, lan_topology: Callable[..., Topology]
) -> None:
    fixed = run_sim(
        _overrides("async"), lan_topology(HETEROGENEOUS, name="hetero-3tier-speeds"), eval_every=STEPS
    )
    sim, adaptive = simulate(
        _overrides("adaptive"), lan_topology(HETEROGENEOUS, name="hetero-3tier-speeds"), eval_every=STEPS
    )

    assert adaptive.acceptance_rate >= ADAPTIVE_ACCEPTANCE_MIN
    assert fixed.acceptance_rate < ADAPTIVE_ACCEPTANCE_MIN
    assert set(fixed.rejected) == {"too-stale"}

    by_speed = {s: [w for w in fixed.workers if w.speed == s] for s in (2.0, 0.5, 0.25)}
    assert all(w.rejected.get("too-stale", 0) == 0 for w in by_speed[2.0]), "fast workers stay within 6"
    slow_sent = sum(w.updates_sent for w in by_speed[0.25])
    assert slow_sent > 0 and sum(w.accepted for w in by_speed[0.25]) <= 0.2 * slow_sent
    # Under the adaptive bound every tier contributes, the slowest included.
    assert all(w.accepted > 0 for w in adaptive.workers)
    assert max(adaptive.staleness) > FLOOR, "admitted updates older than the fixed bound"

    # The bounds it learned follow the speeds: fast workers at the floor, slower tiers above it.
    coordinator = sim.coordinator
    assert isinstance(coordinator, AsyncCoordinator) and isinstance(coordinator.bound, AdaptiveBound)
    bounds = coordinator.bound.snapshot()
    tier = {w.name: w.speed for w in adaptive.workers}
    fast = [b for name, b in bounds.items() if tier[name] == 2.0]
    mid = [b for name, b in bounds.items() if tier[name] == 0.5]
    slow = [b for name, b in bounds.items() if tier[name] == 0.25]
    assert fast and mid and slow
    assert max(fast) == FLOOR < min(mid) and max(mid) < min(slow)

    assert adaptive.virtual_s <= ADAPTIVE_TIME_RATIO_MAX * fixed.virtual_s
    for report in (fixed, adaptive):
        assert report.server_steps == STEPS
        assert math.isfinite(report.final_val_loss) and report.final_val_loss <= FINAL_LOSS_MAX
