"""Asynchronous training on heterogeneous workers, with and without update compression.

The ``hetero-3tier`` cluster (2 GPU-class workers at 2x speed, 2 CPU workers at 0.5x, 2 slow devices at
0.25x, all behind 100 Mbit/s links with 20 ms latency) trains one small GPT asynchronously on the virtual
clock of the simulator, once per codec: ``none`` (fp32), ``topk`` (1 % of the coordinates, with error
feedback) and ``fp16``. Everything except the codec is identical, so the table shows what compression
changes: bytes sent, the staleness the slow tiers' updates arrive with, how many updates the staleness
bound admits, virtual time, and the final validation loss after the same number of server steps
(about 30 s of CPU for all three at the defaults)::

    python examples/demo_async_compression.py                      # about a minute of CPU per codec
    python examples/demo_async_compression.py --mode adaptive      # per-worker bounds: slow tiers admitted
    python examples/demo_async_compression.py --steps 600 --json runs/demo.json

Reading the table: with a fixed bound (``--max-staleness``) the slow tiers' updates are rejected as
``too-stale`` (acceptance below 100 %); ``--mode adaptive`` derives each worker's bound from its measured
speed and admits them. Compression shortens every push, so the same steps take less virtual time. Top-k
1 % sends about 1/76 of the fp32 bytes and error feedback carries the unsent 99 % into later pushes; fp16
halves the bytes. Parameter pulls stay fp32, so the bytes down do not change.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from dist_llm_train.config import RunConfig, load_config
from dist_llm_train.data import prepare_data
from dist_llm_train.errors import UserError
from dist_llm_train.simulation import Simulation, SimulationReport
from dist_llm_train.simulation.render import format_bytes

REPO_ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"

# (label, codec, params): the three codecs the previous version of this demo compared.
CODECS: dict[str, tuple[str, dict[str, Any]]] = {
    "none": ("none", {}),
    "topk": ("topk", {"ratio": 0.01}),
    "fp16": ("fp16", {}),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200, help="server steps per codec (default 200)")
    p.add_argument(
        "--mode",
        choices=("async", "adaptive"),
        default="async",
        help="async: one staleness bound for all; adaptive: per-worker bounds from measured speed",
    )
    p.add_argument(
        "--max-staleness",
        type=int,
        default=4,
        help="async: the bound for every worker; adaptive: the bound of the fastest (default 4)",
    )
    p.add_argument("--buffer-size", type=int, default=1, help="updates aggregated per server step")
    p.add_argument("--codecs", nargs="+", choices=tuple(CODECS), default=list(CODECS))
    p.add_argument("--topk-ratio", type=float, default=0.01, help="share of coordinates top-k keeps")
    p.add_argument(
        "--corpus",
        choices=("auto", "tinyshakespeare", "python-stdlib"),
        default="auto",
        help="auto: tinyshakespeare from ../shared/data when present, else the Python standard library",
    )
    p.add_argument("--data-path", type=Path, default=SHAKESPEARE, help="tinyshakespeare input.txt")
    p.add_argument(
        "--topology", default="hetero-3tier", help="topology preset or YAML (default hetero-3tier)"
    )
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--eval-every", type=int, default=50, help="server steps between validation losses")
    p.add_argument("--json", type=Path, default=None, help="also write every report as JSON here")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace, codec: str, params: dict[str, Any]) -> RunConfig:
    corpus = args.corpus
    if corpus == "auto":
        corpus = "tinyshakespeare" if args.data_path.is_file() else "python-stdlib"
    if corpus == "tinyshakespeare":
        if not args.data_path.is_file():
            raise UserError(
                f"--data-path {args.data_path} is not a file; point it at tinyshakespeare's input.txt "
                "or use --corpus python-stdlib"
            )
        data = ["data.corpus=tinyshakespeare", f"data.path={args.data_path}", "data.tokenizer=char"]
    else:
        data = ["data.corpus=python-stdlib", "data.tokenizer=byte", "data.max_bytes=1500000"]
    overrides = [
        *data,
        "data.shard_tokens=8192",
        "model.preset=custom",
        "model.n_layer=2",
        "model.n_head=2",
        "model.n_embd=64",
        "model.block_size=32",
        "training.batch_size=16",
        "training.lr=3e-3",
        "training.min_lr=3e-4",
        "training.warmup_steps=10",
        # Asynchrony already acts like momentum (Mitliagkas et al. 2016): less of Adam's own keeps stale
        # updates from overshooting.
        "training.beta1=0.5",
        "training.eval_batches=8",
        "training.threads=1",
        f"training.max_steps={args.steps}",
        f"training.seed={args.seed}",
        f"sync.mode={args.mode}",
        f"sync.max_staleness={args.max_staleness}",
        f"sync.buffer_size={args.buffer_size}",
        f"compression.codec={codec}",
        "telemetry.progress=false",
    ]
    cfg = load_config(None, overrides)
    cfg.compression.params = dict(params)
    return cfg


def staleness_mean(report: SimulationReport) -> float | None:
    total = sum(report.staleness.values())
    return sum(k * v for k, v in report.staleness.items()) / total if total else None


def table(reports: dict[str, SimulationReport]) -> Table:
    t = Table(title="async training on hetero-3tier (GPU 2x / CPU 0.5x / slow 0.25x)")
    for col in (
        "codec",
        "accepted",
        "staleness mean",
        "p50/p90/p99/max",
        "ratio",
        "up / down",
        "virt. s",
        "loss",
    ):
        t.add_column(col, justify="left" if col == "codec" else "right")
    for label, r in reports.items():
        sp = r.staleness_percentiles
        mean = staleness_mean(r)
        t.add_row(
            label,
            f"{r.accepted}/{r.submitted} ({r.acceptance_rate:.0%})",
            "-" if mean is None else f"{mean:.2f}",
            "/".join(f"{sp[k]:g}" for k in ("p50", "p90", "p99", "max")) if sp else "-",
            "-" if r.compression_ratio is None else f"{r.compression_ratio:.1f}x",
            f"{format_bytes(r.bytes_up)} / {format_bytes(r.bytes_down)}",
            f"{r.virtual_s:.1f}",
            f"{r.final_val_loss:.3f}",
        )
    return t


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    if not console.is_terminal:
        console = Console(width=150)  # a file or a pipe: one line per codec
    err = Console(stderr=True)
    try:
        if args.steps < 1:
            raise UserError(f"--steps {args.steps} must be at least 1")
        if not 0.0 < args.topk_ratio <= 1.0:
            raise UserError(f"--topk-ratio {args.topk_ratio} must be in (0, 1]; 0.01 keeps 1 %")
        configs = {}
        for label in args.codecs:
            codec, params = CODECS[label]
            if codec == "topk":
                params = {**params, "ratio": args.topk_ratio}
                label = f"topk {args.topk_ratio:.0%}"
            configs[label] = build_config(args, codec, params)
        first = next(iter(configs.values()))
        data = prepare_data(first.data, block_size=first.model.block_size)
        reports: dict[str, SimulationReport] = {}
        for label, cfg in configs.items():
            sim = Simulation(cfg, args.topology, data=data, eval_every=args.eval_every)
            err.print(
                f"[bold]{label}[/]: {sim.topology.name}, {len(sim.workers)} workers, {cfg.sync.mode}, "
                f"{sim.numel:,} parameters, {cfg.data.corpus}, {args.steps} server steps"
            )
            reports[label] = sim.run()
            err.print(f"  done in {reports[label].wall_s:.1f} s real time")
    except UserError as exc:
        err.print(f"[red]error:[/] {exc}")
        return 2
    console.print(table(reports))
    first_report = next(iter(reports.values()))
    console.print(
        f"columns: updates accepted by the staleness bound / pushed; staleness in server versions; ratio = "
        f"fp32 bytes / bytes pushed; traffic up (updates) / down (parameter pulls); virtual seconds for "
        f"{args.steps} server steps; validation loss after them (from {first_report.initial_val_loss:.3f})"
    )
    rejected = {label: r.rejected for label, r in reports.items() if r.rejected}
    if rejected:
        console.print(f"rejections by reason: {rejected}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({label: r.to_dict() for label, r in reports.items()}, indent=1) + "\n",
            encoding="utf-8",
        )
        console.print(f"reports written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
