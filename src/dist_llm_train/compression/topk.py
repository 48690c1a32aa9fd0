"""Top-k sparsification: send the k largest-magnitude entries (values + packed indices).

Selection is either exact (``torch.topk`` on ``|x|``) or DGC's sampled threshold (Lin et al. 2018): take a
strided ~1 % sample, use the k·(sample/len)-th largest sampled magnitude as the threshold, keep every entry
at or above it in one masked pass. The count is then only approximately k; DGC re-picks when it leaves
``[0.8k, 1.3k]``: above, the kept candidates are cut to exactly k by a top-k over the candidates alone;
below, the threshold is lowered from the same sample and the pass repeated, and after a few misses the
exact selection is used. Either way the result has between ⌈0.8k⌉ and ⌊1.3k⌋ entries, and every kept
entry is at least as large as every dropped one (the kept set is a superset or a subset of the exact one).

Always pair top-k with error feedback (:class:`~dist_llm_train.compression.ErrorFeedback`): without it the
dropped 99 % never reaches the server and training stalls.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dist_llm_train.compression.base import (
    Codec,
    GeneratorPool,
    flatten_update,
    param_choice,
    param_float,
    param_int,
    param_seed,
    payload_choice,
    payload_int,
)
from dist_llm_train.compression.dense import FP16_MAX
from dist_llm_train.compression.indices import (
    FIXED_WIDTHS,
    INDEX_CODINGS,
    pack_indices,
    unpack_indices,
    varint_max_bytes,
)
from dist_llm_train.compression.payload import MAX_NUMEL, Encoded, MalformedPayloadError, expect_buffers
from dist_llm_train.compression.quant import dequantize_chunks, n_chunks, quantize_chunks
from dist_llm_train.errors import ConfigError

__all__ = ["TopKCodec", "count_bounds", "exact_topk_indices", "sampled_topk_indices"]

_LOW, _HIGH = 0.8, 1.3
_MAX_REPICKS = 3


def count_bounds(k: int) -> tuple[int, int]:
    """The inclusive range [⌈0.8k⌉, ⌊1.3k⌋] a sampled selection's count must fall in."""
    return math.ceil(_LOW * k), math.floor(_HIGH * k)


def exact_topk_indices(x: Tensor, k: int) -> Tensor:
    """Sorted int64 indices (into the flattened tensor) of the k largest |x| (ties broken arbitrarily)."""
    x = x.detach().reshape(-1)
    if k >= x.numel():
        return torch.arange(x.numel(), device=x.device)
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=x.device)
    idx = torch.topk(x.abs(), k, sorted=False).indices
    return torch.sort(idx).values


def _kth_largest(sample: Tensor, rank: int) -> Tensor:
    """The ``rank``-th largest value of a 1-D tensor (1 = maximum), as a 0-d tensor."""
    return torch.kthvalue(sample, sample.numel() - rank + 1).values


_CHUNK = 1 << 18  # 1 MiB of float32 scratch: stays in L2 while it is reused


