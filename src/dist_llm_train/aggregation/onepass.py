"""One-pass kernels for the direct (vector) iterations of CenteredClip and the geometric median.

A direct iteration forms the iterate ``z`` (an affine combination of the n inputs and at most one extra
vector, CenteredClip's starting point) and the squared distances ``‖x_i − z‖²`` of all inputs to it.  As
torch ops on column blocks that is a matrix-vector product, a subtraction into a buffer and a norm:
several trips through memory and about 2x the time of ``x.mean(0)`` per iteration (n = 25, 2 cores).
The kernels here read every column once:

* :func:`sq_distances_to_combination`: per block of 256 columns, first ``z`` (kept in L1), then for each
  input the sum of squares of its difference to ``z``; about 0.8x the time of the mean.
* :func:`median_and_sq_distances`: CenteredClip's first call also needs its starting point, the
  coordinate median.  The block's median comes from the comparator network of :mod:`.coordinatewise`
  (the same pruned network, so the start is bitwise :func:`~.coordinatewise.coordinate_median`), then
  the distances to it as above; about 0.9x the mean.
* :func:`combination`: the output vector, about 0.8x the mean.

They are generated as C++ per (n, dtype), with the network unrolled, compiled by the system C++ compiler
(``$CXX``, else ``c++``; about 2 s) into ``~/.cache/dist_llm_train/kernels`` (``$DIST_LLM_TRAIN_KERNEL_CACHE``
overrides it; libraries are keyed by source, compiler and CPU) and called through ctypes, one call per
thread on a contiguous column range (ctypes releases the GIL).  ``torch.compile`` was measured first:
the loop Inductor fuses the median network and the n cascade-summed reductions into ran at 2.0x the mean
against 0.9x for the blocked kernel here (n = 25, d = 5M, same run); for the distances to an iterate the
two were even.  If the compiler is missing or fails, the callers fall back to blocked torch ops for the
rest of the process (logged once).

Precision: ``z`` is formed relative to an origin ``o`` near the data (the starting point, or the input
with the largest weight), ``z = o + Σ_j w_j (x_j − o)``, and the kernels subtract before they weight:
``x_i − z = (x_i − o) − Σ_j w_j (x_j − o)``.  Rounding the weights to float32 then perturbs ``z`` on the
scale of the spread of the inputs rather than their magnitude, so distances stay accurate when all
inputs share a large offset (the pitfall of forming ``Σ_j w_j x_j`` directly).  Sums run in the inputs'
dtype within a block of 256 columns and in float64 across blocks.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from dist_llm_train.aggregation import coordinatewise
from dist_llm_train.aggregation.blocks import column_blocks
from dist_llm_train.aggregation.coordinatewise import Backend

__all__ = [
    "MAX_ROWS",
    "available",
    "combination",
    "kernel_source",
    "median_and_sq_distances",
    "on_basis",
    "sq_distances_to_combination",
    "use_compiled",
]

_log = logging.getLogger(__name__)

#: more rows than this run blocked torch ops: the unrolled network (and its compile time) grows with n.
MAX_ROWS = 64

# Weights whose sum is further than this from 1 are not an affine combination (norm-clipped rows): the
# kernels do not serve them.
_AFFINE_TOLERANCE = 1e-9

_CTYPES = {torch.float32: "float", torch.float64: "double"}
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-fno-trapping-math")

_COMPILE_FAILED = False


def use_compiled(x: Tensor, backend: Backend) -> bool:
    """Whether the one-pass kernels serve the inputs ``x`` [n, d] under ``backend``.

    They need a contiguous float32/float64 CPU tensor with 2 <= n <= :data:`MAX_ROWS`.  ``"auto"`` also
    needs at least :data:`~.coordinatewise.COMPILE_MIN_NUMEL` elements (below it the blocked ops take
    well under a second) and no earlier compile failure; ``"compiled"`` uses them whenever the layout
    allows and lets a compile failure raise.
    """
    if backend == "eager":
        return False
    n = int(x.shape[0])
    if not (
        x.device.type == "cpu"
        and x.dtype in _CTYPES
        and x.dim() == 2
        and x.is_contiguous()
        and 2 <= n <= MAX_ROWS
    ):
        return False
    return backend == "compiled" or (not _COMPILE_FAILED and x.numel() >= coordinatewise.COMPILE_MIN_NUMEL)


def available() -> bool:
    """False once building the kernels has failed in this process (the callers then use blocked ops)."""
    return not _COMPILE_FAILED


# ----------------------------------------------------------------------------------------------- source

_TEMPLATE = r"""
#include <stdint.h>
#include <string.h>

