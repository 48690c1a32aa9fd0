"""The parameter server: the master copy of the model and how aggregated updates move it.

It holds a flat fp32 vector of parameters, a server optimiser that turns an aggregated update into a step,
a version counter (one per applied step), and a ring buffer of recent versions so that a worker holding
version ``v`` can be sent the delta to the current one and staleness can be measured. It knows nothing
of sockets or clocks: the runtime and the simulator both call :meth:`apply`.

Update convention: workers send *descent directions* (a gradient, a momentum of gradients, or a DiLoCo
pseudo-gradient ``θ_start − θ_end``); the server optimiser treats the aggregate as the gradient of its
parameters. AdamW on the server (the default) makes asynchronous gradient pushes behave like data-parallel
AdamW; DiLoCo's outer optimiser is SGD with Nesterov momentum (lr 0.7, momentum 0.9).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Literal

import torch

from dist_llm_train.coordination.flat import all_finite
from dist_llm_train.errors import NonFiniteError, PreconditionError
from dist_llm_train.models.base import FUSED_OPTIMIZER_DEVICES

ServerOptimizer = Literal["sgd", "nesterov", "adamw"]


class ParameterServer:
    """Flat master parameters + server optimiser + version counter + history of recent versions.

    Args:
        params: initial flat parameter vector (copied, kept in fp32).
        optimizer: ``sgd`` (with ``momentum``), ``nesterov`` (SGD with Nesterov momentum) or ``adamw``.
        lr: base learning rate of the server optimiser.
        lr_schedule: optional ``version -> lr`` (e.g. warm-up + cosine over server steps); overrides ``lr``.
        history: how many recent versions to keep. A worker whose version fell out of the history gets the
            full parameters instead of a delta; raise it if logs show many full pulls.
    """

    def __init__(
        self,
        params: torch.Tensor,
        *,
        optimizer: ServerOptimizer = "adamw",
        lr: float = 1e-3,
        momentum: float = 0.9,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        lr_schedule: Callable[[int], float] | None = None,
        history: int = 64,
    ) -> None:
        if params.dim() != 1:
            raise PreconditionError(f"parameter server needs a flat vector, got shape {tuple(params.shape)}")
        self._param = torch.nn.Parameter(params.detach().float().clone(), requires_grad=False)
        # The aggregate is copied into one buffer that lives as long as the server (one full-size allocation
        # fewer per step), so the optimiser never holds the caller's tensor.
        self._grad = torch.zeros_like(self._param.data)
        # Fused kernels do a step in one pass without full-size temporaries. On top-k-like sparse updates
        # AdamW's is 13x faster than the per-tensor loop on a CPU (1.4 ms against 20.6 ms at 0.84M
        # parameters, benchmarks/server_step.py): the loop's sqrt of subnormal second moments is slow.
        fused = self._param.device.type in FUSED_OPTIMIZER_DEVICES
        self.optimizer_name = optimizer
        self.lr_schedule = lr_schedule
        self.base_lr = lr
        if optimizer == "adamw":
            self._optimizer: torch.optim.Optimizer = torch.optim.AdamW(
                [self._param], lr=lr, betas=betas, weight_decay=weight_decay, fused=fused
            )
        elif optimizer in ("sgd", "nesterov"):
            self._optimizer = torch.optim.SGD(
                [self._param],
                lr=lr,
                momentum=momentum,
                nesterov=optimizer == "nesterov" and momentum > 0,
                weight_decay=weight_decay,
                fused=fused,
            )
        else:
            raise PreconditionError(f"unknown server optimizer {optimizer!r}: use sgd, nesterov or adamw")
        self.version = 0
        self._history_size = history
        self._history: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._remember()

    @property
    def params(self) -> torch.Tensor:
        """The current parameters (a view: do not modify; :meth:`snapshot` for a copy)."""
        return self._param.data

    @property
    def numel(self) -> int:
        return self._param.numel()

    def current_lr(self) -> float:
        return self.lr_schedule(self.version) if self.lr_schedule is not None else self.base_lr

    def _remember(self) -> None:
        self._history[self.version] = self._param.data.clone()
        while len(self._history) > self._history_size:
            self._history.popitem(last=False)

    def apply(self, update: torch.Tensor) -> int:
        """Take one server-optimiser step along the aggregated ``update``; returns the new version."""
        if update.shape != self._param.shape:
            raise PreconditionError(
                f"update has shape {tuple(update.shape)} but the model has {self.numel} parameters"
            )
        if not all_finite(update):
            raise NonFiniteError("aggregated update holds NaN or Inf: refusing to apply it")
        lr = self.current_lr()
        for group in self._optimizer.param_groups:
            group["lr"] = lr
        self._grad.copy_(update.detach())
        self._param.grad = self._grad
        with torch.enable_grad():
            self._optimizer.step()
        self._param.grad = None
        self.version += 1
        self._remember()
        return self.version

    def snapshot(self, version: int | None = None) -> torch.Tensor | None:
        """A copy of the parameters at ``version`` (default: now), or ``None`` if it left the history."""
        if version is None or version == self.version:
            return self._param.data.clone()
        kept = self._history.get(version)
        return None if kept is None else kept.clone()

    def stored(self, version: int | None = None) -> torch.Tensor | None:
        """The server's own copy of the parameters at ``version`` (default: now), shared instead of copied, or
        ``None`` if it left the history.

        Each version's copy is written once and never again (the next version is a new tensor), so readers
        may hold it, and send it zero-copy, for as long as they like; they must not modify it. Use
        :meth:`snapshot` for a copy of one's own.
        """
        return self._history.get(self.version if version is None else version)

    def delta_since(self, version: int) -> torch.Tensor | None:
        """``params_now − params_at(version)``, or ``None`` when that version left the history."""
        kept = self._history.get(version)
        return None if kept is None else self._param.data - kept

    def oldest_version(self) -> int:
        return next(iter(self._history))

    def state_dict(self) -> dict[str, Any]:
        return {
            "params": self._param.data.clone(),
            "version": self.version,
            # optimizer.state_dict() holds references to live state tensors: copy, or the saved state
            # would keep changing with every later step
            "optimizer": copy.deepcopy(self._optimizer.state_dict()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        params = state["params"]
        if params.shape != self._param.shape:
            raise PreconditionError(
                f"server state holds {params.numel()} parameters but the model has {self.numel}"
            )
        self._param.data.copy_(params)
        self.version = int(state["version"])
        self._optimizer.load_state_dict(state["optimizer"])
        self._history.clear()
        self._remember()
