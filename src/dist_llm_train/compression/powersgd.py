"""PowerSGD (Vogels et al. 2019): rank-r approximation of every matrix-shaped parameter by one power step.

Follows PyTorch's DDP communication hook (``torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook``):

* the flat update is split into parameters by ``shapes``; a parameter with ≥ 2 dims is viewed as a
  matrix M (rows = first dim, columns = the rest); 1-D parameters (biases, norms) go uncompressed;
* a matrix is compressed only when (rows + cols)·r·``min_compression_rate`` < rows·cols, otherwise it goes
  uncompressed too (the hook's ``_should_compress``); r is capped at min(rows, cols);
* P = M·Q, P ← orthonormalise(P), Q = Mᵀ·P; the receiver rebuilds M ≈ P·Qᵀ;
* Q starts as an orthonormalised Gaussian matrix and, with ``warm_start``, the Q of this step seeds the
  next (one subspace iteration per step, so the approximation of a slowly changing update improves);
* error feedback: the hook keeps ``input + error - decompressed``; here that is exactly what
  :class:`~dist_llm_train.compression.ErrorFeedback` does, so PowerSGD uses the wrapper (the config's
  ``compression.error_feedback``) instead of a private copy of the same state.

Differences from the hook, both forced by the parameter-server setting: each worker's P and Q travel
to the server and are decoded separately (the hook all-reduces P and Q, which needs all workers to share
one Q; a Byzantine-robust aggregator must see every worker's update on its own anyway), and the warm-start
Q is this worker's own. Before reuse, Q's columns are rescaled to unit norm: that leaves span(M·Q), hence
the result, unchanged, but stops Q = Mᵀ·P from growing or shrinking geometrically across steps; a column
that has become zero is redrawn at random so that the approximation cannot get stuck at rank < r.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from dist_llm_train.compression.base import (
    Codec,
    flatten_update,
    param_float,
    param_int,
    param_seed,
    payload_keys,
)
from dist_llm_train.compression.payload import (
    MAX_NDIM,
    MAX_NUMEL,
    Encoded,
    MalformedPayloadError,
    expect_buffers,
)
from dist_llm_train.errors import ConfigError, PreconditionError

__all__ = ["PowerSGDCodec"]


def _orthonormalize(m: Tensor) -> Tensor:
    # Householder QR: orthonormal columns even when m is rank-deficient (Gram-Schmidt would divide by 0).
    return torch.linalg.qr(m, mode="reduced").Q


def _cat(parts: list[Tensor], like: Tensor) -> Tensor:
    return torch.cat(parts) if parts else like.new_empty(0)


def _matrix_dims(shape: Sequence[int]) -> tuple[int, int]:
    rows = int(shape[0])
    return rows, math.prod(shape) // rows if rows else 0


class PowerSGDCodec(Codec):
    """Low-rank compression of matrix-shaped parameters (PyTorch DDP PowerSGD hook semantics).

    Parameters
    ----------
    rank:
        r, the rank of each approximation. Wire size per (n×m) matrix is (n + m)·r float32. Rank 1-4 is
        typical; if loss lags the uncompressed run even with error feedback, raise it; the hook's
        authors found rank 2-4 enough for ResNets and transformers on most tasks.
    shapes:
        Parameter shapes, in the order their values appear in the flat update; their sizes must add up to
        the update's length. Unset: the encoded tensor's own shape is the one parameter (so a 2-D tensor
        is compressed as one matrix, a 1-D one is sent as is).
    min_compression_rate:
        A matrix is compressed only when that shrinks it at least this many times (the hook's default 2);
        others go uncompressed, which avoids compressing tiny matrices for no gain.
    warm_start:
        Reuse the previous step's Q (per parameter, per codec instance, so one codec per worker). Turning
        it off redraws Q each step: the approximation then never improves beyond one power step from noise.
    seed:
        Seeds the initial Q draws.
    """

    name = "powersgd"

    def __init__(
        self,
        *,
        rank: int = 1,
        shapes: Sequence[Sequence[int]] | None = None,
        min_compression_rate: float = 2.0,
        warm_start: bool = True,
        seed: int = 0,
    ) -> None:
        self.rank = param_int(self.name, "rank", rank, 1, 1 << 20)
        self.shapes = None if shapes is None else self._check_shapes(shapes)
        self.min_compression_rate = param_float(
            self.name, "min_compression_rate", min_compression_rate, 0.0, 1e6
        )
        if not isinstance(warm_start, bool):
            raise ConfigError(
                f"codec 'powersgd': parameter 'warm_start' is {warm_start!r}; it must be true or false"
            )
        self.warm_start = warm_start
        self.seed = param_seed(self.name, seed)
        self._gen = torch.Generator().manual_seed(self.seed)
        self._qs: dict[int, Tensor] = {}

    @staticmethod
    def _check_shapes(shapes: object) -> list[tuple[int, ...]]:
        if not isinstance(shapes, (list, tuple)) or not shapes:
            raise ConfigError(
                f"codec 'powersgd': parameter 'shapes' is {shapes!r:.100}; it must be a non-empty list of shapes"
            )
        out = []
        for shape in shapes:
            if isinstance(shape, torch.Size):
                shape = tuple(shape)
            if (
                not isinstance(shape, (list, tuple))
                or len(shape) > MAX_NDIM
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
            ):
                raise ConfigError(
                    f"codec 'powersgd': parameter 'shapes' holds {shape!r:.100}; each shape must be a list of "
                    "non-negative integers (e.g. [768, 3072])"
                )
            out.append(tuple(int(d) for d in shape))
        return out

    @property
    def params(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "shapes": None if self.shapes is None else [list(s) for s in self.shapes],
            "min_compression_rate": self.min_compression_rate,
            "warm_start": self.warm_start,
            "seed": self.seed,
        }

    def reset(self) -> None:
        """Forget the warm-start Q matrices (e.g. after the model was reloaded)."""
        self._qs.clear()

    def ranks_for(self, shapes: Sequence[Sequence[int]]) -> list[int]:
        """Rank used for each parameter (0 = sent uncompressed), as in the hook's ``_should_compress``."""
        ranks = []
        for shape in shapes:
            if len(shape) < 2 or math.prod(shape) == 0:
                ranks.append(0)
                continue
            n, m = _matrix_dims(shape)
            r = min(n, m, self.rank)
            ranks.append(r if (n + m) * r * self.min_compression_rate < n * m else 0)
        return ranks

    def _initial_q(self, m: int, r: int, device: torch.device) -> Tensor:
        q = torch.randn(m, r, generator=self._gen, dtype=torch.float32)
        return _orthonormalize(q).to(device)

    def _warm_q(self, i: int, m: int, r: int, device: torch.device) -> Tensor:
        q = self._qs.get(i) if self.warm_start else None
        if q is None or q.shape != (m, r) or q.device != device:
            return self._initial_q(m, r, device)
        norms = torch.linalg.vector_norm(q, dim=0)
        dead = norms <= torch.finfo(torch.float32).tiny
        q = q / torch.where(dead, torch.ones_like(norms), norms)
        if bool(dead.any()):
            fresh = self._initial_q(m, r, device)
            q = torch.where(dead[None, :], fresh, q)
        return q

    def encode(self, tensor: Tensor) -> Encoded:
        flat = flatten_update(tensor, self.name)
        shapes = self.shapes if self.shapes is not None else [tuple(tensor.shape)]
        total = sum(math.prod(s) for s in shapes)
        if total != flat.numel():
            raise PreconditionError(
                f"codec 'powersgd': the parameter shapes add up to {total} values but the update has "
                f"{flat.numel()}; pass the model's parameter shapes in the order of the flat update"
            )
        ranks = self.ranks_for(shapes)
        ps: list[Tensor] = []
        qs: list[Tensor] = []
        dense: list[Tensor] = []
        offset = 0
        for i, (shape, r) in enumerate(zip(shapes, ranks, strict=True)):
            size = math.prod(shape)
            segment = flat[offset : offset + size]
            offset += size
            if r == 0:
                dense.append(segment)
                continue
            n, m = _matrix_dims(shape)
            mat = segment.view(n, m)
            p = _orthonormalize(mat @ self._warm_q(i, m, r, flat.device))
            q = mat.T @ p
            if self.warm_start:
                self._qs[i] = q
            ps.append(p.reshape(-1))
            qs.append(q.reshape(-1))
        return Encoded.build(
            self.name,
            self.version,
            tensor.shape,
            {"shapes": [list(s) for s in shapes], "ranks": ranks},
            [("p", _cat(ps, flat)), ("q", _cat(qs, flat)), ("dense", _cat(dense, flat))],
        )

    @classmethod
    def _decode(cls, encoded: Encoded) -> Tensor:
        p_all, q_all, dense_all = encoded.buffers
        out = torch.empty(encoded.numel, dtype=torch.float32, device=p_all.device)
        offset = p_off = q_off = d_off = 0
        for shape, r in zip(encoded.params["shapes"], encoded.params["ranks"], strict=True):
            size = math.prod(shape)
            target = out[offset : offset + size]
            offset += size
            if r == 0:
                target.copy_(dense_all[d_off : d_off + size])
                d_off += size
                continue
            n, m = _matrix_dims(shape)
            p = p_all[p_off : p_off + n * r].view(n, r)
            q = q_all[q_off : q_off + m * r].view(m, r)
            p_off += n * r
            q_off += m * r
            torch.matmul(p, q.T, out=target.view(n, m))
        return out

    @classmethod
    def validate_payload(cls, encoded: Encoded) -> None:
        payload_keys(encoded, {"shapes", "ranks"})
        shapes, ranks = encoded.params["shapes"], encoded.params["ranks"]
        if not isinstance(shapes, list) or not isinstance(ranks, list) or len(shapes) != len(ranks):
            raise MalformedPayloadError(
                "payload of codec 'powersgd' needs equally long 'shapes' and 'ranks' lists"
            )
        total = p_size = q_size = dense_size = 0
        for shape, r in zip(shapes, ranks, strict=True):
            if (
                not isinstance(shape, list)
                or len(shape) > MAX_NDIM
                or not all(
                    isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_NUMEL for d in shape
                )
            ):
                raise MalformedPayloadError(
                    f"payload of codec 'powersgd' holds an invalid shape {shape!r:.80}"
                )
            size = math.prod(shape)
            total += size
            if total > MAX_NUMEL:
                break
            if isinstance(r, bool) or not isinstance(r, int) or r < 0:
                raise MalformedPayloadError(f"payload of codec 'powersgd' holds an invalid rank {r!r:.40}")
            if r == 0:
                dense_size += size
                continue
            if len(shape) < 2 or size == 0:
                raise MalformedPayloadError(
                    f"payload of codec 'powersgd' compresses shape {shape} at rank {r}; only non-empty "
                    "parameters with >= 2 dims are compressed"
                )
            n, m = _matrix_dims(shape)
            if r > min(n, m):
                raise MalformedPayloadError(
                    f"payload of codec 'powersgd' uses rank {r} for a {n}x{m} matrix (at most {min(n, m)})"
                )
            p_size += n * r
            q_size += m * r
        if total != encoded.numel:
            raise MalformedPayloadError(
                f"payload of codec 'powersgd': parameter shapes cover {total} values, the update has {encoded.numel}"
            )
        expect_buffers(
            encoded, [("p", "float32", p_size), ("q", "float32", q_size), ("dense", "float32", dense_size)]
        )
