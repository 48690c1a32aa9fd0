"""Reproduce nanoGPT's CPU configuration on character-level tinyshakespeare (REFERENCES.md §7).

nanoGPT reports a validation loss of about 1.88 after 2000 iterations with 4 layers, 4 heads, 128 embd,
block 64, batch 12, lr 1e-3, no dropout. This runs the ``shakespeare-char`` preset through the same
:class:`~dist_llm_train.training.Trainer` that ``dist-llm-train train`` uses, and checks the anchor.

    .venv/bin/python benchmarks/baseline_shakespeare.py --data ../shared/data/tinyshakespeare \
        --json benchmarks/results/baseline_shakespeare.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from dist_llm_train.config import load_config
from dist_llm_train.training import Trainer

ANCHOR_VAL_LOSS = 1.88


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="../shared/data/tinyshakespeare", help="local tinyshakespeare copy")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--run-dir", default=None, help="default: a temporary directory")
    parser.add_argument("--json", dest="json_path", default=None, help="write the result here")
    args = parser.parse_args()

    run_dir = args.run_dir or tempfile.mkdtemp(prefix="baseline-shakespeare-")
    overrides = [
        f"data.path={args.data}",
        f"training.max_steps={args.steps}",
        f"training.lr_decay_steps={args.steps}",
        f"training.seed={args.seed}",
        f"training.run_dir={run_dir}",
        "training.device=cpu",
    ]
    if args.threads:
        overrides.append(f"training.threads={args.threads}")
    cfg = load_config("shakespeare-char", overrides)
    started = time.perf_counter()
    trainer = Trainer(cfg)
    result = trainer.train()
    wall = time.perf_counter() - started
    record = {
        "benchmark": "baseline_shakespeare",
        "steps": result.steps,
        "final_val_loss": result.final_eval.loss,
        "anchor_val_loss": ANCHOR_VAL_LOSS,
        "meets_anchor": result.final_eval.loss <= ANCHOR_VAL_LOSS,
        "parameters": trainer.model.num_parameters(),
        "vocab_size": trainer.data.tokenizer.vocab_size,
        "wall_s": round(wall, 1),
        "history": result.history,
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "command": " ".join(["python", *sys.argv]),
    }
    print(
        f"final validation loss {result.final_eval.loss:.4f} after {result.steps} steps "
        f"(anchor <= {ANCHOR_VAL_LOSS}: {'met' if record['meets_anchor'] else 'MISSED'}), {wall:.0f} s"
    )
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(record, indent=2), encoding="utf-8")
    return 0 if record["meets_anchor"] else 1


if __name__ == "__main__":
    sys.exit(main())
