"""The premise check: do a teacher's features group an object's pixels into its parts?

The paper's core claim (§4.2, Tables 5–6) is that clustering an instance model's pixel features
inside an object mask finds parts. Here K-means (k=4, cosine by default) runs inside every
ground-truth object mask of an evaluation split, once per feature source, and the clusters are
scored against the part ground truth:

- AR@1 / AR@10: each object is one "image" whose proposals are its clusters, largest first,
  clipped to the object mask (the paper's ablation protocol uses GT object masks this way);
- NMI / ARI within each object, because per-object cluster ids are arbitrary.

Raw RGB is the floor every table carries. Reads part ground truth: evaluation only.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from partdistill.evaluation.metrics import average_recall, per_object_nmi_ari
from partdistill.models.part_mining import ObjectFeatures, mine_parts, rgb_object


@dataclass
class GTObject:
    image_id: int
    file_name: str
    class_name: str
    mask: np.ndarray          # bool (H, W)
    part_labels: np.ndarray   # int16 (H, W): part category id inside the object, -1 elsewhere / unlabelled
    part_masks: list[np.ndarray]
    object_id: int | None = None  # the object's annotation id in its instance JSON, where it has one


def load_gt_objects(data_dir: Path, split: str = "val", limit: int | None = None) -> list[GTObject]:
    """Objects with their parts from a Parts World (or PartImageNet-style) data folder."""
    return load_coco_objects(data_dir / f"instances_{split}.json", data_dir / f"parts_{split}.json", limit)


def load_coco_objects(instances: Path | str, parts: Path | str, limit: int | None = None) -> list[GTObject]:
    """The objects of an instance JSON that have parts in a part JSON (each part's ``object_id``
    names its object), in ascending annotation id. Segmentations may be polygons or RLE."""
    from partdistill.data.images import decode_segmentation

    inst = json.loads(Path(instances).read_text())
    parts_data = json.loads(Path(parts).read_text())
    images = {im["id"]: im for im in inst["images"]}
    names = {c["id"]: c["name"] for c in inst["categories"]}
    by_object: dict[int, list[dict]] = {}
    for p in parts_data["annotations"]:
        by_object.setdefault(p["object_id"], []).append(p)
    objects = []
    for a in sorted(inst["annotations"], key=lambda a: a["id"]):
        if a["id"] not in by_object:
            continue
        im = images[a["image_id"]]
        mask = decode_segmentation(a["segmentation"], im["height"], im["width"])
        labels = np.full(mask.shape, -1, np.int16)
        part_masks = []
        for p in by_object[a["id"]]:
            pm = decode_segmentation(p["segmentation"], im["height"], im["width"]) & mask
            labels[pm] = p["category_id"]
            part_masks.append(pm)
        objects.append(GTObject(a["image_id"], im["file_name"], names[a["category_id"]], mask, labels, part_masks,
                                int(a["id"])))
        if limit and len(objects) >= limit:
            break
    return objects


# A feature source maps an RGB image (H, W, 3) uint8 and its file name to a stride-8 grid, float32
# (gh, gw, C), and the scale (sy, sx) of the image the grid was computed on, relative to the original.
FeatureSource = Callable[[np.ndarray, str], tuple[np.ndarray, tuple[float, float]]]


def score(objects: Sequence[GTObject], label_maps: Sequence[np.ndarray]) -> dict[str, float]:
    """AR@1/AR@10 and per-object NMI/ARI of part label maps (int, -1 outside) against GT parts."""
    preds = []
    for lm in label_maps:
        ids, counts = np.unique(lm[lm >= 0], return_counts=True)
        preds.append([lm == i for i in ids[np.argsort(-counts, kind="stable")]])
    ar = average_recall([o.part_masks for o in objects], preds, max_dets=(1, 10),
                        object_masks=[o.mask for o in objects])
    nmi = per_object_nmi_ari([o.part_labels[o.mask] for o in objects], [lm[o.mask] for lm, o in
                                                                         zip(label_maps, objects, strict=True)])
    return {"AR@1": ar["AR@1"], "AR@10": ar["AR@10"], "NMI": nmi["NMI"], "ARI": nmi["ARI"]}


def run_source(
    objects: Sequence[GTObject],
    images: dict[str, np.ndarray],
    source: FeatureSource | None,
    stride: int = 8,
    k: int = 4,
    metric: str = "cosine",
    seed: int = 0,
) -> list[np.ndarray]:
    """Part label maps for every object; ``source=None`` means raw RGB."""
    grids: dict[str, tuple[np.ndarray, tuple[float, float]]] = {}
    feats = []
    for o in objects:
        img = images[o.file_name]
        if source is None:
            feats.append(rgb_object(img, o.mask))
            continue
        if o.file_name not in grids:
            grids[o.file_name] = source(img, o.file_name)
        grid, scale = grids[o.file_name]
        feats.append(ObjectFeatures(grid, o.mask, 0, 0, float(stride), scale))
    return mine_parts(feats, k=k, metric=metric, seed=seed)


def part_oracle(objects: Sequence[GTObject], stride: int = 8) -> FeatureSource:
    """The ground-truth parts themselves as features, pooled to the stride-8 grid: each cell holds
    the fraction of its pixels in each part. K-means on these shows what clustering at stride 8
    can reach at best, so how much of the gap to full-resolution RGB is resolution alone."""
    import torch
    import torch.nn.functional as F

    by_image: dict[str, list[GTObject]] = {}
    for o in objects:
        by_image.setdefault(o.file_name, []).append(o)
    part_ids = sorted({int(i) for o in objects for i in np.unique(o.part_labels) if i >= 0})
    index = {p: i for i, p in enumerate(part_ids)}

    def source(img: np.ndarray, file_name: str):
        h, w = img.shape[:2]
        onehot = np.zeros((len(part_ids) + 1, h, w), np.float32)
        onehot[-1] = 1.0
        for o in by_image[file_name]:
            ys, xs = np.nonzero(o.part_labels >= 0)
            onehot[[index[int(v)] for v in o.part_labels[ys, xs]], ys, xs] = 1.0
            onehot[-1, ys, xs] = 0.0
        gh, gw = -(-h // stride), -(-w // stride)
        pooled = F.adaptive_avg_pool2d(torch.from_numpy(onehot)[None], (gh, gw))[0]
        return pooled.permute(1, 2, 0).numpy(), (1.0, 1.0)

    return source
