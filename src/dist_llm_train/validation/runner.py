"""Run a validation preset: every arm through the simulator on the same model, data, budget and seed.

Typical use::

    from dist_llm_train.validation import run_validation

    result = run_validation("gpt2-wikitext", scale="small", out_dir="runs/validate/gpt2",
                            data_dir="../shared/data")
    print(result.passed, [c.name for c in result.criteria if not c.passed])

The outputs in ``out_dir``: ``results.json`` (every number, per arm, plus the verdicts), ``report.md``
(tables and a reading of the criteria) and ``plots/``. Runs are deterministic for a seed on one machine:
:func:`compare_results` checks a re-run against an earlier ``results.json``.

Symptoms and settings: a preset too slow for a CI box → ``--scale small`` (minutes on 2 cores) or
``--arms`` to run a subset; a corpus download attempted offline → ``--data-dir`` pointing at local copies.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dist_llm_train.config import RunConfig, load_config
from dist_llm_train.data import PreparedData, prepare_data
from dist_llm_train.errors import ConfigError, DataError, UserError
from dist_llm_train.models import resolve_model_shapes
from dist_llm_train.simulation import (
    SimProgress,
    Simulation,
    SimulationReport,
    Topology,
    load_topology,
    parse_topology,
)
from dist_llm_train.validation.presets import (
    GPT2_124M_PARAMS,
    Arm,
    Criterion,
    Scale,
    ScaleName,
    ValidationPreset,
    get_preset,
)

__all__ = [
    "DEFAULT_REL_TOLERANCE",
    "ValidationResult",
    "arm_metrics",
    "build_arm_config",
    "compare_results",
    "load_results",
    "run_validation",
]

log = logging.getLogger("dist_llm_train.validation")

DEFAULT_REL_TOLERANCE = 1e-6
"""Re-running a preset with the same seed on the same machine and torch build reproduces every loss and byte
count exactly (the simulator is deterministic); the tolerance only absorbs float formatting. Across CPUs or
thread counts, float summation order can change losses by about 1e-4: pass a looser ``rel_tol`` there."""


@dataclass
class ValidationResult:
    """What :func:`run_validation` measured (``arms``: per-arm metrics, see :func:`arm_metrics`)."""

    preset: str
    scale: str
    seed: int
    description: str
    notes: list[str]
    arms: dict[str, dict[str, Any]]
    failed: dict[str, str]
    criteria: list[Criterion]
    machine: dict[str, Any]
    command: str
    wall_s: float
    out_dir: Path | None = None
    plots: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Every criterion holds and no arm failed."""
        return not self.failed and all(c.passed for c in self.criteria)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["out_dir"] = None if self.out_dir is None else str(self.out_dir)
        data["passed"] = self.passed
        return data


def arm_metrics(arm: Arm, report: SimulationReport, wall_s: float) -> dict[str, Any]:
    """The flat per-arm record: the simulation report (without wall time) plus derived figures.

    ``perplexity``: exp of the final validation loss (per token of the preset's tokenizer);
    ``mlm_accuracy``: final masked-token accuracy (MLM models); ``bytes_per_worker_hour``: payload bytes
    (both directions) per worker per virtual hour; ``bytes_per_worker_hour_124m``: the same scaled linearly
    to GPT-2 124M's parameter count at the same update rate.
    """
    data = report.to_dict(include_wall=False)
    last = report.eval_history[-1] if report.eval_history else None
    hours = report.virtual_s / 3600.0
    per_worker_hour = (
        (report.bytes_up + report.bytes_down) / report.n_workers / hours
        if hours > 0 and report.n_workers
        else None
    )
    data.update(
        name=arm.name,
        label=arm.label,
        role=arm.role,
        aggregator=arm.aggregator,
        attack=arm.attack,
        overrides=list(arm.overrides),
        topology_name=report.topology,
        perplexity=math.exp(report.final_val_loss) if report.final_val_loss < 700 else math.inf,
        mlm_accuracy=None if last is None else last.mlm_accuracy,
        bytes_per_worker_hour=per_worker_hour,
        bytes_per_worker_hour_124m=(
            None if per_worker_hour is None else per_worker_hour * GPT2_124M_PARAMS / report.model_params
        ),
        wall_s=round(wall_s, 2),
    )
    return data


def _machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _topology(spec: dict[str, Any] | str) -> Topology:
    return parse_topology(spec) if isinstance(spec, dict) else load_topology(spec)


def _corpus_path(preset: ValidationPreset, data_dir: str | Path | None) -> list[str]:
    if data_dir is None:
        return []
    path = Path(data_dir) / preset.corpus_dir
    if not path.exists():
        raise DataError(
            f"--data-dir {data_dir}: no {preset.corpus_dir} directory there (preset {preset.name} needs it); "
            "point it at a directory holding local corpus copies, or leave it out to download"
        )
    return [f"data.path={path}"]


