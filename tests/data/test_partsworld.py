"""Tests of the Parts World synthetic data set (small images to keep them fast)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from scipy import ndimage

from partdistill.data.partsworld import (
    CLASSES,
    PART_IDS,
    PartsWorldConfig,
    assemble,
    generate_shard,
    object_categories,
    part_categories,
    preview,
    render_image,
    split_of,
    write_json,
    write_partsworld,
)

# pycocotools' decode trips numpy 2's __array__(copy=...) deprecation; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

CFG = PartsWorldConfig(images=10, seed=3, width=128, height=96, val_fraction=0.3)
JSON_FILES = ("instances_train.json", "instances_val.json", "parts_train.json",
              "parts_val.json", "splits.json")


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("pw")
    summary = write_partsworld(out, CFG, shard_size=4)
    return out, summary


def _load(out: Path, name: str) -> dict:
    return json.loads((out / name).read_text())


def _decode(ann: dict) -> np.ndarray:
    return mask_utils.decode(ann["segmentation"]).astype(bool)


def _part_info() -> dict[int, tuple[int, int, object]]:
    """part category id -> (class index, colour group, texture)."""
    return {PART_IDS[c][j]: (c, p.group, p.texture)
            for c, cls in enumerate(CLASSES) for j, p in enumerate(cls.parts)}


def test_categories() -> None:
    objs = object_categories()
    parts = part_categories()
    assert len(objs) >= 6
    names = {o["name"] for o in objs}
    assert len(names) == len(objs)
    assert [p["id"] for p in parts] == list(range(1, len(parts) + 1))
    for o in objs:
        own = [p for p in parts if p["object_category_id"] == o["id"]]
        assert 3 <= len(own) <= 6, o["name"]
        for p in own:
            assert p["supercategory"] == o["name"]
            assert p["name"] == f"{o['name']} {p['part']}"


def test_spec_has_parts_sharing_colour_and_texture() -> None:
    shared_colour = shared_both = 0
    for cls in CLASSES:
        for a in range(len(cls.parts)):
            for b in range(a + 1, len(cls.parts)):
                pa, pb = cls.parts[a], cls.parts[b]
                if pa.group == pb.group:
                    shared_colour += 1
                    shared_both += pa.texture == pb.texture
    assert shared_colour >= 6
    assert shared_both >= 3


def test_shared_colour_visible_in_pixels() -> None:
    # Compare the bright end (90th percentile) of eroded part interiors: that skips
    # outlines and darkening texture, leaving base colour times shading.
    cfg = replace(CFG, width=192, height=144)
    info = _part_info()
    same, other = [], []
    for index in range(12):
        r = render_image(cfg, index)
        for inst in r.instances:
            tops = {}
            for pid, m in inst.parts:
                core = ndimage.binary_erosion(m, iterations=2)
                if core.sum() >= 10:
                    tops[pid] = np.percentile(r.image[core].astype(float), 90, axis=0)
            ids = sorted(tops)
            for i, a in enumerate(ids):
                for b in ids[i + 1:]:
                    d = float(np.abs(tops[a] - tops[b]).max())
                    (same if info[a][1:] == info[b][1:] else other).append(d)
    assert len(same) >= 5 and len(other) >= 5
    assert np.median(same) < 30
    assert np.median(same) < np.median(other) - 30


def test_same_seed_same_bytes(tmp_path: Path, written) -> None:
    out, _ = written
    again = tmp_path / "again"
    write_partsworld(again, CFG, shard_size=3)  # other shard size on purpose
    for name in JSON_FILES:
        assert (out / name).read_bytes() == (again / name).read_bytes(), name
    pngs = sorted(p.name for p in (out / "images").iterdir())
    assert len(pngs) == CFG.images
    for name in pngs:
        assert (out / "images" / name).read_bytes() == (again / "images" / name).read_bytes()


def test_different_seed_differs(tmp_path: Path, written) -> None:
    out, _ = written
    other = tmp_path / "other"
    write_partsworld(other, replace(CFG, seed=CFG.seed + 1))
    for name in ("instances_train.json", "parts_train.json"):
        a, b = _load(out, name), _load(other, name)
        assert a["annotations"] != b["annotations"]
    assert not np.array_equal(np.asarray(Image.open(out / "images/000000.png")),
                              np.asarray(Image.open(other / "images/000000.png")))


def test_coco_loads_and_links(written) -> None:
    out, summary = written
    splits = _load(out, "splits.json")
    assert sorted(splits["train"] + splits["val"]) == [f"images/{i:06d}.png"
                                                       for i in range(CFG.images)]
    object_names = {c["name"] for c in object_categories()}
    for split in ("train", "val"):
        objs = COCO(str(out / f"instances_{split}.json"))
        parts = COCO(str(out / f"parts_{split}.json"))
        assert [im["file_name"] for im in objs.dataset["images"]] == splits[split]
        assert parts.dataset["images"] == objs.dataset["images"]
        assert summary["images"][split] == len(splits[split])
        assert summary["objects"][split] == len(objs.anns)
        assert summary["parts"][split] == len(parts.anns)
        for cat in parts.dataset["categories"]:
            assert cat["supercategory"] in object_names
        part_cats = {c["id"]: c for c in parts.dataset["categories"]}
        for ann in objs.anns.values():
            assert ann["id"] // 100 == ann["image_id"]
            assert ann["iscrowd"] == 0 and ann["area"] > 0
        for ann in parts.anns.values():
            obj = objs.anns[ann["object_id"]]
            assert obj["image_id"] == ann["image_id"]
            assert obj["category_id"] == ann["object_category_id"]
            assert part_cats[ann["category_id"]]["object_category_id"] == obj["category_id"]
            assert ann["id"] // 100 == ann["object_id"]
    assert sum(summary["objects_per_class"].values()) == sum(summary["objects"].values())


def test_masks_nest_and_partition(written) -> None:
    out, _ = written
    for split in ("train", "val"):
        objs = _load(out, f"instances_{split}.json")["annotations"]
        parts = _load(out, f"parts_{split}.json")["annotations"]
        by_object: dict[int, list[dict]] = {}
        for p in parts:
            by_object.setdefault(p["object_id"], []).append(p)
        per_image: dict[int, np.ndarray] = {}
        for o in objs:
            om = _decode(o)
            assert om.sum() == o["area"]
            assert o["bbox"] == [float(x) for x in mask_utils.toBbox(o["segmentation"])]
            # Objects of one image are disjoint (occlusion keeps only the top one).
            seen = per_image.setdefault(o["image_id"], np.zeros_like(om))
            assert not (seen & om).any()
            seen |= om
            union = np.zeros_like(om)
            for p in by_object.get(o["id"], []):
                pm = _decode(p)
                assert pm.sum() == p["area"] >= CFG.min_part_pixels
                assert not (pm & ~om).any(), "part outside its object"
                assert not (pm & union).any(), "parts overlap"
                union |= pm
            # Only fragments below min_part_pixels may be left unannotated.
            n_parts = len(CLASSES[o["category_id"] - 1].parts)
            assert (om & ~union).sum() < n_parts * CFG.min_part_pixels


def test_render_invariants() -> None:
    occluded = 0
    for index in range(8):
        r = render_image(CFG, index)
        assert r.image.shape == (CFG.height, CFG.width, 3) and r.image.dtype == np.uint8
        assert 1 <= len(r.instances) <= CFG.max_instances
        for inst in r.instances:
            area = int(inst.mask.sum())
            assert area >= CFG.min_visible_fraction * inst.full_area
            occluded += area < inst.full_area
            assert [pid for pid, _ in inst.parts] == sorted(pid for pid, _ in inst.parts)
            assert all(pid in PART_IDS[inst.category_id - 1] for pid, _ in inst.parts)
    assert occluded > 0, "no instance was ever occluded"


def test_render_alone_equals_batch(tmp_path: Path) -> None:
    fragment = generate_shard(CFG, [2, 3, 4], tmp_path)
    alone = render_image(CFG, 4)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "images/000004.png")), alone.image)
    assert np.array_equal(render_image(CFG, 4).image, alone.image)
    objects = [a for a in fragment["instances"] if a["image_id"] == 5]
    assert len(objects) == len(alone.instances)
    for ann, inst in zip(objects, alone.instances, strict=True):
        assert np.array_equal(_decode(ann), inst.mask)


def test_shard_independence(tmp_path: Path) -> None:
    cfg = replace(CFG, images=6)
    whole = assemble(cfg, [generate_shard(cfg, range(6), tmp_path / "a")])
    pieces = [generate_shard(cfg, [3, 4, 5], tmp_path / "b"),
              generate_shard(cfg, [0, 1, 2], tmp_path / "b")]
    split = assemble(cfg, pieces)
    assert set(whole) == set(JSON_FILES)
    for name in JSON_FILES:
        write_json(tmp_path / f"whole_{name}", whole[name])
        write_json(tmp_path / f"split_{name}", split[name])
        assert (tmp_path / f"whole_{name}").read_bytes() == (tmp_path / f"split_{name}").read_bytes()


def test_split_of() -> None:
    n = 400
    val = sum(split_of(CFG, i) == "val" for i in range(n))
    assert abs(val / n - CFG.val_fraction) < 0.03
    assert [split_of(CFG, i) for i in range(20)] == [split_of(CFG, i) for i in range(20)]
    assert {split_of(replace(CFG, val_fraction=0.0), i) for i in range(50)} == {"train"}
    assert {split_of(replace(CFG, val_fraction=1.0), i) for i in range(50)} == {"val"}


def test_preview(tmp_path: Path, written) -> None:
    out, _ = written
    path = preview(out, tmp_path / "sheet.png", n=3)
    with Image.open(path) as sheet:
        assert sheet.mode == "RGB"
        assert sheet.width >= 3 * CFG.width and sheet.height >= 3 * CFG.height


@pytest.mark.parametrize("bad", [dict(val_fraction=1.5), dict(min_instances=0),
                                 dict(min_instances=3, max_instances=2),
                                 dict(max_instances=100), dict(width=8)])
def test_config_validation(bad: dict) -> None:
    with pytest.raises(ValueError):
        PartsWorldConfig(**bad)