typedef @T@ T;
typedef T V __attribute__((vector_size(64)));
enum { N = @N@, W = 64 / sizeof(T), B = 256 };

static inline V ld(const T* p) { V v; memcpy(&v, p, sizeof v); return v; }
static inline void st(T* p, V v) { memcpy(p, &v, sizeof v); }
// plain compare-and-select: one instruction per comparator (NaN gives garbage, caught by the distances)
static inline V lo(V a, V b) { return a < b ? a : b; }
static inline V hi(V a, V b) { return a < b ? b : a; }
static inline T hsum(V a) { T s = 0; for (int l = 0; l < W; ++l) s += a[l]; return s; }

// W columns starting at c, the last group of a range zero-padded (only valid lanes are ever stored)
static inline V load(const T* p, int64_t valid) {
  if (valid >= W) return ld(p);
  T buf[W] = {0};
  memcpy(buf, p, valid * sizeof(T));
  return ld(buf);
}
static inline void store(T* p, V v, int64_t valid) {
  if (valid >= W) { st(p, v); return; }
  T buf[W];
  st(buf, v);
  memcpy(p, buf, valid * sizeof(T));
}

static inline V median(V* v) {
@NETWORK@
}

// sums[i] += ||x_i - ref||^2 over columns [b, e), ref given per column relative to the origin o:
// x_i - ref = (x_i - o) - r, with o = nullptr meaning zero
static inline void add_sq(const T* x, int64_t d, int64_t b, int64_t e, const T* o, const T* r, double* sums) {
  for (int i = 0; i < N; ++i) {
    const T* xi = x + i * d;
    V a0 = {0}, a1 = {0};
    int64_t c = b;
    for (; c + 2 * W <= e; c += 2 * W) {
      V q0 = ld(xi + c), q1 = ld(xi + c + W);
      if (o) { q0 -= ld(o + c); q1 -= ld(o + c + W); }
      q0 -= ld(r + (c - b)); q1 -= ld(r + (c - b) + W);
      a0 += q0 * q0; a1 += q1 * q1;
    }
    T s = hsum(a0 + a1);
    for (; c < e; ++c) {
      T q = xi[c] - (o ? o[c] : T(0)) - r[c - b];
      s += q * q;
    }
    sums[i] += s;
  }
}

// dz = sum_j w_j (x_j - o) over columns [b, e)
static inline void step(const T* x, int64_t d, int64_t b, int64_t e, const T* w, const T* o, T* dz) {
  for (int64_t c = b; c < e; c += W) {
    int64_t valid = e - c;
    V ov = load(o + c, valid), s = {0};
    for (int j = 0; j < N; ++j) s += w[j] * (load(x + j * d + c, valid) - ov);
    store(dz + (c - b), s, valid);
  }
}

