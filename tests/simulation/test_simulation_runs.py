"""Whole simulations on a tiny GPT: determinism, crashes and leases, bytes, stragglers, Byzantine workers."""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dist_llm_train.cli import main
from dist_llm_train.compression import Encoded
from dist_llm_train.config import RunConfig
from dist_llm_train.coordination import WorkerEngine
from dist_llm_train.data import PreparedData
from dist_llm_train.simulation import Simulation, SimulationReport, Topology, parse_topology

# One task = 1 micro-batch x batch 4 x block 32 = 128 tokens: at 128 tokens/s a speed-1.0 worker computes
# for exactly 1 virtual second, which makes the timelines below easy to reason about.
TASK_TOKENS = 128

CfgFactory = Callable[..., RunConfig]


def _topo(*workers: dict[str, Any], name: str = "test") -> Topology:
    return parse_topology({"name": name, "workers": list(workers)})


def _lan(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "bandwidth_mbps": 1000, "latency_ms": 1, **extra}


def _run(
    cfg: RunConfig, topo: Topology | str | None, data: PreparedData, **kw: Any
) -> tuple[Simulation, SimulationReport]:
    sim = Simulation(cfg, topo, data=data, **kw)
    return sim, sim.run()


def _worker(report: SimulationReport, name: str) -> Any:
    return next(w for w in report.workers if w.name == name)


def _check_applied_once(sim: Simulation, report: SimulationReport) -> None:
    completed = [task for _, event, task, _ in sim.task_log if event == "complete"]
    assert len(completed) == len(set(completed)), "a task's result was accepted twice"
    assert report.submitted == len(completed) == report.leases.completions


def test_small_run_is_deterministic_and_model_sharing_changes_nothing(
    sim_cfg: CfgFactory, sim_data: PreparedData
) -> None:
    cfg = sim_cfg(
        "sync.buffer_size=3", "aggregation.rule=trimmed-mean", "aggregation.f=1", "training.max_steps=5"
    )
    topo = _topo(
        _lan("a", jitter_ms=0.5, loss=0.2, speed_jitter=0.3, count=2),
        _lan("b", speed=0.5, speed_jitter=0.2, jitter_ms=2),
        {"name": "byz", "bandwidth_mbps": 100, "latency_ms": 5, "role": "byzantine", "attack": "gaussian"},
    )
    reports = [
        _run(cfg, topo, sim_data, base_tokens_per_s=TASK_TOKENS, eval_every=2, share_model=share)[1]
        for share in (True, True, False)
    ]
    first = reports[0].to_dict(include_wall=False)
    assert first["server_steps"] == 5 and first["byzantine"]["submitted"] > 0
    assert sum(w["retransmissions"] for w in first["workers"]) > 0  # the lossy links were exercised
    assert reports[1].to_dict(include_wall=False) == first
    assert reports[2].to_dict(include_wall=False) == first
    other_seed = Simulation(cfg, topo, data=sim_data, base_tokens_per_s=TASK_TOKENS, seed=7).run()
    assert other_seed.to_dict(include_wall=False) != first


def test_model_sharing_is_safe_for_local_sgd_inner_optimisers(
    sim_cfg: CfgFactory, sim_data: PreparedData
) -> None:
    # Each worker's inner AdamW keeps its own moments for the shared parameters; every compute reloads them.
    cfg = sim_cfg("sync.mode=local-sgd", "sync.local_steps=3", "training.max_steps=3")
    shared, unshared = (_run(cfg, "lan", sim_data, share_model=s)[1] for s in (True, False))
    assert shared.to_dict(include_wall=False) == unshared.to_dict(include_wall=False)
    assert shared.final_val_loss < shared.initial_val_loss


