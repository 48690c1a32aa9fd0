"""Validation presets, criteria, reproducibility checks and the CLI's errors (no training here)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest

from dist_llm_train.cli import main
from dist_llm_train.errors import ConfigError, DataError
from dist_llm_train.validation import PRESETS, build_arm_config, compare_results, get_preset, load_results
from dist_llm_train.validation.presets import BYZANTINE_AGGREGATORS, BYZANTINE_ATTACKS


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("scale", ["small", "full"])
def test_every_arm_of_every_preset_is_a_valid_config(name: str, scale: str, shared_data: Path) -> None:
    preset = get_preset(name)
    arms = preset.arms(scale)  # type: ignore[arg-type]
    assert len({a.name for a in arms}) == len(arms)
    assert sum(a.role == "baseline" for a in arms) == 1
    for arm in arms:
        cfg = build_arm_config(preset, scale, arm, seed=7, data_dir=shared_data)  # type: ignore[arg-type]
        assert cfg.training.seed == 7
        assert cfg.data.path is not None and Path(cfg.data.path).exists()


def test_arms_of_one_preset_share_model_data_and_budget(shared_data: Path) -> None:
    for preset in PRESETS.values():
        configs = [
            build_arm_config(preset, "small", a, seed=1, data_dir=shared_data) for a in preset.arms("small")
        ]
        for field in ("model", "data"):
            assert len({getattr(c, field).model_dump_json() for c in configs}) == 1, (preset.name, field)
        budgets = {(c.training.max_steps, c.training.batch_size, c.training.lr) for c in configs}
        assert len(budgets) == 1, preset.name


def test_byzantine_matrix_covers_every_rule_and_attack_with_f_of_20_percent(shared_data: Path) -> None:
    preset = get_preset("byzantine")
    arms = preset.arms("small")
    assert len(arms) == len(BYZANTINE_AGGREGATORS) * len(BYZANTINE_ATTACKS)
    attacked = build_arm_config(
        preset, "small", next(a for a in arms if a.attack == "alie"), seed=1, data_dir=shared_data
    )
    assert attacked.cluster.byzantine == attacked.aggregation.f
    assert attacked.aggregation.f / attacked.cluster.workers == pytest.approx(0.2)


def _metrics(
    final: float,
    *,
    bytes_up: int = 1000,
    bytes_down: int = 1000,
    acceptance: float = 1.0,
    history: list[float] | None = None,
) -> dict[str, Any]:
    losses = history if history is not None else [6.0, final]
    return {
        "final_val_loss": final,
        "initial_val_loss": losses[0],
        "perplexity": math.exp(final),
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
        "fp32_up_bytes": bytes_up,
        "acceptance_rate": acceptance,
        "accepted": 10,
        "submitted": 10,
        "tokens": 100,
        "mlm_accuracy": None,
        "workers": [],
        "eval_history": [{"step": i, "loss": x} for i, x in enumerate(losses)],
    }


def test_gpt2_criteria_judge_perplexity_traffic_acceptance_and_divergence() -> None:
    criteria = get_preset("gpt2-wikitext").criteria
    ok = {
        c.name: c
        for c in criteria(
            {
                "baseline": _metrics(4.0, bytes_up=10_000),
                "distributed": _metrics(4.0 + math.log(1.09), bytes_up=999, acceptance=0.85),
            }
        )
    }
    assert all(c.passed for c in ok.values()) and len(ok) == 4
    bad = {
        c.name: c
        for c in criteria(
            {
                "baseline": _metrics(4.0, bytes_up=10_000),
                "distributed": _metrics(
                    4.0 + math.log(1.11), bytes_up=1001, acceptance=0.79, history=[6.0, 7.0, 6.5]
                ),
            }
        )
    }
    assert not any(c.passed for c in bad.values())
    assert bad["perplexity vs baseline"].value == pytest.approx(1.11)
    diverged = criteria(
        {"baseline": _metrics(4.0), "distributed": _metrics(math.nan, history=[6.0, math.nan])}
    )
    assert not next(c for c in diverged if c.name == "no divergence").passed


def test_byzantine_criteria_hold_the_defence_to_its_margin() -> None:
    criteria = get_preset("byzantine").criteria
    out = criteria(
        {
            "mean/none": _metrics(3.0),
            "nnm+trimmed-mean/sign-flip": _metrics(3.05),
            "nnm+trimmed-mean/zero": _metrics(3.2),
            "mean/zero": _metrics(9.0),
        }
    )
    assert [(c.name, c.passed) for c in out] == [
        ("nnm+trimmed-mean under sign-flip", True),
        ("nnm+trimmed-mean under zero", False),
    ]


def _payload() -> dict[str, Any]:
    arm = _metrics(4.2, history=[6.0, 5.0, 4.2])
    return {
        "preset": "byzantine",
        "scale": "small",
        "arms": {"mean/none": arm, "krum/zero": copy.deepcopy(arm)},
    }


def test_compare_results_reports_each_difference_beyond_the_tolerance() -> None:
    a, b = _payload(), _payload()
    assert compare_results(a, b) == []
    b["arms"]["krum/zero"]["eval_history"][1]["loss"] = 5.0 + 1e-9  # below 1e-6 relative
    assert compare_results(a, b) == []
    b["arms"]["krum/zero"]["eval_history"][1]["loss"] = 5.001
    b["arms"]["mean/none"]["bytes_up"] += 1
    diffs = compare_results(a, b)
    assert len(diffs) == 2 and any("loss@step1" in d for d in diffs) and any("bytes_up" in d for d in diffs)
    assert compare_results(a, b, rel_tol=1e-2) == []
    del b["arms"]["krum/zero"]
    assert any("only in the current" in d for d in compare_results(a, b))


def test_load_results_rejects_files_that_are_not_results(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such results file"):
        load_results(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match=r"not a readable results\.json"):
        load_results(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"steps": 3}))
    with pytest.raises(DataError, match=r"not a validate results\.json"):
        load_results(tmp_path / "other.json")


def test_unknown_preset_scale_and_arm_are_clear_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="unknown validation preset 'gpt3'; choose one of: gpt2-wikitext"):
        get_preset("gpt3")
    assert main(["validate", "--preset", "gpt3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown validation preset 'gpt3'") and "Traceback" not in err
    assert main(["validate", "--preset", "byzantine", "--arms", "krum/meteor"]) == 2
    assert "has no arm 'krum/meteor'" in capsys.readouterr().err


def test_data_dir_without_the_corpus_is_a_clear_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["validate", "--preset", "shakespeare", "--data-dir", str(tmp_path)]) == 2
    assert "no tinyshakespeare directory there" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing written for a run that could not start
