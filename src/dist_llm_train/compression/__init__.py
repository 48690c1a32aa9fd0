"""Compression of model updates for slow links.

Build codecs by name with :func:`build_codec` (the config's ``compression.codec`` and ``compression.params``);
every codec turns a float32 update into an :class:`Encoded` payload (a msgpack header plus raw buffers, sent
as ZeroMQ frames with :meth:`Encoded.to_frames`, received with :meth:`Encoded.from_frames`) and back.

=========  =====================================================  ====================  ==============
codec      what goes on the wire                                  ratio vs. float32     error
=========  =====================================================  ====================  ==============
none       float32                                                1x                    none
fp16       float16, clamped to ±65504                             2x                    ~2^-11 relative
bf16       bfloat16                                               2x                    ~2^-9 relative
int8       uint8 codes + (min, step) per chunk                    ~4x                   Δ²/12 MSE
topk       k values (fp32/fp16/int8) + delta-packed indices       ~75-185x at 1 %       biased: use EF
powersgd   P (n×r) and Q (m×r) per matrix, 1-D params dense       ~nm/((n+m)r)          biased: use EF
=========  =====================================================  ====================  ==============

Compositions: top-k with int8 values is ``build_codec("topk", ratio=0.01, values="int8")``. Biased codecs
(top-k, PowerSGD, nearest-rounding int8) belong inside :class:`ErrorFeedback`, one per worker; PowerSGD
relies on this wrapper for its error feedback rather than keeping its own.
"""

from __future__ import annotations

from dist_llm_train.compression.base import Codec
from dist_llm_train.compression.dense import BF16Codec, FP16Codec, Int8Codec, NoneCodec
from dist_llm_train.compression.error_feedback import ErrorFeedback
from dist_llm_train.compression.indices import pack_indices, unpack_indices
from dist_llm_train.compression.payload import Encoded, MalformedPayloadError
from dist_llm_train.compression.powersgd import PowerSGDCodec
from dist_llm_train.compression.registry import (
    available_codecs,
    build_codec,
    codec_class,
    compression_ratio,
    decode,
    decode_view,
)
from dist_llm_train.compression.topk import TopKCodec, exact_topk_indices, sampled_topk_indices

__all__ = [
    "BF16Codec",
    "Codec",
    "Encoded",
    "ErrorFeedback",
    "FP16Codec",
    "Int8Codec",
    "MalformedPayloadError",
    "NoneCodec",
    "PowerSGDCodec",
    "TopKCodec",
    "available_codecs",
    "build_codec",
    "codec_class",
    "compression_ratio",
    "decode",
    "decode_view",
    "exact_topk_indices",
    "pack_indices",
    "sampled_topk_indices",
    "unpack_indices",
]
