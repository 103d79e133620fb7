"""Tests of partdistill.data.images. Every fixture file is generated in tmp_path."""

from __future__ import annotations

import json
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils

from partdistill.data.images import (
    DatasetError,
    ImageLoadError,
    ImageRecord,
    coco_images,
    coco_instance_masks,
    imagenet_folder,
    load_rgb,
    partsworld_images,
    rle_counts,
)

# --- helpers -----------------------------------------------------------------------------


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png_with_size(path: Path, width: int, height: int) -> Path:
    """A real 2x2 PNG whose IHDR then claims width x height (CRC recomputed)."""
    Image.new("RGB", (2, 2), (1, 2, 3)).save(path)
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def _reason(path: Path, **kw) -> str:
    with pytest.raises(ImageLoadError) as info:
        load_rgb(path, **kw)
    assert info.value.path == path
    assert str(path) in str(info.value) and info.value.reason in str(info.value)
    return info.value.reason


def _white_composite(rgb: tuple[int, int, int], alpha: int) -> list[int]:
    return [(c * alpha + 255 * (255 - alpha) + 127) // 255 for c in rgb]


# --- load_rgb: failures ------------------------------------------------------------------


def test_truncated_jpeg(tmp_path):
    full = tmp_path / "full.jpg"
    Image.fromarray(_noise(64, 64)).save(full, quality=90)
    cut = tmp_path / "cut.jpg"
    data = full.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    reason = _reason(cut)
    assert reason.startswith("truncated or corrupt: image file is truncated")


def test_truncated_png(tmp_path):
    full = tmp_path / "full.png"
    Image.fromarray(_noise(64, 64)).save(full)
    cut = tmp_path / "cut.png"
    data = full.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    assert _reason(cut).startswith("truncated or corrupt: image file is truncated")


def test_empty_file(tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    assert _reason(p) == "empty file"


def test_text_file_with_image_extension(tmp_path):
    p = tmp_path / "x.jpg"
    p.write_text("this is not a JPEG\n")
    assert _reason(p) == "not an image (cannot identify format)"


def test_missing_file(tmp_path):
    assert _reason(tmp_path / "nope.png") == "file not found"


def test_huge_header_refused_before_decoding(tmp_path):
    # 10000 x 10000 = 1e8 pixels: over our 64M default, under Pillow's own hard limit.
    # The pixel data is a 2x2 image's, so any decode attempt would report "truncated".
    p = _png_with_size(tmp_path / "big.png", 10_000, 10_000)
    assert _reason(p) == "too large: 10000x10000 = 100000000 pixels exceeds the limit of 64000000"


def test_decompression_bomb_header(tmp_path):
    # 100000 x 100000: Pillow itself refuses it while reading the header.
    p = _png_with_size(tmp_path / "bomb.png", 100_000, 100_000)
    reason = _reason(p)
    assert reason.startswith("too large: 10000000000 pixels exceeds")


def test_small_max_pixels(tmp_path):
    p = tmp_path / "a.png"
    Image.fromarray(_noise(64, 32)).save(p)
    assert _reason(p, max_pixels=1000) == "too large: 32x64 = 2048 pixels exceeds the limit of 1000"
    assert load_rgb(p, max_pixels=2048).shape == (64, 32, 3)


def test_error_pickles():
    e = ImageLoadError("/a/b.png", "empty file")
    back = pickle.loads(pickle.dumps(e))
    assert isinstance(back, ValueError)
    assert (back.path, back.reason, str(back)) == (Path("/a/b.png"), "empty file", str(e))


# --- load_rgb: modes ---------------------------------------------------------------------


def test_rgb_roundtrip_and_array_contract(tmp_path):
    p = tmp_path / "a.png"
    img = _noise(5, 7)
    Image.fromarray(img).save(p)
    out = load_rgb(p)
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
    assert out.flags.c_contiguous and out.flags.writeable
    np.testing.assert_array_equal(out, img)


def test_one_by_one(tmp_path):
    p = tmp_path / "one.png"
    Image.new("RGB", (1, 1), (10, 20, 30)).save(p)
    np.testing.assert_array_equal(load_rgb(p), [[[10, 20, 30]]])


def test_grayscale_and_bilevel(tmp_path):
    p = tmp_path / "g.png"
    Image.fromarray(np.array([[0, 77], [200, 255]], np.uint8)).save(p)
    np.testing.assert_array_equal(load_rgb(p)[..., 0], [[0, 77], [200, 255]])
    np.testing.assert_array_equal(load_rgb(p)[..., 2], [[0, 77], [200, 255]])
    b = tmp_path / "b.png"
    Image.fromarray(np.array([[True, False]])).save(b)
    np.testing.assert_array_equal(load_rgb(b), [[[255, 255, 255], [0, 0, 0]]])


def test_rgba_composited_over_white(tmp_path):
    p = tmp_path / "a.png"
    rgba = np.array([[[255, 0, 0, 128], [0, 0, 255, 0], [10, 20, 30, 255]]], np.uint8)
    Image.fromarray(rgba, "RGBA").save(p)
    out = load_rgb(p)
    assert out[0, 0].tolist() == _white_composite((255, 0, 0), 128) == [255, 127, 127]
    assert out[0, 1].tolist() == [255, 255, 255]  # fully transparent -> white, not the stored blue
    assert out[0, 2].tolist() == [10, 20, 30]


def test_la_composited_over_white(tmp_path):
    p = tmp_path / "la.png"
    Image.fromarray(np.array([[[0, 0], [100, 255]]], np.uint8), "LA").save(p)
    np.testing.assert_array_equal(load_rgb(p), [[[255, 255, 255], [100, 100, 100]]])


def test_palette_with_transparency(tmp_path):
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (253 * 3)
    img = Image.fromarray(np.array([[0, 1, 2]], np.uint8), "P")
    img.putpalette(palette)
    single = tmp_path / "single.png"
    img.save(single, transparency=0)  # index 0 (red) is fully transparent
    np.testing.assert_array_equal(load_rgb(single), [[[255, 255, 255], [0, 255, 0], [0, 0, 255]]])
    partial = tmp_path / "partial.png"
    img.save(partial, transparency=bytes([255, 0, 128]))  # per-index alpha (tRNS table)
    assert load_rgb(partial).tolist() == [[[255, 0, 0], [255, 255, 255], _white_composite((0, 0, 255), 128)]]


def test_cmyk_jpeg(tmp_path):
    p = tmp_path / "c.jpg"
    cmyk = Image.new("CMYK", (16, 8))
    cmyk.paste((255, 0, 0, 0), (0, 0, 8, 8))  # cyan
    cmyk.paste((0, 0, 0, 255), (8, 0, 16, 8))  # black
    cmyk.save(p, quality=95)
    assert Image.open(p).mode == "CMYK"
    out = load_rgb(p).astype(int)
    assert np.abs(out[4, 2] - [0, 255, 255]).max() <= 3
    assert np.abs(out[4, 12] - [0, 0, 0]).max() <= 3


def test_16bit_png_scaled_by_dtype_range(tmp_path):
    p = tmp_path / "g16.png"
    Image.fromarray(np.array([[65535, 32768, 255, 256, 0]], np.uint16)).save(p)
    assert Image.open(p).mode.startswith("I;16")
    out = load_rgb(p)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 0], [[255, 128, 0, 1, 0]])
    np.testing.assert_array_equal(out[..., 1], out[..., 0])


