"""The single-process trainer: the baseline every distributed run is measured against.

A readable loop in the manner of nanoGPT: AdamW, warm-up + cosine schedule, gradient clipping, periodic
evaluation, JSON-lines metrics, atomic checkpoints and exact resume. Each batch depends only on
``(seed, step)`` (see :func:`dist_llm_train.data.get_batch`) and the global RNG is re-seeded per step, so
a run of 2N steps and a run of N steps + resume + N steps end with bitwise-equal weights.
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dist_llm_train.config import RunConfig, config_to_yaml
from dist_llm_train.data import PreparedData, get_batch, prepare_data
from dist_llm_train.errors import CheckpointError, UserError
from dist_llm_train.models import LanguageModel, build_model, resolve_model_shapes
from dist_llm_train.telemetry import MetricsWriter
from dist_llm_train.training.checkpoint import (
    load_checkpoint,
    load_model_state,
    load_optimizer_state,
    resolve_checkpoint,
    save_checkpoint,
)
from dist_llm_train.training.device import configure_threads, resolve_device
from dist_llm_train.training.evaluation import EvalResult, evaluate
from dist_llm_train.training.schedule import training_lr


def step_seed(seed: int, step: int, micro: int = 0) -> int:
    """A 63-bit seed for one (step, micro-batch); independent of everything that ran before."""
    return int(np.random.SeedSequence([seed, step, micro]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def default_run_dir(cfg: RunConfig) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.name}-{stamp}"


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    tokens_seen: int
    wall_s: float
    final_eval: EvalResult
    initial_eval: EvalResult | None
    history: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "run_dir": str(self.run_dir),
            "steps": self.steps,
            "tokens_seen": self.tokens_seen,
            "wall_s": round(self.wall_s, 3),
            **self.final_eval.as_dict("final_val_"),
        }
        if self.initial_eval is not None:
            out.update(self.initial_eval.as_dict("initial_val_"))
        return out


class Trainer:
    """Owns data, model and optimiser for one process; :meth:`train` runs the loop."""

    def __init__(self, cfg: RunConfig, *, resume: bool = False, console: Console | None = None) -> None:
        self.cfg = cfg
        self.console = console or Console(stderr=True)
        tc = cfg.training
        configure_threads(tc.threads)
        self.device = resolve_device(tc.device)
        self.run_dir = Path(tc.run_dir) if tc.run_dir else default_run_dir(cfg)
        self._check_run_dir(resume)

        self.model_shapes = resolve_model_shapes(cfg.model)
        self.data: PreparedData = prepare_data(cfg.data, block_size=self.model_shapes["block_size"])
        torch.manual_seed(tc.seed)
        self.model: LanguageModel = build_model(cfg.model, self.data.tokenizer.vocab_size).to(self.device)
        self.optimizer = self.model.configure_optimizer(
            tc.weight_decay, tc.lr, (tc.beta1, tc.beta2), self.device.type
        )
        self.start_step = 0
        if resume:
            self._resume()

    # ------------------------------------------------------------------ setup
    def _check_run_dir(self, resume: bool) -> None:
        has_checkpoint = (self.run_dir / "checkpoints" / "latest").is_file()
        if resume and not has_checkpoint:
            raise CheckpointError(
                f"--resume: {self.run_dir} holds no checkpoint (checkpoints/latest is missing)"
            )
        if not resume and has_checkpoint:
            raise UserError(
                f"run directory {self.run_dir} already holds a checkpoint: pass --resume to continue it, "
                "or choose another --run-dir"
            )

    def _state(self, step: int) -> dict[str, Any]:
        return {
            "step": step,
            "config": self.cfg.model_dump(mode="json"),
            "model_shapes": self.model_shapes,
            "tokenizer": self.data.tokenizer.to_json(),
            "data_fingerprint": self.data.fingerprint,
            "torch_version": torch.__version__,
        }

    def _resume(self) -> None:
        checkpoint = load_checkpoint(resolve_checkpoint(self.run_dir))
        saved_shapes = checkpoint.state.get("model_shapes")
        shapes = self.model_shapes
        if saved_shapes != shapes:
            raise CheckpointError(
                f"checkpoint {checkpoint.path} was written for model {saved_shapes}, but the config asks for "
                f"{shapes}: resume with the model config the run started with"
            )
        if checkpoint.state.get("data_fingerprint") != self.data.fingerprint:
            raise CheckpointError(
                f"checkpoint {checkpoint.path} was trained on different data or tokenizer settings: "
                "resume with the data config the run started with"
            )
        load_model_state(self.model, checkpoint)
        load_optimizer_state(self.optimizer, checkpoint)
        self.start_step = checkpoint.step

    def save(self, step: int) -> Path:
        return save_checkpoint(
            self.run_dir,
            step=step,
            model_state=self.model.state_dict(),
            optimizer=self.optimizer,
            state=self._state(step),
        )

    # ------------------------------------------------------------------ loop
    def evaluate(self) -> EvalResult:
        tc = self.cfg.training
        return evaluate(
            self.model,
            self.data.val,
            batch_size=tc.batch_size,
            n_batches=tc.eval_batches,
            device=self.device,
            byte_level=self.data.tokenizer.is_byte_level,
        )

    def train_step(self, step: int) -> dict[str, float]:
        """One optimiser step (with gradient accumulation); returns loss, lr and grad norm."""
        tc = self.cfg.training
        lr = training_lr(tc, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(step_seed(tc.seed, step))  # dropout draws depend on the step alone
        total_loss = 0.0
        for micro in range(tc.grad_accum_steps):
            index = step * tc.grad_accum_steps + micro
            window = get_batch(self.data.train, tc.batch_size, self.model.block_size, tc.seed, index)
            generator = torch.Generator().manual_seed(step_seed(tc.seed, step, micro + 1))
            batch = self.model.make_batch(window, generator).to(self.device)
            loss, _ = self.model.loss_and_metrics(batch)
            (loss / tc.grad_accum_steps).backward()
            total_loss += float(loss.detach()) / tc.grad_accum_steps
        grad_norm = float("nan")
        if tc.grad_clip is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": total_loss, "lr": lr, "grad_norm": grad_norm}

    def train(self, on_eval: Callable[[int, EvalResult], None] | None = None) -> TrainResult:
        tc = self.cfg.training
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(config_to_yaml(self.cfg), encoding="utf-8")
        self.data.tokenizer.save(self.run_dir / "tokenizer.json")
        tokens_per_step = tc.batch_size * tc.grad_accum_steps * self.model.block_size
        history: list[dict[str, Any]] = []
        initial_eval = None
        started = time.perf_counter()

        with MetricsWriter(self.run_dir / "metrics.jsonl") as metrics, self._progress() as progress:
            task = progress.add_task("train", total=tc.max_steps, completed=self.start_step, info="")
            if self.start_step == 0:
                initial_eval = self.evaluate()
                metrics.write("eval", step=0, **initial_eval.as_dict())
                history.append({"step": 0, **initial_eval.as_dict()})
            else:
                metrics.write("resume", step=self.start_step, checkpoint=str(self.run_dir / "checkpoints"))
            last_eval = initial_eval
            window_start, window_steps = time.perf_counter(), 0
            for step in range(self.start_step, tc.max_steps):
                stats = self.train_step(step)
                window_steps += 1
                done = step + 1
                if done % self.cfg.telemetry.log_interval == 0 or done == tc.max_steps:
                    elapsed = time.perf_counter() - window_start
                    tokens_per_s = window_steps * tokens_per_step / max(elapsed, 1e-9)
                    metrics.write("train", step=done, tokens_per_s=tokens_per_s, **stats)
                    window_start, window_steps = time.perf_counter(), 0
                    progress.update(task, info=self._info(stats["loss"], last_eval, tokens_per_s))
                if done % tc.eval_interval == 0 or done == tc.max_steps:
                    last_eval = self.evaluate()
                    metrics.write("eval", step=done, **last_eval.as_dict())
                    history.append({"step": done, **last_eval.as_dict()})
                    if self.cfg.telemetry.progress:
                        progress.console.print(f"step {done}: val loss {last_eval.loss:.4f}", highlight=False)
                    if on_eval is not None:
                        on_eval(done, last_eval)
                if tc.checkpoint_interval and done % tc.checkpoint_interval == 0 and done != tc.max_steps:
                    self.save(done)
                progress.update(task, completed=done)
            final_step = max(tc.max_steps, self.start_step)
            if last_eval is None or not history or history[-1]["step"] != final_step:
                last_eval = self.evaluate()
                metrics.write("eval", step=final_step, **last_eval.as_dict())
            self.save(final_step)
            wall = time.perf_counter() - started
            result = TrainResult(
                run_dir=self.run_dir,
                steps=final_step,
                tokens_seen=final_step * tokens_per_step,
                wall_s=wall,
                final_eval=last_eval,
                initial_eval=initial_eval,
                history=history,
            )
            metrics.write("summary", **result.summary())
        (self.run_dir / "summary.json").write_text(json.dumps(result.summary(), indent=2), encoding="utf-8")
        return result

    def _progress(self) -> Progress:
        return Progress(
            TextColumn("[bold]step"),
            MofNCompleteColumn(),
            BarColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=self.console,
            disable=not self.cfg.telemetry.progress,
            transient=False,
        )

    @staticmethod
    def _info(loss: float, last_eval: EvalResult | None, tokens_per_s: float) -> str:
        val = f" val {last_eval.loss:.3f}" if last_eval is not None else ""
        return f"loss {loss:.3f}{val}  {tokens_per_s:,.0f} tok/s"
