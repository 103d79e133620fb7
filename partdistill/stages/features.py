"""Stage `features`: the teacher's pixel features around each kept object instance (paper §4.2).

The reference clusters Swin-L res3 (stride 8) and res4 (stride 16, upsampled to 8) features on
an object's pixels, and assigns full-resolution pixels through the upsampled features. So we
store, per instance, the stride-8 feature grid over the instance's bounding box (not only the
mask's cells): mining needs the neighbourhood to upsample and assign at full resolution.

Reads: `data`, `teacher`, `instances`. Writes:

- ``features/shard-{k:05d}.zarr``   Zarr v3, (rows, C) ``dtype`` (fp16 by default), sharding codec with
  Blosc-zstd; one array per shard of images, written whole by the one worker that owns the shard
- ``index/part-{k:05d}.parquet``    instance_id:int64, image_id:int64, shard:int32, row_start:int64,
  grid_y0:int32, grid_x0:int32, grid_h:int32, grid_w:int32 (the box in stride-``stride`` cells),
  scale_y:float32, scale_x:float32 (inference size / original size), stride:int32
- ``projection.npy``               (C_in, C) float32, when ``reduction`` is a random projection

Rows ``row_start : row_start + grid_h * grid_w`` of the shard's array hold the instance's cells
in row-major order: reshape to (grid_h, grid_w, C).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa

from partdistill.parallel import ShardDone, job_artifact, job_inputs, process_cached
from partdistill.stages.base import Stage, StageContext
from partdistill.storage import ShardedArrayWriter, open_array, rle_to_mask, write_parquet

INDEX_SCHEMA = pa.schema([
    ("instance_id", pa.int64()), ("image_id", pa.int64()), ("shard", pa.int32()), ("row_start", pa.int64()),
    ("grid_y0", pa.int32()), ("grid_x0", pa.int32()), ("grid_h", pa.int32()), ("grid_w", pa.int32()),
    ("scale_y", pa.float32()), ("scale_x", pa.float32()), ("stride", pa.int32()),
])


def run(ctx: StageContext) -> dict[str, Any]:
    from partdistill.stages.instances import read_instances
    cfg = ctx.config
    table = read_instances(ctx.inputs["instances"]).to_pylist()
    by_image: dict[int, list[dict]] = {}
    for row in table:
        by_image.setdefault(row["image_id"], []).append(row)
    image_ids = sorted(by_image)
    shard_size = cfg["shard_images"]
    shards = [image_ids[i:i + shard_size] for i in range(0, len(image_ids), shard_size)]
    out = ctx.writer.path
    (out / "features").mkdir(exist_ok=True)
    (out / "index").mkdir(exist_ok=True)
    projection = _projection(cfg, feature_extractor(cfg, ctx.inputs, ctx.full_config), out) \
        if (cfg.get("reduction") or {}).get("type") else None

    names = [f"shard-{k:05d}" for k in range(len(shards))]
    ctx.writer.plan_shards(names)
    todo = [k for k, name in enumerate(names) if not ctx.writer.shard_done(name)]
    # one job per unfinished shard: it runs here or on a cluster worker (runtime.task_runner)
    jobs = [{"index": k, "name": names[k], "images": [(j, by_image[j]) for j in shards[k]], "config": cfg,
             "inputs": job_inputs(ctx.inputs), "full_config": ctx.full_config, "data": job_artifact(ctx.inputs["data"]),
             "projection": None if projection is None else projection.numpy(), "max_pixels": ctx.max_pixels,
             "out": str(out)} for k in todo]
    with ctx.progress.task("features: teacher pixel features", total=len(image_ids)) as bar:
        bar.advance(len(image_ids) - sum(len(shards[k]) for k in todo))
        for j, done in ctx.map_shards(features_shard, jobs, [f"features-{job['name']}" for job in jobs]):
            ctx.writer.complete_shard(done.name, done.files, meta=done.meta)
            bar.advance(len(jobs[j]["images"]))

    metas = [ctx.writer.shard_meta(f"shard-{k:05d}") for k in range(len(shards))]
    rows = sum(m["rows"] for m in metas)
    channels = next((m["channels"] for m in metas if m["channels"]), 0)
    feature_bytes = sum(p.stat().st_size for p in (out / "features").rglob("*") if p.is_file())
    return {"instances": len(table), "rows": rows, "channels": channels, "feature_bytes": feature_bytes,
            "bytes_per_instance": round(feature_bytes / max(len(table), 1)),
            "raw_bytes_per_instance": round(rows * channels * np.dtype(cfg["dtype"]).itemsize / max(len(table), 1))}


def features_shard(job: dict[str, Any]) -> ShardDone:
    """One shard of `features` (see :func:`run` for the job's keys), here or on a cluster worker:
    writes ``features/{name}.zarr`` and ``index/part-{k}.parquet`` into the partial folder ``job["out"]``."""
    from pathlib import Path

    import torch

    from partdistill.data.images import load_rgb
    from partdistill.models.teacher import stack_features

    cfg, data, k, name = job["config"], job["data"], job["index"], job["name"]
    stride, out = cfg["stride"], Path(job["out"])
    teacher = feature_extractor(cfg, job["inputs"], job["full_config"])
    projection = None if job["projection"] is None else torch.from_numpy(job["projection"])
    by_image = dict(job["images"])
    ids = [image_id for image_id, _ in job["images"]]
    blocks, index, names = [], [], []
    row = 0
    for i in range(0, len(ids), cfg["batch_size"]):
        chunk = ids[i:i + cfg["batch_size"]]
        imgs = [load_rgb(data.path / by_image[j][0]["file_name"], job["max_pixels"]) for j in chunk]
        for image_id, img, pred in zip(chunk, imgs, teacher.predict(imgs, layers=cfg["layers"]), strict=True):
            fmap = stack_features(pred.features, cfg["layers"], stride, cfg["normalize"])  # (C, gh, gw)
            if projection is not None:
                fmap = torch.einsum("chw,cd->dhw", fmap, projection)
            for inst in by_image[image_id]:
                crop, meta = instance_grid(fmap, inst, img.shape[:2], pred.inference_size, stride)
                blocks.append(crop.reshape(-1, crop.shape[-1]))
                names.append(inst["file_name"])
                index.append({"instance_id": inst["instance_id"], "image_id": image_id, "shard": k,
                              "row_start": row, **meta})
                row += len(blocks[-1])
    if not blocks:  # every image of the shard was skipped upstream
        write_parquet(out / "index" / f"part-{k:05d}.parquet", {c: [] for c in INDEX_SCHEMA.names}, INDEX_SCHEMA)
        return ShardDone(name, [f"index/part-{k:05d}.parquet"], {"rows": 0, "channels": None})
    matrix = np.concatenate(blocks).astype(cfg["dtype"])
    channels = matrix.shape[1]
    if not np.isfinite(matrix).all():
        bad = sorted({str(data.path / n) for n, b in zip(names, blocks, strict=True)
                      if not np.isfinite(b.astype(cfg["dtype"])).all()})
        raise FloatingPointError(
            f"features of {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} hold NaN or Inf as "
            f"{cfg['dtype']}: check the teacher's weights, or set features.dtype='float32' if values "
            "overflow float16")
    chunk = 4096
    array = ShardedArrayWriter(out / "features" / f"{name}.zarr", rows=len(matrix), channels=channels,
                               shard_rows=-(-len(matrix) // chunk) * chunk, chunk_rows=chunk, dtype=cfg["dtype"])
    array.write_shard(0, matrix)
    write_parquet(out / "index" / f"part-{k:05d}.parquet",
                  {c: [r[c] for r in index] for c in INDEX_SCHEMA.names}, INDEX_SCHEMA)
    files = [p.relative_to(out).as_posix() for p in (out / "features" / f"{name}.zarr").rglob("*")
             if p.is_file()] + [f"index/part-{k:05d}.parquet"]
    return ShardDone(name, files, {"rows": len(matrix), "channels": channels})


def instance_grid(fmap, inst: dict[str, Any], original_size: tuple[int, int], inference_size: tuple[int, int],
                  stride: int) -> tuple[np.ndarray, dict[str, Any]]:
    """The cells of a (C, gh, gw) feature map that cover an instance's box → float32 (grid_h, grid_w, C)
    and the geometry a reader needs (the index columns but instance_id, image_id, shard, row_start)."""
    h0, w0 = original_size
    h, w = inference_size
    sy, sx = h / h0, w / w0
    x, y, bw, bh = inst["bbox"]
    gy0, gx0 = int(y * sy // stride), int(x * sx // stride)
    gy1 = min(math.ceil((y + bh) * sy / stride), fmap.shape[1])
    gx1 = min(math.ceil((x + bw) * sx / stride), fmap.shape[2])
    crop = fmap[:, gy0:gy1, gx0:gx1].permute(1, 2, 0).numpy()
    return crop, {"grid_y0": gy0, "grid_x0": gx0, "grid_h": gy1 - gy0, "grid_w": gx1 - gx0,
                  "scale_y": sy, "scale_x": sx, "stride": stride}


def feature_extractor(features_cfg: dict[str, Any], inputs: dict[str, Any], full_config: dict[str, Any]):
    """The teacher (or classification backbone) that features come from, per the `features` section."""
    # loaded once per process (runtime.task_runner: once per cluster worker) and shared by the stages
    device = full_config.get("runtime", {}).get("device", "cpu")
    if features_cfg["extractor"] == "teacher":
        from partdistill.stages.instances import cached_teacher

        return cached_teacher(inputs["teacher"], device, full_config["teacher"].get("resize_long_side"))
    from partdistill.models.teacher import BackboneFeatures

    return process_cached(("backbone", features_cfg["extractor"], device),
                          lambda: BackboneFeatures(features_cfg["extractor"], device))


class FusedFeatures:
    """Features computed on demand, never stored: ``get(instance_id)`` like :class:`FeatureReader`.
    For the fused features → mining mode (the paper-scale store would be tens of TB). Computes one
    image at a time and keeps the last image's map, since instances of an image are consecutive."""

    def __init__(self, features_cfg: dict[str, Any], extractor, instances: list[dict[str, Any]], data,
                 max_pixels: int | None = None):
        from partdistill.data.images import DEFAULT_MAX_PIXELS, load_rgb

        self.cfg, self.extractor, self.data, self.load = features_cfg, extractor, data, load_rgb
        self.max_pixels = max_pixels or DEFAULT_MAX_PIXELS
        self.rows = {r["instance_id"]: r for r in instances}
        self._image: tuple[str, Any, tuple[int, int], tuple[int, int]] | None = None

    def get(self, instance_id: int) -> tuple[np.ndarray, dict[str, Any]]:
        from partdistill.models.teacher import stack_features

        inst = self.rows[instance_id]
        if self._image is None or self._image[0] != inst["file_name"]:
            img = self.load(self.data.path / inst["file_name"], self.max_pixels)
            [pred] = self.extractor.predict([img], layers=self.cfg["layers"])
            fmap = stack_features(pred.features, self.cfg["layers"], self.cfg["stride"], self.cfg["normalize"])
            self._image = (inst["file_name"], fmap, img.shape[:2], pred.inference_size)
        _, fmap, size, inference = self._image
        crop, meta = instance_grid(fmap, inst, size, inference, self.cfg["stride"])
        return crop.astype(np.float32), {"instance_id": instance_id, **meta}


def _projection(cfg: dict[str, Any], teacher, out):
    """A fixed random projection to ``reduction.dim`` channels (Johnson–Lindenstrauss keeps
    distances roughly, which is what K-means needs); seeded, so the same config gives the same one."""
    import torch

    red = cfg.get("reduction") or {}
    if not red.get("type"):
        return None
    if red.get("type") != "random_projection":
        raise NotImplementedError(f"features.reduction.type={red.get('type')!r}: only 'random_projection' is built")
    dummy = teacher.predict([np.zeros((64, 64, 3), np.uint8)], layers=cfg["layers"])[0]
    from partdistill.models.teacher import stack_features

    c_in = stack_features(dummy.features, cfg["layers"], cfg["stride"], cfg["normalize"]).shape[0]
    gen = torch.Generator().manual_seed(int(red.get("seed", 0)))
    proj = torch.randn(c_in, int(red["dim"]), generator=gen) / math.sqrt(int(red["dim"]))
    np.save(out / "projection.npy", proj.numpy())
    return proj


class FeatureReader:
    """Random access to one `features` artifact: ``get(instance_id)`` → (grid_h, grid_w, C) array."""

    def __init__(self, artifact):
        import pyarrow.parquet as pq

        self.path = artifact.path
        self.index = {r["instance_id"]: r for r in pq.read_table(self.path / "index").to_pylist()}
        self._arrays: dict[int, Any] = {}

    def get(self, instance_id: int) -> tuple[np.ndarray, dict[str, Any]]:
        r = self.index[instance_id]
        arr = self._arrays.get(r["shard"])
        if arr is None:
            arr = self._arrays[r["shard"]] = open_array(self.path / "features" / f"shard-{r['shard']:05d}.zarr")
        n = r["grid_h"] * r["grid_w"]
        block = np.asarray(arr[r["row_start"]:r["row_start"] + n]).astype(np.float32)
        return block.reshape(r["grid_h"], r["grid_w"], arr.shape[1]), r  # (0, 0, C) for an empty box


def object_features(grid: np.ndarray, meta: dict[str, Any], mask: np.ndarray):
    """The :class:`~partdistill.models.part_mining.ObjectFeatures` of one instance: its feature grid
    and index row (``FeatureReader.get``) with its mask."""
    from partdistill.models.part_mining import ObjectFeatures

    return ObjectFeatures(grid, mask, int(meta["grid_y0"]), int(meta["grid_x0"]), float(meta["stride"]),
                          (float(meta["scale_y"]), float(meta["scale_x"])))


def instance_mask(row: dict[str, Any]) -> np.ndarray:
    """bool (H, W) mask of an `instances` row."""
    return rle_to_mask({"size": [row["height"], row["width"]], "counts": row["rle"]})


STAGE = Stage("features", ("data", "teacher", "instances"), "1", run, summary="pixel features",
              upstream_for=lambda section, cfg: ("data", "teacher", "instances") if section["extractor"] == "teacher"
              else ("data", "instances"))