def test_int32_and_float_tiff(tmp_path):
    i32 = tmp_path / "i.tif"
    Image.fromarray(np.array([[65535, 32768, 0]], np.int32), "I").save(i32)
    assert Image.open(i32).mode == "I"
    np.testing.assert_array_equal(load_rgb(i32)[..., 0], [[255, 128, 0]])
    unit = tmp_path / "f1.tif"
    Image.fromarray(np.array([[0.0, 0.5, 1.0, np.nan]], np.float32), "F").save(unit)
    np.testing.assert_array_equal(load_rgb(unit)[..., 0], [[0, 128, 255, 0]])
    byte = tmp_path / "f255.tif"
    Image.fromarray(np.array([[0.0, 100.4, 255.0, 300.0]], np.float32), "F").save(byte)
    np.testing.assert_array_equal(load_rgb(byte)[..., 0], [[0, 100, 255, 255]])


def test_animated_gif_first_frame(tmp_path):
    p = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (6, 4), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(p).n_frames == 3
    out = load_rgb(p)
    assert out.shape == (4, 6, 3)
    assert (out == [255, 0, 0]).all()


def test_exif_rotated_jpeg(tmp_path):
    # Stored 40 wide x 20 high; Orientation 6 = "rotate 90 degrees clockwise to view".
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:6, :6] = (255, 0, 0)  # stored top-left corner, red
    p = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(p, quality=95, exif=exif)
    out = load_rgb(p)
    assert out.shape == (40, 20, 3)  # upright: 20 wide, 40 high
    # the stored top-left lands at the upright top-right
    assert out[1, 18].tolist()[0] > 200 and out[1, 18].tolist()[1] < 50
    assert out[1, 1].max() < 50 and out[38, 18].max() < 50 and out[38, 1].max() < 50


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_matches_exif_transpose(tmp_path, orientation):
    p = tmp_path / f"o{orientation}.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(_noise(6, 10)).save(p, quality=95, exif=exif)
    with Image.open(p) as im:
        expected = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    np.testing.assert_array_equal(load_rgb(p), expected)


