"""WAN training benchmark: sync vs async vs adaptive vs local-SGD, with and without compression.

Each run trains the same small GPT on the virtual clock of the simulator over the ``hetero-3tier``
cluster (2 workers at 2x speed, 2 at 0.5x, 2 at 0.25x: an 8x spread) with every link set to one
bandwidth (50 and 10 Mbit/s by default), and stops when the validation loss reaches ``--target-loss``
or after ``--max-virtual-s`` virtual seconds. Per run it reports:

- throughput: accepted training tokens per virtual second (local-SGD counts its inner steps' tokens);
- bandwidth: payload bytes up (updates) and down (parameter pulls), retransmissions included;
- rejection rate: share of the pushed updates the coordinator refused (too stale, wrong round);
- time to target: virtual seconds until the first evaluation at or below the target ("not reached" when
  the budget ran out first);

and each figure also as a ratio to ``sync`` without compression in the same scenario (time ratio < 1:
faster than sync; bytes ratio < 1: less traffic). Results are deterministic for a seed; the real time a
run takes is reported separately and is the only machine-dependent number.

    python benchmarks/wan_training.py                                    # about 10 minutes on 2 cores
    python benchmarks/wan_training.py --bandwidths 10 --json runs/bench/wan.json
    python benchmarks/wan_training.py --modes sync local-sgd --codecs none topk --target-loss 2.6

Evaluations take no virtual time. They happen every few server steps, chosen per mode so that each mode
is evaluated about as often in trained tokens (a sync step aggregates 6 updates, an async step one, a
local-SGD round 6 x ``--local-steps`` inner steps); time to target is therefore resolved to one
evaluation interval.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from dist_llm_train.config import RunConfig, load_config
from dist_llm_train.data import PreparedData, prepare_data
from dist_llm_train.errors import UserError
from dist_llm_train.simulation import Simulation, SimulationReport

REPO_ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"

CODECS: dict[str, tuple[str, dict[str, Any]]] = {
    "none": ("none", {}),
    "topk": ("topk", {"ratio": 0.01}),
    "int8": ("int8", {}),
}


@dataclass(frozen=True)
class ModeSpec:
    """How one mode is run: its config overrides, a cap on server steps, and the evaluation interval."""

    overrides: tuple[str, ...]
    max_steps: int
    eval_every: int


def mode_specs(local_steps: int) -> dict[str, ModeSpec]:
    """Per-mode settings. Step caps are far above what the virtual-time budget allows; they only bound
    the real compute of a mode that never reaches the target."""
    return {
        "sync": ModeSpec(("sync.mode=sync",), 400, 5),
        "async": ModeSpec(("sync.mode=async", "sync.max_staleness=4"), 2400, 30),
        "adaptive": ModeSpec(("sync.mode=adaptive", "sync.max_staleness=4"), 2400, 30),
        "local-sgd": ModeSpec(("sync.mode=local-sgd", f"sync.local_steps={local_steps}"), 400, 1),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bandwidths", type=float, nargs="+", default=[50.0, 10.0], help="Mbit/s scenarios")
    p.add_argument("--modes", nargs="+", choices=("sync", "async", "adaptive", "local-sgd"), default=None)
    p.add_argument("--codecs", nargs="+", choices=tuple(CODECS), default=list(CODECS))
    p.add_argument("--topk-ratio", type=float, default=0.01, help="share of coordinates top-k keeps")
    p.add_argument(
        "--target-loss",
        type=float,
        default=2.9,
        help="validation loss to time (default 2.9 nats/char: past the unigram plateau of about 3.3)",
    )
    p.add_argument(
        "--max-virtual-s", type=float, default=300.0, help="virtual-time budget per run (default 300 s)"
    )
    p.add_argument("--local-steps", type=int, default=10, help="local-sgd: inner steps H (default 10)")
    p.add_argument(
        "--base-tokens-per-s",
        type=float,
        default=5000.0,
        help="compute speed of a speed-1.0 worker (default 5000 tokens/s; higher: links matter more)",
    )
    p.add_argument(
        "--corpus",
        choices=("auto", "tinyshakespeare", "python-stdlib"),
        default="auto",
        help="auto: tinyshakespeare from ../shared/data when present, else the Python standard library",
    )
    p.add_argument("--data-path", type=Path, default=SHAKESPEARE)
    p.add_argument("--topology", default="hetero-3tier", help="topology preset or YAML file")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--json", type=Path, default=None, help="also write all results as JSON here")
    return p.parse_args(argv)


def base_overrides(args: argparse.Namespace) -> list[str]:
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
    return [
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
        # Asynchrony acts like extra momentum (Mitliagkas et al. 2016); with Adam's beta1 at 0.9 stale
        # updates overshoot and async runs stall near the unigram plateau. 0.5 suits every mode here.
        "training.beta1=0.5",
        "training.eval_batches=8",
        "training.threads=1",
        f"training.seed={args.seed}",
        "telemetry.progress=false",
    ]


def build_config(base: list[str], spec: ModeSpec, codec: str, params: dict[str, Any]) -> RunConfig:
    cfg = load_config(None, [*base, *spec.overrides, f"training.max_steps={spec.max_steps}"])
    cfg.compression.codec = codec
    cfg.compression.params = dict(params)
    return cfg


def run_one(
    cfg: RunConfig, spec: ModeSpec, data: PreparedData, args: argparse.Namespace, bandwidth: float
) -> SimulationReport:
    sim = Simulation(
        cfg,
        args.topology,
        base_tokens_per_s=args.base_tokens_per_s,
        eval_every=spec.eval_every,
        target_loss=args.target_loss,
        max_virtual_s=args.max_virtual_s,
        stop_at_target=True,
        bandwidth_mbps=bandwidth,
        data=data,
    )
    return sim.run()


def metrics(report: SimulationReport) -> dict[str, Any]:
    v = report.virtual_s
    return {
        "throughput_tokens_per_s": report.tokens / v if v > 0 else 0.0,
        "bytes_up": report.bytes_up,
        "bytes_down": report.bytes_down,
        "rejection_rate": 1.0 - report.acceptance_rate,
        "time_to_target_s": report.time_to_target_s,
        "final_val_loss": report.final_val_loss,
        "server_steps": report.server_steps,
        "virtual_s": v,
        "stop_reason": report.stop_reason,
        "compression_ratio": report.compression_ratio,
        "wall_s": report.wall_s,
    }


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return value / base


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each figure divided by the same figure of sync without compression in the same scenario."""
    baselines = {r["bandwidth_mbps"]: r for r in rows if r["mode"] == "sync" and r["codec"] == "none"}
    for r in rows:
        base = baselines.get(r["bandwidth_mbps"])
        keys = ("throughput_tokens_per_s", "bytes_up", "bytes_down", "time_to_target_s")
        r["vs_sync_none"] = {k: ratio(r[k], base[k]) if base else None for k in keys}