def build_arm_config(
    preset: ValidationPreset,
    scale: ScaleName,
    arm: Arm,
    *,
    seed: int,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    extra_overrides: Sequence[str] = (),
) -> RunConfig:
    """The run config of one arm: preset common + scale + arm overrides, the seed and the data location."""
    spec = preset.scales[scale]
    overrides = [
        *preset.common,
        *spec.overrides,
        *arm.overrides,
        *spec.arm_overrides.get(arm.name, ()),
        f"training.seed={seed}",
        "telemetry.progress=false",
        *_corpus_path(preset, data_dir),
        *([f"data.cache_dir={cache_dir}"] if cache_dir is not None else []),
        *extra_overrides,
    ]
    return load_config(None, overrides)


def _prepared(cfg: RunConfig, datasets: dict[tuple[str, int], PreparedData]) -> PreparedData:
    block = int(resolve_model_shapes(cfg.model)["block_size"])
    key = (cfg.data.model_dump_json(), block)
    if key not in datasets:
        datasets[key] = prepare_data(cfg.data, block_size=block)
    return datasets[key]


def _run_arm(
    arm: Arm,
    cfg: RunConfig,
    spec: Scale,
    datasets: dict[tuple[str, int], PreparedData] | None = None,
    progress: Callable[[SimProgress], None] | None = None,
) -> dict[str, Any]:
    """Train one arm through the simulator and return its metrics (also the entry point of a pool worker)."""
    started = time.perf_counter()
    simulation = Simulation(
        cfg,
        _topology(arm.topology),
        data=_prepared(cfg, {} if datasets is None else datasets),
        eval_every=spec.eval_every,
        stop_at_target=False,
        base_tokens_per_s=spec.base_tokens_per_s,
        progress=progress,
    )
    report = simulation.run()
    return arm_metrics(arm, report, time.perf_counter() - started)


def _failure(arm: Arm, exc: BaseException) -> str:
    log.warning("arm %s failed: %s: %s", arm.name, type(exc).__name__, exc)
    return f"{type(exc).__name__}: {exc}"


def _select(arms: list[Arm], only: Sequence[str] | None, preset: ValidationPreset) -> list[Arm]:
    if not only:
        return arms
    names = {a.name for a in arms}
    unknown = [n for n in only if n not in names]
    if unknown:
        raise ConfigError(
            f"preset {preset.name} has no arm {', '.join(map(repr, unknown))}; its arms: {', '.join(sorted(names))}"
        )
    wanted = set(only)
    return [a for a in arms if a.name in wanted]


def run_validation(
    preset_name: str,
    *,
    scale: ScaleName = "small",
    out_dir: str | Path | None = None,
    seed: int = 1337,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    only: Sequence[str] | None = None,
    extra_overrides: Sequence[str] = (),
    progress: bool = True,
    on_arm: Callable[[Arm, dict[str, Any]], None] | None = None,
    plots: bool = True,
    console: Any = None,
    jobs: int = 1,
) -> ValidationResult:
    """Run ``preset_name`` at ``scale`` and (with ``out_dir``) write ``results.json``, ``report.md``, plots.

    Args:
        seed: seeds the model, the data order, the cluster's jitter and the attacks of every arm alike.
        data_dir: a directory with local corpus copies (``wikitext-2/``, ``tinyshakespeare/``); ``None``:
            download once into the cache.
        only: run only these arms (names as in ``results.json``, e.g. ``krum/sign-flip``).
        extra_overrides: ``--set`` style overrides applied to every arm after the preset's (e.g. fewer
            steps for a smoke run; say so when quoting the numbers).
        on_arm: called with each arm and its metrics as soon as it finishes.
        console: the rich console the progress bars go to (default: stdout).
        jobs: arms run at once, each in its own process (one CPU thread each for the small scales): on
            2 cores ``jobs=2`` halves the wall time and changes no number.
    """
    if jobs < 1:
        raise ConfigError(f"jobs={jobs} must be at least 1")
    preset = get_preset(preset_name)
    if scale not in preset.scales:
        raise ConfigError(
            f"preset {preset.name} has no scale {scale!r}; choose one of: {', '.join(preset.scales)}"
        )
    spec = preset.scales[scale]
    arms = _select(preset.arms(scale), only, preset)
    started = time.perf_counter()
    datasets: dict[tuple[str, int], PreparedData] = {}
    results: dict[str, dict[str, Any]] = {}
    # One arm that cannot run (e.g. an attack whose search needs more inputs than the rule gets) must not
    # throw away the others: it is reported as failed, with its error, and the rest of the table stands.
    failed: dict[str, str] = {}
    configs = [
        build_arm_config(
            preset,
            scale,
            arm,
            seed=seed,
            data_dir=data_dir,
            cache_dir=cache_dir,
            extra_overrides=extra_overrides,
        )
        for arm in arms
    ]

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        disable=not progress,
        transient=False,
    )
    with bar:
        overall = bar.add_task(f"{preset.name} ({scale})", total=len(arms), status="")

        def finished(arm: Arm, metrics: dict[str, Any]) -> None:
            results[arm.name] = metrics
            bar.update(overall, advance=1, status=f"{arm.name}: final {metrics['final_val_loss']:.3f}")
            if on_arm is not None:
                on_arm(arm, metrics)

        if jobs <= 1 or len(arms) <= 1:
            for arm, cfg in zip(arms, configs, strict=True):
                steps = bar.add_task(f"  {arm.name}", total=cfg.training.max_steps, status="")

                def on_progress(p: SimProgress, task: Any = steps) -> None:
                    loss = "" if p.val_loss is None else f"val {p.val_loss:.3f}"
                    bar.update(task, completed=p.step, status=loss)

                try:
                    metrics = _run_arm(arm, cfg, spec, datasets, on_progress)
                except (UserError, ArithmeticError, RuntimeError) as exc:
                    failed[arm.name] = _failure(arm, exc)
                    bar.update(overall, advance=1, status=f"{arm.name}: FAILED")
                    continue
                bar.update(
                    steps, completed=cfg.training.max_steps, status=f"final {metrics['final_val_loss']:.3f}"
                )
                finished(arm, metrics)
        else:
            # Arms are independent and each is deterministic, so running them in parallel processes gives
            # the same numbers. Tokenise in this process first: the children then only read the cache.
            for cfg in configs:
                _prepared(cfg, datasets)
            datasets.clear()
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
                futures = {
                    pool.submit(_run_arm, arm, cfg, spec): arm for arm, cfg in zip(arms, configs, strict=True)
                }
                done: dict[str, dict[str, Any]] = {}
                for future in as_completed(futures):
                    arm = futures[future]
                    try:
                        done[arm.name] = future.result()
                    except (UserError, ArithmeticError, RuntimeError) as exc:
                        failed[arm.name] = _failure(arm, exc)
                        bar.update(overall, advance=1, status=f"{arm.name}: FAILED")
                        continue
                    bar.update(
                        overall, advance=1, status=f"{arm.name}: final {done[arm.name]['final_val_loss']:.3f}"
                    )
                    if on_arm is not None:
                        on_arm(arm, done[arm.name])
            results.update(
                {arm.name: done[arm.name] for arm in arms if arm.name in done}
            )  # preset order, not finishing order

    result = ValidationResult(
        preset=preset.name,
        scale=scale,
        seed=seed,
        description=preset.description,
        notes=list(preset.notes),
        arms=results,
        failed=failed,
        criteria=preset.criteria(results),
        machine=_machine(),
        command=" ".join(["dist-llm-train", *sys.argv[1:]]) if sys.argv[0].endswith("dist-llm-train") else "",
        wall_s=round(time.perf_counter() - started, 1),
    )
    if out_dir is not None:
        from dist_llm_train.validation.report import write_outputs

        write_outputs(result, Path(out_dir), plots=plots)
    return result


