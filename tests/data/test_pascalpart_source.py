"""Pascal-Part as a data source (`data.source='pascalpart'`): a VOC2010 folder with the release's
Annotations_Part/*.mat, split by VOC's ImageSets/Main lists, written as per-split COCO instances
(every object, object-mask-only classes too) and evaluation-only part JSONs that read back as the
evaluation loader reads the folder; the errors a real folder meets, each naming its file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from partdistill.config import load_config
from partdistill.data.coco_splits import pascal_part_splits
from partdistill.data.images import DatasetError, ImageLoadError, decode_segmentation
from partdistill.evaluation.loaders import pascal_part
from partdistill.evaluation.premise import load_gt_objects
from partdistill.pipeline import plan, run_pipeline
from partdistill.storage import ArtifactStore, read_parquet
from tests.conftest import DEMO_CONFIG
from tests.evaluation.test_loaders import box, make_pascal, write_image, write_pascal_mat

CLASSES = ["bird", "car", "cat", "chair", "dog", "person", "sofa"]  # present in train or val, sorted


def make_layout(root: Path) -> Path:
    """The loader tests' val split (person, car and chair-without-parts on 2008_000001, a cat on
    2008_000002) and a train split: a dog (head + muzzle, tail) beside a sofa without parts, and a
    bird whose only part lies outside it (so it gets no part annotation)."""
    make_pascal(root)
    (root / "ImageSets" / "Main" / "train.txt").write_text("2009_000003\n2009_000004\n")
    write_image(root / "JPEGImages" / "2009_000003.jpg", 10, 12)
    write_image(root / "JPEGImages" / "2009_000004.jpg", 6, 6)
    write_pascal_mat(root / "Annotations_Part" / "2009_000003.mat", [
        ("dog", 12, box((10, 12), 0, 6, 0, 8), [("head", box((10, 12), 0, 2, 0, 2)),
                                                ("muzzle", box((10, 12), 2, 3, 0, 2)),
                                                ("tail", box((10, 12), 0, 1, 7, 8))]),
        ("sofa", 18, box((10, 12), 6, 10, 0, 12), []),
    ])
    write_pascal_mat(root / "Annotations_Part" / "2009_000004.mat", [
        ("bird", 3, box((6, 6), 0, 3, 0, 3), [("beak", box((6, 6), 4, 6, 4, 6))]),
    ])
    return root


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    return make_layout(tmp_path_factory.mktemp("VOC2010"))


def _cfg(root: Path | None, store: Path, **more) -> dict:
    cfg = load_config(DEMO_CONFIG, {"data.source": "pascalpart", "data.pascalpart.root": root and str(root), **more})
    cfg["runtime"]["store"] = str(store)
    return cfg


@pytest.fixture(scope="module")
def written(layout, tmp_path_factory):
    store = tmp_path_factory.mktemp("pascal-store")
    [out] = run_pipeline(_cfg(layout, store), until="data")
    return ArtifactStore(store).open("data", out.version), out


def _json(data, name: str) -> dict:
    return json.loads(data.file(name).read_text())


def test_per_split_coco_objects_and_categories(layout, written):
    data, out = written
    assert {"instances_train.json", "instances_val.json", "parts_train.json", "parts_val.json"} <= set(data.files)
    assert set(data.manifest["evaluation_only"]) >= {"parts_train.json", "parts_val.json"}
    train, val = _json(data, "instances_train.json"), _json(data, "instances_val.json")
    # VOC's lists decide the split; ids are the VOC ids' digits; file names absolute and real
    assert [im["id"] for im in train["images"]] == [2009000003, 2009000004]
    assert [im["id"] for im in val["images"]] == [2008000001, 2008000002]
    assert out.summary["train_images"] == 2 and out.summary["val_images"] == 2 and out.summary["images"] == 4
    for im in train["images"] + val["images"]:
        assert Path(im["file_name"]).is_absolute() and Path(im["file_name"]).is_file()
        assert im["file_name"] == str((layout / "JPEGImages" / f"{str(im['id'])[:4]}_{str(im['id'])[4:]}.jpg")
                                      .resolve())
    assert [(im["height"], im["width"]) for im in val["images"]] == [(12, 16), (8, 10)]
    # one category list, the classes present in any split, in every split
    assert [c["name"] for c in train["categories"]] == CLASSES == [c["name"] for c in val["categories"]]
    names = {c["id"]: c["name"] for c in val["categories"]}
    # objects without parts (chair, sofa) are objects all the same
    assert [names[a["category_id"]] for a in val["annotations"]] == ["person", "car", "chair", "cat"]
    assert [names[a["category_id"]] for a in train["annotations"]] == ["dog", "sofa", "bird"]
    chair = val["annotations"][2]
    mask = decode_segmentation(chair["segmentation"], 12, 16)
    assert mask.sum() == chair["area"] == 4 and chair["bbox"] == [0.0, 10.0, 2.0, 2.0]
    rows = read_parquet(data.file("images.parquet")).to_pylist()
    assert [(r["image_id"], r["split"]) for r in rows] == [(2008000001, "val"), (2008000002, "val"),
                                                             (2009000003, "train"), (2009000004, "train")]


def test_parts_map_to_their_objects(written):
    data, _ = written
    for split in ("train", "val"):
        inst, parts = _json(data, f"instances_{split}.json"), _json(data, f"parts_{split}.json")
        names = {c["id"]: c["name"] for c in inst["categories"]}
        objects = {a["id"]: a for a in inst["annotations"]}
        sizes = {im["id"]: (im["height"], im["width"]) for im in inst["images"]}
        part_class = {c["id"]: c["supercategory"] for c in parts["categories"]}
        assert set(part_class.values()) <= set(names.values())
        for p in parts["annotations"]:
            obj = objects[p["object_id"]]
            assert p["image_id"] == obj["image_id"] and part_class[p["category_id"]] == names[obj["category_id"]]
            pm = decode_segmentation(p["segmentation"], *sizes[p["image_id"]])
            om = decode_segmentation(obj["segmentation"], *sizes[p["image_id"]])
            assert pm.any() and not (pm & ~om).any()  # clipped to its object
        with_parts = {names[objects[p["object_id"]]["category_id"]] for p in parts["annotations"]}
        assert with_parts == ({"person", "car", "cat"} if split == "val" else {"dog"})
    train_parts = _json(data, "parts_train.json")
    part_names = {c["id"]: c["name"] for c in train_parts["categories"]}
    # head + muzzle -> one head; tail; the bird's beak lies outside the bird: no part
    assert sorted(part_names[p["category_id"]] for p in train_parts["annotations"]) == ["head", "tail"]
    head = next(p for p in train_parts["annotations"] if part_names[p["category_id"]] == "head")
    assert head["area"] == 6


def test_val_parts_read_back_as_the_evaluation_loader_reads_the_folder(layout, written):
    data, _ = written
    categories = {c["id"]: c["name"] for c in _json(data, "parts_val.json")["categories"]}
    ours, theirs = load_gt_objects(data.path, "val"), pascal_part(layout, "val")
    assert len(ours) == len(theirs) == 3
    for a, b in zip(ours, theirs, strict=True):
        assert a.image_id == b.image_id and a.class_name == b.class_name
        assert a.file_name == str((layout / b.file_name).resolve())
        assert (a.mask == b.mask).all()
        named_a = np.vectorize(lambda i: categories.get(int(i), ""))(a.part_labels)
        named_b = np.vectorize(lambda i, c=b.class_name: theirs.part_names[c].get(int(i), ""))(b.part_labels)
        assert (named_a == named_b).all()


def test_the_version_covers_every_file_read(layout, tmp_path):
    def version(**more):
        return {p.name: p.version for p in plan(_cfg(layout, tmp_path / "store", **more))}["data"]

    before = version()
    assert version(**{"data.pascalpart.splits": {"val": "val"}}) != before  # the setting
    for path in (layout / "Annotations_Part" / "2009_000004.mat", layout / "ImageSets" / "Main" / "val.txt",
                 layout / "JPEGImages" / "2008_000002.jpg"):
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        try:
            assert version() != before, path
        finally:
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert version() == before


# --- errors, each naming the file and the setting ------------------------------------------------


def test_root_not_set_fails_in_the_stage_and_leaves_no_partial(tmp_path):
    cfg = _cfg(None, tmp_path / "store")
    with pytest.raises(ValueError, match=r"data\.pascalpart\.root is not set"):
        run_pipeline(cfg, until="data")
    store = ArtifactStore(tmp_path / "store")
    assert store.partial_versions("data") == [] and store.versions("data") == []


def test_missing_root(tmp_path):
    with pytest.raises(DatasetError, match=r"data\.pascalpart\.root: .*nowhere is not a folder"):
        pascal_part_splits(tmp_path / "nowhere")


@pytest.mark.parametrize("folder", ["Annotations_Part", "JPEGImages"])
def test_missing_annotation_or_image_folder(tmp_path, folder):
    root = make_layout(tmp_path / "VOC2010")
    (root / folder).rename(root / f"{folder}.moved")
    with pytest.raises(DatasetError, match=rf"data\.pascalpart\.root: .*VOC2010 has no {folder}/ folder"):
        pascal_part_splits(root)


def test_missing_split_list(tmp_path):
    root = make_layout(tmp_path / "VOC2010")
    (root / "ImageSets" / "Main" / "val.txt").unlink()
    with pytest.raises(DatasetError, match=r"data\.pascalpart\.splits\.val: image-set file .*Main/val\.txt "
                                           r"does not exist"):
        pascal_part_splits(root)
    with pytest.raises(DatasetError, match=r"data\.pascalpart\.splits\.val: image-set file .*Main/trainval\.txt"):
        pascal_part_splits(root, {"val": "trainval"})
    assert [s.name for s in pascal_part_splits(root, {"train": "train"})] == ["train"]


def test_bad_splits_setting(tmp_path):
    root = make_layout(tmp_path / "VOC2010")
    with pytest.raises(DatasetError, match=r"data\.pascalpart\.splits: split 'minival' is not one of"):
        pascal_part_splits(root, {"minival": "val"})
    with pytest.raises(DatasetError, match=r"data\.pascalpart\.splits\.val must be the name of a VOC image set"):
        pascal_part_splits(root, {"val": "../val"})


def test_unreadable_mat_names_the_file(tmp_path):
    root = make_layout(tmp_path / "VOC2010")
    (root / "Annotations_Part" / "2009_000004.mat").write_bytes(b"not a MATLAB file at all" * 8)
    with pytest.raises(DatasetError, match=r"cannot read .*Annotations_Part/2009_000004\.mat as a MATLAB file"):
        pascal_part_splits(root)


def test_listed_image_without_annotation(tmp_path):
    root = make_layout(tmp_path / "VOC2010")
    (root / "Annotations_Part" / "2008_000002.mat").unlink()
    with pytest.raises(DatasetError, match=r"Main/val\.txt: line 3: image 2008_000002 has no part annotation "
                                           r".*Annotations_Part/2008_000002\.mat"):
        pascal_part_splits(root)


def test_listed_image_missing(tmp_path):
    root = make_layout(tmp_path / "VOC2010")
    (root / "JPEGImages" / "2009_000004.jpg").unlink()
    with pytest.raises(ImageLoadError, match=r"2009_000004\.jpg"):
        pascal_part_splits(root)


def test_image_in_two_splits(tmp_path):
    root = make_layout(tmp_path / "VOC2010")
    (root / "ImageSets" / "Main" / "train.txt").write_text("2009_000003\n2008_000002\n")
    with pytest.raises(DatasetError, match=r"Main/val\.txt: line 3: image 2008_000002 is also listed at "
                                           r".*Main/train\.txt: line 2"):
        pascal_part_splits(root)
