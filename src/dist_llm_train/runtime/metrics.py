"""Runtime telemetry: structured logs, the controller's Prometheus endpoint, and the ``metrics`` command.

- :func:`setup_logging` — JSON-lines logs in the run directory plus one readable line per event on stderr.
- :class:`PrometheusExporter` — ``--metrics-port``: a private ``prometheus_client`` registry whose
  collector reads the controller's latest snapshot (replaced atomically by the controller loop, so a scrape
  never sees a half-updated state and never touches the loop's own dictionaries).
- :func:`summarize_run` / :func:`summarize_url` — one summary (loss, throughput, acceptance and rejection
  by reason, staleness, bytes per worker, Byzantine updates filtered) from a run directory's
  ``metrics.jsonl``/``summary.json`` or from a live controller's endpoint; :func:`render_summary` prints it
  as tables, ``--json`` prints the dict.

Metric names on the endpoint (all prefixed ``dlt_``): ``server_version``, ``max_steps``, ``val_loss``,
``train_loss``, ``elapsed_seconds``, ``workers_registered``, ``tokens_total``, ``updates_submitted_total``,
``updates_accepted_total``, ``updates_rejected_total{reason}``, ``protocol_errors_total{code}``,
``staleness_updates_total{staleness}``, ``bytes_total{direction}``, ``worker_bytes_total{worker,name,direction}``,
``worker_updates_total{worker,name,outcome}``, ``byzantine_updates_total{kind}``, ``lease_events_total{kind}``,
``evictions_total{reason}``.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from rich.console import Console
from rich.table import Table

from dist_llm_train.errors import UserError
from dist_llm_train.telemetry import read_metrics

__all__ = [
    "PrometheusExporter",
    "render_summary",
    "setup_logging",
    "staleness_percentiles",
    "summarize_run",
    "summarize_snapshot",
    "summarize_url",
]


# ====================================================================== logging
class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


_OWN_HANDLER = "_dlt_runtime_handler"


def setup_logging(path: Path, logger_name: str, *, stderr_level: int = logging.INFO) -> None:
    """Send ``logger_name``'s records to ``path`` as JSON lines and to stderr as plain lines.

    Idempotent: handlers installed by an earlier call (an earlier run in the same process) are replaced.
    """
    logger = logging.getLogger(logger_name)
    for handler in list(logger.handlers):
        if getattr(handler, _OWN_HANDLER, False):
            logger.removeHandler(handler)
            handler.close()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setFormatter(_JsonFormatter())
    file_handler.setLevel(logging.DEBUG)
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    stream.setLevel(stderr_level)
    for handler in (file_handler, stream):
        setattr(handler, _OWN_HANDLER, True)
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False


# ====================================================================== Prometheus
class _SnapshotCollector(Collector):
    def __init__(self) -> None:
        self.snapshot: dict[str, Any] = {}

    def collect(self) -> Iterator[Any]:
        snap = self.snapshot  # one reference read: the loop replaces the dict, never mutates it
        if not snap:
            return
        coord = snap.get("coordinator", {})

        def gauge(name: str, doc: str, value: float | None) -> Iterator[GaugeMetricFamily]:
            if value is not None:
                yield GaugeMetricFamily(f"dlt_{name}", doc, value=float(value))

        yield from gauge(
            "server_version", "Parameter server version (server steps taken).", snap.get("version")
        )
        yield from gauge("max_steps", "Server steps the run stops at.", snap.get("max_steps"))
        yield from gauge("val_loss", "Latest validation loss.", snap.get("val_loss"))
        yield from gauge(
            "train_loss", "Mean training loss of recently accepted updates.", snap.get("train_loss")
        )
        yield from gauge("elapsed_seconds", "Seconds the controller has served.", snap.get("elapsed_s"))
        yield from gauge("workers_registered", "Workers registered now.", snap.get("workers_registered"))
        yield from gauge("numel", "Model parameters.", snap.get("numel"))
        yield CounterMetricFamily(
            "dlt_tokens", "Tokens trained by accepted updates.", value=coord.get("tokens", 0)
        )
        yield CounterMetricFamily(
            "dlt_updates_submitted", "Updates submitted to the coordinator.", value=coord.get("submitted", 0)
        )
        yield CounterMetricFamily(
            "dlt_updates_accepted", "Updates accepted by the coordinator.", value=coord.get("accepted", 0)
        )
        yield _labelled(
            "dlt_updates_rejected", "Updates rejected, by reason.", "reason", snap.get("rejected", {})
        )
        yield _labelled(
            "dlt_protocol_errors",
            "Refused messages, by protocol error code.",
            "code",
            snap.get("protocol_errors", {}),
        )
        yield _labelled(
            "dlt_staleness_updates",
            "Accepted updates, by staleness.",
            "staleness",
            coord.get("staleness", {}),
        )
        yield _labelled(
            "dlt_bytes",
            "Bytes on the wire, by direction.",
            "direction",
            {"up": snap.get("bytes_up", 0), "down": snap.get("bytes_down", 0)},
        )
        per_bytes = CounterMetricFamily(
            "dlt_worker_bytes", "Bytes on the wire per worker.", labels=["worker", "name", "direction"]
        )
        per_updates = CounterMetricFamily(
            "dlt_worker_updates", "Updates per worker, by outcome.", labels=["worker", "name", "outcome"]
        )
        for wid, w in snap.get("workers", {}).items():
            name = str(w.get("name") or wid)
            per_bytes.add_metric([wid, name, "up"], w.get("bytes_up", 0))
            per_bytes.add_metric([wid, name, "down"], w.get("bytes_down", 0))
            per_updates.add_metric([wid, name, "accepted"], w.get("accepted", 0))
            per_updates.add_metric([wid, name, "rejected"], w.get("rejected_total", 0))
            per_updates.add_metric([wid, name, "excluded"], w.get("excluded", 0))
        yield per_bytes
        yield per_updates
        yield _labelled(
            "dlt_byzantine_updates",
            "Updates of workers labelled Byzantine (ground truth), by fate.",
            "kind",
            {
                "submitted": coord.get("byzantine_submitted", 0),
                "rejected": coord.get("byzantine_rejected", 0),
                "aggregated": coord.get("byzantine_aggregated", 0),
                "excluded": coord.get("byzantine_excluded", 0),
                "honest_excluded": coord.get("honest_excluded", 0),
            },
        )
        yield _labelled("dlt_lease_events", "Task lease events.", "kind", snap.get("leases", {}))
        yield _labelled("dlt_evictions", "Workers removed, by reason.", "reason", snap.get("evictions", {}))


def _labelled(name: str, doc: str, label: str, values: Mapping[str, Any]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=[label])
    for key, value in sorted(values.items(), key=lambda kv: str(kv[0])):
        family.add_metric([str(key)], float(value))
    return family


class PrometheusExporter:
    """Serve the controller's metrics at ``http://ADDR:PORT/metrics`` from a private registry.

    ``port`` 0 picks a free port (read :attr:`port`). ``addr`` defaults to loopback in the controller; use
    ``0.0.0.0`` only behind a firewall (the endpoint is unauthenticated). Call :meth:`close` to stop it.
    """

    def __init__(self, port: int, addr: str = "127.0.0.1") -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._collector = _SnapshotCollector()
        self.registry.register(self._collector)
        try:
            self._server, self._thread = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as exc:
            raise UserError(
                f"cannot serve metrics on {addr}:{port} ({exc.strerror}): choose another --metrics-port"
            ) from exc
        self.port = int(self._server.server_port)

    def update(self, snapshot: dict[str, Any], val_loss: float | None = None) -> None:
        """Publish a new snapshot (the controller's :meth:`ControllerCore.snapshot` plus extras)."""
        snap = dict(snapshot)
        if val_loss is not None:
            snap["val_loss"] = val_loss
        self._collector.snapshot = snap

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


# ====================================================================== summaries
def staleness_percentiles(histogram: Mapping[Any, int]) -> dict[str, float | None]:
    """Mean, p50, p90, p99 and max of a ``{staleness: count}`` histogram (``None`` when empty)."""
    items = sorted((int(k), int(v)) for k, v in histogram.items() if int(v) > 0)
    total = sum(v for _, v in items)
    if not total:
        return {"mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    mean = sum(k * v for k, v in items) / total

    def quantile(q: float) -> float:
        target = q * total
        seen = 0
        for k, v in items:
            seen += v
            if seen >= target:
                return float(k)
        return float(items[-1][0])

    return {
        "mean": mean,
        "p50": quantile(0.5),
        "p90": quantile(0.9),
        "p99": quantile(0.99),
        "max": float(items[-1][0]),
    }


def summarize_snapshot(
    snap: Mapping[str, Any],
    *,
    source: str,
    evals: Iterable[tuple[int, float]] = (),
    elapsed_s: float | None = None,
    status: str = "running",
) -> dict[str, Any]:
    """The ``metrics`` command's summary from one controller snapshot (see the module docstring)."""
    coord = snap.get("coordinator", {})
    history = [[int(s), float(v)] for s, v in evals]
    losses = [v for _, v in history if math.isfinite(v)]
    tokens = int(coord.get("tokens", 0))
    submitted = int(coord.get("submitted", 0))
    numel = snap.get("numel")
    wire = int(coord.get("wire_bytes", 0))
    fp32 = 4 * int(numel) * submitted if numel else None
    steps = int(snap.get("version", snap.get("steps", 0)) or 0)
    workers = []
    for wid, w in sorted(snap.get("workers", {}).items(), key=lambda kv: str(kv[1].get("name") or kv[0])):
        workers.append(
            {
                "worker_id": wid,
                "name": w.get("name") or wid,
                "byzantine": bool(w.get("byzantine", False)),
                "registered": bool(w.get("registered", False)),
                "bytes_up": int(w.get("bytes_up", 0)),
                "bytes_down": int(w.get("bytes_down", 0)),
                "accepted": int(w.get("accepted", 0)),
                "rejected": int(w.get("rejected_total", 0)),
                "excluded": int(w.get("excluded", 0)),
            }
        )
    return {
        "source": source,
        "status": status,
        "stop_reason": snap.get("stop_reason"),
        "steps": steps,
        "max_steps": snap.get("max_steps"),
        "elapsed_s": elapsed_s,
        "mode": snap.get("mode"),
        "codec": snap.get("codec"),
        "aggregator": snap.get("aggregator"),
        "loss": {
            "initial_val": history[0][1] if history else None,
            "final_val": snap.get("final_val_loss", history[-1][1] if history else snap.get("val_loss")),
            "best_val": min(losses) if losses else snap.get("val_loss"),
            "train": snap.get("train_loss"),
            "history": history,
        },
        "throughput": {
            "tokens": tokens,
            # Over this controller session only: a resumed run inherits steps and tokens it did not train now.
            "tokens_per_s": (tokens - int(snap.get("session_start_tokens", 0))) / elapsed_s
            if elapsed_s
            else None,
            "steps_per_s": (steps - int(snap.get("session_start_version", 0))) / elapsed_s
            if elapsed_s
            else None,
            "updates_submitted": submitted,
        },
        "acceptance": {
            "submitted": submitted,
            "accepted": int(coord.get("accepted", 0)),
            "rate": coord.get(
                "acceptance_rate", 1.0 if not submitted else int(coord.get("accepted", 0)) / submitted
            ),
            "rejected": {str(k): int(v) for k, v in sorted(snap.get("rejected", {}).items())},
            "protocol_errors": {str(k): int(v) for k, v in sorted(snap.get("protocol_errors", {}).items())},
        },
        "staleness": {
            "histogram": {
                str(k): int(v)
                for k, v in sorted(coord.get("staleness", {}).items(), key=lambda kv: int(kv[0]))
            },
            **staleness_percentiles(coord.get("staleness", {})),
        },
        # sync.step_wait: task requests parked for an imminent step, and those whose wait ran out first.
        "step_waits": {k: int(v) for k, v in (snap.get("step_waits") or {}).items()},
        "bytes": {
            "up": int(snap.get("bytes_up", 0)),
            "down": int(snap.get("bytes_down", 0)),
            "updates_on_wire": wire,
            "updates_fp32_equivalent": fp32,
            "compression_ratio": fp32 / wire if fp32 and wire else None,
        },
        "workers": workers,
        "byzantine": {
            "submitted": int(coord.get("byzantine_submitted", 0)),
            "rejected": int(coord.get("byzantine_rejected", 0)),
            "aggregated": int(coord.get("byzantine_aggregated", 0)),
            "excluded": int(coord.get("byzantine_excluded", 0)),
            "honest_excluded": int(coord.get("honest_excluded", 0)),
        },
        "leases": dict(snap.get("leases", {})),
        "evictions": dict(snap.get("evictions", {})),
    }


def summarize_run(run_dir: Path) -> dict[str, Any]:
    """Summary of a run directory: its ``summary.json`` when the run finished, else the latest ``stats``."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir} holds no metrics.jsonl: pass the run directory of a distributed run")
    records = read_metrics(path)
    evals = [(int(r["step"]), float(r["val_loss"])) for r in records if r.get("event") == "eval"]
    summary_path = run_dir / "summary.json"
    stats = [r for r in records if r.get("event") in ("stats", "summary")]
    if summary_path.is_file():
        snap = json.loads(summary_path.read_text(encoding="utf-8"))
        snap.setdefault("version", snap.get("steps", 0))
        return summarize_snapshot(
            snap, source=str(run_dir), evals=evals, elapsed_s=snap.get("elapsed_s"), status="finished"
        )
    if not stats:
        raise UserError(f"{path} has no statistics yet: the controller writes them every few seconds")
    snap = stats[-1]
    return summarize_snapshot(snap, source=str(run_dir), evals=evals, elapsed_s=snap.get("elapsed_s"))


def summarize_url(url: str, *, timeout_s: float = 5.0) -> dict[str, Any]:
    """Summary of a live controller from its Prometheus endpoint (``http://host:port/metrics``)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            text = response.read().decode("utf-8")
    except (OSError, ValueError) as exc:
        raise UserError(
            f"cannot read metrics from {url} ({exc}): is the controller running with --metrics-port?"
        ) from exc
    snap: dict[str, Any] = {"coordinator": {}, "workers": {}}
    coord = snap["coordinator"]
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            simple = {
                "dlt_server_version": "version",
                "dlt_max_steps": "max_steps",
                "dlt_val_loss": "val_loss",
                "dlt_train_loss": "train_loss",
                "dlt_elapsed_seconds": "elapsed_s",
                "dlt_workers_registered": "workers_registered",
                "dlt_numel": "numel",
            }
            if name in simple:
                snap[simple[name]] = value
            elif name == "dlt_tokens_total":
                coord["tokens"] = int(value)
            elif name == "dlt_updates_submitted_total":
                coord["submitted"] = int(value)
            elif name == "dlt_updates_accepted_total":
                coord["accepted"] = int(value)
            elif name == "dlt_updates_rejected_total":
                snap.setdefault("rejected", {})[labels["reason"]] = int(value)
            elif name == "dlt_protocol_errors_total":
                snap.setdefault("protocol_errors", {})[labels["code"]] = int(value)
            elif name == "dlt_staleness_updates_total":
                coord.setdefault("staleness", {})[labels["staleness"]] = int(value)
            elif name == "dlt_bytes_total":
                snap[f"bytes_{labels['direction']}"] = int(value)
            elif name == "dlt_worker_bytes_total":
                w = snap["workers"].setdefault(labels["worker"], {"name": labels["name"], "registered": True})
                w[f"bytes_{labels['direction']}"] = int(value)
            elif name == "dlt_worker_updates_total":
                w = snap["workers"].setdefault(labels["worker"], {"name": labels["name"], "registered": True})
                key = {"accepted": "accepted", "rejected": "rejected_total", "excluded": "excluded"}[
                    labels["outcome"]
                ]
                w[key] = int(value)
            elif name == "dlt_byzantine_updates_total":
                kind = labels["kind"]
                coord[kind if kind == "honest_excluded" else f"byzantine_{kind}"] = int(value)
            elif name == "dlt_lease_events_total":
                snap.setdefault("leases", {})[labels["kind"]] = int(value)
            elif name == "dlt_evictions_total":
                snap.setdefault("evictions", {})[labels["reason"]] = int(value)
    if "version" not in snap:
        raise UserError(f"{url} serves no dist-llm-train metrics (no dlt_server_version): check the URL")
    evals = [(int(snap["version"]), float(snap["val_loss"]))] if "val_loss" in snap else []
    return summarize_snapshot(snap, source=url, evals=evals, elapsed_s=snap.get("elapsed_s"))


# ====================================================================== rendering
def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}" if abs(value) < 100 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.2f} MB"


def render_summary(summary: Mapping[str, Any], console: Console) -> None:
    """Print the summary as tables: run and loss, acceptance, staleness, bytes per worker, Byzantine."""
    run = Table(title=f"run {summary['source']} ({summary['status']})")
    run.add_column("metric")
    run.add_column("value", justify="right")
    loss, tp, acc, by = summary["loss"], summary["throughput"], summary["acceptance"], summary["bytes"]
    rows = [
        ("server steps", f"{_fmt(summary['steps'])} / {_fmt(summary.get('max_steps'))}"),
        ("stop reason", summary.get("stop_reason")),
        (
            "mode / codec / aggregator",
            f"{summary.get('mode')} / {summary.get('codec')} / {summary.get('aggregator')}",
        ),
        ("elapsed", None if summary.get("elapsed_s") is None else f"{summary['elapsed_s']:.1f} s"),
        ("initial validation loss", loss["initial_val"]),
        ("final validation loss", loss["final_val"]),
        ("best validation loss", loss["best_val"]),
        ("training loss (recent)", loss["train"]),
        ("tokens trained", tp["tokens"]),
        ("tokens / s", tp["tokens_per_s"]),
        ("server steps / s", tp["steps_per_s"]),
        ("bytes up / down", f"{_mb(by['up'])} / {_mb(by['down'])}"),
        (
            "update compression vs fp32",
            None if by["compression_ratio"] is None else f"{by['compression_ratio']:.1f}x",
        ),
    ]
    for key, value in rows:
        run.add_row(key, value if isinstance(value, str) else _fmt(value))
    console.print(run)

    updates = Table(title="updates: acceptance and rejection")
    updates.add_column("outcome")
    updates.add_column("count", justify="right")
    updates.add_row("submitted", _fmt(acc["submitted"]))
    updates.add_row("accepted", f"{_fmt(acc['accepted'])} ({100 * float(acc['rate'] or 0):.1f}%)")
    for reason, n in acc["rejected"].items():
        updates.add_row(f"rejected: {reason}", _fmt(n))
    for code, n in acc["protocol_errors"].items():
        updates.add_row(f"refused message: {code}", _fmt(n))
    st = summary["staleness"]
    updates.add_row(
        "staleness mean / p50 / p90 / max",
        " / ".join(_fmt(st[k], 2) if k == "mean" else _fmt(st[k], 0) for k in ("mean", "p50", "p90", "max")),
    )
    waits = summary.get("step_waits") or {}
    if waits.get("parked"):
        updates.add_row(
            "step waits: parked / ran out", f"{_fmt(waits['parked'])} / {_fmt(waits['timed_out'])}"
        )
    for reason, n in summary.get("evictions", {}).items():
        updates.add_row(f"workers removed: {reason}", _fmt(n))
    console.print(updates)

    if summary["workers"]:
        table = Table(title="workers")
        for col in ("worker", "role", "bytes up", "bytes down", "accepted", "rejected", "excluded"):
            table.add_column(col, justify="left" if col in ("worker", "role") else "right")
        for w in summary["workers"]:
            table.add_row(
                f"{w['name']}" + ("" if w["registered"] else " (gone)"),
                "byzantine" if w["byzantine"] else "honest",
                _mb(w["bytes_up"]),
                _mb(w["bytes_down"]),
                _fmt(w["accepted"]),
                _fmt(w["rejected"]),
                _fmt(w["excluded"]),
            )
        console.print(table)
    byz = summary["byzantine"]
    if byz["submitted"]:
        table = Table(title="Byzantine updates (workers labelled Byzantine by the launcher)")
        table.add_column("fate")
        table.add_column("count", justify="right")
        filtered = byz["rejected"] + byz["excluded"]
        table.add_row("submitted", _fmt(byz["submitted"]))
        table.add_row("rejected at admission", _fmt(byz["rejected"]))
        table.add_row("excluded by the aggregator", _fmt(byz["excluded"]))
        table.add_row(
            "filtered (rejected + excluded)", f"{filtered} ({100 * filtered / byz['submitted']:.1f}%)"
        )
        table.add_row("aggregated (coordinate-wise rules damp, not drop)", _fmt(byz["aggregated"]))
        table.add_row("honest updates excluded", _fmt(byz["honest_excluded"]))
        console.print(table)
