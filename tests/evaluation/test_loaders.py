"""Tests for partdistill.evaluation.loaders and metrics.per_class_nmi_ari, on tiny generated data sets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio
from PIL import Image

from partdistill.data.images import DatasetError, ImageLoadError
from partdistill.evaluation.loaders import (
    GTObjectList,
    cityscapes_panoptic_parts,
    decode_panoptic_parts,
    partimagenet,
    pascal_part,
    pascal_part_categories,
)
from partdistill.evaluation.metrics import adjusted_rand_index, normalized_mutual_info, per_class_nmi_ari
from partdistill.evaluation.premise import load_gt_objects
from partdistill.storage import mask_to_rle


def write_image(path: Path, height: int, width: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


def box(shape: tuple[int, int], y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[y0:y1, x0:x1] = True
    return m


def part_pixels(obj) -> dict[int, int]:
    ids, counts = np.unique(obj.part_labels[obj.part_labels >= 0], return_counts=True)
    return dict(zip(ids.tolist(), counts.tolist(), strict=True))


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE: run lengths over the column-major pixels, starting with a 0-run."""
    flat = mask.ravel(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], edges])).tolist()
    return {"size": list(mask.shape), "counts": counts}


# --------------------------------------------------------------------------
# PartImageNet
# --------------------------------------------------------------------------

H, W = 20, 30
QUAD_HEAD = [[2, 3, 10, 3, 10, 8, 2, 8]]  # polygon: rows 3..7, cols 2..9 = 40 pixels
QUAD_BODY = box((H, W), 8, 16, 2, 20)  # 144 pixels, compressed RLE
CAR_TIRE = box((H, W), 0, 4, 20, 25)  # 20 pixels, uncompressed RLE


def partimagenet_json() -> dict:
    return {
        "images": [
            {"id": 1, "file_name": "n1_1.JPEG", "width": W, "height": H},
            {"id": 2, "file_name": "n2_1.JPEG", "width": W, "height": H},
            {"id": 3, "file_name": "n3_1.JPEG", "width": W, "height": H},  # no parts
        ],
        "categories": [
            {"id": 0, "name": "Quadruped Head", "supercategory": "Quadruped"},
            {"id": 1, "name": "Quadruped Body", "supercategory": "Quadruped"},
            {"id": 2, "name": "Car Tire", "supercategory": "Car"},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 0, "segmentation": QUAD_HEAD, "iscrowd": 0},
            {"id": 11, "image_id": 1, "category_id": 1, "segmentation": mask_to_rle(QUAD_BODY), "iscrowd": 0},
            # image 2: a car, and a quadruped head: two object classes in one image
            {"id": 20, "image_id": 2, "category_id": 2, "segmentation": uncompressed_rle(CAR_TIRE), "iscrowd": 0},
            {"id": 21, "image_id": 2, "category_id": 0, "segmentation": QUAD_HEAD, "iscrowd": 0},
            {"id": 22, "image_id": 2, "category_id": 1, "segmentation": mask_to_rle(QUAD_BODY), "iscrowd": 1},
        ],
    }


