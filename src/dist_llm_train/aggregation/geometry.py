"""Shared geometry of one aggregation call: one centred Gram matrix, computed once, serves every stage.

Every distance-based rule (Krum, Multi-Krum, Bulyan, geometric median, CenteredClip) and the NNM
pre-aggregator only needs inner products between the n inputs, never the d-dimensional vectors
themselves.  So each call does the d-sized work once: a pass for the centre, a chunked pass that
accumulates the centred Gram matrix ``G = Xc Xcᵀ`` (float32 matmuls, float64 accumulation of the
n x n result), and at the end one pass that materialises the output as a weighted sum of the inputs.
Everything in between (neighbour search, recursive selection, Weiszfeld and clipping iterations)
happens in n x n space.

Centring matters: with the plain identity ``‖a‖² + ‖b‖² − 2a·b`` float32 loses every digit of the
distance when the inputs share a large common part (model weights, a gradient with a big mean).
Subtracting a centre first leaves distances unchanged and keeps the Gram entries on the scale of the
spread.  The mean is the default centre; when f inputs sit very far away they drag the mean with them,
so if the likely-honest core turns out to be tiny compared with its distance from the centre the Gram
matrix is recomputed about a core input (one extra pass, only in that case).

:class:`Points` describes the rows a stage sees as linear combinations of a fixed *basis* (the call's
inputs plus extra rows such as CenteredClip's starting point).  Pre-aggregators are linear maps on
those combinations (NNM and bucketing average rows, clipping scales rows), so their output's Gram
matrix is ``C G Cᵀ`` and nothing d-sized is recomputed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from dist_llm_train.aggregation import onepass
from dist_llm_train.aggregation.blocks import column_blocks
from dist_llm_train.aggregation.coordinatewise import Backend
from dist_llm_train.errors import NonFiniteError

__all__ = [
    "Basis",
    "Geometry",
    "Points",
    "all_finite",
    "centred_gram",
    "pairwise_sq_distances",
    "sq_distances_from_gram",
]

# Bytes of one column block on the CPU. Measured at n=25, d=25M (docs/RESULTS.md): 1 MiB blocks (L2-sized)
# made every blocked pass 2-3x slower than one large matmul, because a [26, 10k] Gram product is too small
# for BLAS to reach its speed and per-op overhead dominates; 64 MiB blocks brought CenteredClip from 11.6x
# to 5.5x the mean and the geometric median from 11.1x to 4.6x, while the block still fits in memory easily.
_CPU_CHUNK_BYTES = 1 << 26
_GPU_CHUNK_BYTES = 256 << 20
# Distances are trusted to about this relative error; past it the Gram matrix is recomputed about a
# better centre.  float32 unit roundoff times the ratio (squared distance of the core from the centre) /
# (squared distance inside the core) estimates the error of a Gram-derived distance.
_RECENTRE_REL_ERROR = 1e-5


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype d-sized arithmetic runs in: float64 stays float64, everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def column_chunk(rows: int, d: int, device: torch.device, itemsize: int = 4) -> int:
    """Columns per block so that a ``[rows, block]`` tensor fits the cache budget of ``device``."""
    budget = _GPU_CHUNK_BYTES if device.type != "cpu" else _CPU_CHUNK_BYTES
    return max(1, min(d, max(1024, budget // (itemsize * max(rows, 1)))))


def all_finite(t: Tensor) -> bool:
    """True when ``t`` holds no NaN or Inf.

    ``aminmax`` propagates NaN and exposes ±Inf in one reduction; it is several times faster than
    ``torch.isfinite(t).all()``, which materialises a boolean tensor.
    """
    if t.numel() == 0:
        return True
    low, high = torch.aminmax(t)
    return math.isfinite(float(low)) and math.isfinite(float(high))


def sq_distances_from_gram(gram: Tensor) -> Tensor:
    """Squared distances ``G_ii + G_jj − 2 G_ij`` from a Gram matrix, clamped at 0, diagonal exactly 0."""
    diag = gram.diagonal()
    dist = (diag[:, None] + diag[None, :] - 2.0 * gram).clamp_min_(0.0)
    dist.fill_diagonal_(0.0)
    return dist


def _gram_pass(
    x: Tensor, extras: list[Tensor], centre: Tensor | None, with_offset: bool
) -> tuple[Tensor, Tensor, Tensor | None, float | None]:
    """One blocked pass: Gram of ``[x; extras] − centre`` (float64) and optionally ``(row − centre)·centre``.

    ``centre=None`` centres on the mean of the rows of ``x``, computed block by block in the same pass
    (the mean of a column only involves that column).  Returns (gram, centre, offset, offset_sq).
    """
    n, d = x.shape
    k = len(extras)
    rows = n + k + (1 if with_offset else 0)
    wd = work_dtype(x.dtype)
    width = column_chunk(rows, d, x.device, torch.finfo(wd).bits // 8)
    mean = centre is None
    cen_full = torch.empty(d, dtype=wd, device=x.device) if centre is None else centre.to(wd)

    def make_state() -> tuple[Tensor, Tensor]:
        buf = torch.empty(rows, width, dtype=wd, device=x.device)
        return buf, torch.zeros(rows, rows, dtype=torch.float64, device=x.device)

    def step(state: tuple[Tensor, Tensor], c0: int, c1: int) -> None:
        buf, acc = state
        block = buf[:, : c1 - c0]
        xs = x[:, c0:c1]
        cen = cen_full[c0:c1]
        if mean:
            torch.mean(xs.to(wd), dim=0, out=cen)
        torch.sub(xs, cen, out=block[:n])
        for j, extra in enumerate(extras):
            torch.sub(extra[c0:c1], cen, out=block[n + j])
        if with_offset:
            block[-1].copy_(cen)
        acc += (block @ block.T).to(torch.float64)

    states = column_blocks(d, width, x.device, make_state, step)
    acc = states[0][1]
    for _, other in states[1:]:
        acc += other
    # the n x n bookkeeping lives on the CPU whatever the inputs' device: it is tiny and branchy.
    # Exact symmetry makes d(i, j) == d(j, i) bit for bit, so ties between rows are real ties.
    acc = acc.cpu()
    acc = (acc + acc.T) * 0.5
    size = n + k
    if not with_offset:
        return acc, cen_full, None, None
    return acc[:size, :size].clone(), cen_full, acc[:size, size].clone(), float(acc[size, size])


def centred_gram(x: Tensor, centre: Tensor | None = None) -> Tensor:
    """Gram matrix of the rows of ``x`` [n, d] about ``centre`` (default: their mean), as float64 [n, n].

    The d-sized work runs in float32 matmuls over column chunks (no full-size copy of ``x``); the n x n
    partial products are accumulated in float64.  Squared distances follow from
    :func:`sq_distances_from_gram`; they are exact up to float32 rounding of the centred values, however
    large an offset the rows share.
    """
    if x.dim() != 2:
        raise ValueError(f"centred_gram expects a 2-D tensor [n, d], got shape {tuple(x.shape)}")
    gram, _, _, _ = _gram_pass(x, [], centre, with_offset=False)
    return gram


def pairwise_sq_distances(x: Tensor) -> Tensor:
    """All squared Euclidean distances between the rows of ``x`` [n, d], as float64 [n, n].

    Computed from one mean-centred Gram matrix (see :func:`centred_gram`), clamped at 0 with an exactly
    zero diagonal.  Agrees with brute force to about 1e-6 relative in float32 even when all rows share an
    offset much larger than their differences.
    """
    return sq_distances_from_gram(centred_gram(x))


def _krum_like_core(dist: Tensor, core: int) -> tuple[int, Tensor]:
    """Index whose ``core − 1`` nearest others are closest in total, and those neighbours (itself first)."""
    n = dist.shape[0]
    masked = dist + torch.diag(torch.full((n,), math.inf, dtype=dist.dtype, device=dist.device))
    near = torch.sort(masked, dim=1, stable=True)
    scores = near.values[:, : core - 1].sum(dim=1)
    r = int(torch.argmin(scores))
    members = torch.cat([torch.tensor([r], device=dist.device), near.indices[r, : core - 1]])
    return r, members


@dataclass
class Geometry:
    """Inner products of the basis rows about a centre c: everything the n x n algorithms need.

    ``gram[k, l] = (b_k − c)·(b_l − c)``; ``offset[k] = (b_k − c)·c`` and ``offset_sq = ‖c‖²`` exist only
    when a stage needs raw norms or rows that are not affine combinations (norm clipping).
    """

    centre: Tensor
    gram: Tensor
    offset: Tensor | None
    offset_sq: float | None
    recentred: bool


class Basis:
    """The vectors every :class:`Points` of one call is a combination of: the inputs, then extra rows.

    Args:
        x: the inputs [n, d]; never written to.
        f: declared Byzantine count, used to pick a likely-honest core when the centre is re-chosen.
        with_offset: also compute the inner products with the centre (needed by norm clipping).
        backend: whether the output combination may use the one-pass kernel of :mod:`.onepass`
            ("eager", the default: never; "auto": for large CPU inputs; "compiled": whenever the weights
            allow).
    """

    def __init__(self, x: Tensor, f: int, with_offset: bool, backend: Backend = "eager") -> None:
        self.x = x
        self.backend = backend
        self.n = int(x.shape[0])
        self.d = int(x.shape[1])
        self.f = f
        self.with_offset = with_offset
        self.extras: list[Tensor] = []
        self.wdtype = work_dtype(x.dtype)
        self._geometry: Geometry | None = None
        self.finite_verified = False
        self.passes = 0  # d-sized passes over the inputs, reported in diagnostics

    @property
    def size(self) -> int:
        return self.n + len(self.extras)

    @property
    def has_geometry(self) -> bool:
        return self._geometry is not None

    @property
    def computed_geometry(self) -> Geometry | None:
        """The geometry if some stage already asked for it, else None (never computes it)."""
        return self._geometry

    # ----------------------------------------------------------------- finiteness
    def nonfinite_rows(self) -> list[int]:
        """Indices of input rows holding NaN or Inf (a full scan)."""
        bad = ~torch.isfinite(self.x).all(dim=1)
        return [int(i) for i in torch.nonzero(bad).flatten().tolist()]

    def raise_nonfinite(self, what: str) -> None:
        """Raise :class:`NonFiniteError` naming the bad rows; if none are bad, the arithmetic overflowed."""
        rows = self.nonfinite_rows()
        if rows:
            shown = ", ".join(str(r) for r in rows[:10]) + (", ..." if len(rows) > 10 else "")
            raise NonFiniteError(
                f"{what} got NaN or Inf in {len(rows)} of {self.n} input rows (rows {shown}); "
                "drop or repair those updates before aggregating."
            )
        low, high = torch.aminmax(self.x)
        big = max(abs(float(low)), abs(float(high)))
        raise NonFiniteError(
            f"{what} overflowed {self.x.dtype} on finite inputs (largest |value| {big:.3g}); "
            "scale the updates down or aggregate in float64."
        )

    def verify_rowwise(self, values: Tensor, what: str) -> None:
        """Mark the inputs finite from per-row reductions over all their entries (norms, distances)."""
        if all_finite(values):
            self.finite_verified = True
        else:
            self.raise_nonfinite(what)

    def ensure_finite(self, what: str) -> None:
        """Check the inputs unless an earlier pass already did (one pass of row sums).

        A row holding NaN or Inf has a NaN or Inf sum; a non-finite sum of a finite row (overflow) is told
        apart by scanning the flagged case fully.
        """
        if self.finite_verified:
            return
        sums = self.x.sum(dim=1, dtype=self.wdtype)
        self.passes += 1
        if not all_finite(sums) and self.nonfinite_rows():
            self.raise_nonfinite(what)
        self.finite_verified = True

    # ----------------------------------------------------------------- geometry
    def geometry(self, what: str) -> Geometry:
        """The centred Gram matrix of the basis, computed on first use (one or two chunked passes)."""
        if self._geometry is None:
            gram, centre, offset, offset_sq = _gram_pass(self.x, self.extras, None, self.with_offset)
            self.passes += 1
            # a NaN or Inf anywhere in a column makes that column's mean NaN or Inf
            if not all_finite(centre):
                self.raise_nonfinite(what)
            self.finite_verified = True
            recentred = False
            r = self._recentre_index(gram)
            if r is not None:
                gram, centre, offset, offset_sq = _gram_pass(
                    self.x, self.extras, self.x[r].to(self.wdtype), self.with_offset
                )
                self.passes += 1
                recentred = True
            self._geometry = Geometry(centre, gram, offset, offset_sq, recentred)
        return self._geometry

    def _recentre_index(self, gram: Tensor) -> int | None:
        """A core input to centre on when the mean sits so far from the core that distances lose digits."""
        n = self.n
        if n < 3:
            return None
        gx = gram[:n, :n]
        dist = sq_distances_from_gram(gx)
        core = max(2, n - self.f)
        r, members = _krum_like_core(dist, core)
        spread = float(dist[r, members[1:]].median())
        scale = float(gx.diagonal()[members].max())
        eps = torch.finfo(self.wdtype).eps
        if scale <= 0.0 or scale * eps <= _RECENTRE_REL_ERROR * spread:
            return None
        return r

    def add_extra(self, v: Tensor) -> int:
        """Append ``v`` [d] to the basis (extending the Gram matrix by one pass if it exists); its index."""
        v = v.to(device=self.x.device)
        self.extras.append(v)
        if self._geometry is not None:
            self._extend_geometry(v)
        return self.size - 1

    def _extend_geometry(self, v: Tensor) -> None:
        geo = self._geometry
        assert geo is not None
        old = self.extras[:-1]
        n, d, wd = self.n, self.d, self.wdtype
        rows = n + len(old) + (1 if geo.offset is not None else 0)
        width = column_chunk(rows, d, self.x.device, torch.finfo(wd).bits // 8)

        def make_state() -> tuple[Tensor, Tensor, Tensor]:
            buf = torch.empty(rows + 1, width, dtype=wd, device=self.x.device)
            return buf, torch.zeros(rows, dtype=torch.float64), torch.zeros((), dtype=torch.float64)

        def step(state: tuple[Tensor, Tensor, Tensor], c0: int, c1: int) -> None:
            buf, cross, vv = state
            block = buf[:rows, : c1 - c0]
            vc = buf[rows, : c1 - c0]
            cen = geo.centre[c0:c1]
            torch.sub(self.x[:, c0:c1], cen, out=block[:n])
            for j, extra in enumerate(old):
                torch.sub(extra[c0:c1], cen, out=block[n + j])
            if geo.offset is not None:
                block[-1].copy_(cen)
            torch.sub(v[c0:c1], cen, out=vc)
            cross += (block @ vc).to(device="cpu", dtype=torch.float64)
            vv += torch.dot(vc, vc).to(device="cpu", dtype=torch.float64)

        states = column_blocks(d, width, self.x.device, make_state, step)
        cross = sum((st[1] for st in states[1:]), states[0][1])
        vv = sum((st[2] for st in states[1:]), states[0][2])
        self.passes += 1
        k = n + len(old)
        gram = torch.empty(k + 1, k + 1, dtype=torch.float64)
        gram[:k, :k] = geo.gram
        gram[:k, k] = cross[:k]
        gram[k, :k] = cross[:k]
        gram[k, k] = vv
        geo.gram = gram
        if geo.offset is not None:
            geo.offset = torch.cat([geo.offset, cross[k:]])

    # ----------------------------------------------------------------- d-sized helpers
    def block(self, c0: int, c1: int) -> Tensor:
        """Columns ``c0:c1`` of all basis rows as one [size, c] tensor in the work dtype (a copy)."""
        parts = [self.x[:, c0:c1].to(self.wdtype)]
        parts += [e[c0:c1].to(self.wdtype)[None] for e in self.extras]
        return torch.cat(parts) if len(parts) > 1 else parts[0].clone()

    def combine(self, weights: Tensor) -> Tensor:
        """``Σ_k weights[k] · b_k`` [d] in the inputs' dtype; a single one-hot weight returns an exact copy."""
        weights = weights.cpu()
        nz = torch.nonzero(weights).flatten()
        if nz.numel() == 1 and float(weights[nz[0]]) == 1.0:
            k = int(nz[0])
            row = self.x[k] if k < self.n else self.extras[k - self.n]
            return row.to(self.x.dtype, copy=True)
        w = weights.to(device=self.x.device)
        self.passes += 1
        no_extras = len(self.extras) == 0 or not bool(weights[self.n :].any())
        if no_extras and bool((weights[: self.n] == 1.0 / self.n).all()):
            # the plain mean: a reduction is faster than a matrix-vector product with equal weights
            return self.x.mean(dim=0, dtype=self.wdtype).to(self.x.dtype)
        arguments = (
            onepass.on_basis(weights, self.x, self.extras)
            if onepass.use_compiled(self.x, self.backend)
            else None
        )
        if arguments is not None:
            # one loop over the columns: about 20% faster than the blocked matrix-vector products below
            fused = onepass.combination(self.x, *arguments, strict=self.backend == "compiled")
            if fused is not None:
                return fused
        wd = self.wdtype
        wx = w[: self.n].to(wd)[None]
        extras = [(float(w[self.n + j]), e) for j, e in enumerate(self.extras) if float(w[self.n + j]) != 0.0]
        out = torch.empty(self.d, dtype=wd, device=self.x.device)
        width = column_chunk(self.n, self.d, self.x.device, torch.finfo(wd).bits // 8)

        def step(_: None, c0: int, c1: int) -> None:
            # blocks in cache, spread over threads: faster than one large matrix-vector product here
            dst = out[c0:c1]
            torch.mm(wx, self.x[:, c0:c1].to(wd), out=dst[None])
            for weight, extra in extras:
                dst.add_(extra[c0:c1].to(wd), alpha=weight)

        column_blocks(self.d, width, self.x.device, lambda: None, step)
        return out.to(self.x.dtype)


class Points:
    """The m rows one stage sees, each a linear combination of the :class:`Basis` rows.

    ``coef`` [m, K] (float64) holds the combinations; ``None`` means the inputs themselves.  ``scale``
    [m] marks the cheap case "inputs scaled row-wise" (norm clipping of the raw inputs).  ``row_sums``
    is ``None`` when every combination is affine (coefficients sum to 1: inputs, averages of inputs),
    which is what lets distances ignore the centre entirely.
    """

    def __init__(
        self,
        basis: Basis,
        coef: Tensor | None = None,
        scale: Tensor | None = None,
        row_sums: Tensor | None = None,
    ) -> None:
        self.basis = basis
        self.coef = coef
        self.scale = scale
        self.row_sums = row_sums
        if coef is not None:
            self.count = int(coef.shape[0])
        elif scale is not None:
            self.count = int(scale.shape[0])
        else:
            self.count = basis.n

    @property
    def is_inputs(self) -> bool:
        """True when the points are exactly the inputs (no pre-aggregation)."""
        return self.coef is None and self.scale is None

    def coefficients(self) -> Tensor:
        """The [m, K] float64 coefficient matrix over the current basis (padded if the basis grew), CPU."""
        b = self.basis
        dev = torch.device("cpu")
        if self.coef is None:
            full = torch.zeros(self.count, b.size, dtype=torch.float64, device=dev)
            diag = self.scale if self.scale is not None else torch.ones(b.n, dtype=torch.float64, device=dev)
            full[:, : b.n] = torch.diag(diag)
            return full
        if self.coef.shape[1] < b.size:
            pad = torch.zeros(self.count, b.size - self.coef.shape[1], dtype=torch.float64, device=dev)
            return torch.cat([self.coef, pad], dim=1)
        return self.coef

    # ----------------------------------------------------------------- n x n geometry
    def gram(self, what: str) -> Tensor:
        """[m, m] float64 inner products of ``(point − centre)``: the only thing distance rules need."""
        geo = self.basis.geometry(what)
        if self.is_inputs:
            return geo.gram[: self.count, : self.count]
        c = self.coefficients()
        h = c @ geo.gram @ c.T
        if self.row_sums is not None:
            # point − centre = Σ c_k (b_k − centre) + (Σ c_k − 1)·centre: the second term is real geometry
            # (a clipped row is shorter), not cancellation, so it is added from the exact offsets.
            if geo.offset is None or geo.offset_sq is None:
                raise RuntimeError("non-affine points need a geometry computed with offsets")
            a = self.row_sums - 1.0
            u = c @ geo.offset
            h = (
                h
                + u[:, None] * a[None, :]
                + a[:, None] * u[None, :]
                + geo.offset_sq * a[:, None] * a[None, :]
            )
        return (h + h.T) * 0.5

    def sq_distances(self, what: str) -> Tensor:
        """[m, m] float64 squared distances between the points (clamped at 0, zero diagonal)."""
        return sq_distances_from_gram(self.gram(what))

    def sq_norms(self, what: str) -> Tensor:
        """[m] float64 squared Euclidean norms of the points."""
        b = self.basis
        geo = b.computed_geometry
        if geo is not None and geo.offset is not None and geo.offset_sq is not None:
            h = self.gram(what).diagonal()
            c = self.coefficients()
            sums = self.row_sums if self.row_sums is not None else torch.ones_like(h)
            # ‖p‖² = ‖p − c‖² + 2 (p − c)·c + ‖c‖², with (p − c)·c = Σ c_k offset_k + (Σ c_k − 1)‖c‖²
            return (h + 2.0 * (c @ geo.offset + (sums - 1.0) * geo.offset_sq) + geo.offset_sq).clamp_min(0.0)
        out = self._row_sq_sums(None, None)
        if self.coef is None:
            b.verify_rowwise(out, what)
        return out

    # ----------------------------------------------------------------- d-sized access
    def chunks(self, rows: Tensor | None = None) -> Iterator[tuple[int, int, Tensor]]:
        """Yield ``(c0, c1, block)``: columns c0:c1 of the selected points in the work dtype.

        A block may be a view of the inputs: read it, never write to it.
        """
        b = self.basis
        dev = b.x.device
        rows_cpu = None if rows is None else rows.cpu()
        rows_dev = None if rows is None else rows.to(dev)
        m = self.count if rows is None else int(rows.numel())
        chunk = column_chunk(max(m, b.size), b.d, dev)
        coef = None
        if self.coef is not None:
            full = self.coefficients()
            coef = (full if rows_cpu is None else full[rows_cpu]).to(device=dev, dtype=b.wdtype)
        scale = None
        if self.scale is not None:
            sc = self.scale if rows_cpu is None else self.scale[rows_cpu]
            scale = sc.to(device=dev, dtype=b.wdtype)[:, None]
        for c0 in range(0, b.d, chunk):
            c1 = min(b.d, c0 + chunk)
            if coef is not None:
                yield c0, c1, coef @ b.block(c0, c1)
                continue
            xs = b.x[:, c0:c1] if rows_dev is None else b.x[:, c0:c1].index_select(0, rows_dev)
            blk = xs.to(b.wdtype)
            if scale is not None:
                blk = blk * scale
            yield c0, c1, blk

    def dense(self) -> Tensor:
        """The points as an [m, d] tensor in the inputs' dtype (the inputs themselves when unmixed)."""
        b = self.basis
        if self.is_inputs:
            return b.x
        b.passes += 1
        if self.coef is None and self.scale is not None:
            return b.x * self.scale.to(device=b.x.device, dtype=b.x.dtype)[:, None]
        out = torch.empty(self.count, b.d, dtype=b.x.dtype, device=b.x.device)
        for c0, c1, blk in self.chunks():
            out[:, c0:c1] = blk
        return out

    def combine(self, weights: Tensor) -> tuple[Tensor, Tensor]:
        """``Σ_i weights[i] · point_i``: the vector [d] and the same weights expressed on the basis [K]."""
        w = weights.to(device="cpu", dtype=torch.float64)
        if self.is_inputs:
            basis_w = torch.zeros(self.basis.size, dtype=torch.float64)
            basis_w[: self.count] = w
        else:
            basis_w = self.coefficients().T @ w
        return self.basis.combine(basis_w), basis_w

    def sq_distances_to(self, z: Tensor, what: str) -> Tensor:
        """[m] float64 squared distances from every point to the vector ``z`` [d]: one d-sized pass."""
        out = self._row_sq_sums(z, None)
        self._verify(out, what)
        return out

    def sq_distances_to_combination(self, basis_weights: Tensor, what: str) -> Tensor:
        """[m] float64 squared distances to ``z = Σ_k basis_weights[k] b_k``, without materialising ``z``.

        ``z`` is formed block by block while the block is in cache, so an iteration of a direct-mode rule
        (new iterate, then distances to it) reads the data once instead of twice.
        """
        out = self._row_sq_sums(None, basis_weights)
        self._verify(out, what)
        return out

    def _verify(self, sq: Tensor, what: str) -> None:
        b = self.basis
        if self.coef is None and not b.finite_verified:
            b.verify_rowwise(sq[: b.n], what)

    def _row_sq_sums(self, z: Tensor | None, combination: Tensor | None) -> Tensor:
        """``Σ_k (p_ik − z_k)²`` for every point, blocked and threaded; float64 on the CPU.

        ``z`` is a vector, or ``Σ_k combination[k] b_k`` built per block, or (both None) zero.
        """
        b = self.basis
        wd = b.wdtype
        m = self.count
        dev = b.x.device
        zw = None if z is None else z.to(device=dev, dtype=wd)
        comb_x: Tensor | None = None
        comb_e: list[tuple[float, Tensor]] | None = None
        if combination is not None:
            comb = combination.to(torch.float64)
            # an iterate sitting on an extra row (CenteredClip's first step) needs no product with x
            comb_x = comb[: b.n].to(device=dev, dtype=wd) if bool(comb[: b.n].any()) else None
            comb_e = [
                (float(comb[b.n + j]), e) for j, e in enumerate(b.extras) if float(comb[b.n + j]) != 0.0
            ]
        coef = None if self.coef is None else self.coefficients().to(device=dev, dtype=wd)
        scale = None if self.scale is None else self.scale.to(device=dev, dtype=wd)[:, None]
        width = column_chunk(max(m, b.size), b.d, dev, torch.finfo(wd).bits // 8)

        def make_state() -> tuple[Tensor, Tensor, Tensor]:
            buf = torch.empty(m, width, dtype=wd, device=dev)
            return buf, torch.empty(width, dtype=wd, device=dev), torch.zeros(m, dtype=torch.float64)

        def step(state: tuple[Tensor, Tensor, Tensor], c0: int, c1: int) -> None:
            buf, zbuf, acc = state
            out = buf[:, : c1 - c0]
            target = None if zw is None else zw[c0:c1]
            if comb_e is not None:
                target = zbuf[: c1 - c0]
                if comb_x is not None:
                    torch.mm(comb_x[None], b.x[:, c0:c1].to(wd), out=target[None])
                else:
                    target.zero_()
                for weight, extra in comb_e:
                    target.add_(extra[c0:c1].to(wd), alpha=weight)
            rows = b.x[:, c0:c1]
            if coef is not None:
                torch.mm(coef, b.block(c0, c1), out=out)
                rows = out
            elif scale is not None:
                torch.mul(rows, scale, out=out)
                rows = out
            if target is not None:
                # the inputs are only read: subtract into the buffer (in place once it holds a copy)
                torch.sub(rows, target, out=out)
                rows = out
            # a float32 norm per block (one fused op), squared and summed in float64 across blocks
            norms = torch.linalg.vector_norm(rows, dim=1, dtype=wd)
            acc += norms.to(device="cpu", dtype=torch.float64).square()

        states = column_blocks(b.d, width, dev, make_state, step)
        b.passes += 1
        return sum((st[2] for st in states[1:]), states[0][2])

    # ----------------------------------------------------------------- derived point sets
    def mixed(self, mixing: Tensor, affine: bool) -> Points:
        """Points ``mixing @ self`` (mixing [m', m]); ``affine`` says every row of ``mixing`` sums to 1."""
        mixing = mixing.to(device="cpu", dtype=torch.float64)
        coef = mixing @ self.coefficients()
        row_sums = None
        if self.row_sums is not None or not affine:
            current = self.row_sums
            if current is None:
                current = torch.ones(self.count, dtype=torch.float64, device=mixing.device)
            row_sums = mixing @ current.to(mixing.device)
        return Points(self.basis, coef=coef, row_sums=row_sums)

    def scaled(self, factors: Tensor) -> Points:
        """Points scaled row-wise by ``factors`` [m] (kept cheap when the points are the raw inputs)."""
        factors = factors.to(device="cpu", dtype=torch.float64)
        current = self.row_sums if self.row_sums is not None else torch.ones_like(factors)
        if self.coef is None:
            base = self.scale if self.scale is not None else torch.ones_like(factors)
            return Points(self.basis, scale=base * factors, row_sums=current * factors)
        return Points(self.basis, coef=self.coef * factors[:, None], row_sums=current * factors)

    def with_extra(self, v: Tensor) -> Points:
        """These points followed by ``v`` [d] as one more point (``v`` joins the basis)."""
        k = self.basis.add_extra(v)
        coef = self.coefficients()
        last = torch.zeros(1, self.basis.size, dtype=torch.float64)
        last[0, k] = 1.0
        row_sums = None
        if self.row_sums is not None:
            row_sums = torch.cat([self.row_sums, torch.ones(1, dtype=torch.float64)])
        return Points(self.basis, coef=torch.cat([coef, last]), row_sums=row_sums)