# ------------------------------------------------------------------------------- reproducibility
_COMPARED = (
    "final_val_loss",
    "initial_val_loss",
    "bytes_up",
    "bytes_down",
    "accepted",
    "submitted",
    "tokens",
)


def compare_results(
    current: dict[str, Any], previous: dict[str, Any], *, rel_tol: float = DEFAULT_REL_TOLERANCE
) -> list[str]:
    """Differences between two ``results.json`` payloads beyond ``rel_tol`` (relative), one line each.

    Compared per arm present in both: the final and initial validation loss, every evaluation's loss,
    bytes up and down, accepted and submitted updates and tokens. An arm in one and not the other is a
    difference too. Empty list: the table is reproduced.
    """
    diffs: list[str] = []
    if current.get("preset") != previous.get("preset") or current.get("scale") != previous.get("scale"):
        return [
            f"different runs: {current.get('preset')}/{current.get('scale')} vs "
            f"{previous.get('preset')}/{previous.get('scale')}"
        ]
    cur, prev = current["arms"], previous["arms"]
    for name in sorted(set(cur) ^ set(prev)):
        diffs.append(f"{name}: only in the {'current' if name in cur else 'previous'} results")
    for name in sorted(set(cur) & set(prev)):
        a, b = cur[name], prev[name]
        pairs = [(key, a[key], b[key]) for key in _COMPARED]
        ha, hb = a["eval_history"], b["eval_history"]
        if len(ha) != len(hb):
            diffs.append(f"{name}: {len(ha)} evaluations vs {len(hb)}")
        pairs += [(f"loss@step{pa['step']}", pa["loss"], pb["loss"]) for pa, pb in zip(ha, hb, strict=False)]
        for key, x, y in pairs:
            if not math.isclose(float(x), float(y), rel_tol=rel_tol, abs_tol=0.0):
                diffs.append(f"{name}: {key} {x!r} vs {y!r}")
    return diffs


def load_results(path: str | Path) -> dict[str, Any]:
    """A ``results.json`` written by :func:`run_validation`; a :class:`DataError` when it is not one."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(
            f"{p}: no such results file; pass the results.json of an earlier validate run"
        ) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{p}: not a readable results.json ({exc})") from None
    if not isinstance(data, dict) or "arms" not in data or "preset" not in data:
        raise DataError(
            f"{p}: not a validate results.json (no 'preset'/'arms'); pass one written by validate"
        )
    return data
