"""Rich tables for a :class:`~dist_llm_train.simulation.report.SimulationReport` (what ``simulate`` prints)."""

from __future__ import annotations

from rich.table import Table

from dist_llm_train.simulation.report import SimulationReport

__all__ = ["format_bytes", "summary_table", "worker_table"]


def format_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB`` (binary units, one decimal)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "-"


def worker_table(report: SimulationReport) -> Table:
    """One row per worker: link, traffic each way, outcomes of its updates, utilisation, crashes."""
    table = Table(title=f"workers ({report.topology})")
    table.add_column("worker")
    table.add_column("speed", justify="right")
    table.add_column("link Mbit/s, ms", justify="right")
    table.add_column("bytes up / down", justify="right")
    table.add_column("accepted / sent", justify="right")
    table.add_column("rejected, refused")
    table.add_column("util.", justify="right")
    table.add_column("crashes", justify="right")
    for w in report.workers:
        link = f"{w.up_mbps:g}" if w.up_mbps == w.down_mbps else f"{w.up_mbps:g}↑ {w.down_mbps:g}↓"
        outcomes = {**w.rejected, **{f"late {k}": v for k, v in w.refused.items()}}
        table.add_row(
            w.name + (" [red](byz)[/]" if w.role == "byzantine" else ""),
            f"{w.speed:g}",
            f"{link}, {w.latency_ms:g}",
            f"{format_bytes(w.bytes_up)} / {format_bytes(w.bytes_down)}",
            f"{w.accepted} / {w.updates_sent}",
            _counts(outcomes),
            f"{w.utilization:.0%}",
            str(w.crashes),
        )
    return table


def _opt(value: float | None, fmt: str, none: str = "-") -> str:
    return none if value is None else format(value, fmt)


def summary_table(report: SimulationReport) -> Table:
    """The run's headline numbers: time, loss, traffic, acceptance, staleness, Byzantine filtering."""
    r = report
    table = Table(title="simulation summary")
    table.add_column("metric")
    table.add_column("value", justify="right")
    sp = r.staleness_percentiles
    staleness = " / ".join(f"{sp[k]:g}" for k in ("p50", "p90", "p99", "max")) if sp else "-"
    byz = r.byzantine
    rows: list[tuple[str, str]] = [
        ("topology / mode", f"{r.topology} / {r.mode}, {r.n_workers} workers"),
        ("codec / aggregator", f"{r.codec} / {r.aggregator}"),
        ("stopped by", r.stop_reason),
        ("virtual time", f"{r.virtual_s:.2f} s"),
        ("server steps (no-op)", f"{r.server_steps} ({r.noop_steps})"),
        (
            "time to target loss",
            "-"
            if r.target_loss is None
            else f"{_opt(r.time_to_target_s, '.2f', 'not reached')} s (target {r.target_loss:g}, "
            f"step {_opt(r.steps_to_target, 'd', '-')})",
        ),
        ("validation loss initial → final", f"{r.initial_val_loss:.4f} → {r.final_val_loss:.4f}"),
        ("tokens accepted", f"{r.tokens:,}"),
        ("bytes up / down", f"{format_bytes(r.bytes_up)} / {format_bytes(r.bytes_down)}"),
        ("compression vs fp32 uploads", _opt(r.compression_ratio, ".2f") + "x"),
        ("acceptance", f"{r.accepted}/{r.submitted} ({r.acceptance_rate:.1%})"),
        ("rejected by reason", _counts(r.rejected)),
        ("staleness p50 / p90 / p99 / max", staleness),
        ("compute utilization", f"{r.utilization:.1%}"),
    ]
    if byz.workers:
        rows.append(
            (
                "Byzantine submitted / rejected / excluded",
                f"{byz.submitted} / {byz.rejected} / {byz.excluded} ({byz.workers} workers)",
            )
        )
        if byz.precision is not None or byz.recall is not None:
            rows.append(
                ("exclusion precision / recall", f"{_opt(byz.precision, '.2f')} / {_opt(byz.recall, '.2f')}")
            )
    lz = r.leases
    rows += [
        (
            "leases granted / expired / released / requeued",
            f"{lz.grants} / {lz.expired} / {lz.released} / {lz.requeued}",
        ),
        ("late results refused", _counts(lz.refused)),
        ("real time", f"{r.wall_s:.1f} s ({r.events:,} events)"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table
