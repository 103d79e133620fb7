"""Instance-level K-means for part proposals (PartDistillation, Sec. 3.1).

Every object mask yields one small clustering problem: the ``n_i`` pixel
features (``d``-dim, taken at stride 8) inside the mask are clustered into
``k`` part proposals.  A dataset has millions of such problems, each tiny
(a few thousand points, ``k`` around 4), so per-call overhead dominates a naive
per-instance loop.  Two backends share one interface:

``backend="torch"`` (default)
    Batched Lloyd iterations in pure torch (CPU or CUDA, no other dependency).
    Ragged instances are sorted by size and zero-padded into ``(B, n_max, d)``
    chunks bounded by ``max_batch_elems``; every step is a handful of batched
    kernels per chunk instead of a Python loop over instances x iterations.
    On CPU the cost is memory traffic and per-kernel overhead, not FLOPs, so
    work that cannot change the result is skipped:

    * an instance stops as soon as an assignment changes no label (Lloyd's
      fixed point: further iterations would be exact no-ops) or, like
      sklearn, when its centroids move less than ``tol``;
    * Hamerly's distance bounds certify most assignments without reading the
      features; only uncertified points are re-scored (exact: certified
      points provably keep their label);
    * centroid sums are updated from the points that changed cluster only;
    * coarse-to-fine: Lloyd first runs on ~``coarse_points`` evenly spaced
      points per instance (like faiss' subsampling, but as a start, not the
      answer); at most ``refine_iters`` full-data iterations follow.  With
      ``coarse_points=None`` (or ``refine_iters=None``) the full data is
      iterated to convergence / ``iters``; with ``tol=0`` as well, the
      result is exactly that of plain Lloyd from the same seeds.

    Results are deterministic for a seed (bit for bit on CPU with a fixed
    thread count; CUDA's atomic ``index_add_`` may change the last bits) and
    independent of how instances are batched, up to float rounding.

``backend="faiss"``
    A per-instance ``faiss.Kmeans`` loop (GPU when faiss has GPU support and
    CUDA is present).  Kept as the reference implementation and for
    cross-checking; the final labels and the objective are computed with the
    same definitions as the torch backend, so the two are comparable.

Objective (same definition for both backends, for the returned centroids and
labels, where the labels are the assignment to the returned centroids; lower
is better for every metric):

* ``"l2"``:     ``sum_i ||x_i - c_{l_i}||^2``
* ``"cosine"``: ``sum_i (1 - cos(x_i, c_{l_i}))`` -- spherical k-means on
  L2-normalised features with renormalised centroids.
* ``"dot"``:    ``-sum_i <x_i, c_{l_i}>`` -- assignment by the largest inner
  product with mean centroids.  This is what the reference does for the
  full-resolution assignment; note that Lloyd iterations do not monotonically
  decrease this objective, it is reported for completeness.

Instances with ``n_i < k`` points get ``n_i`` clusters (one per point, no
iterations); instances with ``n_i == 0`` get an empty result (``(0, d)``
centroids, ``(0,)`` labels, objective ``0.0``).  Everything else gets exactly
``k`` centroids; a cluster can only stay empty when an instance has fewer than
``k`` distinct points.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

__all__ = ["KMeansResult", "assign", "kmeans"]

Metric = Literal["cosine", "l2", "dot"]
Backend = Literal["torch", "faiss"]
Init = Literal["k-means++", "farthest"]
ArrayLike = np.ndarray | torch.Tensor

_METRICS = ("cosine", "l2", "dot")
_EPS = 1e-12


@dataclass
class KMeansResult:
    """Clustering of one instance.

    Attributes:
        centroids: ``(k_i, d)`` float32, ``k_i = min(k, n_i)``.  For
            ``metric="cosine"`` the centroids are unit-norm.  Same container
            type as the instance's input (numpy array, or tensor on the input
            tensor's device).
        labels: ``(n_i,)`` int64 cluster index in ``[0, k_i)`` per point.
        objective: see the module docstring; lower is better.
        n_iter: number of full-data centroid updates performed
            (``<= iters``; smaller when the instance converged early; the
            torch backend's coarse stage is not counted).
    """

    centroids: ArrayLike
    labels: ArrayLike
    objective: float
    n_iter: int = 0


# --------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------


def kmeans(
    features: Sequence[ArrayLike],
    k: int = 4,
    metric: Metric = "cosine",
    iters: int = 20,
    seed: int = 0,
    backend: Backend = "torch",
    device: str | torch.device | None = None,
    *,
    init: Init = "k-means++",
    max_batch_elems: int = 1 << 22,
    coarse_points: int | None = 256,
    refine_iters: int | None = 4,
    tol: float = 1e-4,
    max_points_per_centroid: int | None = None,
    faiss_gpu: bool | None = None,
) -> list[KMeansResult]:
    """Cluster each instance's features independently into ``k`` clusters.

    Args:
        features: one ``(n_i, d)`` float array/tensor per instance (``d``
            shared, ``n_i`` may be 0).  Converted to float32.
        k: clusters per instance.
        metric: ``"cosine"`` | ``"l2"`` | ``"dot"`` (see module docstring).
        iters: maximum number of Lloyd iterations (assignment + update).
        seed: seeds the initialisation.  Every instance draws from the same
            random stream, so an instance's result does not depend on which
            other instances are in the call (it equals solving it alone, up
            to float rounding of differently shaped batched matmuls).
        backend: ``"torch"`` (batched) or ``"faiss"`` (per-instance loop).
        device: torch device for the torch backend (default: the first
            tensor input's device, else CPU).  Ignored by faiss.
        init: torch backend only.  ``"k-means++"`` is sklearn's greedy
            k-means++ (``2 + log k`` candidates per centre);
            ``"farthest"`` is deterministic farthest-point seeding from a
            seeded random first point.
        max_batch_elems: torch backend only.  Upper bound on
            ``instances x n_max x d`` per chunk, i.e. on the padded feature
            buffer (float32); peak memory is about ``8 * max_batch_elems``
            bytes.  A single instance larger than this is solved alone.
        coarse_points: torch backend only.  Instances with more than twice
            this many points are first clustered (seeding + up to ``iters``
            Lloyd iterations) on every ``n // coarse_points``-th point; the
            result seeds the full-data iterations.  ``None`` seeds and
            iterates on the full data directly.
        refine_iters: torch backend only.  Cap on the full-data iterations
            that follow the coarse stage (``None``: ``iters``).  The coarse
            solution is already near a fixed point; the remaining full-data
            iterations mostly shuffle boundary points (objective changes
            ~1e-4 relative) while each costs a pass over all features.
        tol: torch backend only.  sklearn's stopping rule: stop an instance
            once the squared centroid shift is ``<= tol * (mean per-feature
            variance)``.  ``0`` runs every instance to its exact fixed point
            (or ``iters``).
        max_points_per_centroid: faiss only.  ``None`` (default) disables
            faiss' subsampling so that all points are used, as in the torch
            backend; ``256`` restores faiss' default behaviour (train on at
            most ``256 * k`` random points).  The faiss backend seeds with
            faiss' k-means++ when the installed faiss has it (>= 1.12),
            else with faiss' default random sampling.
        faiss_gpu: faiss only.  ``None`` = use the GPU when faiss was built
            with GPU support and CUDA is available.

    Returns:
        One :class:`KMeansResult` per instance, in input order.
    """
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    if init not in ("k-means++", "farthest"):
        raise ValueError(f"unknown init {init!r}")
    if len(features) == 0:
        return []

    dims = {int(f.shape[1]) for f in features if f.ndim == 2}
    if any(f.ndim != 2 for f in features) or len(dims) != 1:
        raise ValueError("features must all be 2-D (n_i, d) with the same d")

    if backend == "torch":
        dev = torch.device(device) if device is not None else _default_device(features)
        xs = [_as_tensor(f, dev) for f in features]
        cents, labels, objs, n_iter = _kmeans_torch(
            xs, k, metric, iters, seed, init, max_batch_elems, coarse_points, tol, refine_iters
        )
    elif backend == "faiss":
        xs_np = [_as_numpy(f) for f in features]
        cents, labels, objs, n_iter = _kmeans_faiss(xs_np, k, metric, iters, seed, max_points_per_centroid, faiss_gpu)
    else:
        raise ValueError(f"backend must be 'torch' or 'faiss', got {backend!r}")

    return [
        KMeansResult(
            centroids=_like(c, f),
            labels=_like(lab, f),
            objective=float(o),
            n_iter=int(it),
        )
        for c, lab, o, it, f in zip(cents, labels, objs, n_iter, features, strict=True)
    ]


def assign(
    features: ArrayLike,
    centroids: ArrayLike,
    metric: Metric = "cosine",
    *,
    chunk_size: int = 1 << 16,
) -> ArrayLike:
    """Assign every feature to its nearest centroid.

    Used for the full-resolution assignment: the reference clusters stride-8
    features and labels each full-resolution pixel by the argmax of the dot
    product with the centroids.  For ``metric="cosine"`` both sides are
    L2-normalised first (argmax cosine); ``"dot"`` is the raw argmax dot
    product; ``"l2"`` is the argmin Euclidean distance.  Ties go to the lowest
    centroid index, as in :func:`kmeans`.

    Args:
        features: ``(n, d)`` float array/tensor.
        centroids: ``(k, d)`` float array/tensor.
        metric: as in :func:`kmeans`.
        chunk_size: rows processed at once, bounding the ``(chunk, k)``
            score buffer.

    Returns:
        ``(n,)`` int64 labels, numpy if ``features`` is numpy, else a tensor on
        ``features``' device.
    """
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
    dev = features.device if isinstance(features, torch.Tensor) else torch.device("cpu")
    x = _as_tensor(features, dev)
    c = _as_tensor(centroids, dev)
    if x.ndim != 2 or c.ndim != 2 or x.shape[1] != c.shape[1]:
        raise ValueError("expected features (n, d) and centroids (k, d)")
    if c.shape[0] == 0:
        if x.shape[0]:
            raise ValueError("cannot assign points to zero centroids")
        return _like(torch.zeros(0, dtype=torch.int64, device=dev), features)
    if metric == "cosine":
        c = _normalize(c)
    out = torch.empty(x.shape[0], dtype=torch.int64, device=dev)
    for s in range(0, x.shape[0], chunk_size):
        xb = x[s : s + chunk_size]
        if metric == "cosine":
            xb = _normalize(xb)
        bias = _score_bias(c, metric)
        sc = xb @ c.T if bias is None else torch.addmm(bias[None, :], xb, c.T)
        out[s : s + chunk_size] = _top2(sc.T.contiguous())[1]
    return _like(out, features)


# --------------------------------------------------------------------------
# torch backend
# --------------------------------------------------------------------------


class _Workspace:
    """Named flat buffers reused across chunks.

    A fresh multi-megabyte CPU allocation is page-faulted on first touch,
    which costs as much as a pass over the data; reusing the same memory for
    every chunk avoids paying that per chunk.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self.bufs.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = torch.empty(max(numel, 1), dtype=dtype, device=self.device)
            self.bufs[name] = buf
        return buf[:numel].view(shape)


def _kmeans_torch(
    xs: list[torch.Tensor],
    k: int,
    metric: str,
    iters: int,
    seed: int,
    init: str,
    max_batch_elems: int,
    coarse_points: int | None,
    tol: float,
    refine_iters: int | None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[float], list[int]]:
    m = len(xs)
    d = xs[0].shape[1]
    dev = xs[0].device
    cents: list = [None] * m
    labels: list = [None] * m
    objs = [0.0] * m
    n_iter = [0] * m

    big: list[int] = []
    for i, x in enumerate(xs):
        n = x.shape[0]
        if n >= k and n > 0:
            big.append(i)
            continue
        # Too few points: every point is its own cluster, nothing to iterate.
        xc = _normalize(x) if metric == "cosine" else x
        cents[i] = xc.clone()
        labels[i] = torch.arange(n, dtype=torch.int64, device=dev)
        objs[i] = -float((xc.double() * xc.double()).sum()) if metric == "dot" else 0.0

    # Sorting by size keeps padding waste low; the stable sort keeps chunking
    # deterministic.
    big.sort(key=lambda i: -xs[i].shape[0])

    # Coarse-to-fine: Lloyd on an evenly spaced subset of m points costs ~m/n
    # of the bandwidth and lands close to the full-data fixed point, so the
    # full-data iterations that follow move few points.  The subsets are
    # small, so they are batched separately in bigger chunks.
    coarse: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    if coarse_points:
        coarse_points = max(coarse_points, k)  # the subsets need >= k points
        todo = [i for i in big if xs[i].shape[0] > 2 * coarse_points]
        for chunk in _chunks(todo, [coarse_points] * len(todo), d, max_batch_elems):
            sub = [_even_subset(xs[i], coarse_points) for i in chunk]
            c0, mu0, _ = _solve_chunk(sub, k, metric, iters, seed, init, ws=_Workspace(dev), tol=tol)
            for j, i in enumerate(chunk):
                coarse[i] = (c0[j], mu0[j])

    ws = _Workspace(dev)
    for chunk in _chunks(big, [xs[i].shape[0] for i in big], d, max_batch_elems):
        c0 = [coarse[i][0] if i in coarse else None for i in chunk]
        mu0 = [coarse[i][1] if i in coarse else None for i in chunk]
        caps = [iters if i not in coarse or refine_iters is None else min(iters, refine_iters) for i in chunk]
        _, _, res = _solve_chunk([xs[i] for i in chunk], k, metric, caps, seed, init, c0, ws, mu0, tol)
        for i, (c, lab, o, it) in zip(chunk, res, strict=True):
            cents[i], labels[i], objs[i], n_iter[i] = c, lab, o, it
    return cents, labels, objs, n_iter


def _chunks(ids: list[int], sizes: list[int], d: int, max_batch_elems: int) -> list[list[int]]:
    """Split size-sorted (descending) ids so that ``len * n_max * d`` stays
    within ``max_batch_elems`` (at least one instance per chunk)."""
    out = []
    start = 0
    while start < len(ids):
        per = max(1, max_batch_elems // max(1, sizes[start] * d))
        out.append(ids[start : start + per])
        start += per
    return out


def _even_subset(x: torch.Tensor, m: int) -> torch.Tensor:
    """Every ``n // m``-th row of ``x``: ``m`` to ``2m - 1`` evenly spaced rows
    (all rows when ``n <= 2 m``).

    A strided view, so no copy; deterministic and independent of batch
    mates.  For raster-ordered pixels it is a spatially uniform subsample.
    """
    n = x.shape[0]
    if n <= 2 * m:
        return x
    return x[:: n // m]


def _score_bias(c: torch.Tensor, metric: str) -> torch.Tensor | None:
    """Per-centroid additive term turning ``<x, c_j>`` into an assignment score.

    For l2 (and cosine, which is l2 on the unit sphere),
    ``argmin ||x - c||^2 = argmax <x, c> - ||c||^2 / 2``; the ``||x||^2`` term
    is constant per point.  Folding the bias into the matmul
    (``addmm``/``baddbmm``) saves a pass over the score buffer.
    """
    if metric == "dot":
        return None
    return -0.5 * (c * c).sum(-1)


def _top2(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(max, argmax, second max) over the leading centroid axis of ``s``.

    ``s`` is ``(k, ...)`` so that every ``s[j]`` is contiguous.  Only min/max
    and arithmetic kernels are used: on CPU, ``argmax``/``max(dim)`` over a
    short axis and the bool-mask kernels (``where``, ``masked_fill``) are
    10-100x slower than a contiguous ``maximum``.  Ties resolve to the lowest
    index, like ``torch.argmax``.
    """
    k = s.shape[0]
    best = s[0]
    second = torch.full_like(best, -math.inf)
    for j in range(1, k):
        sj = s[j]
        second = torch.maximum(second, torch.minimum(best, sj))
        best = torch.maximum(best, sj)
    lab = torch.full_like(best, k - 1)
    for j in range(k - 2, -1, -1):
        # j where s[j] attains the max, else a value >= k that never wins.
        lab = torch.minimum(lab, (s[j] < best).to(s.dtype).mul_(k).add_(j))
    return best, lab.long(), second


def _solve_chunk(
    xs: list[torch.Tensor],
    k: int,
    metric: str,
    iters: int | list[int],
    seed: int,
    init: str,
    init_centroids: list[torch.Tensor | None] | None = None,
    ws: _Workspace | None = None,
    mu: list[torch.Tensor | None] | None = None,
    tol: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor, float, int]]]:
    """Lloyd's algorithm on ``B`` instances (each with ``n_i >= k``) at once.

    Features are zero-padded into ``X`` ``(B, n_max, d)``; per-point state is
    ``(B, n_max)``.  For l2/cosine, Hamerly's bounds (an upper bound on the
    distance to the own centroid, a lower bound on the distance to any other,
    both updated from how far the centroids moved) certify most assignments
    without touching ``X``: only uncertified points are gathered and
    re-scored.  Certified points provably keep their label, so the result is
    that of plain Lloyd.  "dot" has no triangle inequality and re-scores
    every point each iteration.

    ``init_centroids``: optional per-row ``(k, d)`` starting centroids
    (``None`` entries are seeded); ``mu``: optional per-row ``(1, d)``
    centring offset replacing the row mean (l2 only; any offset works, it
    only has to be near the data).  ``tol``: sklearn-style centre-shift
    tolerance (0 = run to the exact fixed point or ``iters``).  ``iters``
    may be given per row.

    Returns ``(B, k, d)`` centroids, the ``(B, 1, d)`` centring offsets
    (zeros unless l2) and, per instance, ``(centroids, labels, objective,
    n_iter)``.
    """
    dev = xs[0].device
    ws = ws if ws is not None else _Workspace(dev)
    B = len(xs)
    d = xs[0].shape[1]
    n_list = [x.shape[0] for x in xs]
    sizes = torch.tensor(n_list, device=dev)
    n_max = max(n_list)

    # l2 is translation invariant: centring each instance keeps ||x||^2 and
    # the expanded distances free of cancellation; the mean is added back.
    offs = torch.zeros(B, 1, d, device=dev)
    if metric == "l2":
        for b, x in enumerate(xs):
            given = mu[b] if mu is not None else None
            offs[b] = x.mean(0, keepdim=True) if given is None else given
    X = ws.get("X", (B, n_max, d))
    x2 = torch.zeros(B, n_max, device=dev)
    for b, x in enumerate(xs):
        n = x.shape[0]
        xb = X[b, :n]
        if metric == "cosine":
            torch.div(x, x.norm(dim=1, keepdim=True).clamp_min(_EPS), out=xb)
        elif metric == "l2":
            torch.sub(x, offs[b], out=xb)
        else:
            xb.copy_(x)
        if n < n_max:
            X[b, n:].zero_()
        x2[b, :n] = torch.linalg.vector_norm(xb, dim=1).square_()
    valid = torch.arange(n_max, device=dev)[None, :] < sizes[:, None]  # (B, n)
    Xv = X.view(B * n_max, d)

    given = init_centroids if init_centroids is not None else [None] * B
    if any(c is None for c in given):
        # Seeding is per row (shared random numbers), so seeding the whole
        # chunk and keeping the rows without a start gives the same result.
        C = _init_centroids(X, x2, valid, sizes, k, seed, init)  # (B, k, d)
    else:
        C = X.new_empty(B, k, d)
    for b, c in enumerate(given):
        if c is not None:
            C[b] = c.to(X.dtype) - offs[b]

    bounded = metric != "dot"
    labels = torch.zeros(B, n_max, dtype=torch.int64, device=dev)
    upper = torch.zeros(B, n_max, device=dev)  # >= dist to own centroid
    lower = torch.zeros(B, n_max, device=dev)  # <= dist to any other
    half_sep = torch.zeros(B, k, device=dev)  # <= half dist to nearest other centroid
    # float32 sums: the incremental +/- updates are applied in point order per
    # instance (deterministic, batch independent); their rounding drift over
    # a few dozen updates is ~1e-7 relative, far below anything that matters.
    sums = torch.zeros(B, k, d, device=dev)
    counts = torch.zeros(B, k, device=dev)
    validf = valid.to(X.dtype)
    n_iter = torch.zeros(B, dtype=torch.int64, device=dev)
    act = torch.ones(B, dtype=torch.bool, device=dev)
    valid_act = valid.clone()
    flat_labels, flat_upper, flat_lower = labels.view(-1), upper.view(-1), lower.view(-1)

    def bounds(
        b1: torch.Tensor, b2: torch.Tensor, xx: torch.Tensor, c2max: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # ||x - c||^2 = ||x||^2 - 2 * score.  The slack covers float32
        # rounding of the expanded form so that certification is safe; too
        # much slack only costs extra re-scoring.
        tol = (xx + c2max).mul_(1e-5)
        up = (xx - 2 * b1).add_(tol).clamp_min_(0).sqrt_()
        lo = (xx - 2 * b2).sub_(tol).clamp_min_(0).sqrt_()
        return up, lo

    def dense_scores(r: torch.Tensor | None) -> torch.Tensor:
        """Scores of all points of rows ``r`` (None = all), ``(k, |r|, n)``."""
        if r is None:
            Cr, Xr = C, X
        elif r.numel() * 2 > B:
            # Scoring converged rows too is cheaper than gathering X[r].
            return dense_scores(None)[:, r]
        else:
            Cr = C[r]
            Xr = None
        bias = _score_bias(Cr, metric)
        if Xr is None:
            assert r is not None
            parts = [
                Cr[i] @ X[b].T if bias is None else torch.addmm(bias[i][:, None], Cr[i], X[b].T)
                for i, b in enumerate(r.tolist())
            ]
            s = torch.stack(parts, 1)
            return s
        Xt = Xr.transpose(1, 2)
        s = torch.bmm(Cr, Xt) if bias is None else torch.baddbmm(bias[:, :, None], Cr, Xt)
        return s.transpose(0, 1).contiguous()

    def point_scores(gb: torch.Tensor, ci: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores ``(k, m)`` of the listed points against their own row's
        centroids, and the gathered features ``(m, d)``."""
        m = gb.numel()
        xg = torch.index_select(Xv, 0, gb * n_max + ci, out=ws.get("xg", (m, d)))
        bias = _score_bias(C, metric)
        if B * k <= 64:
            # Score against every row's centroids in one GEMM and keep the own
            # row's k columns: the wasted columns cost less than any
            # per-row padding or gathering of centroids.
            s = xg @ C.view(B * k, d).T
            if bias is not None:
                s += bias.view(1, B * k)
            cols = gb[:, None] * k + torch.arange(k, device=dev)
            return s.gather(1, cols).T.contiguous(), xg
        cnt = torch.bincount(gb, minlength=B)
        m_max = int(cnt.max())
        pos = torch.arange(m, device=dev) - (torch.cumsum(cnt, 0) - cnt)[gb]
        flat = gb * m_max + pos
        xp = ws.get("Xp", (B, m_max, d))
        xp.view(B * m_max, d).index_copy_(0, flat, xg)
        xt = xp.transpose(1, 2)
        sp = torch.bmm(C, xt) if bias is None else torch.baddbmm(bias[:, :, None], C, xt)
        return sp.transpose(0, 1).reshape(k, B * m_max)[:, flat], xg

    def recompute_sums() -> None:
        # Padding rows are zero, so they may land in any cluster.
        grp = (torch.arange(B, device=dev)[:, None] * k + labels).view(-1)
        sums.zero_()
        sums.view(B * k, d).index_add_(0, grp, Xv)
        counts.zero_()
        counts.view(-1).index_add_(0, grp, validf.view(-1))

    def assign_step(first: bool) -> torch.Tensor:
        """Assignment with the current centroids; updates labels, bounds,
        sums and counts of the active rows.  Returns per-row "a label
        changed" flags."""
        c2max = (C * C).sum(-1).amax(1)  # (B,)
        dense = first or not bounded
        if not dense:
            need = (upper > torch.maximum(lower, half_sep.gather(1, labels))) & valid_act
            n_need = int(need.sum())
            if n_need == 0:
                return torch.zeros(B, dtype=torch.bool, device=dev)
            # Gathering rows costs about as much per byte as streaming all of
            # X, so past ~1/8 of the points a dense pass is cheaper.
            dense = n_need * 8 > int(sizes[act].sum())
        if dense:
            r = None if bool(act.all()) else act.nonzero().squeeze(1)
            b1, lab, b2 = _top2(dense_scores(r))
            if r is None:
                if bounded:
                    up, lo = bounds(b1, b2, x2, c2max[:, None])
                    upper.copy_(up)
                    lower.copy_(lo)
                if first:
                    # One full pass for the sums (padding rows are zero, so
                    # they may land anywhere); later steps move only the
                    # points that changed cluster.
                    labels.copy_(lab)
                    recompute_sums()
                    return torch.ones(B, dtype=torch.bool, device=dev)
                old = labels.clone()
                labels.copy_(lab)
                changed = (lab != old) & valid
                if int(changed.sum()) * 8 > int(sizes.sum()):
                    # Many moves: one dense pass beats gathering them.
                    recompute_sums()
                    return changed.any(1)
                gb, ci = changed.nonzero(as_tuple=True)
                new_l, old_l = lab[gb, ci], old[gb, ci]
            else:
                if bounded:
                    up, lo = bounds(b1, b2, x2[r], c2max[r][:, None])
                    upper[r] = up
                    lower[r] = lo
                old = labels[r]
                labels[r] = lab
                cb, ci = ((lab != old) & valid[r]).nonzero(as_tuple=True)
                gb = r[cb]
                new_l, old_l = lab[cb, ci], old[cb, ci]
            xsel = torch.index_select(Xv, 0, gb * n_max + ci)
        else:
            gb, ci = need.nonzero(as_tuple=True)
            fi = gb * n_max + ci
            sc, xg = point_scores(gb, ci)
            b1, lab, b2 = _top2(sc)
            up, lo = bounds(b1, b2, x2.view(-1)[fi], c2max[gb])
            flat_upper[fi] = up
            flat_lower[fi] = lo
            old = flat_labels[fi]
            flat_labels[fi] = lab
            ch = (lab != old).nonzero().squeeze(1)
            gb, ci, new_l, old_l = gb[ch], ci[ch], lab[ch], old[ch]
            xsel = xg[ch]
        moved = torch.zeros(B, dtype=torch.bool, device=dev)
        if gb.numel():
            ones = torch.ones(gb.numel(), device=dev)
            sums.view(B * k, d).index_add_(0, gb * k + new_l, xsel)
            sums.view(B * k, d).index_add_(0, gb * k + old_l, xsel, alpha=-1)
            counts.view(-1).index_add_(0, gb * k + new_l, ones)
            counts.view(-1).index_add_(0, gb * k + old_l, ones, alpha=-1)
            moved[gb] = True
        return moved

    caps = [iters] * B if isinstance(iters, int) else list(iters)
    cap = torch.tensor(caps, device=dev)
    first = True
    tol_abs = torch.zeros(B, device=dev)
    pending = torch.zeros(B, dtype=torch.bool, device=dev)  # stopped by tol
    for _ in range(max(caps)):
        moved = assign_step(first)
        if first and tol > 0:
            # sklearn's scale: tol * mean per-feature variance.
            mean = sums.sum(1) / sizes[:, None]
            var = (x2.sum(1) / sizes - mean.square().sum(1)).clamp_min(0) / d
            tol_abs = tol * var
        if not first:
            # No label changed => the centroids already are their clusters'
            # means: Lloyd's fixed point, further iterations are no-ops.
            act &= moved
            if not bool(act.any()):
                break
            valid_act = valid & act[:, None]
        first = False
        r = act.nonzero().squeeze(1)
        moved_pts = _fix_empty_clusters(r, X, x2, C, labels, sums, counts, sizes, k, metric)
        cnt = counts[r]
        new_c = (sums[r] / cnt.clamp_min(1)[..., None]).to(X.dtype)
        if metric == "cosine":
            new_c = _normalize(new_c)
        # A cluster can only stay empty with < k distinct points; it keeps its
        # previous centroid instead of collapsing to the origin.
        new_c = torch.where((cnt > 0)[..., None], new_c, C[r])
        if tol > 0:
            done = (new_c - C[r]).square().sum((1, 2)) <= tol_abs[r]
        if bounded:
            shift = torch.zeros(B, k, device=dev)
            shift[r] = (new_c - C[r]).norm(dim=-1).mul_(1 + 1e-5).add_(1e-7)
            C[r] = new_c
            upper.add_(shift.gather(1, labels))
            if k > 1:
                # other_max[b, j] = largest shift among centroids != j.
                top = shift.topk(2, dim=1)
                other_max = top.values[:, :1].repeat(1, k)
                other_max.scatter_(1, top.indices[:, :1], top.values[:, 1:])
                lower.sub_(other_max.gather(1, labels)).clamp_min_(0)
                dc = torch.cdist(C, C)
                dc.diagonal(dim1=1, dim2=2).fill_(math.inf)
                half_sep = dc.amin(2).mul_(0.5 * (1 - 1e-5))
            if moved_pts is not None:
                upper[moved_pts] = math.inf  # force re-scoring
        else:
            C[r] = new_c
        n_iter[r] += 1
        if min(caps) < max(caps):
            capped = n_iter[r] >= cap[r]
            done = capped if tol <= 0 else done | capped
        if (tol > 0 or min(caps) < max(caps)) and bool(done.any()):
            # Centroids (almost) stopped moving, or the row's own iteration
            # cap: stop, but the labels still need one assignment to these
            # final centroids.
            pending[r[done]] = True
            act[r[done]] = False
            if not bool(act.any()):
                break
            valid_act = valid & act[:, None]

    act |= pending
    if first or bool(act.any()):
        # Rows stopped by the iteration cap or by ``tol`` (or all rows when
        # iters == 0) get a final assignment to their final centroids.
        valid_act = valid & act[:, None]
        assign_step(first)

    # Objective from the cluster sums (accumulated in float64): no extra pass.
    cd = C.double()
    cs = (cd * sums.double()).sum(-1)  # (B, k): <c_j, S_j>
    if metric == "l2":
        obj = x2.double().sum(1) - 2 * cs.sum(1) + (counts.double() * (cd * cd).sum(-1)).sum(1)
        obj = obj.clamp_min(0)
    elif metric == "cosine":
        obj = (sizes.double() - cs.sum(1)).clamp_min(0)  # sum(1 - <x, c>), unit c
    else:
        obj = -cs.sum(1)
    C_out = C + offs
    objs = obj.tolist()
    n_it = n_iter.tolist()
    res = [(C_out[b].clone(), labels[b, :n].clone(), objs[b], n_it[b]) for b, n in enumerate(n_list)]
    return C_out, offs, res


def _fix_empty_clusters(
    r: torch.Tensor,
    X: torch.Tensor,
    x2: torch.Tensor,
    C: torch.Tensor,
    labels: torch.Tensor,
    sums: torch.Tensor,
    counts: torch.Tensor,
    sizes: torch.Tensor,
    k: int,
    metric: str,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Re-seed empty clusters with the points worst served by their centroid.

    Same rule as sklearn (relocate to the farthest points).  Rare, so a
    Python loop over the affected rows is fine.  Returns the moved points as
    an index tuple (their bounds must be invalidated), or ``None``.
    """
    bad = (counts[r] == 0).any(1)
    if not bool(bad.any()):
        return None
    mb: list[int] = []
    mi: list[int] = []
    for b in r[bad].tolist():
        n = int(sizes[b])
        xb = X[b, :n]
        s = C[b] @ xb.T  # (k, n)
        lab_b = labels[b, :n]
        own = s.gather(0, lab_b[None]).squeeze(0)
        c2 = (C[b] * C[b]).sum(-1)
        cost = -own if metric == "dot" else x2[b, :n] - 2 * own + c2[lab_b]
        order = torch.argsort(cost, descending=True, stable=True).tolist()
        cnt_b = counts[b].tolist()
        lab_l = lab_b.tolist()
        pos = 0
        for j in [j for j in range(k) if cnt_b[j] == 0]:
            # Never take the last point of a cluster: that would only move
            # the hole elsewhere.
            while pos < n and cnt_b[lab_l[order[pos]]] <= 1:
                pos += 1
            if pos >= n:
                break  # fewer distinct donors than holes (duplicate points)
            i = order[pos]
            pos += 1
            old = lab_l[i]
            xi = xb[i]
            sums[b, old] -= xi
            counts[b, old] -= 1
            sums[b, j] = xi
            counts[b, j] = 1
            cnt_b[old] -= 1
            cnt_b[j] = 1
            lab_l[i] = j
            labels[b, i] = j
            mb.append(b)
            mi.append(i)
    if not mb:
        return None
    return torch.tensor(mb, device=X.device), torch.tensor(mi, device=X.device)


def _init_centroids(
    X: torch.Tensor,
    x2: torch.Tensor,
    valid: torch.Tensor,
    sizes: torch.Tensor,
    k: int,
    seed: int,
    init: str,
) -> torch.Tensor:
    """Batched greedy k-means++ / farthest-point seeding, ``(B, k, d)``.

    Seeding always uses squared Euclidean distance (on the normalised features
    for cosine, where it is equivalent).  The random numbers are drawn once
    per call and shared by all instances, so an instance's seeds do not depend
    on its batch mates.
    """
    B, n_max, d = X.shape
    dev = X.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n_trials = 1 if init == "farthest" else 2 + int(math.log(k))
    u_first = torch.rand(1, generator=gen, dtype=torch.float64)
    u = torch.rand(max(k - 1, 0), n_trials, generator=gen, dtype=torch.float64).to(dev)
    bidx = torch.arange(B, device=dev)
    validd = valid.to(torch.float64)
    Xt = X.transpose(1, 2)

    first = (u_first.to(dev) * sizes).floor().long().clamp_max(sizes - 1)
    C = X.new_empty(B, k, d)
    C[:, 0] = X[bidx, first]

    def sqdist(cands: torch.Tensor) -> torch.Tensor:
        # (B, t, d) candidates -> (B, t, n) float64 squared distances, 0 on
        # padding so that padded points are never sampled.
        c2 = (cands * cands).sum(-1)
        dist = torch.baddbmm(c2[..., None], cands, Xt, alpha=-2).add_(x2[:, None, :])
        return dist.clamp_min_(0).double() * validd[:, None, :]

    closest = sqdist(C[:, :1]).squeeze(1)  # (B, n)
    for j in range(1, k):
        if init == "farthest":
            cand = closest.argmax(1, keepdim=True)  # (B, 1)
        else:
            cum = torch.cumsum(closest, 1)
            target = u[j - 1][None, :] * cum[:, -1:]  # (B, t)
            cand = torch.searchsorted(cum, target.contiguous())
            cand = torch.minimum(cand, (sizes - 1)[:, None])
        cx = X[bidx[:, None], cand]  # (B, t, d)
        pot = torch.minimum(closest[:, None, :], sqdist(cx))  # (B, t, n)
        pick = pot.sum(-1).argmin(1)  # (B,)
        closest = pot[bidx, pick]
        C[:, j] = cx[bidx, pick]
    return C


# --------------------------------------------------------------------------
# faiss backend
# --------------------------------------------------------------------------


def _import_faiss():
    try:
        import faiss  # noqa: PLC0415 -- optional dependency, imported on demand
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "kmeans(backend='faiss') needs the faiss package (pip install faiss-cpu "
            "or faiss-gpu); use backend='torch' otherwise"
        ) from e
    return faiss


def _kmeans_faiss(
    xs: list[np.ndarray],
    k: int,
    metric: str,
    iters: int,
    seed: int,
    max_points_per_centroid: int | None,
    gpu: bool | None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[float], list[int]]:
    faiss = _import_faiss()
    if gpu is None:
        gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0 and torch.cuda.is_available()
    kpp = getattr(faiss, "ClusteringInitMethod_KMEANS_PLUS_PLUS", None)

    cents: list[torch.Tensor] = []
    n_iter: list[int] = []
    for x in xs:
        n, d = x.shape
        xc = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), _EPS) if metric == "cosine" else x
        xc = np.ascontiguousarray(xc, dtype=np.float32)
        if n < k or n == 0 or iters == 0:
            # faiss refuses n < k: mirror the torch backend's convention (one
            # cluster per point).  iters == 0: the first k points.
            c = xc.copy() if n < k else xc[:k].copy()
            cents.append(torch.from_numpy(c))
            n_iter.append(0)
            continue
        params = dict(
            niter=iters,
            seed=seed,
            verbose=False,
            spherical=metric == "cosine",
            # faiss subsamples to k * max_points_per_centroid points; make that
            # a no-op unless the caller asks for the old behaviour.
            max_points_per_centroid=max_points_per_centroid or (n // k + 1),
            min_points_per_centroid=1,  # silence "too few points" warnings
        )
        if kpp is not None:
            # Random seeding lands two seeds in one part far too often for
            # k=4; k-means++ matches the torch backend's quality.
            params["init_method"] = kpp
        km = faiss.Kmeans(d, k, gpu=bool(gpu), **params)
        if metric == "dot":
            index = faiss.IndexFlatIP(d)
            km.index = faiss.index_cpu_to_all_gpus(index) if gpu else index
        km.train(xc)
        cents.append(torch.from_numpy(np.asarray(km.centroids, dtype=np.float32).reshape(-1, d)))
        n_iter.append(iters)

    labels: list[torch.Tensor] = []
    objs: list[float] = []
    for x, c in zip(xs, cents, strict=True):
        lab, obj = _assign_objective(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), c, metric)
        labels.append(lab)
        objs.append(obj)
    return cents, labels, objs, n_iter


def _assign_objective(x: torch.Tensor, c: torch.Tensor, metric: str) -> tuple[torch.Tensor, float]:
    """Final assignment + objective computed directly per point (float64).

    Same definitions as the torch backend (which gets the objective from its
    cluster sums instead), so the two backends' objectives are comparable.
    """
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64), 0.0
    if metric == "cosine":
        x = _normalize(x)
        c = _normalize(c)
    bias = _score_bias(c, metric)
    sc = x @ c.T if bias is None else torch.addmm(bias[None, :], x, c.T)
    lab = _top2(sc.T.contiguous())[1]
    xd, cd = x.double(), c.double()[lab]
    if metric == "l2":
        obj = ((xd - cd) ** 2).sum()
    elif metric == "cosine":
        obj = (1 - (xd * cd).sum(1)).sum()
    else:
        obj = -(xd * cd).sum()
    return lab, float(obj)


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(_EPS)


def _default_device(features: Sequence[ArrayLike]) -> torch.device:
    for f in features:
        if isinstance(f, torch.Tensor):
            return f.device
    return torch.device("cpu")


def _as_tensor(f: ArrayLike, dev: torch.device) -> torch.Tensor:
    if isinstance(f, torch.Tensor):
        return f.detach().to(device=dev, dtype=torch.float32)
    return torch.from_numpy(np.ascontiguousarray(f, dtype=np.float32)).to(dev)


def _as_numpy(f: ArrayLike) -> np.ndarray:
    if isinstance(f, torch.Tensor):
        return f.detach().to("cpu", torch.float32).numpy()
    return np.asarray(f, dtype=np.float32)


def _like(t: torch.Tensor, ref: ArrayLike) -> ArrayLike:
    """Return ``t`` in the container type of ``ref``."""
    if isinstance(ref, torch.Tensor):
        return t.to(ref.device)
    return t.detach().cpu().numpy()
