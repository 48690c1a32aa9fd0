"""What a worker computes: an update from the current parameters and one task's data.

The same :class:`WorkerEngine` runs inside a real worker process and inside the simulator. Per update:

1. load the pulled parameters into the local model. With ``sync.lookahead`` λ > 0 it loads ``θ + λ·s·v``
   instead of the pulled ``θ``: ``v`` is the parameters' per-version change between this worker's last two
   pulls and ``s`` its recent staleness (:meth:`WorkerEngine.observe_staleness`), so the gradient is
   computed near the parameters the update will be applied to (DANA, Hakimi et al. 2019);
2. ``gradient`` modes (sync/async/adaptive): average the gradients of the task's micro-batches, clip them
   to ``training.grad_clip``; ``local-sgd`` (DiLoCo) and ``sync.worker_optimizer=adamw``: run
   ``sync.local_steps`` inner AdamW steps (the inner optimiser state persists across rounds) and send the
   pseudo-gradient ``θ_start − θ_end``. With ``worker_optimizer=adamw`` the inner learning rate follows
   the training schedule at the update's base version, as the server's AdamW would;
3. worker momentum (``sync.worker_momentum`` β): send ``m ← β·m + (1−β)·g`` — what makes CenteredClip and
   other robust rules hold under attack (Karimireddy et al. 2021);
4. worker-level DP: clip the update to ``privacy.clip_norm`` (the coordinator adds the noise);
5. compression with error feedback (a per-worker residual), done by :meth:`encode`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from dist_llm_train.compression import Codec, Encoded, ErrorFeedback, build_codec
from dist_llm_train.config import RunConfig
from dist_llm_train.coordination.flat import flat_grad, flatten_params, load_flat_params
from dist_llm_train.data import get_batch
from dist_llm_train.models import Batch, LanguageModel
from dist_llm_train.privacy import clip_update
from dist_llm_train.training.schedule import training_lr

TargetTransform = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class WorkItem:
    """The data an update is computed on: a token range (a shard) and how many micro-batches to draw."""

    start: int
    end: int
    micro_batches: int
    batch_seed: int


@dataclass
class ComputedUpdate:
    vector: torch.Tensor
    base_version: int
    tokens: int
    loss: float


class WorkerEngine:
    """Worker-side computation for one worker (one instance per worker: it holds per-worker state).

    Args:
        model: this worker's copy of the model (its weights are overwritten by each pull).
        train_tokens: the training token array (the shards index into it).
        cfg: the run config (modes, batch size, clipping, momentum, privacy, compression).
        target_transform: a data attack (label flip) applied to targets before the loss; ``None``: honest.
    """

    def __init__(
        self,
        model: LanguageModel,
        train_tokens: np.ndarray,
        cfg: RunConfig,
        *,
        device: torch.device | str = "cpu",
        target_transform: TargetTransform | None = None,
    ) -> None:
        self.model = model.to(device)
        self.device = torch.device(device)
        self.train_tokens = train_tokens
        self.cfg = cfg
        self.target_transform = target_transform
        self.local_updates = cfg.sync.local_updates
        self._momentum: torch.Tensor | None = None
        self._inner: torch.optim.Optimizer | None = None
        self._base_version = 0
        self._previous_params: torch.Tensor | None = None
        self._previous_version = 0
        self._velocity: torch.Tensor | None = None
        self._staleness: float | None = None
        self.codec: Codec | ErrorFeedback = self._build_codec(model)

    def _build_codec(self, model: LanguageModel) -> Codec | ErrorFeedback:
        comp = self.cfg.compression
        params = dict(comp.params)
        if comp.codec == "powersgd" and "shapes" not in params:
            params["shapes"] = [list(p.shape) for p in model.parameters()]
        if comp.codec == "topk" and params.get("layerwise") and "segments" not in params:
            params["segments"] = [p.numel() for p in model.parameters()]
        codec = build_codec(comp.codec, **params)
        return ErrorFeedback(codec) if comp.error_feedback and comp.codec != "none" else codec

    # ------------------------------------------------------------------ compute
    def _batch(self, item: WorkItem, index: int) -> Batch:
        tc = self.cfg.training
        window = get_batch(
            self.train_tokens,
            tc.batch_size,
            self.model.block_size,
            item.batch_seed,
            index,
            item.start,
            item.end,
        )
        generator = torch.Generator().manual_seed(item.batch_seed * 1_000_003 + index)
        batch = self.model.make_batch(window, generator)
        if self.target_transform is not None:
            batch = Batch(batch.inputs, self.target_transform(batch.targets))
        return batch.to(self.device)

    def _gradient(self, item: WorkItem) -> tuple[torch.Tensor, float]:
        self.model.zero_grad(set_to_none=True)
        total = 0.0
        for index in range(item.micro_batches):
            loss, _ = self.model.loss_and_metrics(self._batch(item, index))
            (loss / item.micro_batches).backward()
            total += float(loss.detach()) / item.micro_batches
        grad = flat_grad(self.model)
        clip = self.cfg.training.grad_clip
        if clip is not None:
            norm = float(grad.norm())
            if norm > clip:
                grad.mul_(clip / (norm + 1e-6))
        self.model.zero_grad(set_to_none=True)
        return grad, total

    def _local_steps(self, item: WorkItem) -> tuple[torch.Tensor, float]:
        tc = self.cfg.training
        if self._inner is None:
            self._inner = self.model.configure_optimizer(
                tc.weight_decay, tc.lr, (tc.beta1, tc.beta2), self.device.type
            )
        if self.cfg.sync.worker_optimizer == "adamw":
            lr = training_lr(tc, self._base_version)
            for group in self._inner.param_groups:
                group["lr"] = lr
        start = flatten_params(self.model)
        total = 0.0
        steps = self.cfg.sync.local_steps
        for index in range(steps):
            loss, _ = self.model.loss_and_metrics(self._batch(item, index))
            self._inner.zero_grad(set_to_none=True)
            loss.backward()
            if tc.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
            self._inner.step()
            total += float(loss.detach()) / steps
        self._inner.zero_grad(set_to_none=True)
        return start - flatten_params(self.model), total

    def observe_staleness(self, staleness: int) -> None:
        """Feed back how many versions the server had moved on when this worker's last update arrived (what
        ``sync.lookahead`` extrapolates by); an exponential average of the last few."""
        value = float(max(0, staleness))
        self._staleness = value if self._staleness is None else 0.5 * self._staleness + 0.5 * value

    def _lookahead_params(self, params: torch.Tensor, base_version: int) -> torch.Tensor:
        """``params`` moved ``lookahead · staleness`` versions further along their last per-version change."""
        factor = self.cfg.sync.lookahead
        if factor <= 0.0:
            return params
        previous = self._previous_params
        if previous is not None and base_version < self._previous_version:
            previous = self._velocity = None  # the server went back (a resumed checkpoint): start afresh
        if previous is not None and base_version > self._previous_version:
            # Averaged over the versions between two pulls: a worker that missed several steps still gets
            # the mean change per version, which is what one more version is expected to add.
            self._velocity = (params - previous) / float(base_version - self._previous_version)
        if previous is None or base_version != self._previous_version:
            self._previous_params = params.detach().clone()
            self._previous_version = base_version
        if self._velocity is None or not self._staleness:
            return params
        return params + (factor * self._staleness) * self._velocity

    def compute(self, params: torch.Tensor, base_version: int, item: WorkItem) -> ComputedUpdate:
        """The honest update for ``item`` starting from ``params`` (before compression)."""
        load_flat_params(self.model, self._lookahead_params(params, base_version))
        self._base_version = base_version
        self.model.train()
        vector, loss = self._local_steps(item) if self.local_updates else self._gradient(item)
        beta = self.cfg.sync.worker_momentum
        if beta > 0:
            # m starts at zero (Karimireddy et al. 2021): starting at the first gradient would give that
            # gradient a total weight of 1/(1-beta) over the following rounds instead of 1.
            previous = self._momentum if self._momentum is not None else torch.zeros_like(vector)
            self._momentum = beta * previous + (1 - beta) * vector
            vector = self._momentum.clone()
        if self.cfg.privacy.mode == "worker":
            vector, _ = clip_update(vector, self.cfg.privacy.clip_norm)
        steps = self.cfg.sync.local_steps if self.local_updates else item.micro_batches
        tokens = steps * self.cfg.training.batch_size * self.model.block_size
        return ComputedUpdate(
            vector=vector.detach().cpu(), base_version=base_version, tokens=tokens, loss=loss
        )

    def encode(self, vector: torch.Tensor, *, defer_residual: bool = False) -> Encoded:
        """Compress for the wire (with this worker's error-feedback residual). Codec schedules (top-k
        warm-up) follow the server version of the last :meth:`compute`.

        ``defer_residual``: leave forming the new error-feedback residual to :meth:`settle`, for a caller
        that has the payload to send first (see :meth:`ErrorFeedback.encode`)."""
        self.codec.set_step(self._base_version)
        if isinstance(self.codec, ErrorFeedback):
            return self.codec.encode(vector, defer_residual=defer_residual)
        return self.codec.encode(vector)

    def settle(self) -> None:
        """Finish the work an ``encode(..., defer_residual=True)`` left (nothing otherwise)."""
        if isinstance(self.codec, ErrorFeedback):
            self.codec.settle()