def _fmt(value: float | None, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def _with_ratio(value: float | None, rel: float | None, spec: str, none: str = "-") -> str:
    text = _fmt(value, spec, none)
    return text if rel is None or value is None else f"{text} ({rel:.2f}x)"


def table(rows: list[dict[str, Any]], target: float) -> Table:
    t = Table(title=f"WAN training, hetero-3tier, target validation loss {target:g} (ratio to sync/none)")
    for col in (
        "Mbit/s",
        "mode",
        "codec",
        "tokens / virtual s",
        "MiB up",
        "MiB down",
        "rejected",
        "time to target (s)",
        "final loss",
        "steps",
        "real s",
    ):
        t.add_column(col, justify="left" if col in ("mode", "codec") else "right")
    for r in rows:
        rel = r["vs_sync_none"]
        t.add_row(
            f"{r['bandwidth_mbps']:g}",
            r["mode"],
            r["codec"],
            _with_ratio(r["throughput_tokens_per_s"], rel["throughput_tokens_per_s"], ",.0f"),
            _with_ratio(r["bytes_up"] / 2**20, rel["bytes_up"], ",.1f"),
            _with_ratio(r["bytes_down"] / 2**20, rel["bytes_down"], ",.1f"),
            f"{r['rejection_rate']:.1%}",
            _with_ratio(r["time_to_target_s"], rel["time_to_target_s"], ".1f", "not reached"),
            f"{r['final_val_loss']:.3f}",
            str(r["server_steps"]),
            f"{r['wall_s']:.0f}",
        )
    return t


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    if not console.is_terminal:
        console = Console(width=170)  # a file or a pipe: keep each run on one line
    err = Console(stderr=True)
    specs = mode_specs(args.local_steps)
    modes = args.modes or list(specs)
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    try:
        if args.local_steps < 1:
            raise UserError(f"--local-steps {args.local_steps} must be at least 1")
        if not 0.0 < args.topk_ratio <= 1.0:
            raise UserError(f"--topk-ratio {args.topk_ratio} must be in (0, 1]; 0.01 keeps 1 %")
        if any(b <= 0 for b in args.bandwidths):
            raise UserError(f"--bandwidths {args.bandwidths} must all be > 0 Mbit/s")
        base = base_overrides(args)
        first = load_config(None, base)
        data = prepare_data(first.data, block_size=first.model.block_size)
        for bandwidth in args.bandwidths:
            for mode in modes:
                spec = specs[mode]
                for label in args.codecs:
                    codec, params = CODECS[label]
                    if codec == "topk":
                        params = {**params, "ratio": args.topk_ratio}
                    cfg = build_config(base, spec, codec, params)
                    report = run_one(cfg, spec, data, args, bandwidth)
                    row = {"bandwidth_mbps": bandwidth, "mode": mode, "codec": label, **metrics(report)}
                    rows.append(row)
                    reached = _fmt(report.time_to_target_s, ".1f", "not reached")
                    err.print(
                        f"{bandwidth:g} Mbit/s {mode:9s} {label:5s}: target {reached}, "
                        f"loss {report.final_val_loss:.3f}, {report.wall_s:.0f} s real"
                    )
    except UserError as exc:
        err.print(f"[red]error:[/] {exc}")
        return 2
    add_ratios(rows)
    console.print(table(rows, args.target_loss))
    total = time.perf_counter() - start
    console.print(f"total real time {total:.0f} s")
    if args.json is not None:
        out = {
            "settings": {
                k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "json"
            },
            "model_corpus": first.data.corpus,
            "machine": {"python": platform.python_version(), "torch": torch.__version__},
            "total_wall_s": total,
            "runs": rows,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
        console.print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
