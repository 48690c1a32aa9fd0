"""Tokens/s of one worker process over loopback vs the same work done in one process.

- **in-process**: one :class:`~dist_llm_train.coordination.WorkerEngine` and the coordinator in a single
  process, no sockets: for every task, compute the update on the current parameters, encode it (top-k
  with error feedback, as configured), decode it and submit it (the server steps). This is what the
  simulator runs. Each measurement runs in a fresh process started as the worker is
  (``--in-process-here``: in this one; see :func:`in_process_fresh`).
- **loopback**: the real thing: ``dist-llm-train controller`` and one ``dist-llm-train worker`` process
  (CurveZMQ keys, as the launcher uses) on 127.0.0.1; per task the worker requests it, pulls the
  parameters (full fp32), computes, encodes and pushes, and the controller decodes, submits and steps.
  Tokens/s are measured by the controller from its push events (the first ``--warmup`` excluded: by
  default the first ``sync.history`` + 10, while the server's history of versions fills).

Both run one torch thread on the same model (the ``distributed-default`` preset: gpt-tiny, 8 x 128 tokens
per task). Measurements take turns: in-process, loopback with CurveZMQ, in-process, loopback plaintext,
in-process, ...; each loopback run is compared with the mean of the two in-process runs just before and
after it, and the median of these per-run ratios is the result, so the machine's drift over minutes hits
both sides of each ratio alike. The in-process run and the worker compute on the same pinned CPU and
the controller runs on the others (``--cpu``; see :class:`Placement` for why). The target is loopback >=
90% of in-process.

A single worker is the worst case for the runtime: the controller's server step and the parameter pull
sit on the critical path of every task, with no other worker to overlap them with. The table also gives
the milliseconds per task spent outside the worker's compute + encode (the time between pushes minus the
compute time the worker reports; in-process, the task's time minus its compute + encode): the runtime's
own cost per task, which the machine's speed phases move far less than the tokens/s.

    python benchmarks/overhead.py --tasks 120 --rounds 4 --json runs/bench/overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from dist_llm_train.compression import decode
from dist_llm_train.config import config_to_yaml, load_config
from dist_llm_train.coordination import (
    Update,
    WorkerEngine,
    WorkItem,
    build_coordinator,
    build_server,
    flatten_params,
)
from dist_llm_train.data import prepare_data
from dist_llm_train.models import build_model, resolve_model_shapes
from dist_llm_train.runtime.launcher import free_port
from dist_llm_train.runtime.security import generate_keys
from dist_llm_train.telemetry import read_metrics
from paired import bracketed_ratios, machine_description, split_cpus

CLI = [sys.executable, "-m", "dist_llm_train.cli"]


@dataclass(frozen=True)
class Placement:
    """CPUs for the compute (the in-process run, the worker process) and for the controller process.

    Left to the scheduler, each run computes on whichever CPU it lands on, and the two vCPUs of the
    machines these numbers were taken on did not always run alike (in-process compute per task, four
    alternating runs each: 124-172 ms on one, 157-165 ms on the other). Pinned, both sides of a ratio
    compute on the same CPU, and the controller, a process of its own as on a real cluster, gets the others.
    """

    compute: frozenset[int]
    controller: frozenset[int]

    @classmethod
    def choose(cls, cpu: int | None) -> Placement | None:
        split = split_cpus(cpu)
        return None if split is None else cls(*split)


def in_process_fresh(
    config: Path, tasks: int, warmup: int, placement: Placement | None = None
) -> tuple[float, dict[str, float]]:
    """:func:`in_process` in a process of its own, started as the worker is (same environment, same CPU).

    Both sides of a ratio then start from a fresh process with nothing left over from earlier
    measurements, as a trainer a user starts would. (In session 8 it made no visible difference: fresh
    processes computed a task in 134-176 ms, runs in the benchmark's own process in 143-193 ms.)
    """
    command = [sys.executable, __file__, "--measure-in-process", str(config)]
    command += ["--tasks", str(tasks), "--warmup", str(warmup)]
    command += ["--cpu", "-1" if placement is None else str(min(placement.compute))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600, check=False)
    if out.returncode != 0:
        raise SystemExit(f"the in-process measurement failed:\n{out.stderr[-2000:]}")
    rate, info = json.loads(out.stdout.strip().splitlines()[-1])
    return float(rate), info


def in_process(
    cfg: Any, tasks: int, warmup: int, placement: Placement | None = None
) -> tuple[float, dict[str, float]]:
    """Tokens/s of compute + encode + decode + submit in one process, and the median milliseconds per task
    of compute + encode (what the worker reports as its compute time) and of the whole task. ``placement``:
    run on its compute CPU."""
    if placement is not None:
        previous = os.sched_getaffinity(0)
        os.sched_setaffinity(0, placement.compute)
        try:
            return in_process(cfg, tasks, warmup)
        finally:
            os.sched_setaffinity(0, previous)
    shapes = resolve_model_shapes(cfg.model)
    data = prepare_data(cfg.data, block_size=int(shapes["block_size"]))
    torch.manual_seed(cfg.training.seed)
    model = build_model(cfg.model, data.tokenizer.vocab_size)
    server = build_server(cfg, flatten_params(model))
    coordinator = build_coordinator(cfg, server, n_workers=1)
    engine = WorkerEngine(model, data.train, cfg)
    shard = data.shards[0]
    tokens = 0
    started = 0.0
    compute_s: list[float] = []
    for i in range(tasks):
        if i == warmup:
            started, tokens = time.perf_counter(), 0
        version = server.version
        task_started = time.perf_counter()
        update = engine.compute(server.snapshot(), version, WorkItem(shard.start, shard.end, 1, i))  # type: ignore[arg-type]
        encoded = engine.encode(update.vector)
        if i >= warmup:
            compute_s.append(time.perf_counter() - task_started)
        coordinator.submit(Update("w", version, decode(encoded), update.tokens, i, encoded.nbytes))
        tokens += update.tokens
    elapsed = time.perf_counter() - started
    return tokens / elapsed, {
        "compute_ms": 1000 * statistics.median(compute_s),
        "task_ms": 1000 * elapsed / (tasks - warmup),
    }


def loopback(
    config: Path,
    run_dir: Path,
    tasks: int,
    warmup: int,
    *,
    secure: bool = True,
    worker_args: Sequence[str] = (),
    pythonpath: str | None = None,
    placement: Placement | None = None,
) -> tuple[float, dict[str, Any]]:
    """Tokens/s of one worker process against a controller process, measured at the controller.

    ``placement``: pin the worker and the controller to these CPUs (``None``: leave it to the scheduler).
    ``worker_args``: more worker options (e.g. link shaping); ``pythonpath``: run both processes from
    another checkout's ``src`` instead of this one."""
    run_dir.mkdir(parents=True, exist_ok=True)
    keys, allow = run_dir / "keys", run_dir / "allow"
    controller_security = ["--insecure"]
    worker_security = ["--insecure"]
    if secure:
        generate_keys(keys, "controller")
        public, _ = generate_keys(keys, "worker")
        allow.mkdir(parents=True)
        (allow / "worker.key").write_bytes(public.read_bytes())
        controller_security = ["--keys", str(keys), "--allow", str(allow)]
        worker_security = [
            "--keys",
            str(keys / "worker.key_secret"),
            "--server-key",
            str(keys / "controller.key"),
        ]
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    controller = subprocess.Popen(
        [
            *CLI,
            "controller",
            "--config",
            str(config),
            "--bind",
            endpoint,
            "--run-dir",
            str(run_dir / "run"),
            *controller_security,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    if placement is not None:
        os.sched_setaffinity(controller.pid, placement.controller)
    worker = subprocess.Popen(
        [
            *CLI,
            "worker",
            "--controller",
            endpoint,
            *worker_security,
            "--max-tasks",
            str(tasks),
            "--threads",
            "1",
            *worker_args,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    if placement is not None:
        # Set before the worker has finished importing torch, so its threads inherit it.
        os.sched_setaffinity(worker.pid, placement.compute)
    try:
        worker.wait(timeout=3600)
    finally:
        controller.terminate()
        controller.wait(timeout=120)
    if worker.returncode != 0:
        raise SystemExit(
            f"the worker exited with {worker.returncode} (PYTHONPATH={pythonpath or 'unchanged'})"
        )
    pushes = [r for r in read_metrics(run_dir / "run" / "metrics.jsonl", "push") if r["accepted"]]
    kept = pushes[warmup:]
    tokens_per_task = read_metrics(run_dir / "run" / "metrics.jsonl", "summary")[-1]["coordinator"][
        "tokens"
    ] / len(pushes)
    period_s = (kept[-1]["time"] - kept[0]["time"]) / (len(kept) - 1)
    return tokens_per_task / period_s, {
        "pushes": len(pushes),
        "tokens_per_task": tokens_per_task,
        # The worker's own compute + encode time per task (its PUSH reports it), and the time between pushes.
        "compute_ms": 1000 * statistics.median(r["compute_s"] for r in kept[1:]),
        "task_ms": 1000 * period_s,
    }


def one_worker_overrides(tasks: int) -> list[str]:
    """One worker, one update per server step with the plain mean, no evaluation or checkpoints in the
    way: what the per-task benchmarks measure (room for ``tasks`` tasks ten times over)."""
    return [
        "cluster.workers=1",
        "cluster.speeds=null",
        "sync.mode=async",
        "sync.buffer_size=1",
        "aggregation.rule=mean",
        "aggregation.f=0",
        "aggregation.params={}",
        "training.eval_interval=1000000",
        f"training.max_steps={tasks * 10}",
        "training.checkpoint_interval=null",
        "training.threads=1",
        "telemetry.progress=false",
    ]


def _overhead_ms(info: list[dict[str, float]]) -> float:
    """Median over runs of the time per task spent outside compute + encode."""
    return statistics.median(run["task_ms"] - run["compute_ms"] for run in info)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="distributed-default", help="preset or YAML (model, data, codec)")
    parser.add_argument("--tasks", type=int, default=120, help="tasks (updates) per measurement")
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="tasks excluded at the start (default: the server's history size + 10, so that only the steady "
        "state is measured)",
    )
    parser.add_argument(
        "--rounds", type=int, default=4, help="rounds of (CurveZMQ, plaintext) loopback runs (median)"
    )
    parser.add_argument(
        "--cpu",
        type=int,
        default=max(os.sched_getaffinity(0)),
        help="CPU for the compute (in-process run and worker); the controller gets the others "
        "(default: the highest-numbered CPU; -1: no pinning)",
    )
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument(
        "--in-process-here",
        action="store_true",
        help="run the in-process measurements in this process instead of a fresh one each",
    )
    parser.add_argument("--measure-in-process", metavar="CONFIG", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.measure_in_process:
        # The child of in_process_fresh: one measurement, printed as JSON.
        if args.cpu >= 0:
            os.sched_setaffinity(0, {args.cpu})
        child_cfg = load_config(args.measure_in_process)
        print(json.dumps(in_process(child_cfg, args.tasks, args.warmup)))
        return
    cfg = load_config(args.config, one_worker_overrides(args.tasks))
    placement = Placement.choose(None if args.cpu < 0 else args.cpu)
    if args.warmup is None:
        # The first `history` versions each keep a new full-size copy of the parameters in the server's
        # history: fresh memory, so page faults on every step. At 0.84M parameters the controller took 1,646
        # minor faults per push and 20.2 ms to handle it during that phase, 0 and 13.6 ms after it; in one
        # process it is 823 faults per step. A transient of a run's first steps, not the steady cost.
        args.warmup = cfg.sync.history + 10
    if args.tasks < args.warmup + 3:
        raise SystemExit(
            f"--tasks {args.tasks} leaves fewer than 3 measured tasks after --warmup {args.warmup}"
        )
    # Schedule: in-process, CurveZMQ, in-process, plaintext, in-process, CurveZMQ, ... in-process. The
    # machine's speed drifts by 20% and more over minutes; every loopback run is compared with the mean of
    # the two in-process runs just before and after it, so both sides of each ratio see the same minute.
    local: list[float] = []
    local_info: list[dict[str, float]] = []
    runs: dict[str, list[float]] = {"curve": [], "plain": []}
    infos: dict[str, list[dict[str, Any]]] = {"curve": [], "plain": []}
    positions: dict[str, list[int]] = {"curve": [], "plain": []}

    def measure_in_process() -> None:
        if args.in_process_here:
            rate, info = in_process(cfg, args.tasks, args.warmup, placement)
        else:
            rate, info = in_process_fresh(config, args.tasks, args.warmup, placement)
        local.append(rate)
        local_info.append(info)

    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "run.yaml"
        config.write_text(config_to_yaml(cfg), encoding="utf-8")
        measure_in_process()
        for r in range(args.rounds):
            for path in ("curve", "plain"):
                positions[path].append(len(local) - 1)
                rate, info = loopback(
                    config,
                    Path(tmp) / f"{path}-{r}",
                    args.tasks,
                    args.warmup,
                    secure=path == "curve",
                    placement=placement,
                )
                runs[path].append(rate)
                infos[path].append(info)
                measure_in_process()
    ratios = {path: bracketed_ratios(runs[path], local, positions[path]) for path in runs}
    headline = {path: statistics.median(values) for path, values in ratios.items()}
    labels = {
        "curve": "worker over loopback, CurveZMQ (as the launcher runs)",
        "plain": "worker over loopback, plaintext",
    }
    table = Table(title=f"one worker, {cfg.model.preset}, codec {cfg.compression.codec}, {args.tasks} tasks")
    table.add_column("path")
    table.add_column("tokens/s (median)", justify="right")
    table.add_column("vs in-process (paired)", justify="right")
    table.add_column("per run", justify="right")
    table.add_column("ms per task outside compute", justify="right")
    table.add_row(
        "in-process (engine + coordinator)" + (", this process" if args.in_process_here else ""),
        f"{statistics.median(local):,.0f}",
        "1.00",
        "",
        f"{_overhead_ms(local_info):.1f}",
    )
    for path, label in labels.items():
        table.add_row(
            label,
            f"{statistics.median(runs[path]):,.0f}",
            f"{headline[path]:.2f}",
            ", ".join(f"{v:.2f}" for v in ratios[path]),
            f"{_overhead_ms(infos[path]):.1f}",
        )
    Console().print(table)
    if placement is not None:
        print(
            f"compute (in-process and worker) pinned to CPU {sorted(placement.compute)}, "
            f"the controller to CPUs {sorted(placement.controller)}"
        )
    print(
        "compute + encode per task, median over runs (ms): "
        f"in-process {statistics.median(i['compute_ms'] for i in local_info):.1f}, "
        f"worker {statistics.median(i['compute_ms'] for i in infos['curve'] + infos['plain']):.1f}"
    )
    for path, name in (("curve", "CurveZMQ"), ("plain", "plaintext")):
        ratio = headline[path]
        print(
            f"loopback ({name}) / in-process = {ratio:.2f} (target >= 0.90): {'met' if ratio >= 0.9 else 'MISSED'}"
        )
    if args.json:
        out = {
            "config": args.config,
            "tasks": args.tasks,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "schedule": "in-process, curve, in-process, plaintext, in-process, ...",
            "in_process_tokens_per_s": local,
            "loopback_curve_tokens_per_s": runs["curve"],
            "loopback_plaintext_tokens_per_s": runs["plain"],
            "ratio_curve": headline["curve"],
            "ratio_plaintext": headline["plain"],
            "run_ratios_curve": ratios["curve"],
            "run_ratios_plaintext": ratios["plain"],
            "ratio_of_medians_curve": statistics.median(runs["curve"]) / statistics.median(local),
            "ratio_of_medians_plaintext": statistics.median(runs["plain"]) / statistics.median(local),
            "in_process_runs": local_info,
            "loopback_curve_runs": infos["curve"],
            "loopback_plaintext_runs": infos["plain"],
            "ms_per_task_outside_compute": {
                "in_process": _overhead_ms(local_info),
                "curve": _overhead_ms(infos["curve"]),
                "plaintext": _overhead_ms(infos["plain"]),
            },
            "in_process": "this process" if args.in_process_here else "a fresh process per run",
            "placement": None
            if placement is None
            else {"compute": sorted(placement.compute), "controller": sorted(placement.controller)},
            "target": 0.9,
            "machine": machine_description(),
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
