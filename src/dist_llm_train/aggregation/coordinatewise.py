"""Exact coordinate-wise robust statistics (median, trimmed mean) over n stacked updates ``x`` [n, d].

Both statistics are order statistics of each column of ``x``. ``torch.median(x, dim=0)`` gets them with a
scalar selection per column (about 78x the time of ``x.mean(dim=0)`` for n=25, d=25M on 2 cores) and
returns the *lower* middle value for even n, which is not the median. This module computes them with
data-oblivious comparator networks (every comparator is an elementwise ``torch.minimum``/``torch.maximum``
over a whole row), which vectorise across coordinates and give exact results (the median bitwise; only
``-0.0`` vs ``0.0`` may differ from a sort, as they compare equal):

* ``backend="compiled"``: the network (Batcher's odd-even merge sort, pruned to the comparators the wanted
  ranks depend on) is generated as straight-line torch code and fused by ``torch.compile`` into one loop
  that reads each column once; it runs at about the speed of the plain mean. The first call for a new
  (n, statistic) compiles for 10-90 s on a 2-core machine (Inductor, needs a C++ compiler; the result is
  cached on disk, so later processes start in seconds).
* ``backend="eager"``: a bitonic network over cache-sized column chunks (2 x next_pow2(n) rows of about
  2k columns, so everything stays in L2), each layer a single strided-view op, chunks spread over
  ``torch.get_num_threads()`` Python threads (the ops release the GIL). No compile step; roughly 20-30x
  the time of the mean on 2 cores (per-op dispatch and L2 traffic, not arithmetic, bound it).
* ``backend="auto"`` (default): compiled for CPU float32/float64 aggregations of at least
  ``COMPILE_MIN_NUMEL`` elements, eager otherwise, and eager for good if compiling ever fails (logged once).
* CUDA tensors always use a sort along dim 0 (fast enough there).

Inputs must be finite: NaN breaks every comparator network (and ``torch.sort`` orders it last), and the
callers (robust aggregators) reject non-finite updates before they get here, because that check costs a
full pass over the data. Neither function modifies its input, and results carry no autograd history.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from dist_llm_train.aggregation.blocks import column_blocks
from dist_llm_train.errors import PreconditionError

__all__ = [
    "COMPILE_MIN_NUMEL",
    "Backend",
    "coordinate_median",
    "coordinate_trimmed_mean",
]

_log = logging.getLogger(__name__)

Backend = Literal["auto", "compiled", "eager"]

#: ``backend="auto"`` compiles only for aggregations of at least this many elements (64 MiB of float32,
#: e.g. 8 updates of 2M parameters): below it the eager network takes well under a second, which does not
#: repay a compile that stalls the first call (and would slow every small test and simulation).
COMPILE_MIN_NUMEL = 1 << 24

# torch's at::internal::GRAIN_SIZE: an elementwise op on fewer elements runs on the calling thread. The
# eager path keeps every op below it, so that its own worker threads are the only parallelism (an OpenMP
# fork/join per small op costs more than the op, and is disastrous on an oversubscribed machine).
_GRAIN = 32768

_COMPILE_FAILED = False


# ---------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------


def coordinate_median(x: Tensor, *, backend: Backend = "auto", size_hint: int | None = None) -> Tensor:
    """True per-coordinate median of ``x`` [n, d] along dim 0, as a new tensor [d].

    Args:
        x: n stacked updates, floating point, finite, on CPU or CUDA. Not modified. A layout whose rows are
            not contiguous (e.g. a transposed tensor) is copied once first.
        backend: ``"auto"``, ``"compiled"`` or ``"eager"`` (see the module docstring). If the first large
            call stalls for a minute, that is the one-off compile: pass ``"eager"`` for short runs or
            tests, keep ``"auto"`` for training (later calls run at about the speed of the mean).
        size_hint: when ``x`` is one column chunk of a larger aggregation, its total element count, so
            that ``"auto"`` picks the compiled kernel for every chunk of a large aggregation (by default
            it looks at ``x.numel()``, and chunks below ``COMPILE_MIN_NUMEL`` would run ~20x slower eager).

    Returns:
        For odd n the middle value of each column; for even n the mean of the two middle values
        (``torch.median`` would return the lower one). Bitwise identical to ``sorted[(n-1)//2]`` resp.
        ``(sorted[n//2-1] + sorted[n//2]) * 0.5`` of ``torch.sort(x, dim=0)``, whichever backend runs
        (except that a column whose middle values are ``-0.0`` and ``0.0`` may give either zero).
    """
    x = _check_input(x, "coordinate_median")
    return _order_statistic_mean(x, median_ranks(x.shape[0]), backend, size_hint)


def coordinate_trimmed_mean(
    x: Tensor, f: int, *, backend: Backend = "auto", size_hint: int | None = None
) -> Tensor:
    """Per coordinate, drop the ``f`` largest and ``f`` smallest of the n values and average the n - 2f left.

    Args:
        x: n stacked updates [n, d], floating point, finite, on CPU or CUDA. Not modified.
        f: values trimmed at each end, ``0 <= f`` and ``2f < n``. Set it to the number of Byzantine workers
            you must tolerate: each attacker can move the result at most to the edge of the honest values.
            ``f = 0`` is the plain mean; ``2f = n - 1`` is the median.
        backend, size_hint: as for :func:`coordinate_median`.

    Returns:
        A new tensor [d]: the mean of ranks ``f .. n-f-1`` of each column. It equals the sort-based value
        ``torch.sort(x, 0).values[f:n-f].mean(0)`` up to float summation order (the same multiset of values
        is summed, in a different order), and is bitwise equal to it when n - 2f <= 2.

    Raises:
        PreconditionError: ``f`` is negative, not an int, or ``2f >= n``.
    """
    x = _check_input(x, "coordinate_trimmed_mean")
    n = x.shape[0]
    if isinstance(f, bool) or not isinstance(f, int) or f < 0 or 2 * f >= n:
        raise PreconditionError(
            f"coordinate_trimmed_mean needs an integer f with 0 <= f and 2f < n, got n={n}, f={f!r}; "
            f"lower f to at most {(n - 1) // 2} or aggregate more updates."
        )
    if f == 0:
        return x.mean(dim=0)
    return _order_statistic_mean(x, tuple(range(f, n - f)), backend, size_hint)


# ---------------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------------


def _check_input(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise PreconditionError(f"{name} expects a torch.Tensor [n, d], got {type(x).__name__}.")
    if x.dim() != 2 or x.shape[0] < 1:
        raise PreconditionError(
            f"{name} expects a 2-D tensor [n, d] with n >= 1 stacked updates, got shape {tuple(x.shape)}; "
            "stack the flattened updates with torch.stack first."
        )
    if not x.is_floating_point():
        raise PreconditionError(
            f"{name} expects a floating-point tensor, got dtype {x.dtype}; cast the updates to float32."
        )
    x = x.detach()
    if x.shape[1] > 1 and x.stride(1) != 1:
        x = x.contiguous()
    return x


def _order_statistic_mean(
    x: Tensor, ranks: tuple[int, ...], backend: Backend, size_hint: int | None
) -> Tensor:
    """Mean over ``ranks`` (consecutive, 0-based, ascending) of the sorted columns of ``x``."""
    if backend not in ("auto", "compiled", "eager"):
        raise PreconditionError(f"backend must be 'auto', 'compiled' or 'eager', got {backend!r}.")
    n, d = x.shape
    if n == 1 or d == 0:
        return x[0].clone()
    if x.device.type != "cpu":
        return _sorted_rows_mean(torch.sort(x, dim=0).values, ranks)
    if backend == "compiled" or (backend == "auto" and _auto_compiles(x, size_hint)):
        out = _run_compiled(x, ranks, strict=backend == "compiled")
        if out is not None:
            return out
    return _run_eager(x, ranks)


def _sorted_rows_mean(s: Tensor, ranks: tuple[int, ...]) -> Tensor:
    if len(ranks) == 1:
        return s[ranks[0]].clone()
    if len(ranks) == 2:
        return (s[ranks[0]] + s[ranks[1]]) * 0.5
    return s[ranks[0] : ranks[-1] + 1].mean(dim=0)


def _auto_compiles(x: Tensor, size_hint: int | None = None) -> bool:
    size = max(x.numel(), size_hint or 0)
    return not _COMPILE_FAILED and x.dtype in (torch.float32, torch.float64) and size >= COMPILE_MIN_NUMEL


# ---------------------------------------------------------------------------------------------------
# Comparator networks
# ---------------------------------------------------------------------------------------------------


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@functools.cache
def _batcher_network(size: int) -> tuple[tuple[int, int], ...]:
    """Batcher's odd-even merge sort on ``size`` (a power of two) wires; each pair puts the min on the first."""
    pairs: list[tuple[int, int]] = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return tuple(pairs)


def _prune(pairs: Sequence[tuple[int, int]], wanted: frozenset[int]) -> list[tuple[int, int, bool, bool]]:
    """Keep only the comparators that the multiset of values on the ``wanted`` wires depends on.

    Walks the network backwards tracking groups of wires whose values matter only as a multiset. A
    comparator inside one group merely permutes it and is dropped; one that feeds a group is kept with
    only the outputs that are used (``need_min``, ``need_max``), and its two input wires then form a new
    group (min and max are symmetric in their inputs). Returns ``(lo, hi, need_min, need_max)`` in order.
    """
    group: dict[int, int] = dict.fromkeys(wanted, 0)
    fresh = 1
    kept: list[tuple[int, int, bool, bool]] = []
    for lo, hi in reversed(pairs):
        g_lo, g_hi = group.get(lo), group.get(hi)
        if g_lo == g_hi:  # both unused, or both in the same multiset
            continue
        kept.append((lo, hi, g_lo is not None, g_hi is not None))
        group[lo] = group[hi] = fresh
        fresh += 1
    kept.reverse()
    return kept


# ---------------------------------------------------------------------------------------------------
# Compiled backend: one fused loop over the columns
# ---------------------------------------------------------------------------------------------------


@functools.cache
def pruned_network(n: int, ranks: tuple[int, ...]) -> tuple[tuple[int, int, bool, bool], ...]:
    """The comparators ``(lo, hi, need_min, need_max)`` that put the multiset of ``ranks`` of n values on
    those wires (Batcher's network, pruned); shared with the C++ kernels of :mod:`.onepass`."""
    # Padding wires (n .. next_pow2(n)-1) would hold +inf and stay put, so every comparator touching one
    # is a no-op and is dropped here.
    pairs = [(a, b) for a, b in _batcher_network(_next_pow2(n)) if b < n]
    return tuple(_prune(pairs, frozenset(ranks)))


def _network_lines(n: int, ranks: tuple[int, ...]) -> tuple[list[str], str]:
    """Body lines (reading rows ``x[i]`` into wires ``v0..v{n-1}``) of the pruned network, and the
    expression for the mean of the wanted ``ranks``."""
    lines = [f"    v{i} = x[{i}]" for i in range(n)]
    for lo, hi, need_min, need_max in pruned_network(n, ranks):
        if need_min and need_max:
            lines.append(
                f"    t = torch.minimum(v{lo}, v{hi}); v{hi} = torch.maximum(v{lo}, v{hi}); v{lo} = t"
            )
        elif need_min:
            lines.append(f"    v{lo} = torch.minimum(v{lo}, v{hi})")
        else:
            lines.append(f"    v{hi} = torch.maximum(v{lo}, v{hi})")
    if len(ranks) == 1:
        result = f"v{ranks[0]}"  # for n >= 2 always a comparator output, never x itself
    elif len(ranks) == 2:
        result = f"(v{ranks[0]} + v{ranks[1]}) * 0.5"
    else:
        result = f"({' + '.join(f'v{r}' for r in ranks)}) / {len(ranks)}"
    return lines, result


def median_ranks(n: int) -> tuple[int, ...]:
    """The 0-based ranks whose mean is the true median of n values (one rank for odd n, two for even)."""
    m = n // 2
    return (m,) if n % 2 == 1 else (m - 1, m)


@functools.cache
def _kernel_source(n: int, ranks: tuple[int, ...]) -> str:
    body, result = _network_lines(n, ranks)
    return "\n".join(["def _kernel(x):", *body, f"    return {result}"]) + "\n"


def _source_kernel(n: int, ranks: tuple[int, ...]) -> Callable[[Tensor], Tensor]:
    """The generated network as a plain (uncompiled) function: one torch op per comparator."""
    # A distinct code object per network: Dynamo caches per code object, so one shared closure would hit
    # its recompile limit after a few (n, ranks) and silently fall back to 200 unfused ops on full rows.
    namespace: dict[str, object] = {"torch": torch}
    exec(compile(_kernel_source(n, ranks), f"<coordinatewise n={n} ranks={ranks}>", "exec"), namespace)
    return namespace["_kernel"]  # type: ignore[return-value]


@functools.cache
def _compiled_kernel(n: int, ranks: tuple[int, ...]) -> Callable[[Tensor], Tensor]:
    # With many wanted ranks (trimmed mean) Inductor by default writes wires read by several comparators to
    # d-sized buffers (9 for n=25, f=5), which costs 2-3x the mean in memory traffic; keeping them in
    # registers runs at 1.5x the mean, for a 4x longer one-off compile (about 40 s of CPU on this machine).
    options = {"realize_reads_threshold": 1 << 20} if len(ranks) > 2 else None
    return torch.compile(_source_kernel(n, ranks), dynamic=True, fullgraph=True, options=options)


def _run_compiled(x: Tensor, ranks: tuple[int, ...], strict: bool) -> Tensor | None:
    global _COMPILE_FAILED
    try:
        with torch.no_grad():
            return _compiled_kernel(x.shape[0], ranks)(x)
    except Exception as exc:  # Inductor raises many types (no compiler, missing headers, codegen bugs).
        if strict:
            raise
        _COMPILE_FAILED = True
        _log.warning(
            "torch.compile of the coordinate-wise kernel failed (%s: %s); using the eager network from now "
            "on, which is about 15x slower for large inputs.",
            type(exc).__name__,
            exc,
        )
        return None


# ---------------------------------------------------------------------------------------------------
# Eager backend: bitonic network on cache-sized chunks
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rows:
    """Rows ``start, start+step, ...`` (``count`` of them) of ping-pong buffer ``buf``."""

    buf: int
    start: int
    count: int
    step: int


@dataclass(frozen=True)
class _EagerPlan:
    n: int
    size: int  # next power of two >= n: the network width
    layers: tuple[tuple[int, int, int], ...]  # (src buffer, block size k, distance j) of full layers
    merge_ops: tuple[tuple[bool, _Rows, _Rows, _Rows], ...]  # (is_min, a, b, out) of the pruned merge
    result: tuple[_Rows, ...]  # where the wanted ranks end up (as a multiset)


@functools.cache
def _eager_plan(n: int, ranks: tuple[int, ...]) -> _EagerPlan:
    """Bitonic sort of the first stages in full, then the final merge pruned to the wanted ranks.

    Full layers map buffer ``src`` to ``1 - src`` with one min and one max op each: the direction of each
    block is folded into the output strides. The final merge (all blocks ascending, distances size/2 .. 1)
    works in place with the other buffer as scratch, so pruned comparators cost nothing.
    """
    size = _next_pow2(n)
    layers: list[tuple[int, int, int]] = []
    src = 0
    k = 2
    while k < size:
        j = k // 2
        while j >= 1:
            layers.append((src, k, j))
            src = 1 - src
            j //= 2
        k *= 2
    merge_pairs = []
    j = size // 2
    while j >= 1:
        merge_pairs += [(a, a + j) for a in range(size) if not a & j]
        j //= 2
    kept = _prune(merge_pairs, frozenset(ranks))

    where = {p: (src, p) for p in range(size)}
    free = [(1 - src, r) for r in range(size)]
    ops: list[tuple[bool, _Rows, _Rows, _Rows]] = []
    stage_of = {pair: i for i, pair in enumerate(merge_pairs)}
    # Distance of each kept comparator decides its substage; comparators of one substage are disjoint.
    by_stage: dict[int, list[tuple[int, int, bool, bool]]] = {}
    for c in kept:
        by_stage.setdefault(c[1] - c[0], []).append(c)
    for dist in sorted(by_stage, reverse=True):
        comps = sorted(by_stage[dist], key=lambda c: stage_of[(c[0], c[1])])
        released: list[tuple[int, int]] = []
        elems: list[tuple[bool, bool, tuple[int, int], tuple[int, int], tuple[int, int] | None]] = []
        for lo, hi, need_min, need_max in comps:
            a, b = where[lo], where[hi]
            out_min: tuple[int, int] | None = None
            if need_min and need_max:
                # The max overwrites b in place, so the min needs a row nobody reads in this substage.
                out_min = free.pop(0)
                released.append(a)
            elif need_min:
                out_min = a
            if need_min:
                where[lo] = out_min  # type: ignore[assignment]
            elems.append((need_min, need_max, a, b, out_min))
        ops += _merge_runs(elems)
        free = sorted(free + released)  # reusable only once this substage's reads are done
    result = _runs(sorted(where[r] for r in ranks))
    return _EagerPlan(n=n, size=size, layers=tuple(layers), merge_ops=tuple(ops), result=tuple(result))


def _affine(rows: Sequence[tuple[int, int] | None]) -> int | None:
    """Common positive step of rows in one buffer, 0 for a single row, None if not an arithmetic run."""
    if rows[0] is None:
        return 0
    if len(rows) == 1:
        return 0
    bufs = {r[0] for r in rows if r is not None}
    if len(bufs) != 1 or any(r is None for r in rows):
        return None
    step = rows[1][1] - rows[0][1]  # type: ignore[index]
    if step <= 0 or any(rows[i + 1][1] - rows[i][1] != step for i in range(len(rows) - 1)):  # type: ignore[index]
        return None
    return step


def _merge_runs(
    elems: list[tuple[bool, bool, tuple[int, int], tuple[int, int], tuple[int, int] | None]],
) -> list[tuple[bool, _Rows, _Rows, _Rows]]:
    """Group consecutive comparators whose rows form arithmetic runs into one op each."""
    ops: list[tuple[bool, _Rows, _Rows, _Rows]] = []
    i = 0
    while i < len(elems):
        end = i + 1
        while end < len(elems) and elems[end][:2] == elems[i][:2]:
            group = elems[i : end + 1]
            if any(_affine([e[col] for e in group]) is None for col in (2, 3, 4)):
                break
            end += 1
        group = elems[i:end]
        need_min, need_max = group[0][0], group[0][1]
        a_rows = _as_rows([e[2] for e in group])
        b_rows = _as_rows([e[3] for e in group])
        if need_min:
            ops.append((True, a_rows, b_rows, _as_rows([e[4] for e in group])))  # type: ignore[misc]
        if need_max:
            ops.append((False, a_rows, b_rows, b_rows))
        i = end
    return ops


def _as_rows(rows: Sequence[tuple[int, int]]) -> _Rows:
    step = _affine(rows) or 1
    return _Rows(buf=rows[0][0], start=rows[0][1], count=len(rows), step=step)


def _runs(rows: Sequence[tuple[int, int]]) -> list[_Rows]:
    """Split sorted rows into maximal runs of consecutive rows of one buffer."""
    out: list[_Rows] = []
    for buf, row in rows:
        last = out[-1] if out else None
        if last is not None and last.buf == buf and last.start + last.count == row:
            out[-1] = _Rows(buf, last.start, last.count + 1, 1)
        else:
            out.append(_Rows(buf, row, 1, 1))
    return out


class _ChunkWorker:
    """Buffers and prebuilt views for running one plan on column chunks of width ``w``."""

    def __init__(self, plan: _EagerPlan, w: int, dtype: torch.dtype) -> None:
        self.plan = plan
        self.w = w
        size = plan.size
        self.bufs = (torch.empty(size, w, dtype=dtype), torch.empty(size, w, dtype=dtype))
        mn, mx = torch.minimum, torch.maximum
        ops: list[tuple[Callable[..., Tensor], Tensor, Tensor, Tensor]] = []
        for src, k, j in plan.layers:
            a, b, out_min, out_max = self._layer_views(self.bufs[src], self.bufs[1 - src], k, j)
            ops += [(mn, a, b, out_min), (mx, a, b, out_max)]
        for is_min, a_rows, b_rows, out_rows in plan.merge_ops:
            a, b, o = self._view(a_rows), self._view(b_rows), self._view(out_rows)
            ops.append((mn if is_min else mx, a, b, o))
        self.ops = ops
        rows_per_op = max(1, (_GRAIN - 1) // w)
        self.loads = [(r, min(plan.n, r + rows_per_op)) for r in range(0, plan.n, rows_per_op)]
        self.pad = self.bufs[0][plan.n :]
        self.result = [
            self._view(_Rows(r.buf, r.start + s, min(rows_per_op, r.count - s), 1))
            for r in plan.result
            for s in range(0, r.count, rows_per_op)
        ]
        self.count = sum(r.count for r in plan.result)

    def _view(self, rows: _Rows) -> Tensor:
        w = self.w
        return self.bufs[rows.buf].as_strided((rows.count, w), (rows.step * w, 1), rows.start * w)

    def _layer_views(self, src: Tensor, dst: Tensor, k: int, j: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        # Rows r = pair*2k + dir*k + group*2j + half*j + i. Blocks of size k alternate ascending (dir 0)
        # and descending (dir 1); ascending puts the min in half 0, descending in half 1, which is the
        # stride k+j (min) and offset j, stride k-j (max) on the output.
        w, size = self.w, self.plan.size
        shape = (size // (2 * k), 2, k // (2 * j), j, w)
        strides = (2 * k * w, k * w, 2 * j * w, w, 1)
        a = src.as_strided(shape, strides, 0)
        b = src.as_strided(shape, strides, j * w)
        out_min = dst.as_strided(shape, (2 * k * w, (k + j) * w, 2 * j * w, w, 1), 0)
        out_max = dst.as_strided(shape, (2 * k * w, (k - j) * w, 2 * j * w, w, 1), j * w)
        return a, b, out_min, out_max

    def run(self, x: Tensor, c0: int, out: Tensor) -> None:
        w = self.w
        first = self.bufs[0]
        for r0, r1 in self.loads:
            first[r0:r1].copy_(x[r0:r1, c0 : c0 + w])
        if self.pad.shape[0]:
            self.pad.fill_(math.inf)  # padding sorts last and never reaches a wanted rank
        for fn, a, b, o in self.ops:
            fn(a, b, out=o)
        dst = out[c0 : c0 + w]
        if self.count == 1:
            dst.copy_(self.result[0][0])
            return
        torch.sum(self.result[0], dim=0, out=dst)
        for rows in self.result[1:]:
            if rows.shape[0] == 1:
                dst.add_(rows[0])
            else:
                dst.add_(rows.sum(dim=0))
        dst.div_(self.count)


def _run_eager(x: Tensor, ranks: tuple[int, ...]) -> Tensor:
    n, d = x.shape
    plan = _eager_plan(n, ranks)
    width = max(1, min(d, (_GRAIN - 1) // max(1, plan.size // 2)))
    out = torch.empty(d, dtype=x.dtype)

    def step(cache: list[_ChunkWorker], c0: int, c1: int) -> None:
        # one worker (with its chunk buffers) per thread, rebuilt only for the narrower tail chunk
        if not cache or cache[0].w != c1 - c0:
            cache[:] = [_ChunkWorker(plan, c1 - c0, x.dtype)]
        cache[0].run(x, c0, out)

    column_blocks(d, width, torch.device("cpu"), list, step)
    return out
