"""Class-specific part ranking: the algorithm of the ``ranking`` stage (paper §4.3, Eq. 1-2).

The part decoder (:mod:`partdistill.models.part_decoder`) gives, per image, ``Q`` class-agnostic
part queries, each with a soft mask ``M_i`` (probabilities), a score ``s_i`` and a decoded query
feature ``f_i``. This module turns them into object-class-specific part labels, in the paper's
order:

1. :func:`associate` (Eq. 1): every part proposal goes to the object instance it overlaps most
   (IoU of the binarised masks).
2. :func:`candidates`: inside one object every pixel goes to its most confident query,
   ``argmax_i M_i(x) s_i``; a query whose score is above ``score_threshold`` (0.3) and whose pixels
   cover at least ``min_fraction`` (5 %) of the object is a candidate.
3. :func:`fit_prototypes`: per object class, weighted k-means (``k = 8``, weights = scores) over
   the L2-normalised features of all its candidates in the dataset; a prototype is the weighted
   mean of its members, the prototype estimate of Snell et al. (prototypical networks).
4. :func:`density_scores` (Eq. 2): ``r_k(f) = softmax_k(-||f - mu_k||_2)`` over the class's
   prototypes; :func:`ranked_scores` gives every proposal its cluster (``argmax_k r_k``) and the
   reference's labelling score ``s * max_k r_k``.
5. :func:`label_parts`: an object's candidates labelled by cluster; segments of the same cluster
   are merged (union of masks, max of scores).

:class:`ClassRanking` is one class's result, with the rows the stage writes to
``prototypes.parquet``. Pure numpy/torch, no I/O; inputs may be numpy arrays or (CPU or CUDA)
torch tensors, outputs are numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from partdistill.models.kmeans import assign

__all__ = [
    "ClassRanking",
    "LabelledPart",
    "ObjectCandidates",
    "PrototypeFit",
    "associate",
    "candidates",
    "density_scores",
    "fit_prototypes",
    "label_parts",
    "ranked_scores",
]

ArrayLike = np.ndarray | torch.Tensor
# "eq2": the paper's softmax over -||f - mu_k||_2.  "reference": the authors' code,
# softmax over f.mu_k - |f|^2 - |mu_k|^2 (see density_scores).
DensityForm = Literal["eq2", "reference"]

# Why a class has fewer than k prototypes (None: it has k).
NO_CANDIDATES = "no_candidates"
FEWER_CANDIDATES = "fewer_candidates_than_k"
FEWER_DISTINCT = "fewer_distinct_candidates_than_k"

_EPS = 1e-12
# (queries x pixels) elements scored at once by `candidates`, bounding its float32 buffers.
_CHUNK_ELEMS = 1 << 22


# --------------------------------------------------------------------------
# Eq. 1: part proposal -> object instance
# --------------------------------------------------------------------------


def associate(part_masks: ArrayLike, object_masks: ArrayLike, mask_threshold: float = 0.5) -> np.ndarray:
    """Eq. 1: assign every part proposal to the object instance of highest IoU.

    Args:
        part_masks: float (Q, H, W) mask probabilities in [0, 1] (or bool); a part's binary mask
            is ``prob > mask_threshold``.
        object_masks: bool (J, H, W) object instance masks of the same image.
        mask_threshold: binarisation threshold of the part masks.

    Returns:
        int64 (Q,): the object index in ``[0, J)``, or -1 for a part that overlaps no object
        (IoU 0 with every object, an empty part mask, or ``J == 0``). Ties go to the lowest
        object index.
    """
    parts = _numpy(part_masks)
    objects = _numpy(object_masks).astype(bool, copy=False)
    if parts.ndim != 3 or objects.ndim != 3 or (objects.shape[0] and parts.shape[1:] != objects.shape[1:]):
        raise ValueError(f"expected part masks (Q, H, W) and object masks (J, H, W), "
                         f"got {parts.shape} and {objects.shape}")
    q, j = parts.shape[0], objects.shape[0]
    out = np.full(q, -1, np.int64)
    if q == 0 or j == 0:
        return out
    binary = (parts > mask_threshold).reshape(q, -1)
    part_area = binary.sum(1, dtype=np.int64)
    obj_flat = objects.reshape(j, -1)
    # One gather per object instead of a (Q, HW) x (HW, J) matmul: J is small, and integer
    # counts stay exact at any image size.
    inter = np.stack([binary[:, np.flatnonzero(o)].sum(1, dtype=np.int64) for o in obj_flat], 1)
    union = part_area[:, None] + obj_flat.sum(1, dtype=np.int64)[None, :] - inter
    iou = inter / np.maximum(union, 1)
    best = iou.argmax(1)
    hit = inter[np.arange(q), best] > 0
    out[hit] = best[hit]
    return out


# --------------------------------------------------------------------------
# candidates of one object
# --------------------------------------------------------------------------


@dataclass
class ObjectCandidates:
    """The candidate part queries of one object (see :func:`candidates`).

    Attributes:
        queries: int64 (m,) candidate query indices, ascending.
        segments: bool (m, H, W) the pixels each candidate won; disjoint, inside the object.
        scores: float32 (m,) the candidates' proposal scores ``s_i``.
        areas: int64 (m,) pixels per segment.
        fractions: float64 (m,) ``areas / object area``.
        label_map: int64 (H, W) the winning candidate's query index per pixel; -1 outside the
            object, where no query's mask passes the threshold, and where the winner is not a
            candidate (those pixels are not handed to the runner-up).
    """

    queries: np.ndarray
    segments: np.ndarray
    scores: np.ndarray
    areas: np.ndarray
    fractions: np.ndarray
    label_map: np.ndarray

    def __len__(self) -> int:
        return len(self.queries)


def candidates(
    masks: ArrayLike,
    scores: ArrayLike,
    object_mask: ArrayLike,
    score_threshold: float = 0.3,
    min_fraction: float = 0.05,
    mask_threshold: float = 0.5,
    max_fraction: float = 1.0,
    pixel_rule: str = "mask_score",
) -> ObjectCandidates:
    """The candidate part queries of one object (§4.3).

    Every object pixel ``x`` goes to ``argmax_i M_i(x) s_i`` among the queries with
    ``M_i(x) > mask_threshold`` (ties: lowest query index); pixels where no query passes stay
    unassigned. ``pixel_rule='mask'``: only the queries scoring above ``score_threshold``
    compete, by ``M_i(x)`` alone (the score does not favour the confident, often object-sized,
    queries; pixels none of them covers stay unassigned). A query is a candidate when
    ``s_i > score_threshold`` and its pixels cover at least ``min_fraction`` of the object's
    area (and at least one pixel), and at most
    ``max_fraction`` of it (the paper's self-training drops parts over half their object: a
    query that takes the whole object is an object, not a part).

    Args:
        masks: float (Q, H, W) mask probabilities in [0, 1] of all the image's part queries
            (every query competes for the pixels, not only those associated to this object).
        scores: float (Q,) part scores in [0, 1].
        object_mask: bool (H, W) the object instance.
        score_threshold, min_fraction, mask_threshold: as above.

    Returns:
        :class:`ObjectCandidates` (empty when the object mask is empty or ``Q == 0``).
    """
    m = _numpy(masks).astype(np.float32, copy=False)
    s = _numpy(scores).astype(np.float32, copy=False).reshape(-1)
    obj = _numpy(object_mask).astype(bool, copy=False)
    if m.ndim != 3 or m.shape[1:] != obj.shape or s.shape[0] != m.shape[0]:
        raise ValueError(f"expected masks (Q, H, W), scores (Q,), object mask (H, W), "
                         f"got {m.shape}, {s.shape}, {obj.shape}")
    q = m.shape[0]
    label_map = np.full(obj.shape, -1, np.int64)
    area = int(obj.sum())
    if q == 0 or area == 0:
        return _no_candidates(label_map)

    if pixel_rule == "mask_score":
        weight = s
    elif pixel_rule == "mask":
        # a query at or under the threshold gets weight 0: it can only win pixels that no scoring
        # query covers, and is dropped below with them
        weight = np.where(s > score_threshold, np.float32(1), np.float32(0))
    else:
        raise ValueError(f"pixel_rule must be 'mask_score' or 'mask', got {pixel_rule!r}")

    # Score only the object's bounding box, a few rows at a time.
    ys, xs = np.nonzero(obj)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    winner = np.full((y1 - y0, x1 - x0), -1, np.int64)
    rows = max(1, _CHUNK_ELEMS // max(1, q * (x1 - x0)))
    for r in range(y0, y1, rows):
        block = m[:, r:min(r + rows, y1), x0:x1]
        passing = block > mask_threshold
        # Confidences are >= 0, so -1 marks "mask below threshold" and never wins.
        conf = np.where(passing, block * weight[:, None, None], np.float32(-1))
        win = conf.argmax(0)  # first maximum: ties go to the lowest query index
        win[~passing.any(0)] = -1
        winner[r - y0:r - y0 + block.shape[1]] = win
    winner[~obj[y0:y1, x0:x1]] = -1

    won = winner >= 0
    counts = np.bincount(winner[won], minlength=q)
    keep = (s > score_threshold) & (counts >= min_fraction * area) & (counts > 0) & (counts <= max_fraction * area)
    winner[won & ~keep[np.maximum(winner, 0)]] = -1
    label_map[y0:y1, x0:x1] = winner

    queries = np.flatnonzero(keep).astype(np.int64)
    segments = label_map[None] == queries[:, None, None]
    return ObjectCandidates(
        queries=queries,
        segments=segments,
        scores=s[queries],
        areas=counts[queries].astype(np.int64),
        fractions=counts[queries] / area,
        label_map=label_map,
    )


def _no_candidates(label_map: np.ndarray) -> ObjectCandidates:
    return ObjectCandidates(
        queries=np.zeros(0, np.int64),
        segments=np.zeros((0, *label_map.shape), bool),
        scores=np.zeros(0, np.float32),
        areas=np.zeros(0, np.int64),
        fractions=np.zeros(0, np.float64),
        label_map=label_map,
    )


# --------------------------------------------------------------------------
# per-class prototypes: weighted k-means (Snell et al.)
# --------------------------------------------------------------------------


@dataclass
class PrototypeFit:
    """Weighted k-means of one object class's candidate features (see :func:`fit_prototypes`).

    Attributes:
        prototypes: float32 (k_eff, C) weighted means of the members' L2-normalised features
            (so norm <= 1; not renormalised, Eq. 2 measures Euclidean distance to this mean).
            Ordered by decreasing cluster weight: prototype 0 is the class's most common part.
        labels: int64 (n,) each candidate's cluster in ``[0, k_eff)``, its nearest prototype.
            When ``iters`` ran out before convergence a cluster may end up empty.
        cluster_weight: float64 (k_eff,) summed member weights.
        cluster_size: int64 (k_eff,) member counts.
        k_eff: number of prototypes, ``min(k, number of distinct candidates)``.
        n_candidates: n.
        n_distinct: distinct (normalised) candidate features.
        few_proposals: why ``k_eff < k`` (:data:`NO_CANDIDATES`, :data:`FEWER_CANDIDATES`,
            :data:`FEWER_DISTINCT`), or None.
        inertia: ``sum_i w_i ||x_i - mu_{l_i}||^2``.
        n_iter: Lloyd iterations run (0 when every distinct candidate is its own prototype).
    """

    prototypes: np.ndarray
    labels: np.ndarray
    cluster_weight: np.ndarray
    cluster_size: np.ndarray
    k_eff: int
    n_candidates: int
    n_distinct: int
    few_proposals: str | None
    inertia: float
    n_iter: int


def fit_prototypes(
    features: ArrayLike,
    weights: ArrayLike | None = None,
    k: int = 8,
    seed: int = 0,
    iters: int = 100,
) -> PrototypeFit:
    """Weighted k-means over L2-normalised query features: one object class's prototypes.

    Minimises ``sum_i w_i ||x_i - mu_{l_i}||^2`` with ``x_i = f_i / ||f_i||``: weighted
    k-means++ seeding (greedy, ``2 + log k`` trials per centre, sampling proportional to
    ``w_i D(x_i)^2``, from ``numpy.random.default_rng(seed)``), then Lloyd iterations (assignment
    by :func:`partdistill.models.kmeans.assign`, prototypes = weighted means) until no label
    changes or ``iters``. An emptied cluster is re-seeded with the point of highest weighted cost.
    Deterministic for a seed.

    Few proposals: with ``n_distinct`` distinct candidates, ``k_eff = min(k, n_distinct)``. When
    ``n_distinct <= k`` every distinct candidate is its own prototype (the k-means optimum, no
    random centroids); ``few_proposals`` says why ``k_eff < k``. ``n == 0`` gives zero
    prototypes.

    Args:
        features: float (n, C) candidate query features (normalised here).
        weights: float (n,) positive weights (the candidates' scores); None = all 1.
        k: prototypes per class.
        seed: seeds the initialisation.
        iters: maximum Lloyd iterations.

    Returns:
        :class:`PrototypeFit`.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    x64 = _numpy(features).astype(np.float64)
    if x64.ndim != 2:
        raise ValueError(f"features must be (n, C), got {x64.shape}")
    n, c = x64.shape
    w = np.ones(n) if weights is None else _numpy(weights).astype(np.float64).reshape(-1)
    if w.shape[0] != n:
        raise ValueError(f"expected {n} weights, got {w.shape[0]}")
    if n and not (np.isfinite(w).all() and (w > 0).all()):
        raise ValueError("weights must be finite and > 0")
    x = _l2_normalize(x64).astype(np.float32)  # one precision for distinctness and assignment

    if n == 0:
        return _fit(np.zeros((0, c), np.float32), np.zeros(0, np.int64), x, w, 0, 0, NO_CANDIDATES, 0)

    distinct, first, inverse = np.unique(x, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    n_distinct = len(distinct)
    if n_distinct <= k:
        # Every distinct point is its own cluster, in order of first appearance.
        order = np.argsort(first, kind="stable")
        rank = np.empty(n_distinct, np.int64)
        rank[order] = np.arange(n_distinct)
        labels = rank[inverse]
        reason = None if n_distinct == k else FEWER_CANDIDATES if n < k else FEWER_DISTINCT
        return _fit(distinct[order], labels, x, w, n_distinct, n_distinct, reason, 0)

    xd = x.astype(np.float64)
    centroids = _weighted_kmeanspp(xd, w, k, np.random.default_rng(seed))
    labels = _nearest(x, centroids)
    n_iter = 0
    while n_iter < iters:
        n_iter += 1
        labels = _fill_empty(xd, w, centroids, labels, k)
        centroids = _weighted_means(xd, w, labels, k)
        new = _nearest(x, centroids)
        if np.array_equal(new, labels):
            break  # Lloyd's fixed point: the prototypes are the weighted means of their members
        labels = new
    return _fit(centroids.astype(np.float32), labels, x, w, k, n_distinct, None, n_iter)


def _nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """int64 (n,) index of the nearest centroid (Euclidean; ties: lowest index)."""
    return np.asarray(assign(x, centroids.astype(np.float32), metric="l2"), dtype=np.int64)


def _fit(prototypes: np.ndarray, labels: np.ndarray, x: np.ndarray, w: np.ndarray, k_eff: int,
         n_distinct: int, reason: str | None, n_iter: int) -> PrototypeFit:
    """Sort clusters by decreasing weight and package the result."""
    weight = np.bincount(labels, weights=w, minlength=k_eff).astype(np.float64)
    order = np.lexsort((np.arange(k_eff), -weight))  # by weight, ties by index
    rank = np.empty(k_eff, np.int64)
    rank[order] = np.arange(k_eff)
    labels = rank[labels] if len(labels) else labels
    prototypes = np.ascontiguousarray(prototypes[order], dtype=np.float32)
    resid = x.astype(np.float64) - prototypes.astype(np.float64)[labels]
    return PrototypeFit(
        prototypes=prototypes,
        labels=labels.astype(np.int64),
        cluster_weight=weight[order],
        cluster_size=np.bincount(labels, minlength=k_eff).astype(np.int64),
        k_eff=k_eff,
        n_candidates=len(labels),
        n_distinct=n_distinct,
        few_proposals=reason,
        inertia=float((w * (resid * resid).sum(1)).sum()),
        n_iter=n_iter,
    )


def _weighted_kmeanspp(x: np.ndarray, w: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ where a point's mass is its weight: (k, C) float64 seeds."""
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    x2 = (x * x).sum(1)

    def sqdist(c: np.ndarray) -> np.ndarray:  # (t, C) -> (t, n), no (t, n, C) temporary
        return np.maximum(x2[None] + (c * c).sum(1)[:, None] - 2 * (c @ x.T), 0)

    first = min(int(np.searchsorted(np.cumsum(w), rng.random() * w.sum(), side="right")), n - 1)
    centres = [x[first]]
    closest = sqdist(x[first][None])[0]
    for _ in range(1, k):
        cum = np.cumsum(w * closest)
        pick = np.searchsorted(cum, rng.random(trials) * cum[-1], side="right").clip(max=n - 1)
        dist = np.minimum(closest[None], sqdist(x[pick]))  # (trials, n)
        best = int((dist * w).sum(1).argmin())
        closest = dist[best]
        centres.append(x[pick[best]])
    return np.stack(centres)


def _weighted_means(x: np.ndarray, w: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(k, C) weighted mean per cluster (every cluster non-empty)."""
    # A loop over the k clusters: a (k, n) one-hot matmul hits a slow BLAS path (~40x slower).
    return np.stack([w[sel] @ x[sel] / w[sel].sum() for sel in (labels == j for j in range(k))])


def _fill_empty(x: np.ndarray, w: np.ndarray, centroids: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Move the worst-served points (largest ``w ||x - c||^2``) into empty clusters.

    Rare; a point is never taken from a cluster it is the last member of. Needs at least k
    distinct points, which the caller guarantees."""
    counts = np.bincount(labels, minlength=k)
    if (counts > 0).all():
        return labels
    labels = labels.copy()
    cost = w * ((x - centroids[labels]) ** 2).sum(1)
    order = np.argsort(-cost, kind="stable")
    pos = 0
    for j in np.flatnonzero(counts == 0):
        while counts[labels[order[pos]]] <= 1:
            pos += 1
        i = order[pos]
        pos += 1
        counts[labels[i]] -= 1
        counts[j] = 1
        labels[i] = j
    return labels


# --------------------------------------------------------------------------
# Eq. 2: density score
# --------------------------------------------------------------------------


def density_scores(features: ArrayLike, prototypes: ArrayLike, form: DensityForm = "eq2") -> np.ndarray:
    """Eq. 2: the probability of each prototype (part cluster) for each query feature.

    ``form="eq2"`` (the paper): ``r_k(f) = exp(-||f - mu_k||_2) / sum_l exp(-||f - mu_l||_2)``,
    a softmax over negative (not squared) Euclidean distances.
    ``form="reference"`` (the authors' code): ``softmax_k(f . mu_k - |f|^2 - |mu_k|^2)``.
    The "eq2" argmax is the nearest prototype; the "reference" argmax maximises
    ``f . mu_k - |mu_k|^2`` and equals it only when all prototypes have the same norm. The
    reference's ``x`` and ``c`` are whatever its clustering used; here ``f`` is normalised and
    ``mu_k`` is the fitted prototype.

    Args:
        features: float (N, C) query features; L2-normalised here, as for the fit.
        prototypes: float (k, C) as returned by :func:`fit_prototypes` (used as they are).
        form: which formula.

    Returns:
        float32 (N, k) rows summing to 1; (N, 0) when there are no prototypes.
    """
    f = _l2_normalize(_numpy(features).astype(np.float64))
    mu = _numpy(prototypes).astype(np.float64)
    if f.ndim != 2 or mu.ndim != 2 or f.shape[1] != mu.shape[1]:
        raise ValueError(f"expected features (N, C) and prototypes (k, C), got {f.shape} and {mu.shape}")
    if mu.shape[0] == 0:
        return np.zeros((f.shape[0], 0), np.float32)
    f2 = (f * f).sum(1, keepdims=True)
    mu2 = (mu * mu).sum(1)[None]
    dot = f @ mu.T
    if form == "eq2":
        logits = -np.sqrt(np.maximum(f2 + mu2 - 2 * dot, 0))
    elif form == "reference":
        logits = dot - f2 - mu2
    else:
        raise ValueError(f"form must be 'eq2' or 'reference', got {form!r}")
    logits -= logits.max(1, keepdims=True)
    p = np.exp(logits)
    return (p / p.sum(1, keepdims=True)).astype(np.float32)


def ranked_scores(
    features: ArrayLike, scores: ArrayLike, prototypes: ArrayLike, form: DensityForm = "eq2"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each proposal's part cluster and its rescored confidence.

    Args:
        features: float (N, C) query features.
        scores: float (N,) proposal scores ``s_i`` (the decoder's foreground probability).
        prototypes: float (k, C), k >= 1.
        form: as in :func:`density_scores`.

    Returns:
        ``(cluster, density, ranked)``: int64 (N,) ``argmax_k r_k``; float32 (N,) ``max_k r_k``;
        float32 (N,) the reference's labelling score ``s_i * max_k r_k``.
    """
    s = _numpy(scores).astype(np.float32).reshape(-1)
    r = density_scores(features, prototypes, form)
    if r.shape[1] == 0:
        raise ValueError("no prototypes to rank against")
    if s.shape[0] != r.shape[0]:
        raise ValueError(f"expected {r.shape[0]} scores, got {s.shape[0]}")
    cluster = r.argmax(1).astype(np.int64)
    density = r[np.arange(r.shape[0]), cluster]
    return cluster, density, (s * density).astype(np.float32)


# --------------------------------------------------------------------------
# labelling one object
# --------------------------------------------------------------------------


class LabelledPart(NamedTuple):
    """One labelled part of an object: cluster id, bool (H, W) mask, float score."""

    cluster_id: int
    mask: np.ndarray
    score: float


def label_parts(
    segments: ArrayLike,
    features: ArrayLike,
    scores: ArrayLike,
    prototypes: ArrayLike,
    form: DensityForm = "eq2",
    score: Literal["ranked", "proposal"] = "ranked",
) -> list[LabelledPart]:
    """Label one object's candidates by part cluster, merging segments of the same cluster.

    Every candidate gets ``argmax_k r_k`` (:func:`ranked_scores`); the segments of a cluster are
    united and the part's score is the maximum of its members' scores: the reference's
    ``s_i * max_k r_k`` (``score="ranked"``) or the proposal score ``s_i`` (``"proposal"``).

    Args:
        segments: bool (m, H, W) the candidates' segments (``ObjectCandidates.segments``).
        features: float (m, C) the candidates' query features.
        scores: float (m,) the candidates' proposal scores.
        prototypes: float (k, C) the object class's prototypes.
        form: as in :func:`density_scores`.
        score: which member score is maxed.

    Returns:
        One :class:`LabelledPart` per cluster present, by increasing cluster id; empty when there
        are no candidates or no prototypes.
    """
    seg = _numpy(segments).astype(bool, copy=False)
    if seg.ndim != 3:
        raise ValueError(f"segments must be (m, H, W), got {seg.shape}")
    if seg.shape[0] == 0 or _numpy(prototypes).shape[0] == 0:
        return []
    cluster, _, ranked = ranked_scores(features, scores, prototypes, form)
    member = ranked if score == "ranked" else _numpy(scores).astype(np.float32).reshape(-1)
    parts = []
    for cid in np.unique(cluster):
        sel = cluster == cid
        parts.append(LabelledPart(int(cid), seg[sel].any(0), float(member[sel].max())))
    return parts


# --------------------------------------------------------------------------
# one class's result, as the stage stores it
# --------------------------------------------------------------------------


@dataclass
class ClassRanking:
    """One object class's ranking model.

    Attributes:
        class_id: the object class.
        prototypes: float32 (k_eff, C), see :class:`PrototypeFit`.
        k_eff: number of prototypes (<= k).
        n_candidates: candidates the prototypes were fitted on.
        few_proposals: why ``k_eff < k``, or None.
        cluster_weight: float64 (k_eff,) summed candidate scores per prototype.
        cluster_size: int64 (k_eff,) candidates per prototype.
    """

    class_id: int
    prototypes: np.ndarray
    k_eff: int
    n_candidates: int
    few_proposals: str | None
    cluster_weight: np.ndarray
    cluster_size: np.ndarray

    @classmethod
    def from_fit(cls, class_id: int, fit: PrototypeFit) -> ClassRanking:
        return cls(int(class_id), fit.prototypes, fit.k_eff, fit.n_candidates, fit.few_proposals,
                   fit.cluster_weight, fit.cluster_size)

    def rows(self) -> list[dict[str, Any]]:
        """One row per prototype: class_id:int, cluster:int, prototype:list[float] (C floats),
        weight:float, size:int, k_eff:int, n_candidates:int, few_proposals:str|None. A class
        without prototypes gives no row; record it from ``few_proposals`` instead."""
        return [
            {"class_id": self.class_id, "cluster": j, "prototype": self.prototypes[j].tolist(),
             "weight": float(self.cluster_weight[j]), "size": int(self.cluster_size[j]),
             "k_eff": self.k_eff, "n_candidates": self.n_candidates, "few_proposals": self.few_proposals}
            for j in range(self.k_eff)
        ]


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _numpy(a: ArrayLike) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), _EPS)
