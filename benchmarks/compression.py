"""Benchmark the update codecs: encode/decode time relative to a plain copy, compression ratio, and
DGC's sampled top-k against ``torch.topk``.

Times are medians over ``--repeats`` runs after one warm-up and are reported as ratios to ``x.clone()``
of the same tensor measured in the same run (absolute milliseconds are in the JSON too), so numbers from
machines of different speed stay comparable. On CUDA every timed call is bracketed by synchronisation.

    python benchmarks/compression.py --sizes 1000000 25000000 --json runs/bench/compression.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from dist_llm_train.compression import (
    build_codec,
    compression_ratio,
    exact_topk_indices,
    sampled_topk_indices,
)

# (label, codec name, params); {n} in a powersgd shape is filled in per size.
CODECS: list[tuple[str, str, dict[str, Any]]] = [
    ("none", "none", {}),
    ("fp16", "fp16", {}),
    ("bf16", "bf16", {}),
    ("int8", "int8", {}),
    ("int8 stochastic", "int8", {"rounding": "stochastic"}),
    ("topk 1% exact", "topk", {"ratio": 0.01}),
    ("topk 1% sampled", "topk", {"ratio": 0.01, "selection": "sampled"}),
    ("topk 1% sampled int8", "topk", {"ratio": 0.01, "selection": "sampled", "values": "int8"}),
    ("powersgd r4", "powersgd", {"rank": 4}),
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn`` in seconds over ``repeats`` runs, after one warm-up run."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def powersgd_shapes(n: int) -> list[list[int]]:
    """A 1024-row matrix covering most of the vector plus a 1-D remainder (like a weight and its bias)."""
    rows = 1024 if n >= 1024 * 8 else 1
    cols = n // rows
    rest = n - rows * cols
    return [[rows, cols]] + ([[rest]] if rest else [])


def bench_codecs(size: int, device: torch.device, repeats: int, seed: int) -> list[dict[str, Any]]:
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(size, generator=gen, device=device)
    clone_s = median_time(x.clone, device, repeats)
    rows = []
    for label, name, params in CODECS:
        if name == "powersgd":
            params = {**params, "shapes": powersgd_shapes(size)}
        codec = build_codec(name, **params)
        encoded = codec.encode(x)
        enc_s = median_time(lambda codec=codec: codec.encode(x), device, repeats)
        dec_s = median_time(lambda codec=codec, encoded=encoded: codec.decode(encoded), device, repeats)
        err = codec.decode(encoded) - x
        rows.append(
            {
                "size": size,
                "codec": label,
                "params": {k: v for k, v in params.items() if k != "shapes"},
                "clone_ms": clone_s * 1e3,
                "encode_ms": enc_s * 1e3,
                "decode_ms": dec_s * 1e3,
                "encode_vs_clone": enc_s / clone_s,
                "decode_vs_clone": dec_s / clone_s,
                "nbytes": encoded.nbytes,
                "compression_ratio": compression_ratio(size, encoded),
                "relative_error": float(torch.linalg.vector_norm(err) / torch.linalg.vector_norm(x)),
            }
        )
    return rows


def bench_topk_selection(
    size: int, ratio: float, device: torch.device, repeats: int, seed: int
) -> dict[str, Any]:
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(size, generator=gen, device=device)
    k = max(1, round(ratio * size))
    sample_gen = torch.Generator(device=device).manual_seed(seed + 1)
    exact_s = median_time(lambda: torch.topk(x.abs(), k, sorted=False), device, repeats)
    sampled_s = median_time(lambda: sampled_topk_indices(x, k, generator=sample_gen), device, repeats)
    clone_s = median_time(x.clone, device, repeats)
    exact = exact_topk_indices(x, k)
    overlaps, counts = [], []
    for _ in range(repeats):
        sampled = sampled_topk_indices(x, k, generator=sample_gen)
        overlaps.append(float(torch.isin(exact, sampled).float().mean()))
        counts.append(sampled.numel() / k)
    return {
        "size": size,
        "k": k,
        "torch_topk_ms": exact_s * 1e3,
        "sampled_ms": sampled_s * 1e3,
        "clone_ms": clone_s * 1e3,
        "speedup": exact_s / sampled_s,
        "overlap_min": min(overlaps),
        "overlap_median": statistics.median(overlaps),
        "count_over_k_min": min(counts),
        "count_over_k_max": max(counts),
        "targets": {"speedup": ">= 3", "overlap": ">= 0.90"},
        "met": exact_s / sampled_s >= 3.0 and min(overlaps) >= 0.9,
    }


def _print_tables(result: dict[str, Any]) -> None:
    console = Console(width=140)
    table = Table(title=f"codecs on {result['device']}, {result['threads']} thread(s); clone = 1.00")
    for h in ("size", "codec", "encode / clone", "decode / clone", "ratio", "rel. error"):
        table.add_column(h, justify="left" if h == "codec" else "right", no_wrap=True)
    for r in result["codecs"]:
        table.add_row(
            f"{r['size']:,}",
            r["codec"],
            f"{r['encode_vs_clone']:.2f}",
            f"{r['decode_vs_clone']:.2f}",
            f"{r['compression_ratio']:.1f}x",
            f"{r['relative_error']:.2e}",
        )
    console.print(table)
    sel = result.get("topk_selection")
    if sel:
        console.print(
            f"sampled top-k at d={sel['size']:,}, k={sel['k']:,}: torch.topk {sel['torch_topk_ms']:.1f} ms, "
            f"sampled {sel['sampled_ms']:.1f} ms (clone {sel['clone_ms']:.1f} ms) -> {sel['speedup']:.2f}x "
            f"faster; overlap with the exact set min {sel['overlap_min']:.4f}; kept/k in "
            f"[{sel['count_over_k_min']:.3f}, {sel['count_over_k_max']:.3f}]; targets met: {sel['met']}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[1_000_000, 25_000_000], help="vector lengths"
    )
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    parser.add_argument(
        "--topk-size", type=int, default=25_000_000, help="d for sampled vs torch.topk; 0 skips"
    )
    parser.add_argument("--topk-ratio", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write all results here")
    args = parser.parse_args(argv)
    if args.repeats < 1 or any(s < 1 for s in args.sizes):
        parser.error("--repeats and every --sizes value must be >= 1")
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
        "cpu_count": os.cpu_count(),
        "load_avg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "repeats": args.repeats,
        "codecs": [],
    }
    for size in args.sizes:
        result["codecs"].extend(bench_codecs(size, device, args.repeats, args.seed))
    if args.topk_size:
        result["topk_selection"] = bench_topk_selection(
            args.topk_size, args.topk_ratio, device, args.repeats, args.seed
        )
    _print_tables(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