def make_partimagenet(root: Path, data: dict | None = None) -> Path:
    data = partimagenet_json() if data is None else data
    (root / "val.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "val.json").write_text(json.dumps(data))
    for im in data["images"]:
        write_image(root / "val" / im["file_name"], im["height"], im["width"])
    return root


def test_partimagenet_objects_classes_part_ids_and_pixels(tmp_path):
    objects = partimagenet(make_partimagenet(tmp_path), "val")
    assert isinstance(objects, GTObjectList)
    assert [(o.image_id, o.file_name, o.class_name) for o in objects] == [
        (1, "val/n1_1.JPEG", "Quadruped"), (2, "val/n2_1.JPEG", "Car"), (2, "val/n2_1.JPEG", "Quadruped")]
    quad, car, head_only = objects
    assert quad.mask.dtype == bool and quad.mask.shape == (H, W)
    assert quad.part_labels.dtype == np.int16
    assert quad.mask.sum() == 40 + 144  # the union of its parts
    assert part_pixels(quad) == {0: 40, 1: 144}
    assert (quad.part_labels[~quad.mask] == -1).all()
    assert [int(m.sum()) for m in quad.part_masks] == [40, 144]
    assert part_pixels(car) == {2: 20} and car.mask.sum() == 20
    assert np.array_equal(car.mask, CAR_TIRE)
    assert part_pixels(head_only) == {0: 40}  # the crowd body is skipped
    assert objects.dropped == 1  # image 3
    assert objects.part_names == {"Quadruped": {0: "Quadruped Head", 1: "Quadruped Body"}, "Car": {2: "Car Tire"}}


def test_partimagenet_limit(tmp_path):
    objects = partimagenet(make_partimagenet(tmp_path), "val", limit=2)
    assert [(o.image_id, o.class_name) for o in objects] == [(1, "Quadruped"), (2, "Car")]
    assert objects.dropped == 0


def test_partimagenet_limit_past_an_image_with_only_empty_parts(tmp_path):
    data = partimagenet_json()
    data["annotations"] = data["annotations"][2:]  # image 1 keeps a degenerate polygon only
    data["annotations"].append({"id": 12, "image_id": 1, "category_id": 0, "segmentation": [[1, 1, 2, 2]]})
    objects = partimagenet(make_partimagenet(tmp_path, data), "val", limit=1)
    assert [(o.image_id, o.class_name) for o in objects] == [(2, "Car")]
    assert part_pixels(objects[0]) == {2: 20}
    assert objects.dropped == 1


def test_partimagenet_delegates_to_parts_world_layout(tmp_path):
    obj = box((H, W), 2, 12, 2, 22)
    parts = [box((H, W), 2, 6, 2, 22), box((H, W), 6, 12, 2, 22)]
    image = {"id": 1, "file_name": "images/0.png", "width": W, "height": H}
    (tmp_path / "instances_val.json").write_text(json.dumps({
        "images": [image], "categories": [{"id": 1, "name": "robot", "supercategory": "object"}],
        "annotations": [{"id": 101, "image_id": 1, "category_id": 1, "segmentation": mask_to_rle(obj)}]}))
    (tmp_path / "parts_val.json").write_text(json.dumps({
        "images": [image],
        "categories": [{"id": 3, "name": "robot torso", "supercategory": "robot"},
                       {"id": 4, "name": "robot head", "supercategory": "robot"}],
        "annotations": [{"id": 10101, "image_id": 1, "category_id": 4, "segmentation": mask_to_rle(parts[0]),
                         "object_id": 101},
                        {"id": 10102, "image_id": 1, "category_id": 3, "segmentation": mask_to_rle(parts[1]),
                         "object_id": 101}]}))
    objects = partimagenet(tmp_path, "val")
    expected = load_gt_objects(tmp_path, "val")
    assert len(objects) == len(expected) == 1
    assert (objects[0].class_name, objects[0].file_name) == ("robot", "images/0.png")
    assert np.array_equal(objects[0].part_labels, expected[0].part_labels)
    assert part_pixels(objects[0]) == {3: 120, 4: 80}
    assert objects.part_names == {"robot": {3: "robot torso", 4: "robot head"}}
    assert objects.dropped is None


def test_partimagenet_missing_json(tmp_path):
    with pytest.raises(DatasetError, match=r"val\.json does not exist"):
        partimagenet(tmp_path, "val")


def test_partimagenet_malformed_json(tmp_path):
    (tmp_path / "val.json").write_text('{"images": [')
    with pytest.raises(DatasetError, match=r"val\.json: not valid JSON"):
        partimagenet(tmp_path, "val")


def test_partimagenet_missing_supercategory(tmp_path):
    data = partimagenet_json()
    del data["categories"][2]["supercategory"]
    with pytest.raises(DatasetError, match=r"categories\[2\] \(id 2\): field 'supercategory'"):
        partimagenet(make_partimagenet(tmp_path, data), "val")


def test_partimagenet_annotation_of_unknown_image(tmp_path):
    data = partimagenet_json()
    data["annotations"][0]["image_id"] = 9
    with pytest.raises(DatasetError, match=r"annotations\[0\] \(id 10\): field 'image_id' 9 is not an image"):
        partimagenet(make_partimagenet(tmp_path, data), "val")


def test_partimagenet_listed_image_missing(tmp_path):
    make_partimagenet(tmp_path)
    (tmp_path / "val" / "n3_1.JPEG").unlink()
    with pytest.raises(ImageLoadError, match=r"n3_1\.JPEG: file not found"):
        partimagenet(tmp_path, "val")


def test_partimagenet_image_size_differs_from_masks(tmp_path):
    make_partimagenet(tmp_path)
    write_image(tmp_path / "val" / "n2_1.JPEG", H + 1, W)
    with pytest.raises(DatasetError, match=r"val\.json: image id 2: the mask is 20x30 \(HxW\) but image .* is 21x30"):
        partimagenet(tmp_path, "val")


def test_partimagenet_rle_size_differs_from_image(tmp_path):
    data = partimagenet_json()
    data["annotations"][1]["segmentation"] = mask_to_rle(np.ones((H, W + 1), bool))
    with pytest.raises(DatasetError, match=r"annotations\[1\] \(id 11\): field 'segmentation.size'"):
        partimagenet(make_partimagenet(tmp_path, data), "val")


# --------------------------------------------------------------------------
# Pascal-Part
# --------------------------------------------------------------------------

PH, PW = 12, 16


def struct_array(records: list[tuple], fields: tuple[str, ...]) -> np.ndarray:
    """A (1, n) MATLAB struct array, as savemat writes numpy structured arrays of objects."""
    out = np.empty((1, len(records)), dtype=[(f, "O") for f in fields])
    for i, r in enumerate(records):
        out[0, i] = r
    return out


def write_pascal_mat(path: Path, objects: list[tuple[str, int, np.ndarray, list[tuple[str, np.ndarray]]]]) -> None:
    """Write an Annotations_Part file: anno.objects[k] = (class, class_ind, mask, parts[part_name, mask])."""
    rows = []
    for class_name, class_ind, mask, parts in objects:
        part_array = (struct_array([(n, m.astype(np.uint8)) for n, m in parts], ("part_name", "mask"))
                      if parts else np.zeros((0, 0)))  # what an object with no parts holds
        rows.append((class_name, class_ind, mask.astype(np.uint8), part_array))
    path.parent.mkdir(parents=True, exist_ok=True)
    sio.savemat(path, {"anno": {"imname": path.stem,
                                "objects": struct_array(rows, ("class", "class_ind", "mask", "parts"))}})


PERSON = box((PH, PW), 0, 10, 2, 8)  # 60 pixels
PERSON_PARTS = [
    ("head", box((PH, PW), 0, 2, 3, 7)),  # 8
    ("leye", box((PH, PW), 2, 3, 3, 5)),  # 2
    ("reye", box((PH, PW), 2, 3, 5, 7)),  # 2
    ("torso", box((PH, PW), 3, 7, 3, 7)),  # 16
    ("luarm", box((PH, PW), 3, 7, 2, 3)),  # 4
    ("rhand", box((PH, PW), 3, 5, 7, 8)),  # 2
    ("llleg", box((PH, PW), 8, 12, 3, 5)),  # 8, 4 of them inside the person
]
CAR = box((PH, PW), 0, 12, 9, 16)  # 84 pixels
CAR_PARTS = [
    ("wheel_1", box((PH, PW), 10, 12, 9, 11)),  # 4
    ("wheel_2", box((PH, PW), 10, 12, 14, 16)),  # 4
    ("window_3", box((PH, PW), 1, 3, 10, 15)),  # 10
    ("leftmirror", box((PH, PW), 3, 4, 9, 10)),  # 1
    ("door_2", box((PH, PW), 4, 8, 10, 13)),  # 12
    ("headlight_1", box((PH, PW), 8, 9, 15, 16)),  # 1
]


def make_pascal(root: Path) -> Path:
    main = root / "ImageSets" / "Main"
    main.mkdir(parents=True)
    (main / "val.txt").write_text("2008_000001\n\n2008_000002\n")
    write_image(root / "JPEGImages" / "2008_000001.jpg", PH, PW)
    write_image(root / "JPEGImages" / "2008_000002.jpg", 8, 10)
    write_pascal_mat(root / "Annotations_Part" / "2008_000001.mat", [
        ("person", 15, PERSON, PERSON_PARTS),
        ("car", 7, CAR, CAR_PARTS),
        ("chair", 9, box((PH, PW), 10, 12, 0, 2), []),  # object mask only: dropped
    ])
    write_pascal_mat(root / "Annotations_Part" / "2008_000002.mat", [
        ("cat", 8, box((8, 10), 1, 7, 1, 9), [("lfpa", box((8, 10), 5, 7, 1, 3)), ("tail", box((8, 10), 1, 2, 7, 9))]),
    ])
    return root


def test_generated_mat_loads_like_pascal_part_files(tmp_path):
    """The writer above makes the layout loadmat gives for the real Annotations_Part files."""
    make_pascal(tmp_path)
    mat = sio.loadmat(tmp_path / "Annotations_Part" / "2008_000001.mat")
    anno = mat["anno"]
    assert anno.shape == (1, 1) and {"imname", "objects"} <= set(anno.dtype.names)
    objects = anno[0, 0]["objects"]
    assert objects.shape == (1, 3) and objects.dtype.names == ("class", "class_ind", "mask", "parts")
    person = objects[0, 0]
    assert person["class"][0] == "person" and person["class_ind"][0, 0] == 15
    assert person["mask"].dtype == np.uint8 and person["mask"].shape == (PH, PW)
    assert person["parts"].shape == (1, 7) and person["parts"].dtype.names == ("part_name", "mask")
    assert person["parts"][0, 1]["part_name"][0] == "leye"
    assert objects[0, 2]["parts"].size == 0
    single = sio.loadmat(tmp_path / "Annotations_Part" / "2008_000002.mat")["anno"][0, 0]["objects"]
    assert single.shape == (1, 1)  # one object stays a struct array: no squeezing


def test_pascal_part_merges_parts_and_strips_numbers(tmp_path):
    objects = pascal_part(make_pascal(tmp_path), "val")
    assert [(o.image_id, o.file_name, o.class_name) for o in objects] == [
        (2008000001, "JPEGImages/2008_000001.jpg", "person"),
        (2008000001, "JPEGImages/2008_000001.jpg", "car"),
        (2008000002, "JPEGImages/2008_000002.jpg", "cat"),
    ]
    person, car, cat = objects
    categories = pascal_part_categories()
    assert categories["person"] == ["arm", "head", "leg", "torso"]
    assert categories["car"] == ["body", "door", "license plate", "light", "mirror", "wheel", "window"]
    assert categories["cat"] == ["head", "leg", "tail", "torso"]
    # head + leye + reye -> one head part; luarm + rhand -> arm; the leg clipped to the person
    assert part_pixels(person) == {0: 6, 1: 12, 2: 4, 3: 16}
    assert person.mask.sum() == 60 and (person.part_labels[person.mask] == -1).sum() == 60 - 38
    assert len(person.part_masks) == 4
    # wheel_1 + wheel_2 -> wheel, window_3 -> window, leftmirror -> mirror, door_2 -> door, headlight_1 -> light
    assert part_pixels(car) == {1: 12, 3: 1, 4: 1, 5: 8, 6: 10}
    assert part_pixels(cat) == {1: 4, 2: 2}
    assert cat.mask.shape == (8, 10)
    assert objects.dropped == 1  # the chair
    assert objects.part_names["person"] == {0: "arm", 1: "head", 2: "leg", 3: "torso"}


def test_pascal_part_custom_merge(tmp_path):
    merge = {"person": {"leye": "eye", "reye": "eye", "luarm": "arm", "rhand": "arm"}}
    categories = pascal_part_categories(merge)
    person_parts = categories["person"]
    # fine names the table does not map keep their name; classes it lacks are not merged at all
    assert {"eye", "arm", "head", "hair", "torso", "llleg", "lfoot"} <= set(person_parts)
    assert "car" in categories and "wheel" in categories["car"] and "frontside" in categories["car"]
    assert person_parts == sorted(person_parts)
    objects = pascal_part(make_pascal(tmp_path), "val", merge=merge)
    person, car = objects[0], objects[1]
    idx = {name: person_parts.index(name) for name in ("head", "eye", "torso", "arm", "llleg")}
    assert part_pixels(person) == {idx["head"]: 8, idx["eye"]: 4, idx["torso"]: 16, idx["arm"]: 6, idx["llleg"]: 4}
    car_parts = categories["car"]
    assert part_pixels(car) == {car_parts.index("wheel"): 8, car_parts.index("window"): 10,
                                car_parts.index("leftmirror"): 1, car_parts.index("door"): 12,
                                car_parts.index("headlight"): 1}


def test_pascal_part_limit(tmp_path):
    objects = pascal_part(make_pascal(tmp_path), "val", limit=1)
    assert [o.class_name for o in objects] == ["person"]


def test_pascal_part_unknown_part_name(tmp_path):
    make_pascal(tmp_path)
    write_pascal_mat(tmp_path / "Annotations_Part" / "2008_000002.mat",
                     [("cat", 8, box((8, 10), 1, 7, 1, 9), [("whisker_2", box((8, 10), 1, 2, 1, 2))])])
    with pytest.raises(DatasetError, match=r"2008_000002\.mat: objects\[0\] \(cat\): parts\[0\]: part 'whisker_2'"):
        pascal_part(tmp_path, "val")
    objects = pascal_part(tmp_path, "val", merge={"cat": {"whisker": "head"}})
    assert objects[-1].class_name == "cat"
    assert part_pixels(objects[-1]) == {pascal_part_categories({"cat": {"whisker": "head"}})["cat"].index("head"): 1}


def test_pascal_part_missing_split_file(tmp_path):
    with pytest.raises(DatasetError, match=r"split file .*val\.txt does not exist"):
        pascal_part(tmp_path, "val")


def test_pascal_part_bad_image_id(tmp_path):
    make_pascal(tmp_path)
    (tmp_path / "ImageSets" / "Main" / "val.txt").write_text("2008_000001\nfoo.jpg\n")
    with pytest.raises(DatasetError, match=r"val\.txt: line 2: 'foo\.jpg' is not a VOC image id"):
        pascal_part(tmp_path, "val")


def test_pascal_part_listed_image_without_annotation(tmp_path):
    make_pascal(tmp_path)
    (tmp_path / "Annotations_Part" / "2008_000002.mat").unlink()
    with pytest.raises(DatasetError, match=r"val\.txt: line 3: image 2008_000002 has no part annotation"):
        pascal_part(tmp_path, "val")


def test_pascal_part_listed_image_missing(tmp_path):
    make_pascal(tmp_path)
    (tmp_path / "JPEGImages" / "2008_000002.jpg").unlink()
    with pytest.raises(ImageLoadError, match=r"2008_000002\.jpg: file not found"):
        pascal_part(tmp_path, "val")


def test_pascal_part_malformed_mat(tmp_path):
    make_pascal(tmp_path)
    (tmp_path / "Annotations_Part" / "2008_000002.mat").write_bytes(b"not a MATLAB file at all" * 8)
    with pytest.raises(DatasetError, match=r"cannot read .*2008_000002\.mat as a MATLAB file"):
        pascal_part(tmp_path, "val")


def test_pascal_part_mat_without_anno(tmp_path):
    make_pascal(tmp_path)
    sio.savemat(tmp_path / "Annotations_Part" / "2008_000002.mat", {"other": np.zeros(3)})
    with pytest.raises(DatasetError, match=r"2008_000002\.mat: missing variable 'anno'"):
        pascal_part(tmp_path, "val")


def test_pascal_part_mat_missing_field(tmp_path):
    make_pascal(tmp_path)
    objects = struct_array([("cat", 8, np.ones((8, 10), np.uint8))], ("class", "class_ind", "mask"))
    sio.savemat(tmp_path / "Annotations_Part" / "2008_000002.mat", {"anno": {"objects": objects}})
    with pytest.raises(DatasetError, match=r"2008_000002\.mat: anno\.objects: missing field\(s\) \['parts'\]"):
        pascal_part(tmp_path, "val")


def test_pascal_part_mask_shape_differs_from_image(tmp_path):
    make_pascal(tmp_path)
    write_image(tmp_path / "JPEGImages" / "2008_000002.jpg", 9, 10)
    with pytest.raises(DatasetError, match=r"2008_000002\.mat: objects\[0\] \(cat\): field 'mask': the mask is 8x10"):
        pascal_part(tmp_path, "val")


def test_pascal_part_part_mask_shape_differs_from_object(tmp_path):
    make_pascal(tmp_path)
    write_pascal_mat(tmp_path / "Annotations_Part" / "2008_000002.mat",
                     [("cat", 8, box((8, 10), 1, 7, 1, 9), [("tail", np.ones((8, 11), bool))])])
    with pytest.raises(DatasetError, match=r"objects\[0\] \(cat\): parts\[0\] \(tail\): field 'mask' is \(8, 11\)"):
        pascal_part(tmp_path, "val")


# --------------------------------------------------------------------------
# Cityscapes-Panoptic-Parts
# --------------------------------------------------------------------------

CH, CW = 10, 12


def cityscapes_labels() -> np.ndarray:
    uids = np.full((CH, CW), 23, np.int32)  # sky
    uids[0:6, 0:4] = 2400101  # person 1, torso: 24 px
    uids[6:8, 0:4] = 2400102  # person 1, head: 8 px
    uids[8:10, 0:2] = 2400100  # person 1, void part: 4 px
    uids[8:10, 2:4] = 24001  # person 1, instance level only: 4 px
    uids[0:2, 4:6] = 24  # a person crowd: semantic level only
    uids[0:4, 6:12] = 2600005  # car 0, chassis: 24 px
    uids[4:5, 6:12] = 2600002  # car 0, wheel: 6 px
    uids[6:10, 6:8] = 25003  # rider 3 without parts: dropped
    return uids


def make_cityscapes(root: Path, uids: np.ndarray | None = None) -> Path:
    uids = cityscapes_labels() if uids is None else uids
    for city, name, labels in (("aachen", "aachen_000000_000019", uids),
                               ("bonn", "bonn_000001_000002", np.full((CH, CW), 2800104, np.int32))):
        label_dir = root / "gtFinePanopticParts" / "val" / city
        label_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(labels).save(label_dir / f"{name}_gtFinePanopticParts.tif")
        write_image(root / "leftImg8bit" / "val" / city / f"{name}_leftImg8bit.png", CH, CW)
    return root


def test_decode_panoptic_parts():
    sid, iid, pid = decode_panoptic_parts(np.array([23, 26002, 2401002, 24000, 2400000]))
    assert sid.tolist() == [23, 26, 24, 24, 24]
    assert iid.tolist() == [-1, 2, 10, 0, 0]
    assert pid.tolist() == [-1, -1, 2, -1, 0]
    with pytest.raises(ValueError, match="10\\*\\*7"):
        decode_panoptic_parts(np.array([10**7]))


def test_cityscapes_objects_parts_and_pixels(tmp_path):
    objects = cityscapes_panoptic_parts(make_cityscapes(tmp_path), "val")
    assert [(o.image_id, o.file_name, o.class_name) for o in objects] == [
        (1, "leftImg8bit/val/aachen/aachen_000000_000019_leftImg8bit.png", "person"),
        (1, "leftImg8bit/val/aachen/aachen_000000_000019_leftImg8bit.png", "car"),
        (2, "leftImg8bit/val/bonn/bonn_000001_000002_leftImg8bit.png", "bus"),
    ]
    person, car, bus = objects
    assert person.mask.sum() == 24 + 8 + 4 + 4  # void-part and instance-only pixels are the person's too
    assert part_pixels(person) == {0: 24, 1: 8}  # torso, head
    assert car.mask.sum() == 30 and part_pixels(car) == {4: 24, 1: 6}  # chassis, wheel
    assert part_pixels(bus) == {3: CH * CW}  # license plate
    assert objects.dropped == 1  # the rider
    assert objects.part_names["person"] == {0: "torso", 1: "head", 2: "arm", 3: "leg"}
    assert objects.part_names["bus"][4] == "chassis"


def test_cityscapes_missing_label_folder(tmp_path):
    with pytest.raises(DatasetError, match=r"gtFinePanopticParts/val does not exist"):
        cityscapes_panoptic_parts(tmp_path, "val")


def test_cityscapes_missing_image(tmp_path):
    make_cityscapes(tmp_path)
    (tmp_path / "leftImg8bit" / "val" / "bonn" / "bonn_000001_000002_leftImg8bit.png").unlink()
    with pytest.raises(ImageLoadError, match=r"bonn_000001_000002_leftImg8bit\.png: file not found"):
        cityscapes_panoptic_parts(tmp_path, "val")


def test_cityscapes_label_shape_differs_from_image(tmp_path):
    make_cityscapes(tmp_path, np.full((CH + 1, CW), 23, np.int32))
    with pytest.raises(DatasetError, match=r"aachen_000000_000019_gtFinePanopticParts\.tif: the mask is 11x12"):
        cityscapes_panoptic_parts(tmp_path, "val")


def test_cityscapes_bad_uids(tmp_path):
    uids = cityscapes_labels()
    uids[0, 0] = 12_345_678
    make_cityscapes(tmp_path, uids)
    with pytest.raises(DatasetError, match=r"aachen.*\.tif: uids must lie in"):
        cityscapes_panoptic_parts(tmp_path, "val")
    uids = cityscapes_labels()
    uids[0, 0] = 2400107  # a person has parts 1..4
    make_cityscapes(tmp_path, uids)
    with pytest.raises(DatasetError, match=r"instance 1 of person \(sid 24\) has part id 7"):
        cityscapes_panoptic_parts(tmp_path, "val")


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_cityscapes_corrupt_label_file(tmp_path):
    make_cityscapes(tmp_path)
    (tmp_path / "gtFinePanopticParts" / "val" / "bonn" / "bonn_000001_000002_gtFinePanopticParts.tif").write_bytes(
        b"II*\x00garbage")
    with pytest.raises(DatasetError, match=r"cannot read label file .*bonn_000001_000002"):
        cityscapes_panoptic_parts(tmp_path, "val")


def test_loaded_objects_feed_the_class_level_metric(tmp_path):
    objects = pascal_part(make_pascal(tmp_path), "val")
    gt = [o.part_labels[o.mask] for o in objects]
    scores = per_class_nmi_ari(gt, gt, [o.class_name for o in objects])
    assert scores["FG-NMI"] == scores["FG-ARI"] == 1.0
    assert {c: s["pixels"] for c, s in scores["per_class"].items()} == {"person": 38, "car": 32, "cat": 6}


# --------------------------------------------------------------------------
# per_class_nmi_ari
# --------------------------------------------------------------------------


def test_per_class_perfect_and_permuted():
    gt = [np.array([0, 0, 1, 1, 2, -1]), np.array([2, 2, 0, -1])]
    assert per_class_nmi_ari(gt, gt, ["a", "a"])["FG-NMI"] == 1.0
    permuted = [np.array([7, 7, 3, 3, 5, 9]), np.array([5, 5, 7, 9])]  # 0->7, 1->3, 2->5, same map in both
    scores = per_class_nmi_ari(gt, permuted, ["a", "a"])
    assert scores["FG-NMI"] == scores["FG-ARI"] == 1.0
    assert scores["per_class"] == {"a": {"NMI": 1.0, "ARI": 1.0, "pixels": 8}}
    noisy = [np.array([0, 1, 1, 1, 2, 0]), np.array([2, 0, 0, 0])]
    relabelled = [np.array([4, 8, 8, 8, 6, 4]), np.array([6, 4, 4, 4])]
    a, b = per_class_nmi_ari(gt, noisy, ["a", "a"]), per_class_nmi_ari(gt, relabelled, ["a", "a"])
    assert a["FG-NMI"] == pytest.approx(b["FG-NMI"]) and a["FG-ARI"] == pytest.approx(b["FG-ARI"])
    assert a["FG-NMI"] < 1.0


def test_per_class_one_cluster_scores_zero():
    gt = [np.array([0, 0, 1, 1, 2, 2])]
    scores = per_class_nmi_ari(gt, [np.zeros(6, int)], ["a"])
    assert scores["FG-NMI"] == 0.0 and scores["FG-ARI"] == 0.0


def test_per_class_averages_classes_not_pixels():
    # class a: 4 pixels, perfect; class b: 12 pixels, one cluster
    gt = [np.array([0, 0, 1, 1]), np.array([0] * 6 + [1] * 6)]
    pred = [np.array([0, 0, 1, 1]), np.zeros(12, int)]
    scores = per_class_nmi_ari(gt, pred, ["a", "b"])
    assert scores["FG-NMI"] == 0.5 and scores["FG-ARI"] == 0.5
    assert scores["per_class"]["a"]["pixels"] == 4 and scores["per_class"]["b"]["pixels"] == 12
    pooled = normalized_mutual_info(np.concatenate(gt), np.concatenate(pred))
    assert not math.isclose(pooled, 0.5)


def test_per_class_pools_objects_of_a_class():
    # each object alone is perfect, but the ids disagree across the two objects of the class
    gt = [np.array([0, 0, 1, 1]), np.array([0, 0, 1, 1])]
    pred = [np.array([0, 0, 1, 1]), np.array([1, 1, 0, 0])]
    scores = per_class_nmi_ari(gt, pred, [3, 3])
    assert scores["FG-NMI"] == 0.0 and scores["FG-ARI"] < 0  # ARI below chance
    assert per_class_nmi_ari(gt, pred, [3, 4])["FG-NMI"] == 1.0


def test_per_class_unassigned_pixels_are_one_cluster():
    gt = [np.array([0, 0, 1, 1, 2, 2])]
    scores = per_class_nmi_ari(gt, [np.array([-1, -3, 5, 5, -2, -1])], ["a"])
    expected = per_class_nmi_ari(gt, [np.array([9, 9, 5, 5, 9, 9])], ["a"])
    assert scores["FG-NMI"] == pytest.approx(expected["FG-NMI"])
    assert scores["FG-ARI"] == pytest.approx(expected["FG-ARI"])
    assert scores["FG-NMI"] < 1.0


def test_per_class_empty_and_mismatched():
    scores = per_class_nmi_ari([np.array([-1, -1])], [np.array([0, 1])], ["a"])
    assert math.isnan(scores["FG-NMI"]) and math.isnan(scores["FG-ARI"]) and scores["per_class"] == {}
    with pytest.raises(ValueError, match="same length"):
        per_class_nmi_ari([np.zeros(2)], [np.zeros(2)], [])
    with pytest.raises(ValueError, match="shapes differ"):
        per_class_nmi_ari([np.zeros(2)], [np.zeros(3)], ["a"])


def test_per_class_agrees_with_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    gt = [rng.integers(-1, 4, 200) for _ in range(4)]
    pred = [rng.integers(-2, 5, 200) for _ in range(4)]
    classes = ["a", "b", "a", "b"]
    scores = per_class_nmi_ari(gt, pred, classes)
    for c in ("a", "b"):
        g = np.concatenate([x for x, k in zip(gt, classes, strict=True) if k == c])
        p = np.concatenate([x for x, k in zip(pred, classes, strict=True) if k == c])
        g, p = g[g >= 0], np.maximum(p[g >= 0], -1)
        assert scores["per_class"][c]["NMI"] == pytest.approx(metrics.normalized_mutual_info_score(g, p), abs=1e-12)
        assert scores["per_class"][c]["ARI"] == pytest.approx(metrics.adjusted_rand_score(g, p), abs=1e-12)
        assert normalized_mutual_info(g, p) == pytest.approx(metrics.normalized_mutual_info_score(g, p), abs=1e-12)
        assert adjusted_rand_index(g, p) == pytest.approx(metrics.adjusted_rand_score(g, p), abs=1e-12)