# --- imagenet_folder ---------------------------------------------------------------------


def test_imagenet_folder(tmp_path):
    root = tmp_path / "set"
    for cls, names in {"dog": ["b.png", "a.JPEG"], "cat": ["z.jpg", "sub/y.png"]}.items():
        for i, name in enumerate(names):
            p = root / cls / name
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (10 + i, 20 + i)).save(p, format="PNG" if p.suffix == ".png" else "JPEG")
    (root / "cat" / "broken.jpg").write_text("not an image")
    (root / "cat" / "notes.txt").write_text("ignored: extension")
    (root / "stray.png").write_bytes((root / "dog" / "b.png").read_bytes())  # not in a class folder
    (root / ".hidden").mkdir()
    Image.new("RGB", (3, 3)).save(root / ".hidden" / "h.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (30, 12)).save(root / "dog" / "rot.jpg", exif=exif)

    records = imagenet_folder(root)
    assert [(r.image_id, r.file_name, r.class_name, r.width, r.height) for r in records] == [
        (1, "cat/broken.jpg", "cat", 0, 0),
        (2, "cat/sub/y.png", "cat", 11, 21),
        (3, "cat/z.jpg", "cat", 10, 20),
        (4, "dog/a.JPEG", "dog", 11, 21),
        (5, "dog/b.png", "dog", 10, 20),
        (6, "dog/rot.jpg", "dog", 12, 30),  # upright size, as load_rgb returns it
    ]
    assert all(r.path == root / r.file_name and r.split is None for r in records)
    assert load_rgb(records[5].path).shape == (30, 12, 3)
    assert [r.file_name for r in imagenet_folder(root, extensions=(".png",))] == ["cat/sub/y.png", "dog/b.png"]


def test_imagenet_folder_empty_or_missing(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        imagenet_folder(tmp_path / "missing")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    Image.new("RGB", (2, 2)).save(tmp_path / "empty" / "root_level.png")
    with pytest.raises(DatasetError, match=r"no images .* root/<class>/<image>"):
        imagenet_folder(tmp_path / "empty")


# --- COCO --------------------------------------------------------------------------------


def _coco(tmp_path: Path) -> dict:
    """Two 8x6 (w x h) images; image 1 has a polygon, an uncompressed RLE, a compressed RLE
    and a crowd annotation; image 2 none."""
    m = np.zeros((6, 8), np.uint8)
    m[1:4, 2:7] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    flat = m.flatten(order="F")
    runs, value, n = [], 0, 0
    for v in flat:  # uncompressed RLE: alternating run lengths, starting with zeros
        if v != value:
            runs.append(n)
            value, n = v, 0
        n += 1
    runs.append(n)
    return {
        "images": [
            {"id": 2, "file_name": "b.png", "width": 8, "height": 6, "split": "val"},
            {"id": 1, "file_name": "a.png", "width": 8, "height": 6},
        ],
        "categories": [{"id": 1, "name": "robot"}, {"id": 2, "name": "car"}],
        "annotations": [
            {"id": 11, "image_id": 1, "category_id": 2, "bbox": [2, 1, 5, 3], "iscrowd": 0,
             "segmentation": {"size": [6, 8], "counts": rle["counts"].decode("ascii")}},
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4], "iscrowd": 0,
             "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4]]},
            {"id": 12, "image_id": 1, "category_id": 1, "iscrowd": 0,
             "segmentation": {"size": [6, 8], "counts": runs}},
            {"id": 13, "image_id": 1, "category_id": 1, "iscrowd": 1,
             "segmentation": {"size": [6, 8], "counts": runs}},
        ],
    }


def _write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "ann" / "instances.json"
    p.parent.mkdir(exist_ok=True)
    p.write_text(json.dumps(data))
    return p


def test_coco_images(tmp_path):
    p = _write(tmp_path, _coco(tmp_path))
    assert coco_images(p) == [
        ImageRecord(1, p.parent / "a.png", "a.png", 8, 6, None, None),
        ImageRecord(2, p.parent / "b.png", "b.png", 8, 6, None, "val"),
    ]
    assert coco_images(p, image_root=tmp_path / "imgs")[0].path == tmp_path / "imgs" / "a.png"


def test_coco_instance_masks(tmp_path):
    data = _coco(tmp_path)
    p = _write(tmp_path, data)
    masks = coco_instance_masks(p)
    assert list(masks) == [1, 2] and masks[2] == []
    assert [(g.annotation_id, g.category_id, g.category_name, g.score) for g in masks[1]] == [
        (10, 1, "robot", 1.0), (11, 2, "car", 1.0), (12, 1, "robot", 1.0)]  # crowd 13 skipped
    expected = np.zeros((6, 8), bool)
    expected[1:4, 2:7] = True
    for g in masks[1]:
        assert g.mask.dtype == bool and g.mask.shape == (6, 8) and g.mask.flags.c_contiguous
    np.testing.assert_array_equal(masks[1][1].mask, expected)  # compressed RLE
    np.testing.assert_array_equal(masks[1][2].mask, expected)  # uncompressed RLE
    poly = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([[0.0, 0, 4, 0, 4, 4, 0, 4]], 6, 8)))
    np.testing.assert_array_equal(masks[1][0].mask, poly.astype(bool))
    assert masks[1][0].mask[:4, :4].all() and not masks[1][0].mask[5:, 5:].any()
    assert list(coco_instance_masks(p, image_ids=[2])) == [2]
    with pytest.raises(DatasetError, match=r"image_ids not in the file: \[7\]"):
        coco_instance_masks(p, image_ids=[7])