extern "C" {

// m[c0:c1] = coordinate median; sums[i] += ||x_i - m||^2 over the range
void median_distances(const T* x, int64_t d, int64_t c0, int64_t c1, T* m, double* sums) {
  for (int64_t b = c0; b < c1; b += B) {
    int64_t e = b + B < c1 ? b + B : c1;
    for (int64_t c = b; c < e; c += W) {
      int64_t valid = e - c;
      V v[N];
      for (int i = 0; i < N; ++i) v[i] = load(x + i * d + c, valid);
      store(m + c, median(v), valid);
    }
    add_sq(x, d, b, e, nullptr, m + b, sums);
  }
}

// sums[i] += ||x_i - z||^2 over the range, z = o + sum_j w_j (x_j - o); w = nullptr means z = o
void distances(const T* x, int64_t d, int64_t c0, int64_t c1, const T* w, const T* o, double* sums) {
  T dz[B];
  for (int64_t b = c0; b < c1; b += B) {
    int64_t e = b + B < c1 ? b + B : c1;
    if (!w) {
      add_sq(x, d, b, e, nullptr, o + b, sums);
      continue;
    }
    step(x, d, b, e, w, o, dz);
    add_sq(x, d, b, e, o, dz, sums);
  }
}

// z[c0:c1] = o + sum_j w_j (x_j - o)
void combination(const T* x, int64_t d, int64_t c0, int64_t c1, const T* w, const T* o, T* z) {
  T dz[B];
  for (int64_t b = c0; b < c1; b += B) {
    int64_t e = b + B < c1 ? b + B : c1;
    step(x, d, b, e, w, o, dz);
    for (int64_t c = b; c < e; ++c) z[c] = o[c] + dz[c - b];
  }
}

}
"""


def _network(n: int) -> str:
    """The median's comparator network over the wires ``v[0..n-1]`` as C++ statements."""
    ranks = coordinatewise.median_ranks(n)
    lines = []
    for a, b, need_min, need_max in coordinatewise.pruned_network(n, ranks):
        if need_min and need_max:
            lines.append(f"  {{ V t = lo(v[{a}], v[{b}]); v[{b}] = hi(v[{a}], v[{b}]); v[{a}] = t; }}")
        elif need_min:
            lines.append(f"  v[{a}] = lo(v[{a}], v[{b}]);")
        else:
            lines.append(f"  v[{b}] = hi(v[{a}], v[{b}]);")
    if len(ranks) == 1:
        lines.append(f"  return v[{ranks[0]}];")
    else:  # the same arithmetic as the torch kernels: (a + b) * 0.5
        lines.append(f"  return (v[{ranks[0]}] + v[{ranks[1]}]) * T(0.5);")
    return "\n".join(lines)


@functools.cache
def kernel_source(n: int, dtype: torch.dtype) -> str:
    """The C++ source of the three kernels for n rows of ``dtype`` (float32 or float64)."""
    return _TEMPLATE.replace("@T@", _CTYPES[dtype]).replace("@N@", str(n)).replace("@NETWORK@", _network(n))


# ------------------------------------------------------------------------------------------------ build


def _cache_dir() -> Path:
    """Where built kernels are kept: ``$DIST_LLM_TRAIN_KERNEL_CACHE``, else ``$XDG_CACHE_HOME`` (or
    ``~/.cache``) ``/dist_llm_train/kernels``, created private to the user; a fresh private temporary
    directory for this process if that cannot be created (read-only home)."""
    root = os.environ.get("DIST_LLM_TRAIN_KERNEL_CACHE")
    if root:
        directory = Path(root)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        directory = Path(base) / "dist_llm_train" / "kernels"
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:
        if root:
            raise
        return _process_dir()
    # a library is loaded into this process: a directory that others can write to could hand us theirs
    info = directory.stat()
    if hasattr(os, "getuid") and (info.st_uid != os.getuid() or info.st_mode & 0o022):
        raise RuntimeError(
            f"kernel cache {directory} is not private to this user; point DIST_LLM_TRAIN_KERNEL_CACHE at a "
            "directory only you can write to"
        )
    return directory


@functools.cache
def _process_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="dist_llm_train_kernels_"))


@functools.cache
def _cpu_fingerprint() -> str:
    # -march=native builds for this CPU: a cache shared between machines must not hand one's build to another
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            info = [line for line in fh if line.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(info)))
    except OSError:
        return platform.machine() + platform.processor()


