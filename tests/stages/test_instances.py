import json
import shutil

import numpy as np
import pyarrow.parquet as pq

from partdistill.config import load_config
from partdistill.pipeline import run_pipeline, store_for
from partdistill.stages.instances import Detection, read_instances, select
from partdistill.storage import rle_to_mask
from tests.conftest import DEMO_CONFIG, TINY


def _mask(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_select_filters_like_the_reference():
    big, small = _mask(100, 100, 0, 50, 0, 50), _mask(100, 100, 0, 2, 0, 2)  # 25% and 0.04% of the image
    dets = [Detection(big, 0.9, 0, "car"), Detection(big, 0.4, 1, "bird"), Detection(small, 0.95, 0, "car"),
            Detection(big, 0.7, 1, "bird"), Detection(big, 0.8, 2, "fish")]
    kept = select(dets, score_threshold=0.5, topk=10, min_object_fraction=0.05)
    assert [(d.class_name, d.score) for d in kept] == [("car", 0.9), ("fish", 0.8), ("bird", 0.7)]
    assert len(select(dets, 0.5, topk=2, min_object_fraction=0.05)) == 2
    # Detic fallback: the image's own class first, relabelled; else the top k of any class
    own = select(dets, 0.5, 10, 0.05, image_class="bird", image_class_first=True, image_class_id=3)
    assert [(d.class_name, d.class_id, d.score) for d in own] == [("bird", 3, 0.7)]
    other = select(dets, 0.5, 2, 0.05, image_class="tree", image_class_first=True, image_class_id=7)
    assert [(d.class_name, d.class_id, d.score) for d in other] == [("tree", 7, 0.9), ("tree", 7, 0.8)]
    assert select([], 0.5, 10, 0.05) == []


def test_teacher_instances_schema(tiny_run):
    cfg, store, outcomes = tiny_run
    art = store.open("instances", outcomes["instances"].version)
    table = read_instances(art)
    assert table.schema.field("rle").type == "string" and table.schema.field("score").type == "float"
    rows = table.to_pylist()
    assert rows, "the tiny teacher kept no instance at score threshold 0"
    for r in rows:
        m = rle_to_mask({"size": [r["height"], r["width"]], "counts": r["rle"]})
        assert m.sum() == r["area"] >= 0.05 * r["height"] * r["width"]
        x, y, w, h = r["bbox"]
        ys, xs = np.nonzero(m)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)
        assert r["instance_id"] // 1000 == r["image_id"]
    images = pq.read_table(art.file("images.parquet")).to_pylist()
    assert len(images) == 12 and sum(i["kept"] for i in images) == len(rows)
    assert pq.read_table(art.file("skipped.parquet")).num_rows == 0


def test_gt_source_matches_annotations_and_skips_bad_images(tmp_path):
    cfg = load_config(DEMO_CONFIG, {**TINY, "instances.source": "gt", "instances.min_object_fraction": 0.0})
    cfg["runtime"]["store"] = str(tmp_path / "store")
    store = store_for(cfg)
    [data, *_] = run_pipeline(cfg, until="data")
    # Break one image in a copy of the data artifact: the stage must record it and go on.
    art = store.open("data", data.version)
    victim = sorted(art.path.glob("images/*.png"))[5]
    victim.write_bytes(victim.read_bytes()[:200])
    run_pipeline(cfg, until="instances")
    inst = store.open("instances", store.versions("instances")[0])
    skipped = pq.read_table(inst.file("skipped.parquet")).to_pylist()
    assert [s["file_name"] for s in skipped] == ["images/000005.png"] and "truncated" in skipped[0]["reason"]

    rows = read_instances(inst).to_pylist()
    expected = {}
    for split in ("train", "val"):
        coco = json.loads(art.file(f"instances_{split}.json").read_text())
        for a in coco["annotations"]:
            if a["image_id"] != 6:  # 000005.png
                expected.setdefault(a["image_id"], []).append(a)
    assert len(rows) == sum(len(v) for v in expected.values())
    by_area = {(r["image_id"], r["area"]): r for r in rows}
    for image_id, anns in expected.items():
        for a in anns:
            r = by_area[(image_id, a["area"])]
            assert r["score"] == 1.0
            assert np.array_equal(rle_to_mask({"size": [r["height"], r["width"]], "counts": r["rle"]}),
                                  rle_to_mask(a["segmentation"]))
    shutil.rmtree(tmp_path / "store")


def test_imagenet_folder_with_image_class_first(tmp_path, tiny_run):
    """The paper's Detic fallback on an ImageNet-style folder: every kept instance takes the
    folder's class."""
    from PIL import Image

    cfg0, store0, outcomes = tiny_run
    data = store0.open("data", outcomes["data"].version)
    root = tmp_path / "folder"
    for i, src in enumerate(sorted(data.path.glob("images/*.png"))[:6]):
        cls = ["n01_bird", "n02_car"][i % 2]
        (root / cls).mkdir(parents=True, exist_ok=True)
        Image.open(src).save(root / cls / f"img{i}.jpg", quality=95)
    (root / "n02_car" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    cfg = load_config(DEMO_CONFIG, {**TINY, "data.source": "imagenet_folder", "data.imagenet_folder.root": str(root),
                                    "instances.image_class_first": True, "instances.min_object_fraction": 0.0,
                                    "teacher.source": "checkpoint", "teacher.checkpoint_sha256": None,
                                    "teacher.checkpoint": str(store0.open("teacher", outcomes["teacher"].version)
                                                              .file("checkpoint.pth"))})
    cfg["runtime"]["store"] = str(tmp_path / "store")
    out = {o.stage: o for o in run_pipeline(cfg, until="instances")}
    assert out["data"].summary["images"] == 7 and out["data"].summary["classes"] == 2
    store = store_for(cfg)
    inst = store.open("instances", out["instances"].version)
    rows = read_instances(inst).to_pylist()
    assert rows
    for r in rows:
        folder = r["file_name"].split("/")[-2]
        assert r["class_name"] == folder and r["class_id"] == ["n01_bird", "n02_car"].index(folder)
    skipped = pq.read_table(inst.file("skipped.parquet")).to_pylist()
    assert [s["file_name"].split("/")[-1] for s in skipped] == ["broken.jpg"]
