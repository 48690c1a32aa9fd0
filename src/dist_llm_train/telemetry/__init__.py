"""Metrics: JSON-lines files in the run directory (and, for the runtime, a Prometheus endpoint)."""

from dist_llm_train.telemetry.jsonl import MetricsWriter, read_metrics

__all__ = ["MetricsWriter", "read_metrics"]
