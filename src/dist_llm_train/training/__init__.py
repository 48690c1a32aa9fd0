"""Single-process training: the loop, schedule, evaluation and checkpoints (the distributed baseline)."""

from dist_llm_train.training.checkpoint import load_checkpoint, save_checkpoint
from dist_llm_train.training.evaluation import EvalResult, evaluate
from dist_llm_train.training.schedule import lr_at
from dist_llm_train.training.trainer import Trainer, TrainResult

__all__ = ["EvalResult", "TrainResult", "Trainer", "evaluate", "load_checkpoint", "lr_at", "save_checkpoint"]