def _compiler() -> str:
    name = os.environ.get("CXX", "c++")
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"no C++ compiler found ({name!r} is not on PATH; set CXX)")
    return path


@functools.cache
def _library(n: int, dtype: torch.dtype) -> ctypes.CDLL:
    source = kernel_source(n, dtype)
    compiler = _compiler()
    key = hashlib.sha256("\0".join([source, compiler, *_FLAGS, _cpu_fingerprint()]).encode()).hexdigest()[:24]
    directory = _cache_dir()
    target = directory / f"onepass_{key}.so"
    if not target.exists():
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            src = Path(tmp) / "onepass.cpp"
            src.write_text(source)
            out = Path(tmp) / "onepass.so"
            done = subprocess.run(
                [compiler, *_FLAGS, str(src), "-o", str(out)], capture_output=True, text=True, check=False
            )
            if done.returncode != 0:
                raise RuntimeError(f"{compiler} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
            os.replace(out, target)  # atomic: concurrent processes never load a half-written file
    lib = ctypes.CDLL(str(target))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.median_distances.argtypes = [p, i64, i64, i64, p, p]
    lib.distances.argtypes = [p, i64, i64, i64, p, p, p]
    lib.combination.argtypes = [p, i64, i64, i64, p, p, p]
    for f in (lib.median_distances, lib.distances, lib.combination):
        f.restype = None
    return lib


def _load(x: Tensor, strict: bool) -> ctypes.CDLL | None:
    global _COMPILE_FAILED
    try:
        return _library(int(x.shape[0]), x.dtype)
    except Exception as exc:  # no compiler, a compiler error, an unloadable library
        if strict:
            raise
        _COMPILE_FAILED = True
        _log.warning(
            "building the one-pass aggregation kernels failed (%s: %s); CenteredClip and the geometric "
            "median use blocked torch ops from now on, about 2x slower per iteration.",
            type(exc).__name__,
            exc,
        )
        return None


# ------------------------------------------------------------------------------------------------- API


def on_basis(weights: Tensor, x: Tensor, extras: Sequence[Tensor]) -> tuple[Tensor, Tensor] | None:
    """Weights over a basis (the rows of ``x``, then ``extras``) as the kernels take them: ``(w [n], o)``.

    The combination ``Σ_k weights[k] b_k`` equals ``o + Σ_j w[j] (x_j − o)`` with the origin ``o`` the one
    extra vector with a non-zero weight if there is one (CenteredClip's start, which lies near the data),
    else the input with the largest weight (the most central one for the geometric median and
    CenteredClip).  None when the kernels cannot serve the weights: more than one extra vector used, or
    weights that do not sum to 1.
    """
    n = int(x.shape[0])
    weights = weights.detach().to(device="cpu", dtype=torch.float64)
    used = torch.nonzero(weights[n:]).flatten().tolist()
    if len(used) > 1 or abs(float(weights.sum()) - 1.0) > _AFFINE_TOLERANCE:
        return None
    w = weights[:n].clone()
    if used:
        return w, extras[used[0]]
    return w, x[int(torch.argmax(w))]


def _origin_and_weights(x: Tensor, weights: Tensor, origin: Tensor) -> tuple[Tensor, Tensor]:
    w = weights.detach().to(device="cpu", dtype=x.dtype).contiguous()
    o = origin.detach().to(device=x.device, dtype=x.dtype).contiguous()
    if w.shape != (x.shape[0],) or o.shape != (x.shape[1],):
        raise ValueError(
            f"one-pass kernels: weights {tuple(w.shape)} and origin {tuple(o.shape)} do not fit x {tuple(x.shape)}"
        )
    return w, o


def combination(x: Tensor, weights: Tensor, origin: Tensor, *, strict: bool = False) -> Tensor | None:
    """``o + Σ_j weights[j] (x_j − o)`` [d] in the dtype of ``x``, in one pass; None if the kernels could not
    be built.  Arguments as for :func:`sq_distances_to_combination`."""
    lib = _load(x, strict)
    if lib is None:
        return None
    d = int(x.shape[1])
    w, o = _origin_and_weights(x, weights, origin)
    z = torch.empty(d, dtype=x.dtype)
    column_blocks(
        d,
        _width(d),
        x.device,
        lambda: None,
        lambda _, c0, c1: lib.combination(x.data_ptr(), d, c0, c1, w.data_ptr(), o.data_ptr(), z.data_ptr()),
    )
    return z


def _width(d: int) -> int:
    """Columns per thread: one contiguous range each, a multiple of 16 so ranges start on whole groups."""
    threads = max(1, torch.get_num_threads())
    per_thread = -(-d // threads)
    return max(16, -(-per_thread // 16) * 16)


def sq_distances_to_combination(
    x: Tensor, weights: Tensor, origin: Tensor, *, strict: bool = False
) -> Tensor | None:
    """``‖x_i − z‖²`` for every row of ``x`` [n, d], ``z = o + Σ_j weights[j] (x_j − o)``, in one pass.

    Args:
        x: the inputs; check :func:`use_compiled` first.  Not modified.
        weights: [n] coefficients (float64 or any float dtype; rounded to the dtype of ``x``, in which
            the kernel works).  :func:`on_basis` turns weights over a basis into these and an origin.
        origin: ``o`` [d], a point near the data (it may be a row of ``x``).
        strict: let a build failure raise instead of returning None.

    Returns:
        [n] float64 on the CPU, or None when the kernels could not be built.  A row holding NaN or Inf
        gets a non-finite distance (so does every row if ``z`` is non-finite).
    """
    lib = _load(x, strict)
    if lib is None:
        return None
    d = int(x.shape[1])
    w, o = _origin_and_weights(x, weights, origin)
    # all weights zero (CenteredClip's first iteration, z = its start): skip forming z
    w_ptr = w.data_ptr() if bool(w.any()) else None
    return _row_sums_over_blocks(
        x,
        lambda c0, c1, out_ptr: lib.distances(x.data_ptr(), d, c0, c1, w_ptr, o.data_ptr(), out_ptr),
    )


def median_and_sq_distances(x: Tensor, *, strict: bool = False) -> tuple[Tensor, Tensor] | None:
    """The coordinate median ``m`` [d] of the rows of ``x`` and ``‖x_i − m‖²`` [n] float64, in one pass.

    ``m`` equals :func:`~.coordinatewise.coordinate_median` of ``x`` (the same pruned network and the same
    arithmetic; only a tie between ``-0.0`` and ``0.0`` may resolve to the other zero).  On a column
    holding NaN it is garbage, but then that row's distance is non-finite, so checking the distances
    checks the inputs.  Returns None when the kernels could not be built (unless ``strict``).
    """
    lib = _load(x, strict)
    if lib is None:
        return None
    d = int(x.shape[1])
    m = torch.empty(d, dtype=x.dtype)
    sq = _row_sums_over_blocks(
        x,
        lambda c0, c1, out_ptr: lib.median_distances(x.data_ptr(), d, c0, c1, m.data_ptr(), out_ptr),
    )
    return m, sq


def _row_sums_over_blocks(x: Tensor, kernel: Callable[[int, int, int], None]) -> Tensor:
    """Run ``kernel(c0, c1, out_ptr)`` over the column blocks of ``x`` [n, d]; each call writes its block's
    n float64 partial sums at ``out_ptr``.  Returns the per-row totals, summed in block order (deterministic
    for a given thread count)."""
    n, d = (int(s) for s in x.shape)
    width = _width(d)
    partial = torch.zeros(-(-d // width), n, dtype=torch.float64)
    column_blocks(
        d, width, x.device, lambda: None, lambda _, c0, c1: kernel(c0, c1, partial[c0 // width].data_ptr())
    )
    return partial.sum(dim=0)
