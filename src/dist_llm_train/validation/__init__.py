"""Validation on real language-model training: distributed configurations against a baseline.

``dist-llm-train validate --preset NAME`` runs a preset's baseline and distributed arms on the same model,
data, token budget and seed through the simulator, judges its criteria and writes ``report.md``,
``results.json`` and plots. Presets: ``gpt2-wikitext``, ``bert-mlm``, ``multi-region``, ``byzantine``,
``shakespeare`` (see :mod:`.presets`).

- :func:`run_validation` — run one preset (``scale`` small or full, a subset with ``only``).
- :func:`compare_results` — check a re-run against an earlier ``results.json`` (reproducibility).
- :data:`PRESETS` — the preset definitions: overrides, arms and criteria.
"""

from __future__ import annotations

from dist_llm_train.validation.presets import PRESETS, Arm, Criterion, ValidationPreset, get_preset
from dist_llm_train.validation.runner import (
    DEFAULT_REL_TOLERANCE,
    ValidationResult,
    arm_metrics,
    build_arm_config,
    compare_results,
    load_results,
    run_validation,
)

__all__ = [
    "DEFAULT_REL_TOLERANCE",
    "PRESETS",
    "Arm",
    "Criterion",
    "ValidationPreset",
    "ValidationResult",
    "arm_metrics",
    "build_arm_config",
    "compare_results",
    "get_preset",
    "load_results",
    "run_validation",
]
