"""Stage `instances`: the object instances whose pixels are mined for parts (paper §4.2).

Reads: `data` (``images.parquet`` and, for source 'gt', ``instances_{split}.json``), `teacher`.
Writes:

- ``instances/part-{shard:05d}.parquet``   one row per kept object instance:
  image_id:int64, instance_id:int64, split:str, file_name:str, class_id:int32, class_name:str,
  score:float32, bbox:list<float32>[4] (x, y, w, h), rle:str (COCO compressed counts), area:int64,
  height:int32, width:int32. Read the folder as one table: ``pyarrow.parquet.read_table(dir)``.
- ``skipped.parquet``   image_id, file_name, reason: images that could not be read, or have more than
  ``data.max_pixels`` pixels (the stage goes on)
- ``images.parquet``    image_id, file_name, split, kept (instances kept), detections (before filtering),
  small (detections dropped as under ``min_object_fraction`` of the image)
- ``classes.json``      {"class_names": [...]}: the object classes ``class_id`` indexes. This is the one
  class numbering of the run: the part models' class slices, `evaluate` and `predict` all read it
  (:func:`object_classes`). The teacher's classes (source 'teacher'), the data's object categories
  in the order of its instance JSONs (source 'gt'), or the folder classes (``image_class_first``).

Sources: 'teacher' runs the teacher; 'gt' reads ground-truth object masks (the paper's "GT
object" setting). Filtering follows the reference: a score threshold, the top k per image, and
objects under 5% of the image dropped. With ``image_class_first`` (the paper's Detic fallback for
ImageNet-style folders), detections of the image's own class come first, else the top k of any
class, all relabelled with the image's class.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from partdistill.parallel import ShardDone, artifact_key, job_artifact, process_cached
from partdistill.stages.base import Stage, StageContext
from partdistill.storage import mask_to_rle, read_parquet, write_json_atomic, write_parquet

SCHEMA = pa.schema([
    ("image_id", pa.int64()), ("instance_id", pa.int64()), ("split", pa.string()), ("file_name", pa.string()),
    ("class_id", pa.int32()), ("class_name", pa.string()), ("score", pa.float32()),
    ("bbox", pa.list_(pa.float32(), 4)), ("rle", pa.string()), ("area", pa.int64()),
    ("height", pa.int32()), ("width", pa.int32()),
])
MAX_INSTANCES_PER_IMAGE = 1000  # instance_id = image_id * 1000 + rank


@dataclass
class Detection:
    mask: np.ndarray   # bool (H, W)
    score: float
    class_id: int
    class_name: str


def select(
    detections: Sequence[Detection],
    score_threshold: float,
    topk: int,
    min_object_fraction: float,
    image_class: str | None = None,
    image_class_first: bool = False,
    image_class_id: int = -1,
) -> list[Detection]:
    """The reference's filtering. Returns detections by descending score. With
    ``image_class_first``, the kept detections take the image's class (name and ``image_class_id``,
    its index among the image set's folder classes)."""
    h, w = detections[0].mask.shape if detections else (1, 1)
    min_area = min_object_fraction * h * w
    kept = [d for d in detections if d.score >= score_threshold and d.mask.sum() >= max(min_area, 1)]
    kept.sort(key=lambda d: -d.score)
    if image_class_first and image_class is not None:
        own = [d for d in kept if d.class_name == image_class]
        kept = own if own else kept
        kept = [Detection(d.mask, d.score, image_class_id, image_class) for d in kept]
    return kept[:topk]


