"""Part-segmentation metrics used to evaluate part proposals and part labels.

* :func:`average_recall` -- class-agnostic part-proposal recall (AR@k), the
  PartDistillation proposal metric: predictions are clipped to the GT object
  mask, matched one-to-one to GT parts (highest IoU first) at IoU thresholds
  0.50:0.05:0.95, recall pooled over images (COCO style) and averaged over
  thresholds.
* :func:`per_object_nmi_ari` -- agreement between the GT part labelling of an
  object's pixels and a predicted clustering (e.g. K-means part proposals),
  as NMI/ARI averaged over objects and pooled over pixels.
* :func:`per_class_nmi_ari` -- FG-NMI / FG-ARI (Choudhury et al., 2021) for
  class-consistent predicted part ids: NMI/ARI over the pooled foreground
  pixels of each object class, averaged over classes.
* :func:`miou` -- part mIoU for class-consistent predicted part ids, with
  many-to-one (majority) or one-to-one (Hungarian) mapping from predicted ids
  to GT parts per object class; C-mIoU and A-mIoU.

:func:`normalized_mutual_info` and :func:`adjusted_rand_index` are dependency
free re-implementations of sklearn's ``normalized_mutual_info_score``
(arithmetic normalisation) and ``adjusted_rand_score``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = [
    "adjusted_rand_index",
    "average_recall",
    "contingency_table",
    "mask_iou",
    "miou",
    "normalized_mutual_info",
    "per_class_nmi_ari",
    "per_object_nmi_ari",
]

_DEFAULT_IOU_THRESHOLDS = np.arange(0.5, 0.96, 0.05)


# --------------------------------------------------------------------------
# average recall
# --------------------------------------------------------------------------


def mask_iou(gt: Sequence[np.ndarray], pred: Sequence[np.ndarray]) -> np.ndarray:
    """IoU between every GT and every predicted binary mask.

    Args:
        gt: ``G`` masks, each ``(H, W)`` bool (or 0/1).
        pred: ``P`` masks of the same ``(H, W)``.

    Returns:
        ``(G, P)`` float64 IoU matrix (0 where the union is empty).
    """
    if len(gt) == 0 or len(pred) == 0:
        return np.zeros((len(gt), len(pred)))
    try:
        from pycocotools import mask as mask_utils  # noqa: PLC0415 -- optional, fast RLE path
    except ImportError:  # pragma: no cover - depends on the environment
        mask_utils = None
    if mask_utils is not None:
        # RLE intersections are computed on run lengths, far cheaper than
        # (G x P x H x W) pixel work for ~200 predictions per image.
        g = mask_utils.encode(np.asfortranarray(np.stack(gt).transpose(1, 2, 0).astype(np.uint8)))
        p = mask_utils.encode(np.asfortranarray(np.stack(pred).transpose(1, 2, 0).astype(np.uint8)))
        iou = mask_utils.iou(p, g, [0] * len(g))  # (P, G)
        return np.asarray(iou, dtype=np.float64).reshape(len(pred), len(gt)).T
    gf = np.stack(gt).reshape(len(gt), -1).astype(np.float32)
    pf = np.stack(pred).reshape(len(pred), -1).astype(np.float32)
    inter = gf @ pf.T
    union = gf.sum(1)[:, None] + pf.sum(1)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0).astype(np.float64)


def _greedy_match_ious(iou: np.ndarray) -> np.ndarray:
    """IoUs of a greedy one-to-one matching, highest IoU first.

    Greedy choices among pairs with IoU >= t never depend on pairs below t,
    so the matching at threshold t is exactly the prefix of this single run
    with IoU >= t: one run serves every threshold.
    """
    G, P = iou.shape
    if G == 0 or P == 0:
        return np.zeros(0)
    flat = iou.ravel()
    order = np.argsort(-flat, kind="stable")  # ties: lower GT, then pred, index
    order = order[flat[order] > 0]
    used_g = np.zeros(G, dtype=bool)
    used_p = np.zeros(P, dtype=bool)
    matched: list[float] = []
    for idx in order:
        g, p = divmod(int(idx), P)
        if used_g[g] or used_p[p]:
            continue
        used_g[g] = used_p[p] = True
        matched.append(float(flat[idx]))
        if len(matched) == min(G, P):
            break
    return np.asarray(matched)


def average_recall(
    gt_masks: Sequence[Sequence[np.ndarray]],
    pred_masks: Sequence[Sequence[np.ndarray]],
    max_dets: Sequence[int] = (1, 10, 100),
    iou_thresholds: Sequence[float] | np.ndarray = _DEFAULT_IOU_THRESHOLDS,
    object_masks: Sequence[np.ndarray | Sequence[np.ndarray] | None] | None = None,
    pred_scores: Sequence[Sequence[float]] | None = None,
) -> dict[str, float]:
    """Class-agnostic average recall of part proposals.

    Protocol, per image (in PartDistillation an "image" is usually one object
    instance with its GT parts): keep the top-``k`` predictions; clip them to
    the GT object mask if given (pixel-wise AND, as the reference multiplies
    predictions by the object mask); match predictions to GT parts one-to-one,
    greedily by decreasing IoU, keeping pairs with ``IoU >= t``.  For each
    threshold ``t``, recall = (matched GT summed over images) / (GT summed
    over images); ``AR@k`` is its mean over thresholds.

    Args:
        gt_masks: per image, the GT part masks, each ``(H, W)`` bool.
        pred_masks: per image, predicted masks ``(H, W)`` bool, best first
            (or in any order together with ``pred_scores``).
        max_dets: the ``k`` values to report.
        iou_thresholds: IoU thresholds; rounded to 10 decimals so that an IoU
            of exactly 0.6 passes the 0.6 threshold despite
            ``np.arange``'s ``0.6000000000000001``.
        object_masks: optional, per image, the GT object mask ``(H, W)`` (or
            a list of masks, clipped to their union) the parts belong to.
        pred_scores: optional, per image, one score per prediction; the
            predictions are then ranked by descending score (stable).

    Returns:
        ``{"AR@k": recall}`` for each ``k`` in ``max_dets``; NaN when there is
        no GT part at all.
    """
    if len(gt_masks) != len(pred_masks):
        raise ValueError("gt_masks and pred_masks must have one entry per image")
    thr = np.round(np.asarray(iou_thresholds, dtype=np.float64), 10)
    ks = [int(k) for k in max_dets]
    k_max = max(ks) if ks else 0
    matched = {k: np.zeros(len(thr)) for k in ks}
    total_gt = 0
    for img, (gts, preds) in enumerate(zip(gt_masks, pred_masks, strict=True)):
        total_gt += len(gts)
        if len(gts) == 0 or len(preds) == 0:
            continue
        preds = list(preds)
        if pred_scores is not None:
            order = np.argsort(-np.asarray(pred_scores[img], dtype=np.float64), kind="stable")
            preds = [preds[i] for i in order]
        preds = preds[:k_max]
        obj = object_masks[img] if object_masks is not None else None
        if obj is not None:
            clip = np.logical_or.reduce([np.asarray(o, bool) for o in obj]) if isinstance(obj, list | tuple) else obj
            clip = np.asarray(clip, dtype=bool)
            preds = [np.logical_and(np.asarray(p, bool), clip) for p in preds]
        iou = mask_iou(gts, preds)  # (G, P), computed once for the largest k
        for k in ks:
            ious = _greedy_match_ious(iou[:, :k])
            matched[k] += (ious[None, :] >= thr[:, None] - 1e-12).sum(1)
    if total_gt == 0:
        return {f"AR@{k}": float("nan") for k in ks}
    return {f"AR@{k}": float((matched[k] / total_gt).mean()) for k in ks}


# --------------------------------------------------------------------------
# clustering agreement
# --------------------------------------------------------------------------


def contingency_table(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(n_a, n_b)`` int64 counts of co-occurring label values.

    Labels may be arbitrary integers; only values that occur get a row/column.
    """
    a = np.asarray(a).ravel()
    b = np.asarray(b).ravel()
    if a.shape != b.shape:
        raise ValueError(f"label arrays differ in size: {a.shape} vs {b.shape}")
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    na = int(ai.max()) + 1 if ai.size else 0
    nb = int(bi.max()) + 1 if bi.size else 0
    return np.bincount(ai * nb + bi, minlength=na * nb).reshape(na, nb).astype(np.int64)


