"""Codec registry: build codecs by name (the config's ``compression.codec``), decode any payload."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor

from dist_llm_train.compression.base import Codec
from dist_llm_train.compression.dense import BF16Codec, FP16Codec, Int8Codec, NoneCodec
from dist_llm_train.compression.payload import Encoded, MalformedPayloadError
from dist_llm_train.compression.powersgd import PowerSGDCodec
from dist_llm_train.compression.topk import TopKCodec
from dist_llm_train.errors import ConfigError

__all__ = ["available_codecs", "build_codec", "codec_class", "compression_ratio", "decode", "decode_view"]

_CODECS: dict[str, type[Codec]] = {
    cls.name: cls for cls in (NoneCodec, FP16Codec, BF16Codec, Int8Codec, TopKCodec, PowerSGDCodec)
}


def available_codecs() -> list[str]:
    """Names accepted by :func:`build_codec`, sorted."""
    return sorted(_CODECS)


def codec_class(name: str) -> type[Codec]:
    """The class registered under ``name`` (ConfigError if there is none)."""
    try:
        return _CODECS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown codec {name!r}; available: {', '.join(available_codecs())}") from None


def _parameter_names(cls: type[Codec]) -> list[str]:
    sig = inspect.signature(cls.__init__)
    return [p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]


def build_codec(name: str, **params: Any) -> Codec:
    """Build the codec ``name`` with ``params`` (e.g. ``build_codec("topk", ratio=0.01, values="int8")``).

    Codecs: ``none`` (float32), ``fp16``, ``bf16``, ``int8`` (chunk_size, rounding, seed), ``topk`` (ratio or
    k, selection, sample_ratio, values, chunk_size, seed) and ``powersgd`` (rank, shapes,
    min_compression_rate, warm_start, seed); see each class for what the parameters trade off. An unknown
    name, an unknown parameter or a value out of range raises ConfigError naming the codec, the parameter,
    the value and what is allowed. Wrap the result in :class:`ErrorFeedback` for biased codecs.
    """
    cls = codec_class(name)
    allowed = _parameter_names(cls)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        shown = ", ".join(f"{k}={params[k]!r}" for k in unknown)
        raise ConfigError(
            f"codec {name!r} has no parameter {shown}; allowed: {', '.join(allowed) if allowed else 'none'}"
        )
    return cls(**params)


def decode(encoded: Encoded, *, device: torch.device | str | None = None) -> Tensor:
    """Decode any payload by the codec named in its header (what a server receiving mixed codecs needs)."""
    try:
        cls = codec_class(encoded.codec)
    except ConfigError as exc:
        raise MalformedPayloadError(str(exc)) from None
    out = cls._decode(encoded)
    if device is not None:
        out = out.to(device)
    return out.view(encoded.shape)


def decode_view(encoded: Encoded) -> Tensor:
    """:func:`decode` without the copy where there is nothing to decode.

    An uncompressed (``none``) payload comes back as a view of its float32 buffer, which for a received
    payload is the network frame itself: read-only, and alive as long as the view. It saves a full-size copy
    per message for a receiver that only reads its input and lets go of it soon (the controller's
    aggregators). Every other codec is decoded into a fresh tensor.
    """
    if encoded.codec == NoneCodec.name:
        values = encoded.buffers[0]
        # Flat payloads (every update and pull) skip the (~5 us) view.
        return values if values.shape == encoded.shape else values.view(encoded.shape)
    return decode(encoded)


def compression_ratio(original_numel: int, encoded: Encoded) -> float:
    """float32 bytes of the original update divided by the bytes this payload puts on the wire."""
    return 4.0 * original_numel / encoded.nbytes