@pytest.mark.parametrize("path", ["eviction", "lease-expiry"])
def test_crash_mid_task_requeues_the_task_to_another_worker(
    sim_cfg: CfgFactory, sim_data: PreparedData, path: str
) -> None:
    sched = (
        ["scheduling.heartbeat_interval_s=1", "scheduling.failure_timeout_s=3", "scheduling.lease_s=60"]
        if path == "eviction"
        else [
            "scheduling.heartbeat_interval_s=1",
            "scheduling.failure_timeout_s=1000",
            "scheduling.lease_s=3",
        ]
    )
    cfg = sim_cfg(*sched, "training.max_steps=50")
    topo = _topo(_lan("a", crash=[{"at_s": 0.5, "down_s": 20}]), _lan("b"), _lan("c"))
    sim, report = _run(cfg, topo, sim_data, base_tokens_per_s=TASK_TOKENS, eval_every=50)
    a = _worker(report, "a")
    assert a.crashes == 1 and a.rejoins == 1
    assert a.lost_compute_s == pytest.approx(0.5, abs=0.01)
    assert a.accepted > 0, "after rejoining, the worker contributes again"
    first = next(task for _, event, task, worker in sim.task_log if event == "grant" and worker == "a")
    history = [(event, worker) for _, event, task, worker in sim.task_log if task == first]
    if path == "eviction":
        assert a.evictions == 1 and report.leases.released >= 1
        assert ("release", "a") in history
    else:
        assert a.evictions == 0 and report.leases.expired >= 1
        assert ("expire", "") in history
    finisher = [worker for event, worker in history if event == "complete"]
    assert len(finisher) == 1 and finisher[0] in {"b", "c"}
    assert report.leases.requeued >= 1
    _check_applied_once(sim, report)


def test_late_result_of_an_expired_lease_is_refused(sim_cfg: CfgFactory, sim_data: PreparedData) -> None:
    # Leases of 2 s, renewed only by rare heartbeats: the 4 s tasks of the slow worker outlive them.
    cfg = sim_cfg(
        "scheduling.lease_s=2", "scheduling.heartbeat_interval_s=50", "scheduling.failure_timeout_s=200",
        "training.max_steps=16",
    )  # fmt: skip
    topo = _topo(_lan("fast", count=2), _lan("slow", speed=0.25))
    sim, report = _run(cfg, topo, sim_data, base_tokens_per_s=TASK_TOKENS, eval_every=50)
    slow = _worker(report, "slow")
    assert slow.refused.get("expired", 0) >= 1
    assert report.leases.refused.get("expired", 0) == slow.refused["expired"]
    refused = {task for _, event, task, w in sim.task_log if event == "refused-expired"}
    done_by = {task: w for _, event, task, w in sim.task_log if event == "complete"}
    assert all(done_by.get(task) != "slow" for task in refused)
    assert any(task in done_by for task in refused), "a refused task was redone by a fast worker"
    # The refused updates never reached the coordinator.
    assert slow.accepted + sum(slow.rejected.values()) == slow.updates_sent - sum(slow.refused.values())
    _check_applied_once(sim, report)


