"""Fixtures for the convergence tests: a real small GPT on real text, trained through the WAN simulator.

Every test trains the same character-level GPT (2 layers, 2 heads, 64 wide, context 32: 106k parameters)
on tinyshakespeare (``<repo>/../shared/data``), 512 tokens per gradient, and compares final validation
losses on 8 fixed evaluation batches. The corpus is tokenised once per session, and reports are memoised
by their inputs so the clean baselines that several tests compare against are trained once.

The margins in the tests are stated as named constants with the value they were measured at; runs are
deterministic for a seed (the simulator is), so a margin only has to cover changes of the code under
test, not run-to-run noise.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from dist_llm_train.config import RunConfig, load_config
from dist_llm_train.data import PreparedData, prepare_data
from dist_llm_train.simulation import Simulation, SimulationReport, Topology, parse_topology

BLOCK = 32


# The 7-worker synchronous cluster of the robust-aggregation and attack tests. Nesterov SGD on the server
# (lr 0.1, momentum 0.9) instead of AdamW: Adam divides every coordinate by its own running scale, which
# makes the mean immune to attacks that only rescale it (sign flip and zero shrink the mean's step by
# (h - f)/n, scaling x1000 keeps its direction), so under AdamW those attacks could not hurt the mean
# measurably and the tests would prove nothing. 7 workers: Bulyan needs n >= 4f + 3 with f = 1, and the
# attack tests need f = 2 < n/3. Measured: 60 steps of this take the validation loss from 4.19 to 2.67.
SYNC7 = (
    "sync.mode=sync",
    "cluster.workers=7",
    "training.max_steps=60",
    "sync.server_optimizer=nesterov",
    "sync.server_lr=0.1",
    "sync.server_momentum=0.9",
)


def _lan_topology(speeds: Iterable[float], speed_jitter: float = 0.1, name: str = "lan") -> Topology:
    workers = [
        {"name": f"w{i}", "bandwidth_mbps": 1000, "latency_ms": 1, "speed": s, "speed_jitter": speed_jitter}
        for i, s in enumerate(speeds)
    ]
    return parse_topology({"name": name, "workers": workers})


@pytest.fixture(scope="session")
def lan_topology() -> Callable[..., Topology]:
    """``lan_topology([2, 0.5, ...])``: workers ``w0..`` of those relative speeds (x 1 +- 10 % per task) on
    a 1 Gbit/s, 1 ms LAN, so compute time, not the network, decides who is stale."""
    return _lan_topology


@pytest.fixture(scope="session")
def sync7() -> tuple[str, ...]:
    """Overrides of the 7-worker synchronous cluster (see ``SYNC7``)."""
    return SYNC7


@pytest.fixture(scope="session")
def conv_cfg(shared_data: Path, session_cache_dir: Path) -> Callable[..., RunConfig]:
    """``conv_cfg("sync.mode=async", ...)``: the convergence config with ``--set`` style overrides."""
    corpus = shared_data / "tinyshakespeare" / "input.txt"
    if not corpus.is_file():
        raise RuntimeError(f"tinyshakespeare not found at {corpus}: CI places ../shared beside the checkout")
    base = [
        "data.corpus=tinyshakespeare",
        f"data.path={corpus}",
        "data.tokenizer=char",
        "data.max_bytes=1200000",
        "data.shard_tokens=8192",
        f"data.cache_dir={session_cache_dir}",
        "model.preset=custom",
        "model.n_layer=2",
        "model.n_head=2",
        "model.n_embd=64",
        f"model.block_size={BLOCK}",
        "training.batch_size=16",
        "training.eval_batches=8",
        "training.warmup_steps=5",
        "training.lr=3e-3",
        "training.min_lr=3e-4",
        "training.threads=1",
        "training.seed=1337",
        "telemetry.progress=false",
    ]

    def make(*overrides: str) -> RunConfig:
        return load_config(None, [*base, *overrides])

    return make


@pytest.fixture(scope="session")
def conv_data(conv_cfg: Callable[..., RunConfig]) -> PreparedData:
    return prepare_data(conv_cfg().data, block_size=BLOCK)


@pytest.fixture(scope="session")
def simulate(
    conv_cfg: Callable[..., RunConfig], conv_data: PreparedData, request: pytest.FixtureRequest
) -> Callable[..., tuple[Simulation, SimulationReport]]:
    """``simulate(overrides, topology=None, **simulation_kwargs) -> (simulation, report)``: one run, for
    tests that inspect the simulation itself (task log, learned bounds). Not memoised: a finished
    simulation still holds its model, parameter history and worker state."""
    measured: dict[str, dict[str, Any]] = {}

    def run(
        overrides: Iterable[str], topology: Topology | str | None = None, **kwargs: Any
    ) -> tuple[Simulation, SimulationReport]:
        overrides = tuple(overrides)
        sim = Simulation(conv_cfg(*overrides), topology, data=conv_data, **kwargs)
        report = sim.run()
        name = topology.name if isinstance(topology, Topology) else str(topology)
        measured[" ".join([*overrides, f"topology={name}"])] = _summary(report)
        return sim, report

    def dump() -> None:
        # DLT_CONVERGENCE_JSON=<path>: write what every run measured (docs/results_coordination.md quotes it).
        path = os.environ.get("DLT_CONVERGENCE_JSON")
        if path and measured:
            out = Path(path)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(measured, indent=1, sort_keys=True) + "\n", encoding="utf-8")

    request.addfinalizer(dump)
    return run


def _summary(report: SimulationReport) -> dict[str, Any]:
    return {
        "initial_val_loss": round(report.initial_val_loss, 4),
        "final_val_loss": round(report.final_val_loss, 4),
        "server_steps": report.server_steps,
        "acceptance_rate": round(report.acceptance_rate, 4),
        "rejected": report.rejected,
        "virtual_s": round(report.virtual_s, 3),
        "compression_ratio": None if report.compression_ratio is None else round(report.compression_ratio, 2),
        "wall_s": round(report.wall_s, 1),
    }


@pytest.fixture(scope="session")
def run_sim(simulate: Callable[..., tuple[Simulation, SimulationReport]]) -> Callable[..., SimulationReport]:
    """``run_sim(overrides, topology=None, **simulation_kwargs) -> report``, memoised on the overrides, the
    topology and the arguments: a baseline that several tests compare against is trained once."""
    cache: dict[str, SimulationReport] = {}

    def run(
        overrides: Iterable[str], topology: Topology | str | None = None, **kwargs: Any
    ) -> SimulationReport:
        overrides = tuple(overrides)
        topo_key = topology.model_dump_json() if isinstance(topology, Topology) else str(topology)
        key = repr((overrides, topo_key, sorted(kwargs.items())))
        if key not in cache:
            cache[key] = simulate(overrides, topology, **kwargs)[1]
        return cache[key]

    return run
