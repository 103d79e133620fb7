"""Score the part proposals of a `mining` artifact against the part ground truth of a split.

The protocol is the premise check's (:mod:`partdistill.evaluation.premise`), applied to what the
pipeline wrote instead of to clusters computed on the side:

- every instance of the split is matched to the ground-truth object of its image with the
  highest mask IoU, if that IoU is at least 0.5; a GT object claimed by several instances keeps
  the one with the highest IoU (teacher duplicates must not score twice);
- per GT object, the predictions are the matched instance's mined parts, largest first, clipped
  to the GT object mask; AR@1 / AR@10 with :func:`average_recall`, each object one "image" (the
  paper's GT-object ablations), and NMI / ARI over the object's pixels with
  :func:`per_object_nmi_ari`;
- AR is over the parts of *all* GT objects of the split: an object no instance matches keeps its
  parts in the denominator and counts with no prediction (all its pixels "unlabelled", -1, which
  gives NMI = ARI = 0 for an object of two parts or more).

The core, :func:`score_label_maps`, takes one label map per GT object, so anything that labels
pixels (the stage's output, K-means on raw RGB, a dataset-level clustering done on the side) is
scored by the same code. It reads ``parts_{split}.json``, which is evaluation-only: benchmarks and
the `evaluate` stage may call it, training stages may not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from partdistill.evaluation.metrics import mask_iou
from partdistill.evaluation.premise import GTObject, load_gt_objects, score
from partdistill.storage import rle_to_mask

__all__ = [
    "MATCH_IOU",
    "evaluate_label_maps",
    "evaluate_mined",
    "instance_label_maps",
    "match_instances",
    "object_label_maps",
    "rgb_label_maps",
    "score_label_maps",
]

MATCH_IOU = 0.5


def score_label_maps(objects: Sequence[GTObject], label_maps: Sequence[np.ndarray | None]) -> dict[str, float]:
    """AR@1, AR@10, NMI, ARI of one label map per GT object, plus the counts.

    label_maps[i]: int (H, W) over GT object i's image, -1 where no part, part ids otherwise
    (ranked by their pixel count, largest first, before clipping to the object); ``None``: no
    instance matched the object. Returns {"AR@1", "AR@10", "NMI", "ARI", "objects", "matched"}.
    """
    if len(objects) != len(label_maps):
        raise ValueError(f"{len(objects)} objects but {len(label_maps)} label maps")
    # An unmatched object predicts nothing: an all -1 map gives no proposal (AR) and one
    # "unlabelled" cluster (NMI/ARI), through the very same code as a matched one.
    maps = [np.full(o.mask.shape, -1, np.int16) if lm is None else lm for o, lm in zip(objects, label_maps,
                                                                                        strict=True)]
    out: dict[str, float] = dict(score(objects, maps))  # NaN everywhere without objects
    out["objects"] = len(objects)
    out["matched"] = sum(lm is not None for lm in label_maps)
    return out


def match_instances(objects: Sequence[GTObject], instances: Sequence[Mapping[str, Any]],
                    min_iou: float = MATCH_IOU) -> dict[int, int]:
    """GT object index → the instance_id matched to it (one-to-one).

    instances: `instances` rows (image_id, instance_id, rle, height, width). Each instance goes to
    the GT object of its image with the highest mask IoU, if >= ``min_iou``; of several instances
    that pick the same object, the one with the highest IoU keeps it (ties: lowest instance_id).
    """
    by_image: dict[int, list[int]] = {}
    for i, o in enumerate(objects):
        by_image.setdefault(o.image_id, []).append(i)
    best: dict[int, tuple[float, int]] = {}  # object index → (IoU, instance_id)
    for row in sorted(instances, key=lambda r: r["instance_id"]):
        candidates = by_image.get(row["image_id"], [])
        if not candidates:
            continue
        mask = rle_to_mask({"size": [row["height"], row["width"]], "counts": row["rle"]})
        if any(objects[i].mask.shape != mask.shape for i in candidates):
            raise ValueError(f"instance {row['instance_id']}: mask {mask.shape} is not the size of its image's GT")
        ious = mask_iou([mask], [objects[i].mask for i in candidates])[0]
        j = int(np.argmax(ious))
        if ious[j] < min_iou:
            continue
        obj, iou = candidates[j], float(ious[j])
        if obj not in best or iou > best[obj][0]:
            best[obj] = (iou, int(row["instance_id"]))
    return {obj: iid for obj, (_, iid) in best.items()}


def instance_label_maps(mining_artifact: Any, split: str | None = None) -> dict[int, np.ndarray]:
    """instance_id → int16 (H, W) label map of its mined parts, id 0 the largest part.

    Reads ``mined_parts/`` of a `mining` artifact (anything with a ``path``); instances without a
    part (skipped) are absent."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(Path(mining_artifact.path) / "mined_parts")
    if split is not None:
        table = table.filter(pc.equal(table["split"], split))
    by_instance: dict[int, list[dict[str, Any]]] = {}
    for r in table.to_pylist():
        by_instance.setdefault(r["instance_id"], []).append(r)
    maps = {}
    for iid, parts in by_instance.items():
        parts.sort(key=lambda p: (-p["area"], p["part"]))
        lm = np.full((parts[0]["height"], parts[0]["width"]), -1, np.int16)
        for rank, p in enumerate(parts):
            lm[rle_to_mask({"size": [p["height"], p["width"]], "counts": p["rle"]})] = rank
        maps[iid] = lm
    return maps