def _entropy(counts: np.ndarray) -> float:
    n = counts.sum()
    p = counts[counts > 0] / n
    return float(-(p * np.log(p)).sum())


def normalized_mutual_info(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
    """NMI with arithmetic-mean normalisation (sklearn's default).

    ``MI / ((H(true) + H(pred)) / 2)``, natural log.  As in sklearn: 1.0 when
    both labellings are a single cluster (or empty), 0.0 when MI is 0
    otherwise.  Invariant to permutations of label values.
    """
    c = contingency_table(labels_true, labels_pred)
    if c.shape[0] == c.shape[1] and c.shape[0] <= 1:
        return 1.0
    n = c.sum()
    nz = c > 0
    pij = c[nz] / n
    pi = c.sum(1) / n
    pj = c.sum(0) / n
    outer = np.outer(pi, pj)[nz]
    mi = float((pij * (np.log(pij) - np.log(outer))).sum())
    if mi <= 0:
        return 0.0
    denom = (_entropy(c.sum(1)) + _entropy(c.sum(0))) / 2
    return float(min(1.0, mi / denom)) if denom > 0 else 1.0


def adjusted_rand_index(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
    """Adjusted Rand index (Hubert & Arabie), equal to sklearn's.

    Computed from the pair-confusion counts in int64/float64 (no overflow for
    millions of pixels).  1.0 for identical partitions (including the empty
    and single-element cases), ~0 for independent ones, can be negative.
    """
    c = contingency_table(labels_true, labels_pred)
    n = int(c.sum())
    sum_sq = int((c.astype(np.int64) ** 2).sum())
    a = c.sum(1).astype(np.int64)
    b = c.sum(0).astype(np.int64)
    # Pair confusion counts over ordered pairs, as sklearn's
    # pair_confusion_matrix: tp = same cluster in both, fp = same predicted
    # cluster only, fn = same true class only.
    tp = sum_sq - n
    fp = int((c @ b).sum()) - sum_sq if c.size else 0
    fn = int((c.T @ a).sum()) - sum_sq if c.size else 0
    tn = n * n - fp - fn - sum_sq
    if fn == 0 and fp == 0:
        return 1.0
    tp, fp, fn, tn = float(tp), float(fp), float(fn), float(tn)
    return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))