def _bad(tmp_path, mutate) -> str:
    data = _coco(tmp_path)
    mutate(data)
    p = _write(tmp_path, data)
    with pytest.raises(DatasetError) as info:
        coco_images(p)
    assert str(p) in str(info.value)
    with pytest.raises(DatasetError):
        coco_instance_masks(p)
    return str(info.value)


def _set(path: tuple, value):
    def mutate(data):
        obj = data
        for key in path[:-1]:
            obj = obj[key]
        if value is _DELETE:
            del obj[path[-1]]
        else:
            obj[path[-1]] = value
    return mutate


_DELETE = object()


@pytest.mark.parametrize(("mutate", "message"), [
    (_set(("images", 1, "file_name"), _DELETE), r"images\[1\] \(id 1\): missing field 'file_name'"),
    (_set(("images", 0, "height"), _DELETE), r"images\[0\] \(id 2\): missing field 'height'"),
    (_set(("images", 0, "id"), _DELETE), r"images\[0\]: missing field 'id'"),
    (_set(("images", 0, "width"), 0), r"images\[0\] \(id 2\): field 'width' must be a positive int"),
    (_set(("images", 0, "id"), 1), r"images\[1\] \(id 1\): duplicate image id 1"),
    (_set(("annotations", 1, "id"), 11), r"annotations\[1\] \(id 11\): duplicate annotation id 11"),
    (_set(("annotations", 0, "image_id"), 99), r"annotations\[0\] \(id 11\): field 'image_id' 99 is not an image"),
    (_set(("annotations", 0, "image_id"), _DELETE), r"annotations\[0\] \(id 11\): missing field 'image_id'"),
    (_set(("annotations", 1, "id"), _DELETE), r"annotations\[1\]: missing field 'id'"),
    (_set(("annotations", 0, "bbox"), [5, 1, 5, 3]), r"annotations\[0\] \(id 11\): field 'bbox' .* outside the 8x6"),
    (_set(("annotations", 0, "bbox"), [0, -3, 2, 2]), r"field 'bbox' .* outside"),
    (_set(("annotations", 1, "segmentation"), [[0, 0, 12, 0, 12, 4]]),
     r"annotations\[1\] \(id 10\): field 'segmentation'\[0\] has points outside the 8x6 image"),
    (_set(("annotations", 0, "segmentation", "size"), [60, 80]),
     r"field 'segmentation.size' \[60, 80\] does not match .* outside the image"),
    (_set(("annotations", 2, "segmentation", "counts"), [10, 5]), r"'segmentation.counts' covers 15 pixels"),
    (_set(("annotations", 0, "segmentation", "counts"), "!!"), r"not a valid compressed RLE"),
    (_set(("annotations", 0, "category_id"), 9), r"field 'category_id' 9 is not a category"),
    (_set(("categories", 1, "id"), 1), r"categories\[1\]: duplicate category id 1"),
    (_set(("images",), {"not": "a list"}), r"field 'images' must be a list"),
])
def test_coco_validation_errors(tmp_path, mutate, message):
    import re

    text = _bad(tmp_path, mutate)
    assert re.search(message, text), text


