"""Writing a validation's results: ``results.json``, ``report.md`` and the plots.

Plots (matplotlib, no display needed): validation loss against accepted tokens, against virtual time and
against bytes on the wire (both directions), and the staleness histogram of every asynchronous arm. The
``byzantine`` preset gets a heat map of its aggregator x attack table instead of one line per arm.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from dist_llm_train.validation.presets import Criterion

__all__ = ["byzantine_table", "render_markdown", "summary_rows", "write_outputs"]


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def _num(x: float | None, fmt: str = ".4f") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return format(x, fmt)


def summary_rows(arms: dict[str, dict[str, Any]]) -> list[list[str]]:
    """One row per arm: the figures every preset reports (header first)."""
    rows = [
        [
            "arm",
            "configuration",
            "final val loss",
            "perplexity",
            "MLM acc",
            "tokens",
            "virtual s",
            "MiB up",
            "MiB down",
            "acceptance",
            "staleness p50/p90/max",
            "wall s",
        ]
    ]
    for name, m in arms.items():
        st = m.get("staleness_percentiles") or {}
        stale = "-" if not st else f"{st.get('p50', 0):.0f}/{st.get('p90', 0):.0f}/{st.get('max', 0):.0f}"
        acc = m.get("mlm_accuracy")
        rows.append(
            [
                name,
                m["label"],
                _num(m["final_val_loss"]),
                _num(m["perplexity"], ".2f"),
                "-" if acc is None else f"{100 * acc:.2f}%",
                f"{m['tokens']:,}",
                _num(m["virtual_s"], ".1f"),
                _mib(m["bytes_up"]),
                _mib(m["bytes_down"]),
                f"{100 * m['acceptance_rate']:.1f}%",
                stale,
                _num(m["wall_s"], ".1f"),
            ]
        )
    return rows


def byzantine_table(
    arms: dict[str, dict[str, Any]],
) -> tuple[list[str], list[str], dict[tuple[str, str], dict]]:
    """(rules, attacks, cells) of the arms that carry an aggregator and an attack, in run order."""
    rules: list[str] = []
    attacks: list[str] = []
    cells: dict[tuple[str, str], dict] = {}
    for m in arms.values():
        rule, attack = m.get("aggregator"), m.get("attack")
        if rule is None or attack is None:
            continue
        if rule not in rules:
            rules.append(rule)
        if attack not in attacks:
            attacks.append(attack)
        cells[(rule, attack)] = m
    return rules, attacks, cells


def _table(rows: list[list[str]]) -> str:
    head, *body = rows
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def _criteria_rows(criteria: list[Criterion]) -> list[list[str]]:
    rows = [["criterion", "measured", "target", "verdict", "what"]]
    for c in criteria:
        rows.append(
            [
                c.name,
                _num(c.value),
                f"{c.comparison} {c.threshold:g}",
                "met" if c.passed else "**MISSED**",
                c.detail,
            ]
        )
    return rows


def render_markdown(result: Any) -> str:
    """``report.md`` for a :class:`~dist_llm_train.validation.runner.ValidationResult`."""
    arms = result.arms
    out = [f"# Validation `{result.preset}` ({result.scale} scale)", "", result.description, ""]
    if result.command:
        out += ["```", result.command, "```", ""]
    m = result.machine
    out += [
        f"Seed {result.seed}; {m['platform']}, {m['cpu_count']} CPUs, torch {m['torch']}, "
        f"GPU: {m['cuda'] or 'none'}; {result.wall_s:.0f} s of real time.",
        "",
    ]
    out += [f"- {note}" for note in result.notes]
    out += ["", "## Criteria", ""]
    if result.criteria:
        out += [_table(_criteria_rows(result.criteria)), ""]
        missed = [c.name for c in result.criteria if not c.passed]
        out += [("All criteria met." if not missed else f"Missed: {', '.join(missed)}."), ""]
    else:
        out += ["No criteria apply to the arms that ran.", ""]
    rules, attacks, cells = byzantine_table(arms)
    if rules and attacks:
        clean = arms.get("mean/none")
        base = None if clean is None else clean["final_val_loss"]
        out += ["## Final validation loss minus the clean baseline", ""]
        if base is not None:
            out += [f"Clean baseline (mean, no attack): {base:.4f}.", ""]
        rows = [["rule", *attacks]]
        for rule in rules:
            row = [rule]
            for attack in attacks:
                cell = cells.get((rule, attack))
                if cell is None:
                    row.append("")
                elif base is None:
                    row.append(_num(cell["final_val_loss"]))
                else:
                    delta = cell["final_val_loss"] - base
                    row.append(f"{delta:+.3f}" if math.isfinite(delta) and abs(delta) < 100 else "diverged")
            rows.append(row)
        out += [_table(rows), ""]
        pr = [["rule", *attacks]]
        for rule in rules:
            row = [rule]
            for attack in attacks:
                byz = (cells.get((rule, attack)) or {}).get("byzantine") or {}
                p, r = byz.get("precision"), byz.get("recall")
                row.append("" if p is None and r is None else f"{_num(p, '.2f')} / {_num(r, '.2f')}")
            pr.append(row)
        if any(cell for row in pr[1:] for cell in row[1:]):
            out += [
                "Precision / recall of the Byzantine updates a selection rule left out:",
                "",
                _table(pr),
                "",
            ]
    out += ["## Every run", "", _table(summary_rows(arms)), ""]
    failed = getattr(result, "failed", {}) or {}
    if failed:
        out += ["## Arms that failed", ""] + [f"- `{name}`: {error}" for name, error in failed.items()] + [""]
    traffic = [(name, a) for name, a in arms.items() if a.get("bytes_per_worker_hour") is not None]
    if result.preset == "multi-region" and traffic:
        rows = [["arm", "MiB per worker per virtual hour", "extrapolated to GPT-2 124M (GiB/h)"]]
        for name, a in traffic:
            rows.append(
                [name, _mib(a["bytes_per_worker_hour"]), f"{a['bytes_per_worker_hour_124m'] / 2**30:,.1f}"]
            )
        out += ["## Traffic per worker", "", _table(rows), ""]
        dist = arms.get("distributed")
        if dist is not None:
            wrows = [["worker", "speed", "Mbit/s", "sent", "accepted", "rejected", "MiB up", "MiB down"]]
            for w in dist["workers"]:
                wrows.append(
                    [
                        w["name"],
                        f"{w['speed']:g}",
                        f"{w['up_mbps']:g}",
                        str(w["updates_sent"]),
                        str(w["accepted"]),
                        str(sum(w["rejected"].values())),
                        _mib(w["bytes_up"]),
                        _mib(w["bytes_down"]),
                    ]
                )
            out += ["Per worker (distributed arm):", "", _table(wrows), ""]
    if result.plots:
        out += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in result.plots] + [""]
    return "\n".join(out)


def _plots(result: Any, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir = out_dir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    rules, attacks, cells = byzantine_table(result.arms)
    if rules and attacks and "mean/none" in result.arms:
        base = result.arms["mean/none"]["final_val_loss"]
        grid = [
            [
                min(2.0, cells[(r, a)]["final_val_loss"] - base) if (r, a) in cells else math.nan
                for a in attacks
            ]
            for r in rules
        ]
        fig, ax = plt.subplots(figsize=(1.1 * len(attacks) + 3, 0.5 * len(rules) + 2))
        image = ax.imshow(grid, cmap="RdYlGn_r", vmin=-0.1, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(attacks)), attacks, rotation=35, ha="right")
        ax.set_yticks(range(len(rules)), rules)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if math.isfinite(v):
                    ax.text(j, i, f"{v:+.2f}" if v < 2.0 else ">2", ha="center", va="center", fontsize=7)
        fig.colorbar(image, ax=ax, label="final loss - clean baseline")
        ax.set_title(f"{result.preset}: final validation loss relative to the clean baseline")
        fig.tight_layout()
        fig.savefig(plot_dir / "byzantine_matrix.png", dpi=110)
        plt.close(fig)
        written.append("plots/byzantine_matrix.png")
        lines = {n: m for n, m in result.arms.items() if n.split("/")[0] in ("mean", "nnm+trimmed-mean")}
    else:
        lines = result.arms

    for key, xlabel, fname, scale_x in (
        ("tokens", "tokens accepted", "loss_vs_tokens.png", 1.0),
        ("virtual_s", "virtual seconds", "loss_vs_time.png", 1.0),
        ("bytes", "MiB on the wire (up + down)", "loss_vs_bytes.png", 1 / 2**20),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for name, m in lines.items():
            hist = m["eval_history"]
            if key == "bytes":
                xs = [(p["bytes_up"] + p["bytes_down"]) * scale_x for p in hist]
            else:
                xs = [p[key] * scale_x for p in hist]
            ys = [p["loss"] for p in hist]
            ax.plot(xs, ys, marker="o", markersize=3, label=name)
        if key == "bytes":
            ax.set_xscale("symlog")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(f"{result.preset} ({result.scale})")
        fig.tight_layout()
        fig.savefig(plot_dir / fname, dpi=110)
        plt.close(fig)
        written.append(f"plots/{fname}")

    # Every asynchronous arm, even one whose updates all arrived fresh (a bar at 0 says so).
    async_arms = {
        n: m
        for n, m in lines.items()
        if m.get("mode") in ("async", "adaptive") or len(m.get("staleness") or {}) > 1
    }
    if async_arms:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        width = 0.8 / len(async_arms)
        for i, (name, m) in enumerate(async_arms.items()):
            hist = {int(k): v for k, v in m["staleness"].items()}
            total = sum(hist.values())
            ax.bar([k + i * width for k in hist], [v / total for v in hist.values()], width=width, label=name)
        # Integer ticks over at least 0..3, so that an arm whose updates are all fresh shows as one bar at 0.
        top = max([3, *(int(k) for m in async_arms.values() for k in m["staleness"])])
        ax.set_xticks(range(top + 1))
        ax.set_xlim(-0.5, top + 0.5)
        ax.set_xlabel("staleness (versions behind at arrival)")
        ax.set_ylabel("share of updates")
        ax.legend(fontsize=7)
        ax.set_title(f"{result.preset}: staleness")
        fig.tight_layout()
        fig.savefig(plot_dir / "staleness.png", dpi=110)
        plt.close(fig)
        written.append("plots/staleness.png")
    return written


def write_outputs(result: Any, out_dir: Path, *, plots: bool = True) -> None:
    """``results.json``, ``plots/*.png`` and ``report.md`` in ``out_dir`` (created; files replaced atomically)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result.out_dir = out_dir
    if plots:
        result.plots = _plots(result, out_dir)
    _atomic_write(out_dir / "results.json", json.dumps(result.to_dict(), indent=1, default=str) + "\n")
    _atomic_write(out_dir / "report.md", render_markdown(result))
