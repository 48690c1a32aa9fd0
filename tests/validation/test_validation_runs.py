"""The small scale of `gpt2-wikitext` and a reduced `byzantine` matrix, trained for real, judged by the
issue's criteria; and a re-run reproducing a table.

Each preset arm trains a real GPT through the simulator (real data from ``../shared/data``); the arms run
two at a time in separate processes, which changes no number (each arm is deterministic for its seed).
The bounds that are not the issue's own criteria are named constants with the value they were measured at.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dist_llm_train.validation import compare_results, run_validation
from dist_llm_train.validation.presets import BYZANTINE_DEFENCE, BYZANTINE_DEFENCE_MARGIN

# The reduced matrix: the clean baseline, a divergent attack (scaling x1000) against the mean, the
# recommended defence and Krum, and the defence under ALIE (the in-distribution attack built to beat it).
BYZANTINE_REDUCED = [
    "mean/none",
    "mean/scaling",
    "krum/scaling",
    f"{BYZANTINE_DEFENCE}/scaling",
    f"{BYZANTINE_DEFENCE}/alie",
]


@pytest.fixture(scope="module")
def gpt2_small(shared_data: Path, session_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    out = tmp_path_factory.mktemp("gpt2-wikitext")
    return run_validation(
        "gpt2-wikitext",
        scale="small",
        out_dir=out,
        data_dir=shared_data,
        cache_dir=session_cache_dir,
        progress=False,
        jobs=2,
    )


def test_gpt2_wikitext_small_meets_every_criterion(gpt2_small: Any) -> None:
    verdicts = {c.name: c for c in gpt2_small.criteria}
    assert set(verdicts) == {
        "perplexity vs baseline",
        "update traffic reduction",
        "acceptance",
        "no divergence",
    }
    assert verdicts["update traffic reduction"].passed, verdicts["update traffic reduction"]
    assert verdicts["update traffic reduction"].value >= 10.0
    assert verdicts["acceptance"].passed and verdicts["acceptance"].value >= 0.80
    assert verdicts["no divergence"].passed
    # Measured at seed 1337: 1.075 (distributed 4.4979 vs baseline 4.4255 nats/token); the criterion is 1.10.
    ratio = verdicts["perplexity vs baseline"].value
    assert verdicts["perplexity vs baseline"].passed and ratio is not None and ratio <= 1.10
    # Both arms learned: well below the untrained loss (ln 1024 = 6.93 for a uniform guess).
    for arm in gpt2_small.arms.values():
        assert arm["final_val_loss"] < arm["initial_val_loss"] - 1.5


def test_gpt2_wikitext_small_writes_report_results_and_plots(gpt2_small: Any) -> None:
    out: Path = gpt2_small.out_dir
    data = json.loads((out / "results.json").read_text())
    assert set(data["arms"]) == {"baseline", "distributed"} and data["preset"] == "gpt2-wikitext"
    report = (out / "report.md").read_text()
    assert "perplexity vs baseline" in report and "trained on the validation split" in report
    for name in ("loss_vs_tokens", "loss_vs_time", "loss_vs_bytes", "staleness"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 5_000


@pytest.fixture(scope="module")
def byzantine_reduced(
    shared_data: Path, session_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Any:
    return run_validation(
        "byzantine",
        scale="small",
        out_dir=tmp_path_factory.mktemp("byzantine"),
        data_dir=shared_data,
        cache_dir=session_cache_dir,
        only=BYZANTINE_REDUCED,
        progress=False,
        jobs=2,
        plots=False,
    )


def test_byzantine_reduced_matrix_defence_holds_and_mean_does_not(byzantine_reduced: Any) -> None:
    arms = byzantine_reduced.arms
    clean = arms["mean/none"]["final_val_loss"]
    assert arms["mean/scaling"]["final_val_loss"] > clean + 1.0  # the undefended mean is wrecked
    # The preset's criterion: the defence ends within the margin of the clean run under every attack it
    # faces, including ALIE, the in-distribution attack built to beat coordinate-wise rules (measured with
    # worker momentum 0.7: +0.037 under scaling, +0.066 under ALIE).
    for attack in ("scaling", "alie"):
        defended = arms[f"{BYZANTINE_DEFENCE}/{attack}"]["final_val_loss"]
        assert defended - clean <= BYZANTINE_DEFENCE_MARGIN, (attack, defended, clean)
    verdicts = {c.name: c.passed for c in byzantine_reduced.criteria}
    assert verdicts == {f"{BYZANTINE_DEFENCE} under scaling": True, f"{BYZANTINE_DEFENCE} under alie": True}
    # Final, not best: the reported loss is the last evaluation's.
    for m in arms.values():
        assert m["final_val_loss"] == m["eval_history"][-1]["loss"]


def test_byzantine_selection_rules_report_precision_and_recall(byzantine_reduced: Any) -> None:
    krum = byzantine_reduced.arms["krum/scaling"]["byzantine"]
    assert krum["submitted"] > 0 and krum["precision"] is not None and krum["recall"] is not None
    # Krum keeps one update of 15 and the scaled updates are far away: every one of them is left out.
    assert krum["recall"] == 1.0 and 0.0 < krum["precision"] <= 1.0
    assert byzantine_reduced.arms["mean/scaling"]["byzantine"]["precision"] is None  # mean selects nothing


def test_rerunning_with_the_same_seed_reproduces_the_table(
    byzantine_reduced: Any, shared_data: Path, session_cache_dir: Path
) -> None:
    again = run_validation(
        "byzantine",
        scale="small",
        data_dir=shared_data,
        cache_dir=session_cache_dir,
        only=["krum/scaling"],
        progress=False,  # in this process: parallel and serial agree too
    )
    first = byzantine_reduced.to_dict()
    first["arms"] = {"krum/scaling": first["arms"]["krum/scaling"]}
    assert compare_results(again.to_dict(), first) == []
