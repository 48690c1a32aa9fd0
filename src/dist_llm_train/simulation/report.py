"""What a simulation reports: time, loss, traffic, acceptance, staleness, utilisation, Byzantine filtering.

Everything in a :class:`SimulationReport` except ``wall_s`` (real seconds the run took) is a function of
the config, the topology and the seed: :meth:`SimulationReport.to_dict` with ``include_wall=False`` is
identical for two runs with the same inputs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ByzantineReport",
    "EvalPoint",
    "LeaseReport",
    "SimulationReport",
    "WorkerReport",
    "percentiles",
]


@dataclass
class EvalPoint:
    """One validation measurement: after ``step`` server steps, at ``virtual_s``, ``tokens`` accepted.

    ``bytes_up``/``bytes_down``: payload bytes all workers had sent/received by then (retransmissions
    included), so loss can be plotted against traffic. ``mlm_accuracy``: masked-token accuracy for MLM
    models, else ``None``.
    """

    step: int
    virtual_s: float
    tokens: int
    loss: float
    bytes_up: int = 0
    bytes_down: int = 0
    mlm_accuracy: float | None = None


@dataclass
class WorkerReport:
    """Per-worker traffic, work and outcomes.

    ``bytes_up``/``bytes_down``: payload bytes on the wire (model pulls down, updates up), retransmissions
    included; ``payload_up``/``payload_down``: the same without retransmissions (``payload_up`` is the sum
    of the pushed ``Encoded.nbytes``). ``control_bytes``: registrations and heartbeats, both directions.
    ``utilization``: share of the run's virtual time the worker spent computing (lost work included);
    ``lost_compute_s``: compute thrown away by a crash.
    """

    name: str
    role: str
    speed: float
    up_mbps: float
    down_mbps: float
    latency_ms: float
    bytes_up: int = 0
    bytes_down: int = 0
    payload_up: int = 0
    payload_down: int = 0
    control_bytes: int = 0
    retransmissions: int = 0
    tasks_assigned: int = 0
    updates_sent: int = 0
    accepted: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)
    compute_s: float = 0.0
    lost_compute_s: float = 0.0
    up_s: float = 0.0
    utilization: float = 0.0
    crashes: int = 0
    evictions: int = 0
    rejoins: int = 0


@dataclass
class ByzantineReport:
    """Byzantine updates and what the defences did with them.

    ``rejected``: refused at admission (e.g. ``non-finite``, ``too-stale``); ``aggregated``: entered an
    aggregation; ``excluded``: left out by a selection rule (Krum, Multi-Krum, Bulyan). ``precision`` (of
    the excluded updates, the Byzantine share) and ``recall`` (of the Byzantine updates aggregated, the
    excluded share) are given only for selection rules without pre-aggregators, where exclusion is
    well-defined. ``attacks_deferred``: rounds a Byzantine worker sent its honest update because the attack
    had too few honest updates to observe yet.
    """

    workers: int = 0
    submitted: int = 0
    rejected: int = 0
    aggregated: int = 0
    excluded: int = 0
    honest_excluded: int = 0
    precision: float | None = None
    recall: float | None = None
    attacks_deferred: int = 0


@dataclass
class LeaseReport:
    """Task leases: granted, completed, expired or released (eviction), requeued, refused results."""

    grants: int = 0
    completions: int = 0
    renewals: int = 0
    expired: int = 0
    released: int = 0
    requeued: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    passes: int = 0


def percentiles(counts: Mapping[int, int], qs: tuple[float, ...] = (50, 90, 99)) -> dict[str, float]:
    """Nearest-rank percentiles (and the max) of a histogram ``value -> count``; empty: ``{}``."""
    total = sum(counts.values())
    if total == 0:
        return {}
    items = sorted(counts.items())
    out: dict[str, float] = {}
    for q in qs:
        rank = max(1, -(-q * total // 100))  # ceil(q/100 * total), at least 1
        seen = 0
        for value, count in items:
            seen += count
            if seen >= rank:
                out[f"p{q:g}"] = float(value)
                break
    out["max"] = float(items[-1][0])
    return out


@dataclass
class SimulationReport:
    """The outcome of one :class:`~dist_llm_train.simulation.Simulation` run (see the module docstring)."""

    topology: str
    mode: str
    n_workers: int
    seed: int
    codec: str
    aggregator: str
    model_params: int
    stop_reason: str
    virtual_s: float
    server_steps: int
    noop_steps: int
    straggler_timeouts: int
    tokens: int
    target_loss: float | None
    time_to_target_s: float | None
    steps_to_target: int | None
    initial_val_loss: float
    final_val_loss: float
    eval_history: list[EvalPoint]
    bytes_up: int
    bytes_down: int
    payload_up: int
    payload_down: int
    control_bytes: int
    fp32_up_bytes: int
    compression_ratio: float | None
    submitted: int
    accepted: int
    acceptance_rate: float
    rejected: dict[str, int]
    staleness: dict[int, int]
    staleness_percentiles: dict[str, float]
    utilization: float
    byzantine: ByzantineReport
    leases: LeaseReport
    workers: list[WorkerReport]
    events: int
    #: ``sync.step_wait``: requests parked for an imminent step, how many of those waits ran out before the
    #: step came, and the virtual seconds workers spent parked.
    step_waits: int = 0
    step_wait_timeouts: int = 0
    step_wait_s: float = 0.0
    wall_s: float = 0.0

    def to_dict(self, *, include_wall: bool = True) -> dict[str, Any]:
        """Plain JSON-ready data (staleness keys become strings)."""
        data = asdict(self)
        data["staleness"] = {str(k): v for k, v in sorted(self.staleness.items())}
        if not include_wall:
            data.pop("wall_s")
        return data

    def to_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as indented JSON to ``path`` (parents created); returns the path."""
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        return out