def _at_or_above(x: Tensor, threshold: Tensor) -> Tensor:
    """Sorted indices of the entries with |x| >= threshold: the one full pass of the sampled selection."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        # Accelerators stream the full-size |x| and mask at memory speed; nonzero returns sorted indices.
        return torch.nonzero(x.abs() >= threshold).view(-1)
    # On CPU, a fresh full-size |x| costs more in page faults than in arithmetic, and torch.nonzero is ~3x
    # slower than numpy's flatnonzero. Chunks through two small reused buffers keep the pass near
    # memory-read speed (about 4x faster than the one-liner at 25M), single-threaded and so immune to
    # thread-pool stalls on a busy machine.
    values = x.detach().contiguous().numpy()
    thr = np.float32(threshold.item())
    n = values.size
    scratch = np.empty(min(_CHUNK, n), dtype=np.float32)
    mask = np.empty(min(_CHUNK, n), dtype=np.bool_)
    found = []
    for start in range(0, n, _CHUNK):
        chunk = values[start : start + _CHUNK]
        m = chunk.size
        np.abs(chunk, out=scratch[:m])
        np.greater_equal(scratch[:m], thr, out=mask[:m])
        hits = np.flatnonzero(mask[:m])
        if hits.size:
            found.append(hits + start)
    if not found:
        return torch.empty(0, dtype=torch.long)
    return torch.from_numpy(np.concatenate(found) if len(found) > 1 else found[0])


def sampled_topk_indices(
    x: Tensor, k: int, *, sample_ratio: float = 0.01, generator: torch.Generator | None = None
) -> Tensor:
    """Sorted indices of about k large-|x| entries by DGC's sampled threshold; count in [⌈0.8k⌉, ⌊1.3k⌋].

    ``sample_ratio``: fraction of entries sampled (stride ≈ 1/ratio, random start). Larger samples give a
    threshold closer to the exact k-th value (fewer re-picks) but cost a longer selection on the sample.
    Indices refer to the flattened tensor.
    """
    x = x.detach().reshape(-1)
    n = x.numel()
    if k >= n or k == 0:
        return exact_topk_indices(x, k)
    lo_count, hi_count = count_bounds(k)
    stride = max(1, round(1.0 / sample_ratio))
    if stride == 1 or n // stride < 1:
        return exact_topk_indices(x, k)
    start = int(
        torch.randint(stride, (1,), generator=generator, device=generator.device if generator else "cpu")
    )
    sample = x[start::stride].abs()
    s = sample.numel()
    rank = min(s, max(1, round(k * s / n)))
    for _ in range(_MAX_REPICKS):
        idx = _at_or_above(x, _kth_largest(sample, rank))
        count = idx.numel()
        if count > hi_count:
            # Too many (ties, or the sample missed the heavy region): the candidates contain the exact
            # top-k, so an exact top-k over them alone gives exactly k at a fraction of the full cost.
            keep = torch.topk(x[idx].abs(), k, sorted=False).indices
            return torch.sort(idx[keep]).values
        if count >= lo_count:
            return idx
        if rank == s:
            break
        # Too few: the threshold sits too high. Scale the sample rank by the shortfall (plus 10 %).
        rank = min(s, max(rank + 1, math.ceil(rank * k / max(count, 1) * 1.1)))
    return exact_topk_indices(x, k)


class TopKCodec(Codec):
    """Keep the k largest-magnitude entries; send their values and delta-packed indices.

    Parameters
    ----------
    ratio, k:
        How many entries to keep: ``k`` fixed, or ``ratio`` of the vector (k = max(1, round(ratio·len))).
        Give at most one; default ``ratio=0.01``. Wire size ≈ k·(value bytes + ~1.3 index bytes) + header.
        If loss stalls even with error feedback, raise the ratio (DGC warms up 25 % → 0.1 % over the first
        epochs); if the network is the bottleneck, lower it.
    selection:
        ``"exact"``: ``torch.topk`` on |x| (exactly k). ``"sampled"``: DGC's sampled threshold, several times
        faster on large vectors, keeps between 0.8k and 1.3k entries. Prefer ``sampled`` above ~1M entries
        when encode time shows up in step time.
    sample_ratio:
        Fraction sampled by ``selection="sampled"`` (default 0.01, as in DGC).
    values:
        Precision of the kept values: ``"fp32"`` (4 bytes), ``"fp16"`` (2 bytes, clamped to ±65504) or
        ``"int8"`` (1 byte + per-chunk min/max scales): the top-k ∘ int8 composition. Quantisation error
        adds to the sparsification error, which error feedback carries over to later steps.
    chunk_size:
        Values per int8 scale when ``values="int8"`` (see the ``int8`` codec); ignored otherwise.
    seed:
        Seeds the random start of the sampling stride (one generator per device per codec instance).
    layerwise, segments:
        ``layerwise=True`` keeps ``ratio`` of every segment (one segment per parameter tensor, as DGC does)
        instead of ``ratio`` of the whole vector; ``segments`` are the segment lengths in order (the worker
        engine passes the model's parameter sizes). Use it when one tensor's large gradients (often the
        embeddings) crowd the others out of a global top-k and some layers barely train. Same wire format.
    warmup_steps, warmup_ratio:
        DGC's sparsity warm-up: for the first ``warmup_steps`` server versions keep a share that falls
        geometrically from ``warmup_ratio`` to ``ratio`` (the worker engine reports the version through
        :meth:`set_step`). Use it when loss stalls for the first hundred steps with top-k but not without:
        early gradients change fast, and error feedback delays the small coordinates too long then.
    """

    name = "topk"

    def __init__(
        self,
        *,
        ratio: float | None = None,
        k: int | None = None,
        selection: str = "exact",
        sample_ratio: float = 0.01,
        values: str = "fp32",
        chunk_size: int = 4096,
        seed: int = 0,
        layerwise: bool = False,
        segments: Sequence[int] | None = None,
        warmup_steps: int = 0,
        warmup_ratio: float = 0.25,
    ) -> None:
        if ratio is not None and k is not None:
            raise ConfigError(
                f"codec 'topk': give either 'ratio' or 'k', not both (got ratio={ratio!r}, k={k!r})"
            )
        self.k = None if k is None else param_int(self.name, "k", k, 1, MAX_NUMEL)
        self.ratio = (
            None
            if self.k is not None
            else param_float(self.name, "ratio", 0.01 if ratio is None else ratio, 0.0, 1.0, lo_open=True)
        )
        self.selection = param_choice(self.name, "selection", selection, ("exact", "sampled"))
        self.sample_ratio = param_float(self.name, "sample_ratio", sample_ratio, 0.0, 1.0, lo_open=True)
        self.values = param_choice(self.name, "values", values, ("fp32", "fp16", "int8"))
        self.chunk_size = param_int(self.name, "chunk_size", chunk_size, 1, 2**31 - 1)
        self.seed = param_seed(self.name, seed)
        self._gens = GeneratorPool(self.seed)
        if not isinstance(layerwise, bool):
            raise ConfigError(f"codec 'topk': layerwise must be true or false, got {layerwise!r}")
        self.layerwise = layerwise
        self.warmup_steps = param_int(self.name, "warmup_steps", warmup_steps, 0, 2**31 - 1)
        self.warmup_ratio = param_float(self.name, "warmup_ratio", warmup_ratio, 0.0, 1.0, lo_open=True)
        if self.warmup_steps and self.k is not None:
            raise ConfigError("codec 'topk': warmup_steps needs 'ratio' (it raises the share early), not 'k'")
        self._step = 0
        self.segments: list[int] | None = None
        if layerwise:
            if self.k is not None:
                raise ConfigError(
                    "codec 'topk': layerwise needs 'ratio' (a share of every tensor), not a fixed 'k'"
                )
            if segments is None or len(segments) == 0:
                raise ConfigError(
                    "codec 'topk': layerwise needs 'segments', the parameter tensor sizes in order "
                    "(the worker engine passes them; set them yourself when using the codec directly)"
                )
            self.segments = [param_int(self.name, "segments[]", n, 1, MAX_NUMEL) for n in segments]

    @property
    def params(self) -> dict[str, Any]:
        size = {"k": self.k} if self.k is not None else {"ratio": self.ratio}
        return {
            **size,
            "selection": self.selection,
            "sample_ratio": self.sample_ratio,
            "values": self.values,
            "chunk_size": self.chunk_size,
            "seed": self.seed,
            **({"layerwise": True, "segments": list(self.segments or [])} if self.layerwise else {}),
            **(
                {"warmup_steps": self.warmup_steps, "warmup_ratio": self.warmup_ratio}
                if self.warmup_steps
                else {}
            ),
        }

    def set_step(self, step: int) -> None:
        self._step = max(0, int(step))

    @property
    def current_ratio(self) -> float | None:
        """The share kept at the current step (``None`` with a fixed ``k``)."""
        if self.ratio is None:
            return None
        if self._step >= self.warmup_steps or self.warmup_ratio <= self.ratio:
            return self.ratio
        progress = self._step / self.warmup_steps
        return self.warmup_ratio * (self.ratio / self.warmup_ratio) ** progress

    def target_k(self, numel: int) -> int:
        """The k this codec aims at for a vector of ``numel`` entries (never more than ``numel``)."""
        if self.k is not None:
            return min(self.k, numel)
        ratio = self.current_ratio
        assert ratio is not None
        return min(numel, max(1, round(ratio * numel))) if numel else 0

    def select(self, flat: Tensor) -> Tensor:
        """Sorted indices this codec would keep for a flat float32 tensor."""
        if self.segments is None:
            return self._select_one(flat)
        if sum(self.segments) != flat.numel():
            raise ConfigError(
                f"codec 'topk': layerwise segments cover {sum(self.segments)} entries but the update has "
                f"{flat.numel()}; the segments must be this model's parameter sizes"
            )
        parts, offset = [], 0
        for length in self.segments:
            parts.append(self._select_one(flat[offset : offset + length]) + offset)
            offset += length
        return torch.cat(parts)  # each part is sorted and the parts are in order: sorted overall

    def _select_one(self, flat: Tensor) -> Tensor:
        k = self.target_k(flat.numel())
        if self.selection == "exact":
            return exact_topk_indices(flat, k)
        gen = self._gens.get(flat.device)
        return sampled_topk_indices(flat, k, sample_ratio=self.sample_ratio, generator=gen)

    def encode(self, tensor: Tensor) -> Encoded:
        flat = flatten_update(tensor, self.name)
        idx = self.select(flat)
        kept = flat[idx]
        coding, packed = pack_indices(idx.cpu().numpy(), flat.numel())
        params: dict[str, Any] = {"k": int(idx.numel()), "values": self.values, "index_coding": coding}
        if self.values == "fp32":
            value_buffers = [("values", kept)]
        elif self.values == "fp16":
            value_buffers = [("values", kept.clamp_(-FP16_MAX, FP16_MAX).half())]
        else:
            codes, scales = quantize_chunks(kept, self.chunk_size)
            value_buffers = [("codes", codes), ("scales", scales)]
            params["chunk_size"] = self.chunk_size
        return Encoded.build(
            self.name,
            self.version,
            tensor.shape,
            params,
            [*value_buffers, ("indices", torch.from_numpy(packed))],
        )

    @classmethod
    def _indices(cls, encoded: Encoded) -> Tensor:
        cached = encoded._cache.get("indices")
        if cached is None:
            raw = encoded.buffer("indices").cpu().numpy()
            cached = torch.from_numpy(
                unpack_indices(encoded.params["index_coding"], raw, int(encoded.params["k"]), encoded.numel)
            )
            encoded._cache["indices"] = cached
        return cached

    @classmethod
    def _decode(cls, encoded: Encoded) -> Tensor:
        params = encoded.params
        if params["values"] == "int8":
            values = dequantize_chunks(
                encoded.buffer("codes"), encoded.buffer("scales"), int(params["chunk_size"])
            )
        else:
            values = encoded.buffer("values").float()
        out = torch.zeros(encoded.numel, dtype=torch.float32, device=values.device)
        out[cls._indices(encoded).to(values.device)] = values
        return out

    @classmethod
    def validate_payload(cls, encoded: Encoded) -> None:
        params = encoded.params
        numel = encoded.numel
        value_kind = payload_choice(encoded, "values", ("fp32", "fp16", "int8"))
        keys = {"k", "values", "index_coding"} | ({"chunk_size"} if value_kind == "int8" else set())
        if set(params) != keys:
            raise MalformedPayloadError(
                f"payload of codec 'topk' must carry params {sorted(keys)}, got {sorted(map(str, params))}"
            )
        k = payload_int(encoded, "k", 0, numel)
        coding = payload_choice(encoded, "index_coding", INDEX_CODINGS)
        if coding == "varint":
            index_bytes: int | tuple[int, int] = (k, k * varint_max_bytes(numel))
        else:
            index_bytes = k * FIXED_WIDTHS[coding].itemsize
        expected: list[tuple[str, str, int | tuple[int, int]]]
        if value_kind == "int8":
            chunk = payload_int(encoded, "chunk_size", 1, MAX_NUMEL)
            expected = [("codes", "uint8", k), ("scales", "float32", 2 * n_chunks(k, chunk))]
        else:
            expected = [("values", "float32" if value_kind == "fp32" else "float16", k)]
        expect_buffers(encoded, [*expected, ("indices", "uint8", index_bytes)])
        cls._indices(encoded)  # decodes and range-checks the index stream; cached for decode
