"""Error feedback (EF-SGD): what compression drops this step is added back into the next step's update."""

from __future__ import annotations

import torch
from torch import Tensor

from dist_llm_train.compression.base import Codec, flatten_update
from dist_llm_train.compression.payload import Encoded
from dist_llm_train.errors import PreconditionError

__all__ = ["ErrorFeedback"]


class ErrorFeedback:
    """Wrap a codec with a per-worker residual ``e``: send C(g + e), then e ← g + e − decode(C(g + e)).

    With error feedback nothing is lost, only delayed: after T steps the decoded updates sum to
    Σg − e_T, so biased codecs (top-k, rank-r PowerSGD, round-to-nearest int8) converge like the
    uncompressed run. Keep exactly one instance per worker and never share it. If ``residual_norm`` keeps
    growing step after step, the codec keeps too little (raise top-k's ratio or PowerSGD's rank); call
    :meth:`reset` when the worker's model is replaced (rejoin, checkpoint reload), because the residual
    belongs to the old trajectory.

    The residual costs one float32 copy of the update per worker.
    """

    def __init__(self, codec: Codec) -> None:
        if not isinstance(codec, Codec):
            raise PreconditionError(f"ErrorFeedback wraps a Codec, got {type(codec).__name__}")
        self.codec = codec
        self._residual: Tensor | None = None
        # An encode whose residual is still to be formed: (g + e, its payload). See ``defer_residual``.
        self._pending: tuple[Tensor, Encoded] | None = None

    @property
    def name(self) -> str:
        return self.codec.name

    def encode(self, tensor: Tensor, *, defer_residual: bool = False) -> Encoded:
        """Encode ``tensor + residual`` and keep what the payload does not carry as the new residual.

        ``defer_residual``: return as soon as the payload exists and form the new residual (a decode of the
        payload and a subtraction, 1.7 ms of a 14 ms top-k encode at 0.84M values; a matrix product for
        PowerSGD) in :meth:`settle`. A worker calls it after sending the payload, while it waits for the
        controller's reply anyway, so the work leaves the task's critical path. Every other use of the
        residual (the next encode, :attr:`residual`, :attr:`residual_norm`) settles first, so the result
        is the same as without deferring. The payload's buffers must stay unmodified until then.
        """
        self.settle()
        g = flatten_update(tensor, self.codec.name)
        e = self._residual
        if e is not None and (e.numel() != g.numel() or e.device != g.device):
            raise PreconditionError(
                f"ErrorFeedback: the update has {g.numel()} values on {g.device} but the residual has "
                f"{e.numel()} on {e.device}; call reset() when the model (or its device) changes"
            )
        corrected = g.clone() if e is None else g + e
        encoded = self.codec.encode(corrected.view(tensor.shape))
        self._residual = None
        self._pending = (corrected, encoded)
        if not defer_residual:
            self.settle()
        return encoded

    def settle(self) -> None:
        """Form the residual of an encode made with ``defer_residual`` (nothing to do otherwise)."""
        if self._pending is None:
            return
        corrected, encoded = self._pending
        self._pending = None
        # Reuse the corrected buffer for the new residual (no second full-size allocation per step), unless
        # the payload aliases it (the none codec sends its input zero-copy).
        decoded = self.codec.decode(encoded).reshape(-1)
        base = corrected.untyped_storage().data_ptr()
        aliased = any(b.untyped_storage().data_ptr() == base for b in encoded.buffers)
        self._residual = corrected - decoded if aliased else corrected.sub_(decoded)

    def decode(self, encoded: Encoded, *, device: torch.device | str | None = None) -> Tensor:
        return self.codec.decode(encoded, device=device)

    def set_step(self, step: int) -> None:
        self.codec.set_step(step)

    def reset(self) -> None:
        """Drop the residual (next step starts from e = 0)."""
        self._residual = None
        self._pending = None

    @property
    def residual(self) -> Tensor | None:
        """The current residual (flat float32; None before the first step or after reset). Do not modify."""
        self.settle()
        return self._residual

    @property
    def residual_norm(self) -> float:
        """‖e‖₂, 0.0 before the first step."""
        residual = self.residual
        return 0.0 if residual is None else float(torch.linalg.vector_norm(residual))
