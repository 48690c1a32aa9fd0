"""nanoGPT's own recipe for its CPU tinyshakespeare run, re-implemented standalone, to cross-check the anchor.

``baseline_shakespeare.py`` trains our ``shakespeare-char`` preset and compares it with the "about 1.88"
of nanoGPT's README (REFERENCES.md §7). This script answers the question that comparison leaves open:
what does nanoGPT's recipe itself score on this machine, measured the way we measure? It shares no code
with the package. It follows nanoGPT's ``train.py`` + ``model.py`` for the README's CPU command
(``--device=cpu --compile=False --eval_iters=20 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4
--n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0`` over ``train_shakespeare_char.py``):

- 65-character vocabulary, first 90% of the text for training and the last 10% for validation;
- the global torch RNG consumed in nanoGPT's order (``torch.manual_seed(seed)``, model construction and
  init, one ``torch.randint`` per batch, the evaluation batches every 250 iterations), so seed 1337 is
  the README's run up to float summation order;
- no biases, tied embeddings, init N(0, 0.02) with residual projections N(0, 0.02/sqrt(2 n_layer)),
  AdamW (0.9, 0.99), weight decay 0.1 on tensors of 2 or more dimensions, clip 1.0, warm-up
  lr (it+1)/(warmup+1) over 100 iterations, then cosine from 1e-3 to 1e-4.

At iteration 2000 it reports both estimates of the validation loss:

- **nanoGPT's**: the mean over ``eval_iters`` = 20 random batches of 12 x 64 characters (what the README's
  number is; about 15k characters, so it moves by a few hundredths with the batch draw);
- **full**: every non-overlapping 64-character window of the validation text (111k characters). This is
  what our benchmark's 200 fixed batches estimate.

    .venv/bin/python benchmarks/nanogpt_reference.py --data ../shared/data/tinyshakespeare --seed 1337 \
        --json benchmarks/results/nanogpt_reference_1337.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

N_LAYER, N_HEAD, N_EMBD, BLOCK_SIZE, BATCH_SIZE = 4, 4, 128, 64, 12
LR, MIN_LR, WARMUP_ITERS, BETAS, WEIGHT_DECAY, GRAD_CLIP = 1e-3, 1e-4, 100, (0.9, 0.99), 0.1, 1.0
EVAL_INTERVAL, EVAL_ITERS = 250, 20


class LayerNorm(nn.Module):
    """LayerNorm without a bias (nanoGPT's ``bias=False``)."""

    def __init__(self, ndim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, None, 1e-5)


class SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_attn = nn.Linear(N_EMBD, 3 * N_EMBD, bias=False)
        self.c_proj = nn.Linear(N_EMBD, N_EMBD, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.size()
        q, k, v = (
            t.view(batch, length, N_HEAD, width // N_HEAD).transpose(1, 2)
            for t in self.c_attn(x).split(N_EMBD, dim=2)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(batch, length, width))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # Attribute order is construction order, which fixes how the seeded RNG is consumed.
        self.ln_1 = LayerNorm(N_EMBD)
        self.attn = SelfAttention()
        self.ln_2 = LayerNorm(N_EMBD)
        self.mlp = nn.ModuleDict(
            {
                "c_fc": nn.Linear(N_EMBD, 4 * N_EMBD, bias=False),
                "c_proj": nn.Linear(4 * N_EMBD, N_EMBD, bias=False),
            }
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp["c_proj"](F.gelu(self.mlp["c_fc"](self.ln_2(x))))


class CharGPT(nn.Module):
    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab_size, N_EMBD)
        self.wpe = nn.Embedding(BLOCK_SIZE, N_EMBD)
        self.h = nn.ModuleList([Block() for _ in range(N_LAYER)])
        self.ln_f = LayerNorm(N_EMBD)
        self.lm_head = nn.Linear(N_EMBD, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight
        for module in self.modules_in_init_order():
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * N_LAYER))

    def modules_in_init_order(self) -> list[nn.Module]:
        """Linear and Embedding modules in the order nanoGPT's ``self.apply`` visits them (children first)."""
        order: list[nn.Module] = []

        def visit(module: nn.Module) -> None:
            for child in module.children():
                visit(child)
            if isinstance(module, nn.Linear | nn.Embedding):
                order.append(module)

        visit(self)
        return order

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1)))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def lr_at(it: int, max_iters: int) -> float:
    if it < WARMUP_ITERS:
        return LR * (it + 1) / (WARMUP_ITERS + 1)
    if it > max_iters:
        return MIN_LR
    ratio = (it - WARMUP_ITERS) / (max_iters - WARMUP_ITERS)
    return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (LR - MIN_LR)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="../shared/data/tinyshakespeare", help="directory with input.txt")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", dest="json_path", default=None, help="write the result here")
    args = parser.parse_args()
    path = Path(args.data) / "input.txt"
    if not path.is_file():
        print(
            f"error: {path} not found; pass --data DIR holding tinyshakespeare's input.txt", file=sys.stderr
        )
        return 2
    torch.set_num_threads(args.threads)
    text = path.read_text(encoding="utf-8")
    vocab = sorted(set(text))
    index = {ch: i for i, ch in enumerate(vocab)}
    ids = np.array([index[ch] for ch in text], dtype=np.int64)
    cut = int(len(ids) * 0.9)
    splits = {"train": torch.from_numpy(ids[:cut]), "val": torch.from_numpy(ids[cut:])}

    torch.manual_seed(args.seed)

    def batch(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        data = splits[split]
        starts = torch.randint(len(data) - BLOCK_SIZE, (BATCH_SIZE,))
        x = torch.stack([data[i : i + BLOCK_SIZE] for i in starts])
        y = torch.stack([data[i + 1 : i + 1 + BLOCK_SIZE] for i in starts])
        return x, y

    model = CharGPT(len(vocab))
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=LR,
        betas=BETAS,
    )

    @torch.no_grad()
    def nanogpt_estimate() -> dict[str, float]:
        losses = {}
        for split in ("train", "val"):
            losses[split] = sum(model(*batch(split)).item() for _ in range(EVAL_ITERS)) / EVAL_ITERS
        return losses

    @torch.no_grad()
    def full_validation() -> float:
        data = splits["val"]
        windows = (len(data) - 1) // BLOCK_SIZE
        xs = data[: windows * BLOCK_SIZE].view(windows, BLOCK_SIZE)
        ys = data[1 : windows * BLOCK_SIZE + 1].view(windows, BLOCK_SIZE)
        total = sum(
            model(xs[i : i + 64], ys[i : i + 64]).item() * ys[i : i + 64].numel()
            for i in range(0, windows, 64)
        )
        return total / ys.numel()

    started = time.perf_counter()
    history: list[dict[str, float]] = []
    x, y = batch("train")
    it = 0
    while True:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(it, args.steps)
        if it % EVAL_INTERVAL == 0:
            model.eval()
            point = {"step": it, **nanogpt_estimate()}
            if it == args.steps:
                point["full_val"] = full_validation()
            model.train()
            history.append(point)
            print(
                f"step {it}: " + ", ".join(f"{k} {v:.4f}" for k, v in point.items() if k != "step"),
                flush=True,
            )
        loss = model(x, y)
        x, y = batch("train")  # nanoGPT fetches the next batch between forward and backward
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        it += 1
        if it > args.steps:
            break
    final = history[-1]
    record = {
        "benchmark": "nanogpt_reference",
        "seed": args.seed,
        "steps": args.steps,
        "vocab_size": len(vocab),
        "val_loss_nanogpt_estimate": final["val"],
        "val_loss_full": final.get("full_val"),
        "wall_s": round(time.perf_counter() - started, 1),
        "history": history,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "command": " ".join(["python", *sys.argv]),
    }
    print(
        f"seed {args.seed}: validation loss after {args.steps} iterations {final['val']:.4f} (nanoGPT's 20-batch "
        f"estimate), {final.get('full_val', float('nan')):.4f} (full validation text)"
    )
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(record, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
