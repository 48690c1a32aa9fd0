"""Tokens/s of one worker process over loopback vs the same work done in one process.

- **in-process**: one :class:`~dist_llm_train.coordination.WorkerEngine` and the coordinator in a single
  process, no sockets: for every task, compute the update on the current parameters, encode it (top-k
  with error feedback, as configured), decode it and submit it (the server steps). This is what the
  simulator runs.
- **loopback**: the real thing: ``dist-llm-train controller`` and one ``dist-llm-train worker`` process
  (CurveZMQ keys, as the launcher uses) on 127.0.0.1; per task the worker requests it, pulls the
  parameters (full fp32), computes, encodes and pushes, and the controller decodes, submits and steps.
  Tokens/s are measured by the controller from its push events (the first ``--warmup`` excluded).

Both run one torch thread on the same model (the ``distributed-default`` preset: gpt-tiny, 8 x 128 tokens
per task). Measurements are interleaved (in-process, loopback with CurveZMQ, loopback plaintext, ...,
in-process); each loopback run is compared with the mean of the two in-process runs around it, and the
median of these per-round ratios is the result, so drifting load on the machine hits both sides of each
ratio alike. The target is loopback >= 90% of in-process. A single worker is the worst case for the runtime: the controller's
server step and the parameter pull sit on the critical path of every task, with no other worker to
overlap them with.

    python benchmarks/overhead.py --tasks 100 --rounds 2 --json runs/bench/overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
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
from paired import paired_ratio, round_ratios

CLI = [sys.executable, "-m", "dist_llm_train.cli"]


def in_process(cfg: Any, tasks: int, warmup: int) -> float:
    """Tokens/s of compute + encode + decode + submit in one process."""
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
    for i in range(tasks):
        if i == warmup:
            started, tokens = time.perf_counter(), 0
        version = server.version
        update = engine.compute(server.snapshot(), version, WorkItem(shard.start, shard.end, 1, i))  # type: ignore[arg-type]
        encoded = engine.encode(update.vector)
        coordinator.submit(Update("w", version, decode(encoded), update.tokens, i, encoded.nbytes))
        tokens += update.tokens
    return tokens / (time.perf_counter() - started)


def loopback(
    config: Path,
    run_dir: Path,
    tasks: int,
    warmup: int,
    *,
    secure: bool = True,
    worker_args: Sequence[str] = (),
    pythonpath: str | None = None,
) -> tuple[float, dict[str, Any]]:
    """Tokens/s of one worker process against a controller process, measured at the controller.

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
    rate = (len(kept) - 1) * tokens_per_task / (kept[-1]["time"] - kept[0]["time"])
    return rate, {"pushes": len(pushes), "tokens_per_task": tokens_per_task}


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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="distributed-default", help="preset or YAML (model, data, codec)")
    parser.add_argument("--tasks", type=int, default=120, help="tasks (updates) per measurement")
    parser.add_argument("--warmup", type=int, default=10, help="tasks excluded at the start")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved measurement rounds (median)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config, one_worker_overrides(args.tasks))
    # Interleaved (in-process, loopback, loopback plaintext) rounds, then one more in-process run: load on the
    # machine drifts over minutes, and every loopback run sits between two in-process runs.
    local: list[float] = []
    secure: list[float] = []
    plain: list[float] = []
    info: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "run.yaml"
        config.write_text(config_to_yaml(cfg), encoding="utf-8")
        for r in range(args.rounds):
            local.append(in_process(cfg, args.tasks, args.warmup))
            rate, info = loopback(config, Path(tmp) / f"curve-{r}", args.tasks, args.warmup, secure=True)
            secure.append(rate)
            plain.append(loopback(config, Path(tmp) / f"plain-{r}", args.tasks, args.warmup, secure=False)[0])
        local.append(in_process(cfg, args.tasks, args.warmup))
    base = statistics.median(local)
    # Headline: each loopback run against the mean of the two in-process runs around it, then the median
    # over rounds. The machine's speed drifts by 20% and more over minutes, and a ratio of pooled medians
    # mixes runs from different speeds; the paired ratio compares runs taken a minute apart.
    ratio_secure = paired_ratio(secure, local)
    ratio_plain = paired_ratio(plain, local)
    table = Table(title=f"one worker, {cfg.model.preset}, codec {cfg.compression.codec}, {args.tasks} tasks")
    table.add_column("path")
    table.add_column("tokens/s (median)", justify="right")
    table.add_column("vs in-process (paired)", justify="right")
    table.add_column("per round", justify="right")
    table.add_column("all runs", justify="right")
    for label, runs in (
        ("in-process (engine + coordinator)", local),
        ("worker over loopback, CurveZMQ (as the launcher runs)", secure),
        ("worker over loopback, plaintext", plain),
    ):
        paired = runs is not local
        table.add_row(
            label,
            f"{statistics.median(runs):,.0f}",
            f"{paired_ratio(runs, local):.2f}" if paired else "1.00",
            ", ".join(f"{v:.2f}" for v in round_ratios(runs, local)) if paired else "",
            ", ".join(f"{v:,.0f}" for v in runs),
        )
    Console().print(table)
    for label, ratio in (("CurveZMQ", ratio_secure), ("plaintext", ratio_plain)):
        print(
            f"loopback ({label}) / in-process = {ratio:.2f} (target >= 0.90): {'met' if ratio >= 0.9 else 'MISSED'}"
        )
    if args.json:
        out = {
            "config": args.config,
            "tasks": args.tasks,
            "rounds": args.rounds,
            "in_process_tokens_per_s": local,
            "loopback_curve_tokens_per_s": secure,
            "loopback_plaintext_tokens_per_s": plain,
            "ratio_curve": ratio_secure,
            "ratio_plaintext": ratio_plain,
            "round_ratios_curve": round_ratios(secure, local),
            "round_ratios_plaintext": round_ratios(plain, local),
            "ratio_of_medians_curve": statistics.median(secure) / base,
            "ratio_of_medians_plaintext": statistics.median(plain) / base,
            "target": 0.9,
            **info,
            "machine": {"python": platform.python_version(), "torch": torch.__version__},
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
