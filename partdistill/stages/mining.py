"""Stage `mining`: part proposals by instance-level K-means, refined by a dense CRF (paper §4.2).

For every kept object instance: its stride-8 feature grid (`features`), its mask (`instances`),
K-means with k clusters on the feature cells inside the mask and full-resolution assignment
through the bilinearly upsampled features (:func:`partdistill.models.part_mining.mine_parts`),
optionally the reference's dense CRF on the image (:mod:`partdistill.models.crf`), then parts
under ``min_part_area`` pixels are dropped. With ``mining.fusion``'s colour or position weight
above 0, K-means clusters the features fused with each cell's CIELAB colour and (y, x) position
(:class:`partdistill.models.part_mining.Fusion`); with both 0 (the default) nothing is fused.
Every part lies inside its object mask: K-means only labels object pixels, and the CRF's result
is clamped to the mask.

Reads: `data` (images, for the CRF and colour-aware mining), `instances` (masks), `features`
(grids). Writes:

- ``mined_parts/part-{k:05d}.parquet``  one row per mined part: instance_id:int64, image_id:int64,
  split:str, part:int16 (0..n-1, dense per instance, in cluster order; n <= k), rle:str (COCO
  compressed counts of the full-image (height, width) part mask), area:int64 (pixels),
  height:int32, width:int32, crf:bool (whether the CRF refined it). Read the folder as one table:
  ``pyarrow.parquet.read_table(dir)``.
- ``skipped.parquet``  instance_id:int64, image_id:int64, reason:str: instances that gave no part
  (empty or tiny mask, no feature cells, NaN or Inf features, every part under ``min_part_area``,
  unreadable image).

Instances are processed in instance_id order, in shards of ``shard_instances``; each shard gets a
completion marker, so a killed run resumes at its first unfinished shard. Shards run in this
process or on a Dask / Ray cluster (``runtime.task_runner``, :mod:`partdistill.parallel`); in
this process the CRF runs in ``runtime.num_workers`` processes, on a cluster in each worker.
Neither changes a byte of the output, so they are runtime settings and not part of the version.
"""

from __future__ import annotations

import functools
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from partdistill.parallel import ShardDone, artifact_key, job_inputs, process_cached
from partdistill.stages.base import Stage, StageContext
from partdistill.storage import mask_to_rle, write_parquet

SCHEMA = pa.schema([
    ("instance_id", pa.int64()), ("image_id", pa.int64()), ("split", pa.string()), ("part", pa.int16()),
    ("rle", pa.string()), ("area", pa.int64()), ("height", pa.int32()), ("width", pa.int32()), ("crf", pa.bool_()),
])
SKIPPED_SCHEMA = pa.schema([("instance_id", pa.int64()), ("image_id", pa.int64()), ("reason", pa.string())])

# instance_id → (float32 (grid_h, grid_w, C) cells, its `features` index row); KeyError when absent
FeatureLookup = Callable[[int], tuple[np.ndarray, Mapping[str, Any]]]
# file_name → uint8 (H, W, 3) RGB
ImageLookup = Callable[[str], np.ndarray]


@dataclass
class MinedShard:
    """What :func:`mine_instances` found for a group of instances."""

    rows: list[dict[str, Any]] = field(default_factory=list)      # SCHEMA rows, one per part
    skipped: list[dict[str, Any]] = field(default_factory=list)   # SKIPPED_SCHEMA rows
    seconds: dict[str, float] = field(default_factory=lambda: {"read": 0.0, "kmeans": 0.0, "crf": 0.0,
                                                               "encode": 0.0})

    def table(self) -> dict[str, list[Any]]:
        return {c: [r[c] for r in self.rows] for c in SCHEMA.names}


def skip_reason(mask: np.ndarray, grid: np.ndarray | None, min_part_area: int) -> str | None:
    """Why an instance cannot give a part before any clustering, or ``None``.

    mask: bool (H, W) object mask; grid: its (grid_h, grid_w, C) feature cells, ``None`` if absent.
    An object smaller than ``min_part_area`` pixels cannot hold a part that survives the filter."""
    area = int(mask.sum())
    if area == 0:
        return "empty mask"
    if area < min_part_area:
        return f"mask smaller than min_part_area ({area} < {min_part_area} px)"
    if grid is None:
        return "no features"
    if grid.size == 0:
        return "empty feature grid"
    if not np.isfinite(grid).all():
        # K-means would silently put every pixel in one part (torch) or fail inside faiss
        return "features hold NaN or Inf"
    return None


