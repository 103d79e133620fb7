"""Score any COCO part-results file against part ground truth, with the `evaluate` stage's metrics.

``partdistill score PRED.json --parts parts_val.json --instances instances_val.json`` reads

* the ground truth: the objects of the instance JSON that have parts in the part JSON (each part's
  ``object_id`` names its object; :func:`~partdistill.evaluation.premise.load_coco_objects`, the
  loader the `evaluate` stage uses);
* the predictions: a COCO results list (``[{image_id, category_id, segmentation, score}, ...]``,
  as any method writes them), or a ``predictions.json`` of ``partdistill predict`` or of the
  `evaluate` stage (a dict with ``annotations``; see README, "Results files").

Each predicted part goes to a ground-truth object: the one its ``object_id`` names when the file
says its object ids are the instance JSON's annotation ids (``"object_ids": "annotation"``), else
the object of its image it overlaps most (a part overlapping none is not scored). Per object:

* proposals: the file's ``proposals`` of the object when it has them (the `evaluate` stage writes
  every query of its model), else its parts; best score first;
* label map: each object pixel takes the ``category_id`` of the best-scoring part covering it.

Category ids are taken as class-consistent part ids (``class × k + cluster`` in our files), so the
class-level metrics are computed too. The metrics are :func:`~partdistill.evaluation.parts_eval.score_method`'s:
AR@k, C-/A-mIoU (majority and Hungarian), FG-NMI/ARI and NMI/ARI within each object.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from partdistill.data.images import DatasetError
from partdistill.evaluation.parts_eval import AR_KS, ObjectPrediction, score_method
from partdistill.evaluation.premise import GTObject

__all__ = ["PartResults", "object_predictions", "read_results", "score_file", "write_results"]


@dataclass
class PartResults:
    """A part-results file, read."""

    parts: list[dict[str, Any]]
    proposals: list[dict[str, Any]] | None = None
    objects: list[dict[str, Any]] | None = None      # the predicted objects, where the file lists them
    by_annotation: bool = False                      # object_id is the instance JSON's annotation id
    object_classes: list[str] | None = None          # the class numbering of the file's category ids
    extra: dict[str, Any] = field(default_factory=dict)


def read_results(path: Path | str) -> PartResults:
    """A COCO results list or a predictions.json dict (``annotations`` and optionally ``proposals``,
    ``objects``, ``object_ids``, ``object_classes``).

    Raises:
        DatasetError: unreadable JSON, or entries without ``image_id``/``segmentation``/``score``.
    """
    from partdistill.data.images import _read_json

    path = Path(path)
    data = _read_json(path)
    if isinstance(data, list):
        results = PartResults(data)
    elif isinstance(data, dict) and isinstance(data.get("annotations"), list):
        results = PartResults(data["annotations"], data.get("proposals"), data.get("objects"),
                              data.get("object_ids") == "annotation", data.get("object_classes"),
                              {k: data[k] for k in ("model", "setting", "method") if k in data})
    else:
        raise DatasetError(f"{path}: expected a COCO results list or a dict with 'annotations'")
    for key, entries in (("annotations", results.parts), ("proposals", results.proposals or [])):
        for i, r in enumerate(entries):
            for f in ("image_id", "segmentation", "score") + (("category_id",) if key == "annotations" else ()):
                if not isinstance(r, dict) or f not in r:
                    raise DatasetError(f"{path}: {key}[{i}]: missing field {f!r}")
            if results.by_annotation and "object_id" not in r:
                raise DatasetError(f"{path}: {key}[{i}]: missing field 'object_id' (the file says its object ids "
                                   "are annotation ids)")
    return results


def object_predictions(objects: Sequence[GTObject], results: PartResults) -> tuple[list[ObjectPrediction], int]:
    """One ObjectPrediction per ground-truth object (``label_map`` None: nothing predicted for it),
    and the number of results that went to no object."""
    from partdistill.data.images import decode_segmentation

    by_image: dict[int, list[int]] = defaultdict(list)
    by_id: dict[int, int] = {}
    for i, o in enumerate(objects):
        by_image[o.image_id].append(i)
        if o.object_id is not None:
            by_id[o.object_id] = i

    def owner(r: Mapping[str, Any], mask: np.ndarray) -> int | None:
        if results.by_annotation:
            return by_id.get(int(r["object_id"]))
        best, best_overlap = None, 0
        for i in by_image.get(int(r["image_id"]), []):
            if objects[i].mask.shape != mask.shape:
                continue
            overlap = int(np.count_nonzero(objects[i].mask & mask))
            if overlap > best_overlap:
                best, best_overlap = i, overlap
        return best

    def decode(r: Mapping[str, Any]) -> np.ndarray | None:
        idx = by_image.get(int(r["image_id"]))
        if not idx:
            return None
        h, w = objects[idx[0]].mask.shape
        return decode_segmentation(r["segmentation"], h, w)

    unmatched = 0
    parts: dict[int, list[tuple[float, int, np.ndarray]]] = defaultdict(list)
    proposals: dict[int, list[tuple[float, np.ndarray]]] = defaultdict(list)
    for r in results.parts:
        mask = decode(r)
        i = owner(r, mask) if mask is not None else None
        if i is None:
            unmatched += 1
            continue
        parts[i].append((float(r["score"]), int(r["category_id"]), mask))
        if results.proposals is None:
            proposals[i].append((float(r["score"]), mask & objects[i].mask))
    for r in results.proposals or []:
        mask = decode(r)
        i = owner(r, mask) if mask is not None else None
        if i is not None:
            proposals[i].append((float(r["score"]), mask & objects[i].mask))
    predicted = set(parts) | set(proposals)
    if results.objects is not None and results.by_annotation:
        predicted |= {by_id[int(o["object_id"])] for o in results.objects if int(o["object_id"]) in by_id}

    out = []
    for i, o in enumerate(objects):
        if i not in predicted:
            out.append(ObjectPrediction(None))
            continue
        lm = np.full(o.mask.shape, -1, np.int32)
        # the best-scoring part wins a pixel: paint from the lowest score up (ties: the earlier wins)
        ranked = sorted(range(len(parts[i])), key=lambda j: -parts[i][j][0])
        for j in reversed(ranked):
            _, category, mask = parts[i][j]
            lm[mask & o.mask] = category
        props = sorted(proposals[i], key=lambda p: -p[0])
        out.append(ObjectPrediction(lm, [m for _, m in props], [s for s, _ in props]))
    return out, unmatched


def class_numbering(objects: Sequence[GTObject], object_classes: Sequence[str] | None) -> dict[str, int]:
    """GT class name → id for the class-level metrics: the file's numbering where it has one (the
    `evaluate` stage's), then any other class in object order."""
    ids = {n: i for i, n in enumerate(object_classes or [])}
    for o in (objects if object_classes else sorted(objects, key=lambda o: o.class_name)):
        ids.setdefault(o.class_name, len(ids))
    return ids


