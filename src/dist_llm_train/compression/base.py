"""The codec interface and the checks every codec shares (parameters, input tensors, payload params)."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from dist_llm_train.compression.payload import MAX_NUMEL, Encoded, MalformedPayloadError
from dist_llm_train.errors import ConfigError, NonFiniteError, PreconditionError

__all__ = ["Codec", "check_finite", "flatten_update"]


class Codec(ABC):
    """Turns a float32 update into an :class:`Encoded` payload and back.

    Any input shape is flattened (the shape travels in the header and is restored by :meth:`decode`);
    other floating dtypes are converted to float32 first. NaN or Inf in the input raises
    :class:`~dist_llm_train.errors.NonFiniteError` instead of being encoded. ``decode`` reads everything it
    needs from the payload header, so any instance of the right codec class decodes any payload of that
    codec, whatever parameters the sender used (see also :func:`dist_llm_train.compression.decode`).
    Codecs with state (PowerSGD's warm start, stochastic rounding's generator) keep it per instance: use one
    instance per worker.
    """

    name: ClassVar[str]
    version: ClassVar[int] = 1

    @abstractmethod
    def encode(self, tensor: Tensor) -> Encoded:
        """Compress ``tensor`` (any shape, floating dtype, finite)."""

    def decode(self, encoded: Encoded, *, device: torch.device | str | None = None) -> Tensor:
        """Reconstruct the float32 tensor (original shape) from a payload of this codec.

        ``device``: where the result should live; default: where the payload's buffers are (CPU for a payload
        from :meth:`Encoded.from_frames`). The result never aliases the payload.
        """
        if encoded.codec != self.name:
            raise MalformedPayloadError(
                f"payload was encoded with codec {encoded.codec!r} but is being decoded by {self.name!r}; "
                "decode it with dist_llm_train.compression.decode(), which dispatches on the header"
            )
        out = self._decode(encoded)
        if device is not None:
            out = out.to(device)
        return out.view(encoded.shape)

    @classmethod
    @abstractmethod
    def _decode(cls, encoded: Encoded) -> Tensor:
        """Flat float32 reconstruction of a payload that passed :meth:`validate_payload` (or came from encode)."""

    @classmethod
    @abstractmethod
    def validate_payload(cls, encoded: Encoded) -> None:
        """Check codec params and buffer layout of a received payload; raise MalformedPayloadError if wrong."""

    def set_step(self, step: int) -> None:  # noqa: B027 - a deliberate no-op for codecs without schedules
        """The server version the next update was computed at; codecs with a schedule (top-k's sparsity
        warm-up) follow it, the others ignore it."""

    @property
    @abstractmethod
    def params(self) -> dict[str, Any]:
        """The parameters this instance was built with (what ``build_codec`` would need to rebuild it)."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"


# ---------------------------------------------------------------------- input checks
def flatten_update(tensor: Tensor, codec: str) -> Tensor:
    """Validate an update and return it as a flat, contiguous float32 tensor (a view when already so)."""
    if not isinstance(tensor, Tensor):
        raise PreconditionError(f"codec {codec!r} encodes a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise PreconditionError(
            f"codec {codec!r} encodes floating-point updates, got dtype {tensor.dtype}; cast with .float()"
        )
    if tensor.numel() > MAX_NUMEL:
        raise PreconditionError(
            f"codec {codec!r}: update has {tensor.numel()} elements, above the wire limit {MAX_NUMEL}; split it"
        )
    flat = tensor.detach().reshape(-1)
    if flat.dtype != torch.float32:
        flat = flat.float()
    flat = flat.contiguous()
    check_finite(flat, f"codec {codec!r}")
    return flat


def check_finite(flat: Tensor, what: str) -> None:
    """Raise NonFiniteError if ``flat`` holds NaN or Inf."""
    # One reduction instead of a full-size boolean temporary: a finite sum proves every element is finite
    # (NaN and Inf propagate); only an infinite sum (overflow, or a real Inf/NaN) needs the exact check.
    if flat.numel() == 0 or bool(torch.isfinite(flat.sum())):
        return
    bad = ~torch.isfinite(flat)
    n_bad = int(bad.sum())
    if n_bad:
        first = int(bad.nonzero()[0, 0])
        raise NonFiniteError(
            f"{what}: the update holds {n_bad} non-finite values (first at flat index {first}: "
            f"{float(flat[first])}); fix the source (lower the learning rate, enable grad_clip) rather than "
            "sending it"
        )


# ---------------------------------------------------------------------- parameter checks
def param_int(codec: str, name: str, value: object, lo: int, hi: int | None = None) -> int:
    """An integer parameter in [lo, hi]; ConfigError naming codec, parameter, value and range otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        allowed = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
        raise ConfigError(f"codec {codec!r}: parameter {name!r} is {value!r}; it must be {allowed}")
    return int(value)


def param_float(
    codec: str, name: str, value: object, lo: float, hi: float, *, lo_open: bool = False
) -> float:
    """A real parameter in [lo, hi] (or (lo, hi] with ``lo_open``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        bracket = "(" if lo_open else "["
        raise ConfigError(
            f"codec {codec!r}: parameter {name!r} is {value!r}; it must be a number in {bracket}{lo}, {hi}]"
        )
    return float(value)  # type: ignore[arg-type]


def param_choice(codec: str, name: str, value: object, choices: Sequence[str]) -> str:
    """A string parameter from a fixed set."""
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"codec {codec!r}: parameter {name!r} is {value!r}; allowed: {', '.join(choices)}")
    return value


def param_seed(codec: str, value: object) -> int:
    return param_int(codec, "seed", value, 0, 2**63 - 1)


# ---------------------------------------------------------------------- payload param checks
def payload_int(encoded: Encoded, name: str, lo: int, hi: int) -> int:
    """An integer field of a received payload's params, in [lo, hi]."""
    value = encoded.params.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise MalformedPayloadError(
            f"payload of codec {encoded.codec!r}: param {name!r} is {value!r:.40}; expected an integer in [{lo}, {hi}]"
        )
    return value


def payload_choice(encoded: Encoded, name: str, choices: Sequence[str]) -> str:
    value = encoded.params.get(name)
    if not isinstance(value, str) or value not in choices:
        raise MalformedPayloadError(
            f"payload of codec {encoded.codec!r}: param {name!r} is {value!r:.40}; expected one of {list(choices)}"
        )
    return value


def payload_keys(encoded: Encoded, keys: set[str]) -> None:
    got = set(encoded.params)
    if got != keys:
        raise MalformedPayloadError(
            f"payload of codec {encoded.codec!r} must carry params {sorted(keys)}, got {sorted(map(str, got))}"
        )


class GeneratorPool:
    """One seeded ``torch.Generator`` per device, created on first use (random draws must happen on the
    tensor's device, and a CUDA generator cannot drive CPU sampling or vice versa)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._gens: dict[str, torch.Generator] = {}
        self._numpy: np.random.Generator | None = None

    def numpy(self) -> np.random.Generator:
        """A seeded numpy PCG64 generator for CPU draws (several times faster than torch's CPU generator)."""
        if self._numpy is None:
            self._numpy = np.random.default_rng(self.seed)
        return self._numpy

    def get(self, device: torch.device) -> torch.Generator:
        key = str(device)
        gen = self._gens.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self._gens[key] = gen
        return gen

    def reset(self) -> None:
        self._gens.clear()
        self._numpy = None