def run(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.config
    data = ctx.inputs["data"]
    images = read_parquet(data.file("images.parquet")).to_pylist()
    images = [im for im in images if im["split"] in cfg["splits"]]
    source = cfg["source"]
    if source not in ("teacher", "gt"):
        raise ValueError(f"instances.source must be 'teacher' or 'gt', got {source!r}")
    # ImageNet-style folders: classes are the folder names, numbered in sorted order
    folder_classes = {c: i for i, c in enumerate(sorted({im.get("class_name") for im in images} - {None}))}
    class_names = object_classes(cfg, data, ctx.inputs.get("teacher"))
    write_json_atomic(ctx.writer.path / "classes.json", {"class_names": class_names})
    shard_size = cfg["shard_images"]
    shards = [images[i:i + shard_size] for i in range(0, len(images), shard_size)]
    (ctx.writer.path / "instances").mkdir(exist_ok=True)
    names = [f"part-{index:05d}" for index in range(len(shards))]
    ctx.writer.plan_shards(names)
    todo = [i for i, name in enumerate(names) if not ctx.writer.shard_done(name)]
    # one job per unfinished shard: it runs here or on a cluster worker (runtime.task_runner)
    jobs = [{"name": names[i], "images": shards[i], "config": cfg, "data": job_artifact(data),
             "teacher": job_artifact(ctx.inputs["teacher"]) if source == "teacher" else None,
             "device": ctx.runtime.get("device", "cpu"),
             "resize_long_side": ctx.full_config["teacher"].get("resize_long_side"),
             "folder_classes": folder_classes, "max_pixels": ctx.max_pixels, "out": str(ctx.writer.path)}
            for i in todo]
    with ctx.progress.task(f"instances: {source} masks", total=len(images)) as bar:
        bar.advance(len(images) - sum(len(shards[i]) for i in todo))
        for j, done in ctx.map_shards(instances_shard, jobs, [f"instances-{job['name']}" for job in jobs]):
            ctx.writer.complete_shard(done.name, done.files, meta=done.meta)
            bar.advance(len(jobs[j]["images"]))

    metas = [ctx.writer.shard_meta(f"part-{i:05d}") for i in range(len(shards))]
    skipped = [s for m in metas for s in m["skipped"]]
    per_image = [p for m in metas for p in m["images"]]
    write_parquet(ctx.writer.path / "skipped.parquet", {
        "image_id": [s["image_id"] for s in skipped], "file_name": [s["file_name"] for s in skipped],
        "reason": [s["reason"] for s in skipped]},
        pa.schema([("image_id", pa.int64()), ("file_name", pa.string()), ("reason", pa.string())]))
    for p in per_image:
        p.setdefault("small", 0)  # shards written before the count was kept
    write_parquet(ctx.writer.path / "images.parquet", {k: [p[k] for p in per_image] for k in
                                                       ("image_id", "file_name", "split", "kept", "detections",
                                                        "small")})
    kept = sum(p["kept"] for p in per_image)
    return {"images": len(images), "instances": kept, "skipped_images": len(skipped),
            "images_without_instances": sum(1 for p in per_image if p["kept"] == 0),
            "instances_per_image": round(kept / max(len(per_image), 1), 2),
            # the reference's size filter: objects under min_object_fraction of the image are dropped
            f"dropped_under_{cfg['min_object_fraction']:g}_of_image": sum(p["small"] for p in per_image),
            "object_classes": len(class_names)}


def instances_shard(job: dict[str, Any]) -> ShardDone:
    """One shard of `instances` (see :func:`run` for the job's keys), here or on a cluster worker:
    writes ``instances/{name}.parquet`` into the partial folder ``job["out"]``."""
    from pathlib import Path

    cfg, data = job["config"], job["data"]
    teacher = gt = None
    if job["teacher"] is not None:
        teacher = cached_teacher(job["teacher"], job["device"], job["resize_long_side"])
    else:
        gt = process_cached(("instances-gt", *artifact_key(data)), lambda: _GroundTruth(data))
    rows, skipped, per_image = _shard(job["images"], cfg, teacher, gt, data, job["folder_classes"],
                                      job["max_pixels"])
    name = job["name"]
    write_parquet(Path(job["out"]) / "instances" / f"{name}.parquet",
                  {k: [r[k] for r in rows] for k in SCHEMA.names}, SCHEMA)
    return ShardDone(name, [f"instances/{name}.parquet"], {"skipped": skipped, "images": per_image})


def cached_teacher(artifact, device: str, resize_long_side: int | None):
    """The teacher of a `teacher` artifact, loaded once per process (instances and features share it)."""
    from partdistill.stages.teacher import load_teacher, teacher_checkpoint

    try:  # a checkpoint the artifact refers to may be replaced in place: then load it again
        stat = teacher_checkpoint(artifact).stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
    except OSError:
        stamp = None  # load_teacher says what is missing
    return process_cached(("teacher", *artifact_key(artifact), stamp, device, resize_long_side),
                          lambda: load_teacher(artifact, device, resize_long_side))


def _shard(shard, cfg, teacher, gt, data, folder_classes, max_pixels):
    from partdistill.data.images import ImageLoadError, load_rgb

    rows, skipped, per_image, loaded = [], [], [], []
    for im in shard:
        try:
            loaded.append((im, load_rgb(data.path / im["file_name"], max_pixels)))
        except ImageLoadError as err:
            skipped.append({"image_id": im["image_id"], "file_name": im["file_name"], "reason": err.reason})
    batch = cfg["batch_size"]
    for i in range(0, len(loaded), batch):
        chunk = loaded[i:i + batch]
        if teacher is not None:
            preds = teacher.predict([img for _, img in chunk], layers=())
            found = [[Detection(m, float(s), int(c), teacher.class_names[int(c)])
                      for m, s, c in zip(p.masks, p.scores, p.labels, strict=True)] for p in preds]
        else:
            found = [gt.detections(im) for im, _ in chunk]
        for (im, img), dets in zip(chunk, found, strict=True):
            h, w = img.shape[:2]
            sizes = {d.mask.shape for d in dets} - {(h, w)}
            if sizes:  # ground truth annotated at another size: its masks would not line up
                (mh, mw), *_ = sizes
                skipped.append({"image_id": im["image_id"], "file_name": im["file_name"],
                                "reason": f"image is {h}x{w}, its ground-truth masks are {mh}x{mw}"})
                continue
            kept = select(dets, cfg["score_threshold"], cfg["topk_per_image"], cfg["min_object_fraction"],
                          im.get("class_name"), cfg["image_class_first"], folder_classes.get(im.get("class_name"), -1))
            small = count_small(dets, cfg["score_threshold"], cfg["min_object_fraction"])
            for rank, d in enumerate(kept):
                rle = mask_to_rle(d.mask)
                ys, xs = np.nonzero(d.mask)
                rows.append({
                    "image_id": im["image_id"], "instance_id": im["image_id"] * MAX_INSTANCES_PER_IMAGE + rank,
                    "split": im["split"], "file_name": im["file_name"], "class_id": d.class_id,
                    "class_name": d.class_name, "score": d.score,
                    "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                             float(ys.max() - ys.min() + 1)],
                    "rle": rle["counts"], "area": int(d.mask.sum()), "height": h, "width": w,
                })
            per_image.append({"image_id": im["image_id"], "file_name": im["file_name"], "split": im["split"],
                              "kept": len(kept), "detections": len(dets), "small": small})
    return rows, skipped, per_image


def count_small(detections: Sequence[Detection], score_threshold: float, min_object_fraction: float) -> int:
    """How many of the detections that pass the score threshold :func:`select` drops for being
    under ``min_object_fraction`` of the image."""
    if not detections:
        return 0
    h, w = detections[0].mask.shape
    min_area = max(min_object_fraction * h * w, 1)
    return sum(1 for d in detections if d.score >= score_threshold and d.mask.sum() < min_area)


class _GroundTruth:
    """Ground-truth object masks from the data artifact's instance JSONs (objects, not parts)."""

    def __init__(self, data):
        from partdistill.data.images import coco_instance_masks

        # class ids index the data's categories (by name: one numbering across the split files), as a
        # teacher's labels index its class names
        index = {name: i for i, name in enumerate(data_categories(data))}
        self.by_image: dict[int, list[Detection]] = {}
        for split in ("train", "val"):
            name = f"instances_{split}.json"
            if name not in data.files:
                continue
            for image_id, insts in coco_instance_masks(data.file(name)).items():
                self.by_image[image_id] = [Detection(g.mask, 1.0, index[g.category_name], g.category_name)
                                           for g in insts]

    def detections(self, image: dict) -> list[Detection]:
        return self.by_image.get(image["image_id"], [])


def data_categories(data) -> list[str]:
    """The object categories of a `data` artifact by name, in the order its instance JSONs list them
    (train's first, then any class only val has): the class numbering of ground-truth objects,
    and the order a teacher trained on the data learns its classes in."""
    import json

    names: list[str] = []
    for split in ("train", "val"):
        if f"instances_{split}.json" in data.files:
            for c in json.loads(data.file(f"instances_{split}.json").read_text()).get("categories", []):
                if c["name"] not in names:
                    names.append(c["name"])
    return names


def object_classes(section: dict[str, Any], data, teacher=None) -> list[str]:
    """The object classes an `instances` artifact made with ``section`` numbers ``class_id`` by."""
    if section.get("image_class_first"):
        images = [im for im in read_parquet(data.file("images.parquet")).to_pylist()
                  if im["split"] in section["splits"]]
        folder = sorted({im.get("class_name") for im in images} - {None})
        if folder:
            return folder
    if section["source"] == "gt" or teacher is None:
        return data_categories(data)
    from partdistill.stages.teacher import teacher_class_names

    return teacher_class_names(teacher)


def read_object_classes(artifact, data=None, teacher=None) -> list[str]:
    """The class numbering of an `instances` artifact: its ``classes.json``; for an artifact made
    before that file was written, the same list from its inputs ``data`` and ``teacher``."""
    import json

    if "classes.json" in artifact.files:
        return list(json.loads(artifact.file("classes.json").read_text())["class_names"])
    if data is None:
        raise ValueError(f"{artifact.stage}/{artifact.version} has no classes.json: pass its data and teacher")
    return object_classes(artifact.manifest["config"], data, teacher)


def read_instances(artifact) -> pa.Table:
    """All instances of an `instances` artifact as one table."""
    import pyarrow.parquet as pq

    return pq.read_table(artifact.path / "instances")


def _relevant(section: dict[str, Any], cfg: Any) -> dict[str, Any]:
    # data.max_pixels decides which images are skipped; at its default it stays out of the hash, so
    # versions made before the setting existed are kept
    from partdistill.config import max_pixels
    from partdistill.data.images import DEFAULT_MAX_PIXELS

    limit = max_pixels(cfg)
    return section if limit == DEFAULT_MAX_PIXELS else {**section, "_max_pixels": limit}


STAGE = Stage("instances", ("data", "teacher"), "2", run, summary="object masks", relevant=_relevant,
              upstream_for=lambda section, cfg: ("data",) if section["source"] == "gt" else ("data", "teacher"))