def test_bytes_accounting_matches_the_encoded_payloads(
    sim_cfg: CfgFactory, sim_data: PreparedData, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: Counter[int] = Counter()
    original = WorkerEngine.encode

    def recording(self: WorkerEngine, vector: Any) -> Encoded:
        encoded = original(self, vector)
        sent[id(self)] += encoded.nbytes
        return encoded

    monkeypatch.setattr(WorkerEngine, "encode", recording)
    cfg = sim_cfg("compression.codec=topk", "compression.params={ratio: 0.05}", "training.max_steps=8")
    sim = Simulation(cfg, "lan", data=sim_data)
    engines = {w.name: id(w.engine) for w in sim.workers}
    report = sim.run()
    assert report.payload_up == report.bytes_up == sum(sent.values()) > 0
    for w in report.workers:
        assert w.payload_up == w.bytes_up == sent[engines[w.name]]
        assert w.bytes_down == w.tasks_assigned * sim.pull_bytes
    assert 4 * sim.numel < sim.pull_bytes < 4 * sim.numel + 256
    assert report.fp32_up_bytes == 4 * sim.numel * sum(w.updates_sent for w in report.workers)
    assert report.compression_ratio == pytest.approx(report.fp32_up_bytes / report.payload_up)
    assert report.compression_ratio > 5


def test_sync_straggler_timeout_steps_without_the_slowest(
    sim_cfg: CfgFactory, sim_data: PreparedData
) -> None:
    cfg = sim_cfg("sync.mode=sync", "sync.straggler_timeout_s=2.5", "training.max_steps=6")
    topo = _topo(_lan("fast", count=3), _lan("slow", speed=0.1))
    _, report = _run(cfg, topo, sim_data, base_tokens_per_s=TASK_TOKENS, eval_every=50)
    assert report.server_steps == 6 and report.noop_steps == 0
    assert report.straggler_timeouts == 6
    assert report.virtual_s == pytest.approx(15.0)  # one step per 2.5 s timeout
    for i in range(3):
        assert _worker(report, f"fast-{i}").accepted == 6
    slow = _worker(report, "slow")
    assert slow.accepted == 0 and slow.rejected.get("stale-round", 0) >= 1


def test_step_wait_gives_workers_of_similar_speed_fresh_parameters(
    sim_cfg: CfgFactory, sim_data: PreparedData
) -> None:
    # 4 workers of one speed (+-10%) and a buffer of 4: without waiting, the first three to push each
    # compute their next update on a version the fourth push retires.
    topo = _topo(_lan("w", count=4, speed_jitter=0.1))
    base = ("sync.buffer_size=4", "training.max_steps=8")
    _, eager = _run(sim_cfg(*base), topo, sim_data, base_tokens_per_s=TASK_TOKENS, eval_every=50)
    _, waiting = _run(
        sim_cfg(*base, "sync.step_wait=0.25"), topo, sim_data, base_tokens_per_s=TASK_TOKENS, eval_every=50
    )
    assert eager.step_waits == 0 and eager.staleness_percentiles["p50"] >= 1
    assert waiting.server_steps == eager.server_steps == 8
    # A worker's task time is measured from its first result on, so the first three pushes of every round
    # wait: all 32 updates are fresh, for workers idle about 5% of the time (the spread of task times).
    assert waiting.step_waits == 3 * 8 and waiting.step_wait_timeouts == 0
    assert waiting.staleness == {0: 32}
    assert 0.0 < waiting.step_wait_s < 0.1 * 4 * waiting.virtual_s


def test_step_wait_runs_out_when_a_peer_never_pushes(sim_cfg: CfgFactory, sim_data: PreparedData) -> None:
    cfg = sim_cfg(
        "sync.buffer_size=3",
        "sync.step_wait=0.5",
        "training.max_steps=6",
        "scheduling.heartbeat_interval_s=1",
        "scheduling.failure_timeout_s=1000",
        "scheduling.lease_s=100",
    )
    # "dies" holds its lease for 100 s: the others' waits for a step it would complete all run out.
    topo = _topo(_lan("ok", count=3), _lan("dies", crash=[{"at_s": 1.5}]))
    _, report = _run(cfg, topo, sim_data, base_tokens_per_s=TASK_TOKENS, eval_every=50)
    assert report.server_steps == 6 and report.stop_reason == "max-steps"
    assert report.step_wait_timeouts >= 1
    assert report.virtual_s < 20.0  # bounded waits, never a barrier on the lost worker


def test_sync_without_timeout_waits_and_reports_a_stall(sim_cfg: CfgFactory, sim_data: PreparedData) -> None:
    cfg = sim_cfg("sync.mode=sync", "training.max_steps=5")
    topo = _topo(_lan("ok"), _lan("dies", crash=[{"at_s": 0.5}]))
    _, report = _run(cfg, topo, sim_data, base_tokens_per_s=TASK_TOKENS)
    # Once "ok" waits at the barrier only heartbeats are left: the run ends there instead of spinning.
    assert report.stop_reason == "stalled" and report.server_steps == 0
    assert _worker(report, "ok").accepted == 1 and report.virtual_s < 1.1


def test_rounds_that_can_never_complete_are_reported_as_stalled(
    sim_cfg: CfgFactory, sim_data: PreparedData
) -> None:
    # Sync without a straggler timeout needs every worker, but the NaN worker is always rejected.
    cfg = sim_cfg("sync.mode=sync", "cluster.byzantine=1", "cluster.attack=nonfinite")
    sim = Simulation(cfg, "lan", data=sim_data)
    sim.stall_pushes = 10
    report = sim.run()
    assert report.stop_reason == "stalled" and report.server_steps == 0
    assert report.rejected["non-finite"] == 11 - report.accepted


@pytest.mark.parametrize("attack", ["nonfinite", "label-flip", "optimal-ipm", "gaussian"])
def test_byzantine_workers_send_their_attack_and_training_goes_on(
    sim_cfg: CfgFactory, sim_data: PreparedData, attack: str
) -> None:
    cfg = sim_cfg("cluster.byzantine=1", f"cluster.attack={attack}", "training.max_steps=8")
    sim, report = _run(cfg, "lan", sim_data)
    byz = report.byzantine
    attacker = _worker(report, "node-3")
    assert byz.workers == 1 and byz.submitted == attacker.accepted + sum(attacker.rejected.values()) > 0
    assert report.server_steps == 8 and math.isfinite(report.final_val_loss)
    if attack == "nonfinite":
        assert report.rejected == {"non-finite": byz.submitted} and byz.rejected == byz.submitted
        # NaN cannot be encoded: it travelled raw, as fp32.
        assert attacker.payload_up == attacker.updates_sent * sim.pull_bytes
        assert report.final_val_loss < report.initial_val_loss
    else:
        assert byz.rejected == 0 and byz.aggregated == byz.submitted


def test_white_box_attack_waits_until_the_defenders_rule_can_run(
    sim_cfg: CfgFactory, sim_data: PreparedData
) -> None:
    """Regression: optimal-IPM's search ran the median (f=3, needs 7 rows) on the first honest update plus
    3 forged ones and crashed the run. It now forges only once it has seen 4 honest updates."""
    cfg = sim_cfg(
        "cluster.workers=7", "cluster.byzantine=3", "cluster.attack=optimal-ipm", "sync.buffer_size=7",
        "aggregation.rule=median", "aggregation.f=3", "training.max_steps=4",
    )  # fmt: skip
    _, report = _run(cfg, None, sim_data)
    assert report.server_steps == 4 and math.isfinite(report.final_val_loss)
    assert report.byzantine.attacks_deferred > 0


def test_selection_rules_report_exclusion_precision_and_recall(
    sim_cfg: CfgFactory, sim_data: PreparedData
) -> None:
    cfg = sim_cfg(
        "cluster.workers=5", "cluster.byzantine=1", "cluster.attack=sign-flip", "sync.buffer_size=5",
        "aggregation.rule=multi-krum", "aggregation.f=1", "training.max_steps=4",
    )  # fmt: skip
    _, report = _run(cfg, None, sim_data)
    byz = report.byzantine
    assert byz.aggregated > 0 and byz.precision is not None and byz.recall is not None
    assert byz.excluded + byz.honest_excluded > 0
    assert byz.recall == pytest.approx(byz.excluded / byz.aggregated)


def test_target_loss_stops_the_run_and_reports_the_time(sim_cfg: CfgFactory, sim_data: PreparedData) -> None:
    cfg = sim_cfg("training.max_steps=40", "training.lr=3e-3")
    _, full = _run(cfg, "lan", sim_data, eval_every=5, stop_at_target=False, target_loss=5.2)
    assert full.stop_reason == "max-steps" and full.time_to_target_s is not None
    point = next(p for p in full.eval_history if p.loss <= 5.2)
    assert (full.time_to_target_s, full.steps_to_target) == (point.virtual_s, point.step)
    _, stopped = _run(cfg, "lan", sim_data, eval_every=5, target_loss=5.2)
    assert stopped.stop_reason == "target-loss" and stopped.server_steps == point.step
    assert stopped.time_to_target_s == full.time_to_target_s


def test_hundred_workers_complete(sim_cfg: CfgFactory, sim_data: PreparedData) -> None:
    cfg = sim_cfg("cluster.workers=100", "sync.mode=sync", "training.max_steps=2")
    start = time.perf_counter()
    _, report = _run(cfg, None, sim_data, eval_every=50)
    wall = time.perf_counter() - start
    assert report.n_workers == 100 and report.server_steps == 2
    assert report.accepted == 200 and report.rejected == {}
    assert all(w.accepted == 2 and w.utilization > 0 for w in report.workers)
    assert wall < 300, f"100 workers x 2 sync steps took {wall:.0f} s"


def test_cli_simulate_prints_tables_and_writes_json(
    sim_cfg: CfgFactory, sim_data: PreparedData, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = sim_cfg()
    sets: list[str] = []
    for key in ("corpus", "path", "max_bytes", "shard_tokens", "cache_dir"):
        sets += ["-s", f"data.{key}={getattr(cfg.data, key)}"]
    for key in ("preset", "n_layer", "n_head", "n_embd", "block_size"):
        sets += ["-s", f"model.{key}={getattr(cfg.model, key)}"]
    sets += ["-s", "training.batch_size=4", "-s", "training.eval_batches=2", "-s", "telemetry.progress=false"]
    out = tmp_path / "report.json"
    code = main(["simulate", "--topology", "multi-region", "--steps", "3", "--json", str(out), *sets])
    printed = capsys.readouterr().out
    assert code == 0
    assert "simulation summary" in printed and "us-east" in printed
    data = json.loads(out.read_text())
    assert data["topology"] == "multi-region" and data["server_steps"] == 3 and len(data["workers"]) == 7
    assert main(["simulate", "--topology", "nowhere", *sets]) == 2
    assert "neither a file nor a preset" in capsys.readouterr().err
