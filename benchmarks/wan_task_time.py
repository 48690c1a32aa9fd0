"""Time per task of one worker process over an emulated WAN link, optionally against another checkout.

A ``dist-llm-train controller`` and one ``dist-llm-train worker`` run on 127.0.0.1 (plaintext); the worker
shapes its own link (``--latency-ms``, ``--bandwidth-mbps``: :class:`~dist_llm_train.runtime.LinkShaper`).
The time per task is measured by the controller from its push events (the first ``--warmup`` excluded).
On a slow link the protocol's round trips dominate: one worker, nothing to overlap them with.

``--baseline-src DIR`` also runs the same with ``PYTHONPATH=DIR`` (the ``src`` of another checkout, e.g. a
``git worktree`` of an older commit), alternating the two, so a protocol change can be measured as a ratio
in one run. The config is written without fields that checkout may not know (``--drop-field``).

    python benchmarks/wan_task_time.py --latency-ms 50 --bandwidth-mbps 100 \
        --baseline-src /tmp/old/src --json runs/bench/wan_task_time.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from dist_llm_train.config import config_to_yaml, load_config
from overhead import loopback, one_worker_overrides


def task_time_ms(
    config: Path, run_dir: Path, tasks: int, warmup: int, link: list[str], src: str | None
) -> float:
    """Mean time per task (ms) between the first kept push and the last one, measured at the controller."""
    rate, info = loopback(config, run_dir, tasks, warmup, secure=False, worker_args=link, pythonpath=src)
    return 1000.0 * info["tokens_per_task"] / rate


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="distributed-default", help="preset or YAML (model, data, codec)")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="one-way latency of the worker's link")
    parser.add_argument("--bandwidth-mbps", type=float, default=100.0, help="the worker's link rate")
    parser.add_argument("--tasks", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--baseline-src", default=None, help="another checkout's src directory to compare with"
    )
    parser.add_argument(
        "--drop-field", action="append", default=["lookahead"], help="config keys to leave out"
    )
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    cfg = load_config(args.config, one_worker_overrides(args.tasks))
    link = ["--latency-ms", str(args.latency_ms), "--bandwidth-mbps", str(args.bandwidth_mbps)]
    arms: dict[str, str | None] = {"this checkout": None}
    if args.baseline_src:
        arms = {"baseline": args.baseline_src, **arms}
    results: dict[str, list[float]] = {name: [] for name in arms}
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "run.yaml"
        # An older checkout rejects config keys it does not know: leave those out (their defaults apply).
        lines = config_to_yaml(cfg).splitlines()
        config.write_text(
            "\n".join(line for line in lines if line.strip().split(":")[0] not in args.drop_field),
            encoding="utf-8",
        )
        for r in range(args.rounds):
            for name, src in arms.items():
                results[name].append(
                    task_time_ms(
                        config,
                        Path(tmp) / f"{r}-{len(results[name])}-{name[0]}",
                        args.tasks,
                        args.warmup,
                        link,
                        src,
                    )
                )
    table = Table(
        title=f"one worker, {args.latency_ms:g} ms one-way, {args.bandwidth_mbps:g} Mbit/s, {args.tasks} tasks"
    )
    for col in ("code", "ms per task (median)", "all rounds"):
        table.add_column(col, justify="left" if col == "code" else "right")
    for name, runs in results.items():
        table.add_row(name, f"{statistics.median(runs):.0f}", ", ".join(f"{v:.0f}" for v in runs))
    Console().print(table)
    out: dict[str, Any] = {
        "latency_ms": args.latency_ms,
        "bandwidth_mbps": args.bandwidth_mbps,
        "tasks": args.tasks,
        "ms_per_task": results,
    }
    if args.baseline_src:
        speedup = statistics.median(results["baseline"]) / statistics.median(results["this checkout"])
        out["speedup"] = speedup
        print(f"tasks per second, this checkout / baseline = {speedup:.2f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
