"""Paired ratios for interleaved benchmarks: each measured run against the baseline runs around it.

The benchmarks alternate baseline and measured runs (baseline, measured, baseline, ..., baseline), so run
``r`` of the measured path sits between baseline runs ``r`` and ``r + 1``. Comparing it with their mean,
then taking the median over rounds, keeps the machine's drift over minutes out of the ratio, which a
ratio of pooled medians would mix in.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
from pathlib import Path
from typing import Any

import torch


def round_ratios(runs: list[float], baseline: list[float]) -> list[float]:
    """Run ``r`` against the mean of the baseline runs just before and after it (``len(runs) + 1`` of them)."""
    if len(baseline) != len(runs) + 1:
        raise ValueError(
            f"{len(runs)} runs need {len(runs) + 1} baseline runs around them, got {len(baseline)}"
        )
    return [rate / ((baseline[r] + baseline[r + 1]) / 2) for r, rate in enumerate(runs)]


def paired_ratio(runs: list[float], baseline: list[float]) -> float:
    """Median over rounds of :func:`round_ratios`."""
    return statistics.median(round_ratios(runs, baseline))


def bracketed_ratios(runs: list[float], baseline: list[float], positions: list[int]) -> list[float]:
    """Run ``i`` against the mean of ``baseline[positions[i]]`` and ``baseline[positions[i] + 1]``, the
    baseline runs just before and after it, for schedules where several measured paths take turns
    between baseline runs."""
    if len(runs) != len(positions):
        raise ValueError(f"{len(runs)} runs but {len(positions)} positions")
    if any(p < 0 or p + 1 >= len(baseline) for p in positions):
        raise ValueError(f"positions {positions} need baseline runs on both sides ({len(baseline)} runs)")
    return [rate / ((baseline[p] + baseline[p + 1]) / 2) for rate, p in zip(runs, positions, strict=True)]


def machine_description() -> dict[str, Any]:
    """What a result was measured on. The same command gave per-task compute of 175 ms on one of these VMs
    and 80 ms on another (sessions 10 and 11), so a ratio is only comparable with its machine named."""
    cpu: dict[str, str] = {}
    with contextlib.suppress(OSError):
        # The first processor's block; virtual machines often report only a generic name, so the family
        # and model numbers go with it.
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").split("\n\n")[0].splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "cpu family", "model", "stepping"):
                cpu[key.strip()] = value.strip()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu or platform.processor() or None,
        "cpus": sorted(os.sched_getaffinity(0)),
        "kernel": platform.release(),
    }


def split_cpus(cpu: int | None) -> tuple[frozenset[int], frozenset[int]] | None:
    """``({cpu}, the other CPUs this process may use)`` for a ``--cpu`` option; ``None`` for no pinning
    (``cpu`` None or negative, or fewer than two CPUs). Exits with a one-line error for a CPU not allowed."""
    available = sorted(os.sched_getaffinity(0))
    if cpu is None or cpu < 0 or len(available) < 2:
        return None
    if cpu not in available:
        raise SystemExit(f"--cpu {cpu}: this process may run on CPUs {available} only")
    return frozenset({cpu}), frozenset(c for c in available if c != cpu)
