"""The parameter server's optimiser step: torch's fused kernel (what the server runs) vs the per-tensor loop.

A server step turns one aggregated update into new parameters. With one worker it sits on the critical
path of every task; with many it bounds how many updates per second the controller can apply. The server
holds one flat fp32 vector, so the step is one tensor; what differs is the kernel:

- **per-tensor** (``foreach=False``, torch's default on a CPU before this change): one full-size pass and
  temporary per arithmetic operation of the update rule;
- **fused** (``fused=True``, what :class:`~dist_llm_train.coordination.ParameterServer` uses on CPU and
  CUDA): the whole rule in one pass, no temporaries.

The updates are sparse like top-k aggregates (``--density`` of the coordinates non-zero per step), which
leaves most AdamW second moments decaying towards subnormal floats, whose square roots are slow on x86.
Both kernels run on the same machine in alternating rounds; the result is the median per-round ratio
per-tensor / fused (higher is better for fused).

    python benchmarks/server_step.py --numel 842496 --steps 60 --rounds 5 --json runs/bench/server_step.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

OPTIMIZERS: dict[str, Callable[[torch.nn.Parameter, dict[str, bool]], torch.optim.Optimizer]] = {
    "adamw": lambda p, kind: torch.optim.AdamW([p], lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, **kind),
    "nesterov": lambda p, kind: torch.optim.SGD([p], lr=0.05, momentum=0.9, nesterov=True, **kind),
}
KINDS = {"per-tensor": {"foreach": False}, "fused": {"fused": True}}


def ms_per_step(optimizer: str, kind: str, numel: int, steps: int, density: float, seed: int) -> float:
    """Mean wall time of one step over ``steps`` sparse updates, after as many warm-up steps."""
    gen = torch.Generator().manual_seed(seed)
    param = torch.nn.Parameter(torch.randn(numel, generator=gen) * 0.02)
    opt = OPTIMIZERS[optimizer](param, KINDS[kind])
    nonzero = max(1, int(numel * density))
    updates = []
    for _ in range(8):
        grad = torch.zeros(numel)
        grad[torch.randint(0, numel, (nonzero,), generator=gen)] = torch.randn(nonzero, generator=gen)
        updates.append(grad)
    elapsed = 0.0
    for i in range(2 * steps):
        param.grad = updates[i % len(updates)]
        started = time.perf_counter()
        opt.step()
        if i >= steps:
            elapsed += time.perf_counter() - started
    return 1000.0 * elapsed / steps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--numel", type=int, default=842_496, help="parameters (gpt-tiny has 842,496)")
    parser.add_argument(
        "--steps", type=int, default=60, help="timed steps per measurement (after as many warm-up)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (median ratio)")
    parser.add_argument(
        "--density", type=float, default=0.05, help="share of non-zero coordinates per update"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the controller uses 1)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results: dict[str, dict[str, list[float]]] = {}
    for optimizer in OPTIMIZERS:
        runs: dict[str, list[float]] = {kind: [] for kind in KINDS}
        for r in range(args.rounds):
            for kind in KINDS:
                runs[kind].append(ms_per_step(optimizer, kind, args.numel, args.steps, args.density, seed=r))
        results[optimizer] = runs
    table = Table(title=f"server step, {args.numel:,} fp32 parameters, {args.density:.0%} dense updates")
    for column in (
        "optimizer",
        "per-tensor ms (median)",
        "fused ms (median)",
        "per-tensor / fused",
        "per round",
    ):
        table.add_column(column, justify="left" if column == "optimizer" else "right")
    summary = {}
    for optimizer, runs in results.items():
        ratios = [slow / fast for slow, fast in zip(runs["per-tensor"], runs["fused"], strict=True)]
        summary[optimizer] = {**runs, "ratios": ratios, "speedup": statistics.median(ratios)}
        table.add_row(
            optimizer,
            f"{statistics.median(runs['per-tensor']):.2f}",
            f"{statistics.median(runs['fused']):.2f}",
            f"{statistics.median(ratios):.1f}x",
            ", ".join(f"{v:.1f}" for v in ratios),
        )
    Console().print(table)
    if args.json:
        out = {
            "numel": args.numel,
            "steps": args.steps,
            "rounds": args.rounds,
            "density": args.density,
            "threads": args.threads,
            "results": summary,
            "machine": {"python": platform.python_version(), "torch": torch.__version__},
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