def part_rows(row: Mapping[str, Any], labels: np.ndarray, k: int, min_part_area: int, crf: bool) -> list[dict]:
    """SCHEMA rows of one instance's parts: parts of ``min_part_area`` pixels or more, renumbered
    0..n-1 in cluster order. labels: integer (H, W), -1 background, 0..k-1 parts."""
    areas = np.bincount(labels[labels >= 0].ravel().astype(np.int64), minlength=k)
    rows = []
    for cluster in range(k):
        if areas[cluster] < min_part_area:
            continue
        rows.append({"instance_id": row["instance_id"], "image_id": row["image_id"], "split": row["split"],
                     "part": len(rows), "rle": mask_to_rle(labels == cluster)["counts"],
                     "area": int(areas[cluster]), "height": labels.shape[0], "width": labels.shape[1], "crf": crf})
    return rows


def mine_instances(
    instances: Sequence[Mapping[str, Any]],
    features: FeatureLookup,
    images: ImageLookup | None,
    cfg: Mapping[str, Any],
    executor: Executor | None = None,
) -> MinedShard:
    """Mine the parts of a group of instances (one K-means call for all, then the CRF).

    instances: `instances` rows (instance_id, image_id, split, file_name, rle, height, width).
    features:  instance_id → (float32 (grid_h, grid_w, C), index row with grid_y0, grid_x0, stride,
               scale_y, scale_x); raises KeyError for an instance without features.
    images:    file_name → uint8 (H, W, 3) RGB; only called when ``cfg["crf"]["enabled"]`` or when
               ``cfg["fusion"]`` fuses colour or position.
    cfg:       the `mining` config section (k, metric, iters, seed, backend, min_part_area, crf,
               fusion: optional).
    executor:  a process pool for the CRF (:func:`partdistill.models.crf.make_pool`); None: in-process.
    """
    from partdistill.data.images import ImageLoadError
    from partdistill.models.crf import CRFItem, CRFParams, refine_many
    from partdistill.models.part_mining import Fusion, ObjectFeatures, mine_parts
    from partdistill.stages.features import instance_mask, object_features

    out = MinedShard()
    k, min_area = int(cfg["k"]), int(cfg["min_part_area"])
    crf_cfg = dict(cfg.get("crf") or {})
    use_crf = bool(crf_cfg.get("enabled", False))
    if use_crf and images is None:
        raise ValueError("mining.crf.enabled needs the images: pass an image lookup")
    fusion = Fusion.from_config(cfg.get("fusion"))
    if fusion.active and images is None:
        raise ValueError("mining.fusion with colour or position needs the images: pass an image lookup")
    need_image = use_crf or fusion.active

    start = time.perf_counter()
    kept: list[tuple[Mapping[str, Any], ObjectFeatures, np.ndarray | None]] = []
    for row in instances:
        mask = instance_mask(row)
        try:
            grid, meta = features(row["instance_id"])
        except KeyError:
            grid, meta = None, None
        reason = skip_reason(mask, grid, min_area)
        image = None
        if reason is None and need_image:
            try:
                image = images(row["file_name"])
                if image.shape[:2] != mask.shape:
                    reason = f"image is {image.shape[:2]}, mask is {mask.shape}"
            except ImageLoadError as err:
                reason = f"image: {err.reason}"
        if reason is not None:
            out.skipped.append({"instance_id": row["instance_id"], "image_id": row["image_id"], "reason": reason})
            continue
        obj = object_features(grid, meta, mask)
        kept.append((row, obj, image))
    out.seconds["read"] = time.perf_counter() - start

    start = time.perf_counter()
    # fusion=None when nothing is fused: exactly the features-only K-means
    maps = mine_parts([obj for _, obj, _ in kept], k=k, metric=cfg["metric"], iters=int(cfg["iters"]),
                      seed=int(cfg["seed"]), backend=cfg["backend"], fusion=fusion if fusion.active else None,
                      images=[image for _, _, image in kept] if fusion.active else None) if kept else []
    out.seconds["kmeans"] = time.perf_counter() - start

    if use_crf and kept:
        start = time.perf_counter()
        params = CRFParams.from_config(crf_cfg)
        items = [CRFItem(image, labels, obj.mask, k) for (_, obj, image), labels in zip(kept, maps, strict=True)]
        maps = refine_many(items, params=params, executor=executor)
        out.seconds["crf"] = time.perf_counter() - start

    start = time.perf_counter()
    for (row, obj, _), labels in zip(kept, maps, strict=True):
        # the guarantee downstream stages rely on; K-means and the CRF clamp both give it
        if (labels[~obj.mask] >= 0).any():
            raise RuntimeError(f"instance {row['instance_id']}: a mined part leaves its object mask")
        rows = part_rows(row, labels, k, min_area, use_crf)
        if not rows:
            out.skipped.append({"instance_id": row["instance_id"], "image_id": row["image_id"],
                                "reason": f"no part of at least min_part_area ({min_area} px)"})
        out.rows.extend(rows)
    out.seconds["encode"] = time.perf_counter() - start
    return out