def per_object_nmi_ari(
    gt_labels: Sequence[np.ndarray],
    pred_labels: Sequence[np.ndarray],
) -> dict[str, float]:
    """NMI/ARI between GT part labels and predicted clusters, per object.

    Args:
        gt_labels: per object, an int array (any shape, e.g. ``(H, W)`` or
            ``(n,)``) of GT part ids over the object's pixels; pixels with a
            negative id are ignored.
        pred_labels: per object, predicted cluster ids, same shape.

    Returns:
        ``{"NMI", "ARI"}``: means over objects with at least one valid pixel;
        ``{"NMI_pooled", "ARI_pooled"}``: one score over all valid pixels of
        all objects, with the ids used as given -- meaningful when ids are
        consistent across objects (e.g. semantic part ids), offset them per
        object otherwise.  NaN when no object has a valid pixel.
    """
    if len(gt_labels) != len(pred_labels):
        raise ValueError("gt_labels and pred_labels must have one entry per object")
    nmis: list[float] = []
    aris: list[float] = []
    pooled_g: list[np.ndarray] = []
    pooled_p: list[np.ndarray] = []
    for g, p in zip(gt_labels, pred_labels, strict=True):
        g = np.asarray(g).ravel()
        p = np.asarray(p).ravel()
        if g.shape != p.shape:
            raise ValueError(f"object label shapes differ: {g.shape} vs {p.shape}")
        keep = g >= 0
        if not keep.any():
            continue
        g, p = g[keep], p[keep]
        nmis.append(normalized_mutual_info(g, p))
        aris.append(adjusted_rand_index(g, p))
        pooled_g.append(g)
        pooled_p.append(p)
    if not nmis:
        nan = float("nan")
        return {"NMI": nan, "ARI": nan, "NMI_pooled": nan, "ARI_pooled": nan}
    g_all = np.concatenate(pooled_g)
    p_all = np.concatenate(pooled_p)
    return {
        "NMI": float(np.mean(nmis)),
        "ARI": float(np.mean(aris)),
        "NMI_pooled": normalized_mutual_info(g_all, p_all),
        "ARI_pooled": adjusted_rand_index(g_all, p_all),
    }


