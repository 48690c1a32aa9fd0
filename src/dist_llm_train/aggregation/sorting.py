"""Per-coordinate order statistics of a few rows, vectorised across coordinates (Bulyan's second phase).

``torch.sort`` along dim 0 of a [θ, d] tensor runs one tiny sort per coordinate and is dozens of times
slower than a pass over the data.  For the small θ of robust aggregation a sorting *network* is faster:
a fixed list of compare-exchange steps, each one ``minimum``/``maximum`` over whole rows.

Two backends, as for the coordinate-wise median (:mod:`.coordinatewise`):

* ``"eager"``: the network runs op by op on cache-sized column blocks spread over threads (about 20x
  the time of a mean on 2 cores for θ = 15).
* ``"compiled"``: the network and the window sum are generated as straight-line torch code and fused
  by ``torch.compile`` into one loop that reads each selected row once (about the time of a mean).  The
  first call for a new (θ, β) compiles for tens of seconds (cached on disk afterwards).
* ``"auto"`` (default): compiled for CPU float32/float64 work of at least
  :data:`~dist_llm_train.aggregation.coordinatewise.COMPILE_MIN_NUMEL` elements, eager otherwise, and
  eager for good once a compile has failed (logged once).

Both give bitwise the same result.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from dist_llm_train.aggregation.blocks import column_blocks
from dist_llm_train.aggregation.coordinatewise import COMPILE_MIN_NUMEL

__all__ = [
    "Backend",
    "closest_to_median_mean",
    "closest_to_median_mean_rows",
    "sort_columns",
    "sorting_network",
    "window_kernel",
    "window_kernel_source",
]

_log = logging.getLogger(__name__)

Backend = Literal["auto", "compiled", "eager"]
_COMPILE_FAILED = False

# Beyond this many rows Batcher's network (O(θ log² θ) steps) loses to torch.sort.
_NETWORK_MAX_ROWS = 64
# torch runs an elementwise op on fewer elements than its grain size (32768) on the calling thread.
# Keeping every op below it and spreading column ranges over our own threads avoids an OpenMP
# fork/join per tiny op, which costs more than the op (and far more on an oversubscribed machine).
_COLUMNS_PER_OP = 8192


@functools.lru_cache(maxsize=128)
def sorting_network(n: int) -> tuple[tuple[int, int], ...]:
    """Batcher's odd-even merge sort comparators for ``n`` inputs (pruned from the next power of two).

    Pruning is valid because the missing inputs can be taken as +inf: a comparator touching one of
    them never moves anything.
    """
    size = 1
    while size < n:
        size *= 2
    pairs: list[tuple[int, int]] = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    a, b = i + j, i + j + k
                    if a // (2 * p) == b // (2 * p) and b < n:
                        pairs.append((a, b))
            k //= 2
        p *= 2
    return tuple(pairs)


def sort_columns(block: Tensor) -> list[Tensor]:
    """Sort every column of ``block`` [θ, c] ascending; returns the θ sorted rows.

    ``block`` is consumed (its memory is reused); pass a copy if it must survive.
    """
    theta = block.shape[0]
    if theta > _NETWORK_MAX_ROWS:
        return list(torch.sort(block, dim=0).values.unbind(0))
    rows = list(block.unbind(0))
    if theta < 2:
        return rows
    spare = torch.empty_like(rows[0])
    for a, b in sorting_network(theta):
        torch.minimum(rows[a], rows[b], out=spare)
        torch.maximum(rows[a], rows[b], out=rows[b])
        # the old buffer of row a becomes the next scratch: no copy per comparator
        rows[a], spare = spare, rows[a]
    return rows


def closest_to_median_mean(block: Tensor, beta: int) -> Tensor:
    """Per column of ``block`` [θ, c]: the mean of the ``beta`` values closest to the column's median.

    The median is the true midpoint median.  With the column sorted (s_0 <= ... <= s_{θ-1}) the beta
    closest values are a window s_a .. s_{a+β-1}; comparing the pair (s_j, s_{j+β}) decides whether the
    window starts after j (the upper one is closer, s_j + s_{j+β} < 2·median), and that test is monotone
    in j, so ``a`` = number of true tests and the window sum follows by adding the differences.  Exact
    ties in distance keep the lower value.  ``block`` is consumed.
    """
    theta = block.shape[0]
    if not 1 <= beta <= theta:
        raise ValueError(f"closest_to_median_mean needs 1 <= beta <= theta, got beta={beta}, theta={theta}")
    s = sort_columns(block)
    h = theta // 2
    two_med = s[h] + s[h] if theta % 2 else s[h - 1] + s[h]
    total = s[0].clone()
    for j in range(1, beta):
        total += s[j]
    for j in range(theta - beta):
        upper_closer = (s[j] + s[j + beta]) < two_med
        total += torch.where(upper_closer, s[j + beta] - s[j], 0.0)
    return total / beta


class _Worker:
    """Preallocated rows for running the network and the window sum on ``width`` columns at a time."""

    def __init__(self, theta: int, beta: int, width: int, dtype: torch.dtype, device: torch.device) -> None:
        self.theta, self.beta, self.width = theta, beta, width
        self.buf = torch.empty(theta, width, dtype=dtype, device=device)
        self.views = list(self.buf.unbind(0))
        self.spare = torch.empty(width, dtype=dtype, device=device)
        self.two_med = torch.empty(width, dtype=dtype, device=device)
        self.total = torch.empty(width, dtype=dtype, device=device)
        self.pair = torch.empty(width, dtype=dtype, device=device)
        self.diff = torch.empty(width, dtype=dtype, device=device)
        self.mask = torch.empty(width, dtype=torch.bool, device=device)
        self.network = sorting_network(theta)

    def run(self, x: Tensor, rows: Tensor, c0: int, out: Tensor) -> None:
        theta, beta, w = self.theta, self.beta, self.width
        torch.index_select(x[:, c0 : c0 + w], 0, rows, out=self.buf)
        s = list(self.views)
        spare = self.spare
        for a, b in self.network:
            torch.minimum(s[a], s[b], out=spare)
            torch.maximum(s[a], s[b], out=s[b])
            s[a], spare = spare, s[a]
        h = theta // 2
        if theta % 2:
            torch.add(s[h], s[h], out=self.two_med)
        else:
            torch.add(s[h - 1], s[h], out=self.two_med)
        total = self.total
        total.copy_(s[0])
        for j in range(1, beta):
            total.add_(s[j])
        for j in range(theta - beta):
            # the window moves past s_j when s_{j+β} is closer to the median (see closest_to_median_mean)
            torch.add(s[j], s[j + beta], out=self.pair)
            torch.ge(self.pair, self.two_med, out=self.mask)
            torch.sub(s[j + beta], s[j], out=self.diff)
            self.diff.masked_fill_(self.mask, 0.0)
            total.add_(self.diff)
        torch.div(total, beta, out=out[c0 : c0 + w])


@functools.cache
def window_kernel_source(theta: int, beta: int) -> str:
    """Straight-line torch code of the network plus the window sum, for θ row arguments."""
    lines = ["def _kernel(" + ", ".join(f"v{i}" for i in range(theta)) + "):"]
    for a, b in sorting_network(theta):
        lines.append(f"    t = torch.minimum(v{a}, v{b}); v{b} = torch.maximum(v{a}, v{b}); v{a} = t")
    h = theta // 2
    lines.append(f"    two_med = v{h} + v{h}" if theta % 2 else f"    two_med = v{h - 1} + v{h}")
    lines.append("    total = " + " + ".join(f"v{j}" for j in range(beta)))
    for j in range(theta - beta):
        lines.append(
            f"    total = total + torch.where(v{j} + v{j + beta} < two_med, v{j + beta} - v{j}, 0.0)"
        )
    lines.append(f"    return total / {beta}")
    return "\n".join(lines) + "\n"


def window_kernel(theta: int, beta: int) -> Callable[..., Tensor]:
    """The generated code as a plain function (a distinct code object per (θ, β), as Dynamo caches per code)."""
    namespace: dict[str, object] = {"torch": torch}
    exec(compile(window_kernel_source(theta, beta), f"<bulyan theta={theta} beta={beta}>", "exec"), namespace)
    return namespace["_kernel"]  # type: ignore[return-value]


@functools.cache
def _compiled_window_kernel(theta: int, beta: int) -> Callable[..., Tensor]:
    return torch.compile(window_kernel(theta, beta), dynamic=True, fullgraph=True)


def _run_compiled(x: Tensor, rows: Sequence[int], beta: int, strict: bool) -> Tensor | None:
    global _COMPILE_FAILED
    try:
        with torch.no_grad():
            return _compiled_window_kernel(len(rows), beta)(*[x[i] for i in rows])
    except Exception as exc:  # Inductor raises many types (no compiler, missing headers, codegen bugs)
        if strict:
            raise
        _COMPILE_FAILED = True
        _log.warning(
            "torch.compile of Bulyan's coordinate-wise kernel failed (%s: %s); using the eager network from "
            "now on, which is about 20x slower for large inputs.",
            type(exc).__name__,
            exc,
        )
        return None


def closest_to_median_mean_rows(
    x: Tensor, rows: Sequence[int], beta: int, backend: Backend = "auto"
) -> Tensor:
    """:func:`closest_to_median_mean` of the rows ``rows`` of ``x`` [n, d], without copying them out.

    Eager: column blocks of a few thousand coordinates are gathered into preallocated buffers that stay
    in cache and spread over ``torch.get_num_threads()`` threads.  Compiled: one fused loop (see the
    module docstring).  ``x`` is only read.
    """
    theta = len(rows)
    d = int(x.shape[1])
    if not 1 <= beta <= theta:
        raise ValueError(
            f"closest_to_median_mean_rows needs 1 <= beta <= theta, got beta={beta}, theta={theta}"
        )
    if backend not in ("auto", "compiled", "eager"):
        raise ValueError(f"backend must be 'auto', 'compiled' or 'eager', got {backend!r}")
    idx = torch.tensor(list(rows), dtype=torch.long, device=x.device)
    if x.device.type != "cpu" or theta > _NETWORK_MAX_ROWS:
        return closest_to_median_mean(x.index_select(0, idx), beta)
    if theta == 1:
        return x[rows[0]].clone()
    compiles = (
        not _COMPILE_FAILED and x.dtype in (torch.float32, torch.float64) and theta * d >= COMPILE_MIN_NUMEL
    )
    if backend == "compiled" or (backend == "auto" and compiles):
        result = _run_compiled(x, rows, beta, strict=backend == "compiled")
        if result is not None:
            return result
    out = torch.empty(d, dtype=x.dtype, device=x.device)
    width = max(1, min(d, _COLUMNS_PER_OP))

    def step(cache: list[_Worker], c0: int, c1: int) -> None:
        # one worker (with its buffers) per thread, rebuilt only for the narrower tail block
        if not cache or cache[0].width != c1 - c0:
            cache[:] = [_Worker(theta, beta, c1 - c0, x.dtype, x.device)]
        cache[0].run(x, idx, c0, out)

    column_blocks(d, width, x.device, list, step)
    return out
