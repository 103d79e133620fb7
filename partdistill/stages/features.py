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

from partdistill.stages.base import Stage, StageContext
from partdistill.storage import ShardedArrayWriter, open_array, rle_to_mask, write_parquet

INDEX_SCHEMA = pa.schema([
    ("instance_id", pa.int64()), ("image_id", pa.int64()), ("shard", pa.int32()), ("row_start", pa.int64()),
    ("grid_y0", pa.int32()), ("grid_x0", pa.int32()), ("grid_h", pa.int32()), ("grid_w", pa.int32()),
    ("scale_y", pa.float32()), ("scale_x", pa.float32()), ("stride", pa.int32()),
])


def run(ctx: StageContext) -> dict[str, Any]:
    import torch

    from partdistill.data.images import load_rgb
    from partdistill.models.teacher import stack_features
    from partdistill.stages.instances import read_instances
    cfg = ctx.config
    stride = cfg["stride"]
    teacher = feature_extractor(cfg, ctx.inputs, ctx.full_config)
    table = read_instances(ctx.inputs["instances"]).to_pylist()
    by_image: dict[int, list[dict]] = {}
    for row in table:
        by_image.setdefault(row["image_id"], []).append(row)
    image_ids = sorted(by_image)
    shard_size = cfg["shard_images"]
    shards = [image_ids[i:i + shard_size] for i in range(0, len(image_ids), shard_size)]
    data = ctx.inputs["data"]
    out = ctx.writer.path
    (out / "features").mkdir(exist_ok=True)
    (out / "index").mkdir(exist_ok=True)
    projection = _projection(cfg, teacher, out)
    channels = None

    with ctx.progress.task("features: teacher pixel features", total=len(image_ids)) as bar:
        for k, ids in enumerate(shards):
            name = f"shard-{k:05d}"
            if ctx.writer.shard_done(name):
                bar.advance(len(ids))
                continue
            blocks, index = [], []
            row = 0
            for i in range(0, len(ids), cfg["batch_size"]):
                chunk = ids[i:i + cfg["batch_size"]]
                imgs = [load_rgb(data.path / by_image[j][0]["file_name"]) for j in chunk]
                for image_id, img, pred in zip(chunk, imgs, teacher.predict(imgs, layers=cfg["layers"]), strict=True):
                    fmap = stack_features(pred.features, cfg["layers"], stride, cfg["normalize"])  # (C, gh, gw)
                    if projection is not None:
                        fmap = torch.einsum("chw,cd->dhw", fmap, projection)
                    for inst in by_image[image_id]:
                        crop, meta = instance_grid(fmap, inst, img.shape[:2], pred.inference_size, stride)
                        blocks.append(crop.reshape(-1, crop.shape[-1]))
                        index.append({"instance_id": inst["instance_id"], "image_id": image_id, "shard": k,
                                      "row_start": row, **meta})
                        row += len(blocks[-1])
                bar.advance(len(chunk))
            if not blocks:  # every image of the shard was skipped upstream
                write_parquet(out / "index" / f"part-{k:05d}.parquet", {c: [] for c in INDEX_SCHEMA.names},
                              INDEX_SCHEMA)
                ctx.writer.complete_shard(name, [f"index/part-{k:05d}.parquet"], meta={"rows": 0, "channels": None})
                continue
            matrix = np.concatenate(blocks).astype(cfg["dtype"])
            channels = matrix.shape[1]
            if not np.isfinite(matrix).all():
                raise FloatingPointError(f"features of shard {k} (images {ids[0]}..{ids[-1]}) hold NaN or Inf")
            chunk = 4096
            array = ShardedArrayWriter(out / "features" / f"{name}.zarr", rows=len(matrix), channels=channels,
                                       shard_rows=-(-len(matrix) // chunk) * chunk, chunk_rows=chunk,
                                       dtype=cfg["dtype"])
            array.write_shard(0, matrix)
            write_parquet(out / "index" / f"part-{k:05d}.parquet",
                          {c: [r[c] for r in index] for c in INDEX_SCHEMA.names}, INDEX_SCHEMA)
            files = [p.relative_to(out).as_posix() for p in (out / "features" / f"{name}.zarr").rglob("*")
                     if p.is_file()] + [f"index/part-{k:05d}.parquet"]
            ctx.writer.complete_shard(name, files, meta={"rows": len(matrix), "channels": channels})

    metas = [ctx.writer.shard_meta(f"shard-{k:05d}") for k in range(len(shards))]
    rows = sum(m["rows"] for m in metas)
    channels = next((m["channels"] for m in metas if m["channels"]), 0)
    feature_bytes = sum(p.stat().st_size for p in (out / "features").rglob("*") if p.is_file())
    return {"instances": len(table), "rows": rows, "channels": channels, "feature_bytes": feature_bytes,
            "bytes_per_instance": round(feature_bytes / max(len(table), 1)),
            "raw_bytes_per_instance": round(rows * channels * np.dtype(cfg["dtype"]).itemsize / max(len(table), 1))}


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
    device = full_config.get("runtime", {}).get("device", "cpu")
    if features_cfg["extractor"] == "teacher":
        from partdistill.stages.teacher import load_teacher

        return load_teacher(inputs["teacher"], device, full_config["teacher"].get("resize_long_side"))
    from partdistill.models.teacher import BackboneFeatures

    return BackboneFeatures(features_cfg["extractor"], device)


class FusedFeatures:
    """Features computed on demand, never stored: ``get(instance_id)`` like :class:`FeatureReader`.
    For the fused features → mining mode (the paper-scale store would be tens of TB). Computes one
    image at a time and keeps the last image's map, since instances of an image are consecutive."""

    def __init__(self, features_cfg: dict[str, Any], extractor, instances: list[dict[str, Any]], data):
        from partdistill.data.images import load_rgb

        self.cfg, self.extractor, self.data, self.load = features_cfg, extractor, data, load_rgb
        self.rows = {r["instance_id"]: r for r in instances}
        self._image: tuple[str, Any, tuple[int, int], tuple[int, int]] | None = None

    def get(self, instance_id: int) -> tuple[np.ndarray, dict[str, Any]]:
        from partdistill.models.teacher import stack_features

        inst = self.rows[instance_id]
        if self._image is None or self._image[0] != inst["file_name"]:
            img = self.load(self.data.path / inst["file_name"])
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
        return block.reshape(r["grid_h"], r["grid_w"], -1), r


def instance_mask(row: dict[str, Any]) -> np.ndarray:
    """bool (H, W) mask of an `instances` row."""
    return rle_to_mask({"size": [row["height"], row["width"]], "counts": row["rle"]})


STAGE = Stage("features", ("data", "teacher", "instances"), "1", run, summary="pixel features",
              upstream_for=lambda section, cfg: ("data", "teacher", "instances") if section["extractor"] == "teacher"
              else ("data", "instances"))