def _object_pixels(g: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One object's GT and predicted ids, flattened to int64; their shapes must agree."""
    g = np.asarray(g).ravel().astype(np.int64)
    p = np.asarray(p).ravel().astype(np.int64)
    if g.shape != p.shape:
        raise ValueError(f"object label shapes differ: {g.shape} vs {p.shape}")
    return g, p


def per_class_nmi_ari(
    gt_labels: Sequence[np.ndarray],
    pred_labels: Sequence[np.ndarray],
    object_classes: Sequence[Hashable],
) -> dict[str, Any]:
    """FG-NMI and FG-ARI of class-consistent part predictions (Choudhury et al., 2021).

    For each object class, the foreground pixels (GT id ``>= 0``) of all its
    objects are pooled and NMI / ARI computed between their GT part ids and
    predicted ids; the scores are the means over classes, so a class with few
    pixels weighs as much as one with many. Pooling needs predicted ids that
    mean the same part across the objects of a class (e.g. a part-segmentation
    model's class-level part ids); use :func:`per_object_nmi_ari` for
    per-object clusterings. Predicted ids ``< 0`` (pixels no predicted part
    covers) form one extra "unassigned" cluster.

    Args:
        gt_labels: per object, an int array (any shape, e.g. ``(H, W)`` or
            ``(n,)``) of GT part ids; ``< 0`` = background / unlabelled,
            ignored.
        pred_labels: per object, predicted part ids, same shape.
        object_classes: per object, its object class (a name or an id).

    Returns:
        ``{"FG-NMI": float, "FG-ARI": float, "per_class": {class: {"NMI",
        "ARI", "pixels"}}}`` over the classes with at least one foreground
        pixel, in first-appearance order; the means are NaN when there is
        none.
    """
    if not (len(gt_labels) == len(pred_labels) == len(object_classes)):
        raise ValueError("gt_labels, pred_labels and object_classes must have the same length")
    pooled: dict[Hashable, tuple[list[np.ndarray], list[np.ndarray]]] = {}
    for g, p, c in zip(gt_labels, pred_labels, object_classes, strict=True):
        g, p = _object_pixels(g, p)
        keep = g >= 0
        if keep.any():
            gs, ps = pooled.setdefault(c, ([], []))
            gs.append(g[keep])
            ps.append(np.maximum(p[keep], -1))  # every negative id is the same "unassigned" cluster
    per_class: dict[Hashable, dict[str, float | int]] = {}
    for c, (gs, ps) in pooled.items():
        g_all, p_all = np.concatenate(gs), np.concatenate(ps)
        per_class[c] = {"NMI": normalized_mutual_info(g_all, p_all), "ARI": adjusted_rand_index(g_all, p_all),
                        "pixels": int(g_all.size)}
    nan = float("nan")
    return {
        "FG-NMI": float(np.mean([s["NMI"] for s in per_class.values()])) if per_class else nan,
        "FG-ARI": float(np.mean([s["ARI"] for s in per_class.values()])) if per_class else nan,
        "per_class": per_class,
    }


# --------------------------------------------------------------------------
# mIoU
# --------------------------------------------------------------------------


def _part_ious(conf: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    """Per-GT-part IoU when predicted id ``j`` is read as GT part
    ``mapping[j]`` (``-1`` = unmapped).  ``conf`` is ``(P_gt, K_pred)``."""
    n_parts = conf.shape[0]
    inter = np.zeros(n_parts)
    pred_area = np.zeros(n_parts)
    col = conf.sum(0)
    for j, g in enumerate(mapping):
        if g >= 0:
            inter[g] += conf[g, j]
            pred_area[g] += col[j]
    gt_area = conf.sum(1)
    union = gt_area + pred_area - inter
    # Parts absent from the GT of this class are not scored (standard mIoU).
    return np.where(gt_area > 0, inter / np.maximum(union, 1), np.nan)


def miou(
    gt_labels: Sequence[np.ndarray],
    pred_labels: Sequence[np.ndarray],
    object_classes: Sequence[int],
    num_parts: Mapping[int, int] | None = None,
    num_pred: Mapping[int, int] | None = None,
) -> dict[str, float]:
    """Part mIoU for class-consistent predicted part ids.

    Pixels of every object of class ``c`` accumulate one confusion matrix
    ``conf_c[gt_part, pred_id]`` (GT ids ``< 0`` are ignored, predicted ids
    ``< 0`` count as "no part").  Predicted ids are then mapped to GT parts
    of that class in two ways:

    * majority (many-to-one): each predicted id -> the GT part it overlaps
      most (ids that never hit a GT pixel stay unmapped);
    * Hungarian (one-to-one): ``scipy.optimize.linear_sum_assignment``
      maximising the total overlap; surplus ids stay unmapped.

    and each GT part's IoU is computed with its mapped ids' pixels as the
    prediction.  Per class, mIoU averages the parts present in that class's
    GT.

    Args:
        gt_labels: per object, int array of GT part ids ``0..P_c-1`` (any
            shape, pixels of the object; ``< 0`` = ignore).
        pred_labels: per object, int array of predicted ids ``0..K_c-1``,
            same shape, with ids consistent across objects of a class.
        object_classes: per object, its object class id.
        num_parts: optional ``{class: P_c}``; default max GT id + 1.
        num_pred: optional ``{class: K_c}``; default max predicted id + 1.

    Returns:
        ``"C-mIoU"`` (mean over object classes of the per-class mIoU) and
        ``"A-mIoU"`` (mean over all (class, part) pairs) for the majority
        mapping, plus ``"C-mIoU_hungarian"``/``"A-mIoU_hungarian"``.  NaN when
        nothing is scored.
    """
    if not (len(gt_labels) == len(pred_labels) == len(object_classes)):
        raise ValueError("gt_labels, pred_labels and object_classes must have the same length")
    per_class: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    for g, p, c in zip(gt_labels, pred_labels, object_classes, strict=True):
        g, p = _object_pixels(g, p)
        keep = g >= 0
        per_class.setdefault(int(c), []).append((g[keep], p[keep]))

    out: dict[str, float] = {}
    for name in ("majority", "hungarian"):
        class_means: list[float] = []
        all_parts: list[float] = []
        for c, items in sorted(per_class.items()):
            g_all = np.concatenate([g for g, _ in items])
            p_all = np.concatenate([p for _, p in items])
            n_parts = (num_parts or {}).get(c, int(g_all.max()) + 1 if g_all.size else 0)
            n_pred = (num_pred or {}).get(c, int(p_all.max()) + 1 if p_all.size else 0)
            if n_parts == 0:
                continue
            if (g_all.size and g_all.max() >= n_parts) or (p_all.size and p_all.max() >= n_pred):
                raise ValueError(f"class {c}: label ids exceed num_parts/num_pred")
            hit = p_all >= 0
            w = max(n_pred, 1)
            conf = np.bincount(g_all[hit] * w + p_all[hit], minlength=n_parts * w).reshape(n_parts, w)[:, :n_pred]
            # Pixels predicted as "no part" (< 0) still count in the GT area:
            # an extra, never-mapped column.
            missed = np.bincount(g_all[~hit], minlength=n_parts)
            conf_full = np.concatenate([conf, missed[:, None]], axis=1)
            mapping = np.full(n_pred + 1, -1)
            if n_pred:
                if name == "majority":
                    best = conf.argmax(0)
                    mapping[:n_pred] = np.where(conf.max(0) > 0, best, -1)
                else:
                    rows, cols = linear_sum_assignment(conf, maximize=True)
                    mapping[cols] = rows
            ious = _part_ious(conf_full, mapping)
            scored = ious[~np.isnan(ious)]
            if scored.size:
                class_means.append(float(scored.mean()))
                all_parts.extend(scored.tolist())
        suffix = "" if name == "majority" else "_hungarian"
        out[f"C-mIoU{suffix}"] = float(np.mean(class_means)) if class_means else float("nan")
        out[f"A-mIoU{suffix}"] = float(np.mean(all_parts)) if all_parts else float("nan")
    return out