def object_label_maps(objects: Sequence[GTObject], matches: Mapping[int, int],
                      by_instance: Mapping[int, np.ndarray]) -> list[np.ndarray | None]:
    """Per GT object, the label map of its matched instance; ``None`` when unmatched. A matched
    instance that gave no part (absent from ``by_instance``) predicts nothing: an all -1 map."""
    out: list[np.ndarray | None] = []
    for i, o in enumerate(objects):
        iid = matches.get(i)
        if iid is None:
            out.append(None)
        else:
            lm = by_instance.get(iid)
            out.append(lm if lm is not None else np.full(o.mask.shape, -1, np.int16))
    return out


def _split_instances(instances_artifact: Any, split: str) -> list[dict[str, Any]]:
    from partdistill.stages.instances import read_instances

    columns = ["image_id", "instance_id", "split", "file_name", "rle", "height", "width"]
    return [r for r in read_instances(instances_artifact).select(columns).to_pylist() if r["split"] == split]


def evaluate_label_maps(data_dir: Path, instances_artifact: Any, by_instance: Mapping[int, np.ndarray],
                        split: str = "val", objects: Sequence[GTObject] | None = None) -> dict[str, float]:
    """Score per-instance label maps (instance_id → int (H, W), -1 outside the parts) of an
    `instances` artifact against the split's part ground truth (matching, then
    :func:`score_label_maps`). ``objects``: the split's GT objects, when already loaded."""
    objects = load_gt_objects(Path(data_dir), split) if objects is None else objects
    matches = match_instances(objects, _split_instances(instances_artifact, split))
    return score_label_maps(objects, object_label_maps(objects, matches, by_instance))


def evaluate_mined(data_dir: Path, instances_artifact: Any, mining_artifact: Any, split: str = "val",
                   objects: Sequence[GTObject] | None = None) -> dict[str, float]:
    """Score the mined parts of a `mining` artifact against the part GT of ``split``.

    data_dir: the `data` artifact's folder (``instances_{split}.json``, ``parts_{split}.json``);
    instances_artifact / mining_artifact: the `instances` and `mining` artifacts of that run.
    Returns {"AR@1", "AR@10", "NMI", "ARI"} (fractions, NaN without GT parts), "objects" (GT
    objects of the split with parts) and "matched" (those an instance matched)."""
    return evaluate_label_maps(data_dir, instances_artifact, instance_label_maps(mining_artifact, split), split,
                               objects)


def rgb_label_maps(data_dir: Path, instances_artifact: Any, split: str = "val", k: int = 4,
                   metric: str = "cosine", seed: int = 0, min_part_area: int = 0) -> dict[int, np.ndarray]:
    """The raw-RGB floor: K-means (k clusters) on each instance's pixel colours, in [0, 1]
    (:func:`~partdistill.models.part_mining.rgb_object` + ``mine_parts``), as instance_id → label
    map, ready for :func:`evaluate_label_maps`. Clusters under ``min_part_area`` pixels are
    dropped, as the mining stage drops its small parts."""
    import functools

    from partdistill.data.images import load_rgb
    from partdistill.models.part_mining import mine_parts, rgb_object
    from partdistill.stages.features import instance_mask

    rows = _split_instances(instances_artifact, split)
    load = functools.lru_cache(maxsize=4)(lambda name: load_rgb(Path(data_dir) / name))
    kept, objs = [], []
    for r in rows:
        mask = instance_mask(r)
        if mask.any():
            kept.append(r["instance_id"])
            objs.append(rgb_object(load(r["file_name"]), mask))
    maps = mine_parts(objs, k=k, metric=metric, seed=seed) if objs else []
    out = {}
    for iid, lm in zip(kept, maps, strict=True):
        ids, counts = np.unique(lm[lm >= 0], return_counts=True)
        for i in ids[counts < min_part_area]:
            lm[lm == i] = -1
        out[iid] = lm
    return out