def score_file(predictions: Path | str, parts: Path | str, instances: Path | str,
               ar_ks: Sequence[int] = AR_KS) -> dict[str, Any]:
    """The metrics of a part-results file (fractions in [0, 1]; NaN where not defined), plus
    ``objects``, ``predicted`` and ``unmatched_results``.

    Raises:
        DatasetError: a malformed ground-truth or results file, naming the file and the id.
    """
    from partdistill.data.coco_splits import _check_parts
    from partdistill.data.images import _read_json, _validate_coco
    from partdistill.evaluation.premise import load_coco_objects

    instances, parts = Path(instances), Path(parts)
    data = _read_json(instances)
    _validate_coco(instances, data, need_masks=True)
    _check_parts(parts, instances, data)
    objects = load_coco_objects(instances, parts)
    if not objects:
        raise DatasetError(f"{instances}: no object has a part in {parts}")
    results = read_results(predictions)
    preds, unmatched = object_predictions(objects, results)
    metrics = score_method(objects, preds, True, class_numbering(objects, results.object_classes), ar_ks)
    metrics["unmatched_results"] = unmatched
    return metrics


def write_results(path: Path, objects: Sequence[GTObject], preds: Sequence[ObjectPrediction],
                  class_ids: Mapping[str, int], k: int, **extra: Any) -> int:
    """Write one method's predictions on ground-truth objects as a part-results file that
    :func:`score_file` scores to the same numbers: per predicted object its label map's parts
    (``annotations``; ``category_id`` = the label, ``score`` = that of the proposal it overlaps most)
    and its ranked ``proposals``. Objects need their ``object_id``. Returns the number of parts."""
    from partdistill.storage import mask_to_rle, write_json_atomic

    annotations, proposals, listed = [], [], []
    names = [n for n, _ in sorted(class_ids.items(), key=lambda kv: kv[1])]
    for o, p in zip(objects, preds, strict=True):
        if p.label_map is None or o.object_id is None:
            continue
        listed.append({"image_id": int(o.image_id), "object_id": int(o.object_id), "class_name": o.class_name,
                       "class_id": int(class_ids[o.class_name])})
        for m, s in zip(p.proposals, p.scores, strict=True):
            proposals.append({"image_id": int(o.image_id), "object_id": int(o.object_id),
                              "segmentation": mask_to_rle(np.asarray(m, bool)), "score": float(s)})
        lm = p.label_map
        for label in np.unique(lm[o.mask & (lm >= 0)]):
            m = o.mask & (lm == label)
            ious = [np.count_nonzero(m & q) / max(np.count_nonzero(m | q), 1) for q in p.proposals]
            score = float(p.scores[int(np.argmax(ious))]) if ious and max(ious) > 0 else 0.0
            annotations.append({"id": len(annotations) + 1, "image_id": int(o.image_id), "object_id": int(o.object_id),
                                "category_id": int(label), "object_class": int(label) // k,
                                "part_cluster": int(label) % k, "segmentation": mask_to_rle(m), "score": score,
                                "area": int(m.sum())})
    categories = [{"id": c * k + cl, "name": f"{name}/part{cl}", "supercategory": name}
                  for c, name in enumerate(names) for cl in range(k)]
    write_json_atomic(path, {**extra, "object_ids": "annotation", "object_classes": names, "k": k,
                             "categories": categories, "objects": listed, "annotations": annotations,
                             "proposals": proposals})
    return len(annotations)


def results_table(metrics: Mapping[str, Any], title: str) -> str:
    """One markdown row per method: the `evaluate` stage's columns (×100)."""
    from partdistill.stages.evaluate import COLUMNS, _pct

    lines = ["| method | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|",
             f"| {title} | " + " | ".join(_pct(metrics.get(c)) for c in COLUMNS) + " |"]
    return "\n".join(lines) + "\n"


def _json_ready(metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in metrics.items()}


def dumps(metrics: Mapping[str, Any]) -> str:
    return json.dumps(_json_ready(metrics), indent=2)