def run(ctx: StageContext) -> dict[str, Any]:
    """Mine every instance, shard by shard (resuming finished shards); returns the summary:
    instance / part / skip counts and the seconds spent reading, in K-means, in the CRF and encoding."""
    from partdistill.stages.instances import read_instances

    cfg = ctx.config
    columns = ["instance_id", "image_id", "split", "file_name", "rle", "height", "width", "bbox"]
    instances = sorted(read_instances(ctx.inputs["instances"]).select(columns).to_pylist(),
                       key=lambda r: r["instance_id"])
    size = int(cfg["shard_instances"])
    # at least one (maybe empty) file, so that readers of the folder always find a table
    shards = [instances[i:i + size] for i in range(0, len(instances), size)] or [[]]
    if cfg["fused"] and (ctx.full_config["features"].get("reduction") or {}).get("type"):
        raise NotImplementedError("mining.fused with features.reduction is not built: set one or the other")
    from partdistill.models.part_mining import Fusion

    Fusion.from_config(cfg.get("fusion"))  # a bad weight fails here, before any shard
    out = ctx.writer.path
    (out / "mined_parts").mkdir(exist_ok=True)
    use_crf = bool((cfg.get("crf") or {}).get("enabled", False))
    # In this process the CRF runs in runtime.num_workers processes; on a cluster each worker runs
    # its shard's CRFs itself (the workers are the parallelism). No byte depends on it.
    crf_processes = int(ctx.runtime.get("num_workers", 1)) if ctx.shards_in_process else 1

    names = [f"part-{index:05d}" for index in range(len(shards))]
    ctx.writer.plan_shards(names)
    todo = [i for i, name in enumerate(names) if not ctx.writer.shard_done(name)]
    # one job per unfinished shard: it runs here or on a cluster worker (runtime.task_runner)
    jobs = [{"name": names[i], "instances": shards[i], "config": cfg, "inputs": job_inputs(ctx.inputs),
             "features_config": ctx.full_config["features"], "full_config": ctx.full_config,
             "max_pixels": ctx.max_pixels, "crf_processes": crf_processes, "out": str(out)} for i in todo]
    with ctx.progress.task("mining: K-means" + (" + CRF" if use_crf else ""), total=len(instances)) as bar:
        bar.advance(len(instances) - sum(len(shards[i]) for i in todo))
        for j, done in ctx.map_shards(mining_shard, jobs, [f"mining-{job['name']}" for job in jobs]):
            ctx.writer.complete_shard(done.name, done.files, meta=done.meta)
            bar.advance(len(jobs[j]["instances"]))

    metas = [ctx.writer.shard_meta(f"part-{i:05d}") for i in range(len(shards))]
    skipped = sorted((s for m in metas for s in m["skipped"]), key=lambda s: s["instance_id"])
    write_parquet(out / "skipped.parquet", {c: [s[c] for s in skipped] for c in SKIPPED_SCHEMA.names},
                  SKIPPED_SCHEMA)
    parts = sum(m["parts"] for m in metas)
    mined = sum(m["mined"] for m in metas)
    seconds = {key: round(sum(m["seconds"][key] for m in metas), 3) for key in ("read", "kmeans", "crf", "encode")}
    n = max(len(instances), 1)
    return {"instances": len(instances), "mined_instances": mined, "parts": parts,
            "parts_per_instance": round(parts / max(mined, 1), 2), "skipped": len(skipped),
            "skipped_reasons": dict(Counter(s["reason"].split(" (")[0] for s in skipped)), "crf": use_crf,
            "seconds": seconds, "kmeans_seconds_per_instance": round(seconds["kmeans"] / n, 5),
            "crf_seconds_per_instance": round(seconds["crf"] / n, 5)}


