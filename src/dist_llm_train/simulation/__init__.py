"""Virtual-clock WAN simulator: real training on simulated clusters of heterogeneous, unreliable workers.

Typical use::

    from dist_llm_train.simulation import Simulation

    report = Simulation(cfg, "multi-region", target_loss=2.5).run()
    print(report.virtual_s, report.time_to_target_s, report.acceptance_rate)

- :class:`EventEngine` / :class:`VirtualClock` — the discrete-event core (deterministic tie-break).
- :class:`Topology` and :func:`load_topology` — workers, links, speeds, crashes and roles from YAML;
  presets ``lan``, ``hetero-3tier``, ``multi-region`` in ``configs/topologies/``.
- :func:`transfer` — link arithmetic (latency, bandwidth, jitter, loss with retransmission).
- :class:`Simulation` — drives the runtime's coordinator, scheduler, leases, failure detector, codecs and
  attacks on the virtual clock; :class:`SimulationReport` is what it measured.
"""

from __future__ import annotations

from dist_llm_train.simulation.clock import VirtualClock
from dist_llm_train.simulation.engine import Event, EventEngine, RunOutcome
from dist_llm_train.simulation.links import Transfer, serialization_s, transfer
from dist_llm_train.simulation.report import (
    ByzantineReport,
    EvalPoint,
    LeaseReport,
    SimulationReport,
    WorkerReport,
    percentiles,
)
from dist_llm_train.simulation.simulator import (
    DEFAULT_BASE_TOKENS_PER_S,
    SimProgress,
    Simulation,
    resolve_topology,
)
from dist_llm_train.simulation.topology import (
    CrashSpec,
    Topology,
    WorkerProfile,
    WorkerSpec,
    available_topologies,
    default_topology,
    load_topology,
    parse_topology,
)

__all__ = [
    "DEFAULT_BASE_TOKENS_PER_S",
    "ByzantineReport",
    "CrashSpec",
    "EvalPoint",
    "Event",
    "EventEngine",
    "LeaseReport",
    "RunOutcome",
    "SimProgress",
    "Simulation",
    "SimulationReport",
    "Topology",
    "Transfer",
    "VirtualClock",
    "WorkerProfile",
    "WorkerReport",
    "WorkerSpec",
    "available_topologies",
    "default_topology",
    "load_topology",
    "parse_topology",
    "percentiles",
    "resolve_topology",
    "serialization_s",
    "transfer",
]
