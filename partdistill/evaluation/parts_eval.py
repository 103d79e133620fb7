"""Part quality of every method of one pipeline run, on one split, by one protocol.

Each method gives, per ground-truth object, an :class:`ObjectPrediction`: a label map over the
object's image (part ids, -1 where none) and ranked part proposals. One scorer then computes:

- AR@1/10/50/100/200 (:func:`average_recall`): the object's proposals, best first, clipped to the
  GT object mask, against its GT parts (each object one "image", as the reference protocol);
- NMI / ARI within each object (:func:`per_object_nmi_ari`): meaningful for any method, also one
  whose ids are arbitrary per object (K-means per object, mined parts);
- for methods whose ids mean the same part across objects of a class ("class-consistent":
  ranking clusters, the final model): C-mIoU / A-mIoU with the majority (reference) and the
  Hungarian mapping (:func:`miou`) and FG-NMI / FG-ARI per class (:func:`per_class_nmi_ari`).

Objects come in two settings: the GT object masks (the paper's "GT Object ✓" rows) and the
pipeline's own instances matched to GT objects at IoU ≥ 0.5 (unmatched objects predict nothing).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from partdistill.evaluation.metrics import average_recall, miou, per_class_nmi_ari, per_object_nmi_ari
from partdistill.evaluation.premise import GTObject

AR_KS = (1, 10, 50, 100, 200)


@dataclass
class ObjectPrediction:
    label_map: np.ndarray | None                                # int (H, W), -1 = no part; None = no prediction
    proposals: list[np.ndarray] = field(default_factory=list)   # bool (H, W) masks
    scores: list[float] = field(default_factory=list)           # one per proposal (higher first)


def from_label_map(label_map: np.ndarray | None) -> ObjectPrediction:
    """A label map's parts as proposals, largest first (methods without scores)."""
    if label_map is None:
        return ObjectPrediction(None)
    ids, counts = np.unique(label_map[label_map >= 0], return_counts=True)
    order = np.argsort(-counts, kind="stable")
    return ObjectPrediction(label_map, [label_map == ids[i] for i in order], [float(counts[i]) for i in order])


def score_method(objects: Sequence[GTObject], preds: Sequence[ObjectPrediction], class_consistent: bool,
                 class_ids: Mapping[str, int], ar_ks: Sequence[int] = AR_KS) -> dict[str, float]:
    """All metrics of one method (fractions in [0, 1]; NaN where not defined). ``class_ids``:
    GT class name → id, the grouping of the class-level metrics."""
    if len(objects) != len(preds):
        raise ValueError(f"{len(objects)} objects but {len(preds)} predictions")
    maps = [np.full(o.mask.shape, -1, np.int32) if p.label_map is None else p.label_map.astype(np.int32)
            for o, p in zip(objects, preds, strict=True)]
    out: dict[str, float] = dict(average_recall(
        [o.part_masks for o in objects], [p.proposals for p in preds], max_dets=ar_ks,
        object_masks=[o.mask for o in objects], pred_scores=[p.scores for p in preds]))
    within = per_object_nmi_ari([o.part_labels[o.mask] for o in objects],
                                [lm[o.mask] for lm, o in zip(maps, objects, strict=True)])
    out["NMI (within object)"], out["ARI (within object)"] = within["NMI"], within["ARI"]
    nan = float("nan")
    if class_consistent:
        gt = [o.part_labels[o.mask] for o in objects]
        pr = [lm[o.mask] for lm, o in zip(maps, objects, strict=True)]
        classes = [class_ids[o.class_name] for o in objects]
        m = miou(_dense_gt(gt, classes), pr, classes)
        out.update({"C-mIoU": m["C-mIoU"], "A-mIoU": m["A-mIoU"], "C-mIoU (Hungarian)": m["C-mIoU_hungarian"],
                    "A-mIoU (Hungarian)": m["A-mIoU_hungarian"]})
        fg = per_class_nmi_ari(gt, pr, classes)
        out["FG-NMI"], out["FG-ARI"] = fg["FG-NMI"], fg["FG-ARI"]
    else:
        out.update({k: nan for k in ("C-mIoU", "A-mIoU", "C-mIoU (Hungarian)", "A-mIoU (Hungarian)", "FG-NMI",
                                     "FG-ARI")})
    out["objects"] = len(objects)
    out["predicted"] = sum(p.label_map is not None for p in preds)
    return out


def _dense_gt(gt: Sequence[np.ndarray], classes: Sequence[int]) -> list[np.ndarray]:
    """GT part category ids renumbered 0..P_c-1 per object class (miou wants dense ids)."""
    per_class: dict[int, dict[int, int]] = {}
    for g, c in zip(gt, classes, strict=True):
        table = per_class.setdefault(c, {})
        for v in np.unique(g[g >= 0]):
            table.setdefault(int(v), len(table))
    out = []
    for g, c in zip(gt, classes, strict=True):
        d = np.full(g.shape, -1, np.int64)
        for v, i in per_class[c].items():
            d[g == v] = i
        out.append(d)
    return out


def query_proposals(masks: np.ndarray, scores: np.ndarray, object_mask: np.ndarray,
                    mask_threshold: float = 0.5) -> ObjectPrediction:
    """All of a model's queries as proposals of one object (binarised, clipped to it, empty ones
    dropped, by score) with the argmax-by-(mask × score) label map over the object (query index)."""
    binary = (masks > mask_threshold) & object_mask[None]
    keep = np.nonzero(binary.reshape(len(binary), -1).any(1))[0]
    order = keep[np.argsort(-scores[keep], kind="stable")]
    conf = np.where(masks > mask_threshold, masks * scores[:, None, None], -1.0)
    best = conf.argmax(0)
    lm = np.where(object_mask & (conf.max(0) > 0), best, -1)
    return ObjectPrediction(lm, [binary[q] for q in order], [float(scores[q]) for q in order])