def mining_shard(job: dict[str, Any]) -> ShardDone:
    """One shard of `mining` (see :func:`run` for the job's keys), here or on a cluster worker:
    writes ``mined_parts/{name}.parquet`` into the partial folder ``job["out"]``."""
    from pathlib import Path

    from partdistill.data.images import load_rgb
    from partdistill.models.crf import make_pool
    from partdistill.stages.features import FeatureReader, FusedFeatures, feature_extractor

    cfg, inputs, shard = job["config"], job["inputs"], job["instances"]
    data = inputs["data"]
    if cfg["fused"]:
        reader = FusedFeatures(job["features_config"], feature_extractor(job["features_config"], inputs,
                               job["full_config"]), shard, data, job["max_pixels"])
    else:  # its index is read once per process
        reader = process_cached(("feature-reader", *artifact_key(inputs["features"])),
                                lambda: FeatureReader(inputs["features"]))
    # instances of one image are consecutive (instance_id = image_id * 1000 + rank): a tiny cache
    # loads each image once
    images = functools.lru_cache(maxsize=4)(lambda name: load_rgb(data.path / name, job["max_pixels"]))
    use_crf = bool((cfg.get("crf") or {}).get("enabled", False))
    # (colour-aware mining needs the images too; it runs in this process, the pool is the CRF's)
    pool = make_pool(int(job["crf_processes"])) if use_crf and len(shard) > 1 else None
    try:
        mined = mine_instances(shard, reader.get, images, cfg, pool)
    finally:
        if pool is not None:
            pool.shutdown()
    name = job["name"]
    write_parquet(Path(job["out"]) / "mined_parts" / f"{name}.parquet", mined.table(), SCHEMA)
    return ShardDone(name, [f"mined_parts/{name}.parquet"], {
        "instances": len(shard), "parts": len(mined.rows), "skipped": mined.skipped,
        "mined": len({r["instance_id"] for r in mined.rows}), "seconds": mined.seconds})


def _upstream(section: dict[str, Any], cfg: Mapping[str, Any]) -> tuple[str, ...]:
    # fused: features are computed here (from the teacher, or a backbone) and never stored
    if not section["fused"]:
        return ("data", "instances", "features")
    return ("data", "teacher", "instances") if cfg["features"]["extractor"] == "teacher" else ("data", "instances")


def _relevant(section: dict[str, Any], cfg: Mapping[str, Any]) -> dict[str, Any]:
    # Nothing fused (colour and position weights 0, or no `fusion` key): the features-only K-means,
    # so the version leaves `fusion` out and stays that of mining before `fusion` existed.
    fusion = section.get("fusion") or {}
    if not any(_positive(fusion.get(key)) for key in ("color_weight", "position_weight")):
        section = {key: value for key, value in section.items() if key != "fusion"}
    else:  # a weight of 16 and one of 16.0 give the same bytes, so the same version
        section = {**section, "fusion": {key: float(value) if isinstance(value, int) and not isinstance(value, bool)
                                         else value for key, value in fusion.items()}}
    # fused mining computes the features itself, so the features settings are part of its version
    return {**section, "_features": dict(cfg["features"])} if section["fused"] else section


def _positive(value: Any) -> bool:
    """Whether a fusion weight fuses its block; a value that is no number is hashed (and refused by
    :class:`~partdistill.models.part_mining.Fusion` when the stage runs)."""
    try:
        return not float(value) <= 0  # NaN counts as set
    except (TypeError, ValueError):
        return value is not None


STAGE = Stage("mining", ("data", "teacher", "instances", "features"), "1", run, summary="K-means part proposals",
              upstream_for=_upstream, relevant=_relevant)