def test_coco_unreadable_files(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        coco_images(tmp_path / "missing.json")
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        coco_images(p)


def test_masks_need_segmentation_but_images_do_not(tmp_path):
    data = _coco(tmp_path)
    del data["annotations"][0]["segmentation"]
    p = _write(tmp_path, data)
    assert len(coco_images(p)) == 2  # a detection-only file is a fine image list
    with pytest.raises(DatasetError, match=r"annotations\[0\] \(id 11\): missing field 'segmentation'"):
        coco_instance_masks(p)


def test_rle_counts_matches_pycocotools():
    rng = np.random.default_rng(1)
    for _ in range(50):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        m = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        runs = rle_counts(mask_utils.encode(np.asfortranarray(m))["counts"])
        assert runs.sum() == h * w and runs.min() >= 0
        decoded = np.repeat(np.arange(runs.size) % 2, runs).reshape(w, h).T
        np.testing.assert_array_equal(decoded, m)
    big = np.zeros((3000, 3000), np.uint8)
    big[-1, -1] = 1
    assert rle_counts(mask_utils.encode(np.asfortranarray(big))["counts"]).tolist() == [8_999_999, 1]
    with pytest.raises(ValueError, match="unfinished"):
        rle_counts("0o")  # 'o' = 63 sets the continuation bit on the last character


# --- Parts World -------------------------------------------------------------------------


def test_partsworld_images(tmp_path):
    pq.write_table(pa.table({
        "image_id": pa.array([2, 1], pa.int64()),
        "file_name": ["images/000001.png", "images/000000.png"],
        "split": ["val", "train"],
        "width": pa.array([128, 128], pa.int32()),
        "height": pa.array([96, 96], pa.int32()),
    }), tmp_path / "images.parquet")
    assert partsworld_images(tmp_path) == [
        ImageRecord(1, tmp_path / "images/000000.png", "images/000000.png", 128, 96, None, "train"),
        ImageRecord(2, tmp_path / "images/000001.png", "images/000001.png", 128, 96, None, "val"),
    ]


def test_partsworld_images_errors(tmp_path):
    with pytest.raises(DatasetError, match="has no images.parquet"):
        partsworld_images(tmp_path)
    pq.write_table(pa.table({"image_id": [1], "file_name": ["a.png"], "width": [4], "height": [4]}),
                   tmp_path / "images.parquet")
    with pytest.raises(DatasetError, match=r"images.parquet: missing column\(s\) \['split'\]"):
        partsworld_images(tmp_path)
    pq.write_table(pa.table({"image_id": [1, 1], "file_name": ["a.png", "b.png"], "split": ["train"] * 2,
                             "width": [4, 4], "height": [4, 4]}), tmp_path / "images.parquet")
    with pytest.raises(DatasetError, match="row 1: duplicate image_id 1"):
        partsworld_images(tmp_path)
