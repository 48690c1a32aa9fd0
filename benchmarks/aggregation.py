"""Benchmark the robust aggregation rules against the plain mean and one centred Gram product.

Generates n updates of dimension d once, then times (median of ``--repeats`` runs after one warm-up):

* the baselines: ``x.mean(dim=0)`` and one centred Gram product (``xc = x - mean; xc @ xc.T``), the
  d-sized work that Krum, Multi-Krum and Bulyan cannot avoid;
* every rule through the public API ``build_aggregator(name, f=..., **params)``;
* the coordinate-wise kernels called directly (both backends) and ``torch.median(x, dim=0)`` for reference.

Each time is reported as a ratio to the mean (and for the Krum family to the Gram product) measured in the
same run, so results from machines of different speed or load stay comparable. Targets (the issue's
acceptance criteria): median and trimmed mean <= 10x mean; Krum, Multi-Krum and Bulyan <= 2x Gram;
geometric median and CenteredClip <= (iterations + 2)x mean. The first call of a compiled kernel (the
warm-up) compiles it, which is not timed.

CenteredClip is stateful, so it gets two rows: "first call" resets the rule before every timed call
(untimed), so each call starts from the coordinate median as a fresh run's first round does; "steady
state" times consecutive calls, each starting from the previous output as every later round does. The
target's verdict is taken on the first-call row, the more expensive one.

    python benchmarks/aggregation.py --n 25 --d 25000000 --repeats 3 --json runs/bench/aggregation.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from dist_llm_train.aggregation.coordinatewise import coordinate_median, coordinate_trimmed_mean

try:  # the one-pass kernels arrived after the first benchmarks; keep the script runnable on older trees
    from dist_llm_train.aggregation import onepass
except ImportError:
    onepass = None  # type: ignore[assignment]


@dataclass(frozen=True)
class Case:
    """One timed row: a rule built through the public API, or a direct call (``call``)."""

    label: str
    rule: str | None = None  # registry name for build_aggregator
    params: dict[str, Any] = field(default_factory=dict)
    pre: tuple[str, ...] = ()
    call: Callable[[torch.Tensor], object] | None = None
    target: tuple[str, float] | None = None  # ("mean" | "gram", max ratio)
    repeats: int | None = None  # overrides --repeats for very slow references
    warmup: bool = True
    fresh: bool = False  # reset the (stateful) rule before every call, untimed
    note: str = ""


RULES = ("mean", "median", "trimmed-mean", "krum", "multi-krum", "bulyan", "geometric-median",
         "centered-clip", "centered-clip-steady", "nnm+trimmed-mean")  # fmt: skip
KERNELS = ("kernel-median", "kernel-trimmed-mean", "kernel-median-eager", "kernel-trimmed-mean-eager",
           "torch.median")  # fmt: skip


def build_cases(names: Sequence[str], f: int, gm_iters: int, cc_iters: int) -> list[Case]:
    cases = {
        "mean": Case("mean", "mean"),
        "median": Case("median", "median", target=("mean", 10.0)),
        "trimmed-mean": Case(f"trimmed-mean f={f}", "trimmed-mean", target=("mean", 10.0)),
        "krum": Case(f"krum f={f}", "krum", target=("gram", 2.0)),
        "multi-krum": Case(f"multi-krum f={f}", "multi-krum", target=("gram", 2.0)),
        "bulyan": Case(f"bulyan f={f}", "bulyan", target=("gram", 2.0)),
        "geometric-median": Case(
            f"geometric-median T={gm_iters}",
            "geometric-median",
            {"iterations": gm_iters, "tol": 0.0},  # tol=0: always all T steps (the worst case)
            target=("mean", gm_iters + 2.0),
        ),
        "centered-clip": Case(
            f"centered-clip L={cc_iters} (first call: median start)",
            "centered-clip",
            {"iterations": cc_iters},
            target=("mean", cc_iters + 2.0),
            fresh=True,
            note="reset before every call: starts from the coordinate median",
        ),
        "centered-clip-steady": Case(
            f"centered-clip L={cc_iters} (steady state)",
            "centered-clip",
            {"iterations": cc_iters},
            note="consecutive calls: each starts from the previous output",
        ),
        "nnm+trimmed-mean": Case(f"nnm + trimmed-mean f={f}", "trimmed-mean", pre=("nnm",)),
        "kernel-median": Case("coordinate_median (auto)", call=coordinate_median, target=("mean", 10.0)),
        "kernel-trimmed-mean": Case(
            f"coordinate_trimmed_mean f={f} (auto)",
            call=lambda x: coordinate_trimmed_mean(x, f),
            target=("mean", 10.0),
        ),
        "kernel-median-eager": Case(
            "coordinate_median (eager)", call=lambda x: coordinate_median(x, backend="eager"), repeats=1
        ),
        "kernel-trimmed-mean-eager": Case(
            f"coordinate_trimmed_mean f={f} (eager)",
            call=lambda x: coordinate_trimmed_mean(x, f, backend="eager"),
            repeats=1,
        ),
        "torch.median": Case(
            "torch.median(x, dim=0)", call=lambda x: torch.median(x, dim=0), repeats=1, warmup=False
        ),
    }
    return [cases[name] for name in names]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(
    fn: Callable[[], object],
    device: torch.device,
    repeats: int,
    warmup: bool = True,
    setup: Callable[[], object] | None = None,
) -> float:
    """Median wall time of ``fn`` in seconds over ``repeats`` runs, after one untimed warm-up run.

    ``setup`` (untimed) runs before every call, the warm-up included.
    """
    if warmup:
        if setup is not None:
            setup()
        fn()
        _sync(device)
    gc.collect()
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
        del out  # free the d-sized result before the next run
    return statistics.median(times)


def centred_gram(x: torch.Tensor) -> torch.Tensor:
    xc = x - x.mean(dim=0)
    return xc @ xc.T


def check_kernels(x: torch.Tensor, f: int, columns: int = 200_000) -> dict[str, bool]:
    """The timed kernels against a sort and float64 sums on a slice of the same data (guards against fast
    wrong answers)."""
    xs = x[:, :columns].contiguous()
    s = torch.sort(xs, dim=0).values
    n = x.shape[0]
    med = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) * 0.5
    tm = s[f : n - f].mean(dim=0)
    checks = {
        "median_exact": bool(torch.equal(coordinate_median(xs), med)),
        "trimmed_mean_close": bool(torch.allclose(coordinate_trimmed_mean(xs, f), tm, rtol=1e-5, atol=1e-6)),
    }
    if onepass is not None and onepass.use_compiled(xs, "compiled"):
        # CenteredClip's one-pass kernels: the median start and the distances to an iterate
        x64 = xs.to(torch.float64)
        m, sq = onepass.median_and_sq_distances(xs, strict=True)
        checks["one_pass_median_exact"] = bool(torch.equal(m, med))
        checks["one_pass_distances_close"] = bool(
            torch.allclose(sq, ((x64 - m.double()) ** 2).sum(1), rtol=1e-5)
        )
        w = torch.linspace(1.0, 2.0, n, dtype=torch.float64)
        w /= w.sum()
        z = med.double() + (w[:, None] * (x64 - med.double())).sum(0)
        sq = onepass.sq_distances_to_combination(xs, w, med, strict=True)
        checks["one_pass_iterate_close"] = bool(torch.allclose(sq, ((x64 - z) ** 2).sum(1), rtol=1e-5))
    return checks


def run(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    gen = torch.Generator(device=device).manual_seed(args.seed)
    x = torch.randn(args.n, args.d, generator=gen, device=device)
    result: dict[str, Any] = {"n": args.n, "d": args.d, "f": args.f, "rows": []}
    result["mean_ms"] = median_time(lambda: x.mean(dim=0), device, args.repeats) * 1e3
    result["gram_ms"] = median_time(lambda: centred_gram(x), device, args.repeats) * 1e3
    result["kernel_check"] = check_kernels(x, args.f) if device.type == "cpu" else None
    try:
        from dist_llm_train.aggregation import build_aggregator
    except ImportError as exc:  # the rules package may be absent in a partial checkout
        build_aggregator = None
        result["rules_unavailable"] = str(exc)
    for case in build_cases(args.rules, args.f, args.gm_iterations, args.cc_iterations):
        seen: dict[str, Any] = {}  # what the rule reports about its last timed call
        if case.rule is not None:
            if build_aggregator is None:
                continue
            pre = {"pre": list(case.pre)} if case.pre else {}
            agg = build_aggregator(case.rule, f=args.f, **pre, **case.params)

            def fn(agg: Any = agg, seen: dict[str, Any] = seen) -> object:
                res = agg(x)
                seen.update({k: v for k, v in res.diagnostics.items() if k in ("mode", "kernel", "passes")})
                return res

            setup = agg.reset if case.fresh else None
        else:
            assert case.call is not None

            def fn(call: Callable[[torch.Tensor], object] = case.call) -> object:
                return call(x)

            setup = None
        seconds = median_time(fn, device, case.repeats or args.repeats, case.warmup, setup)
        row: dict[str, Any] = {
            "label": case.label,
            "rule": case.rule,
            "pre": list(case.pre),
            "params": case.params,
            "note": case.note,
            "diagnostics": seen,
            "ms": seconds * 1e3,
            "vs_mean": seconds * 1e3 / result["mean_ms"],
            "vs_gram": seconds * 1e3 / result["gram_ms"],
        }
        if case.target is not None:
            base, limit = case.target
            ratio = row["vs_mean"] if base == "mean" else row["vs_gram"]
            row["target"] = f"<= {limit:g}x {base}"
            row["met"] = ratio <= limit
        result["rows"].append(row)
        print(f"  {case.label}: {row['ms']:.0f} ms = {row['vs_mean']:.2f}x mean", file=sys.stderr, flush=True)
        gc.collect()
    return result


def print_table(result: dict[str, Any]) -> None:
    bench = result["bench"]
    table = Table(
        title=(
            f"aggregation, n={bench['n']}, d={bench['d']:,}, f={bench['f']} on {result['device']} "
            f"({result['threads']} threads): mean {bench['mean_ms']:.0f} ms, Gram {bench['gram_ms']:.0f} ms"
        )
    )
    for h in ("rule", "ms", "x mean", "x Gram", "target", "status"):
        table.add_column(h, justify="left" if h in ("rule", "target") else "right", no_wrap=True)
    for r in bench["rows"]:
        status = "" if "met" not in r else ("[green]PASS[/green]" if r["met"] else "[red]MISS[/red]")
        table.add_row(
            r["label"],
            f"{r['ms']:.0f}",
            f"{r['vs_mean']:.2f}",
            f"{r['vs_gram']:.2f}",
            r.get("target", ""),
            status,
        )
    console = Console(width=150)
    console.print(table)
    if bench.get("kernel_check") is not None:
        console.print(f"kernel check against torch.sort on 200k columns: {bench['kernel_check']}")
    if bench.get("rules_unavailable"):
        console.print(f"rules skipped: {bench['rules_unavailable']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=25, help="number of updates (rows)")
    parser.add_argument("--d", type=int, default=25_000_000, help="dimension of each update")
    parser.add_argument("--f", type=int, default=5, help="declared Byzantine count for the robust rules")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    parser.add_argument("--gm-iterations", type=int, default=8, help="geometric median: Weiszfeld steps T")
    parser.add_argument("--cc-iterations", type=int, default=3, help="CenteredClip: clipping steps L")
    parser.add_argument(
        "--rules", nargs="+", choices=RULES + KERNELS, default=list(RULES + KERNELS), help="rows to time"
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write all results here")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.n < 1 or args.d < 1 or args.f < 0:
        parser.error("--repeats, --n and --d must be >= 1 and --f >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]) if argv is None else " ".join(["python", "-", *argv]),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_avg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "repeats": args.repeats,
    }
    result["bench"] = run(args, device)
    result["load_avg_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print_table(result)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
