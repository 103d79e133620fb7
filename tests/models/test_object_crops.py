"""Object-centric crops: crop → predict → paste back lands every part inside its object, in place."""

import numpy as np
import pytest
import torch

from partdistill.models.object_crops import CropBox, crop_image, crop_mask, crop_settings, object_box, paste_probs


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def _object(h=96, w=128, box=(20, 50, 30, 90)):
    m = np.zeros((h, w), bool)
    y0, y1, x0, x1 = box
    m[y0:y1, x0:x1] = True
    return m


def test_box_is_square_centred_with_margin():
    m = _object(box=(20, 50, 30, 90))  # 30 x 60
    b = object_box(m, 128, 0.25)
    assert b.side == 90                 # 60 + 2 x 0.25 x 60
    assert (b.y0 + b.side / 2, b.x0 + b.side / 2) == (35, 60)
    assert b.scale == pytest.approx(128 / 90)


def test_crop_then_paste_round_trip_in_place():
    m = _object()
    part = np.zeros_like(m)
    part[20:50, 30:50] = True           # the object's left third
    b = object_box(m, 128, 0.15)
    cm = crop_mask(part, b)
    back = paste_probs(torch.from_numpy(cm.astype(np.float32))[None], b, m.shape)[0].numpy() > 0.5
    assert _iou(back, part) > 0.9
    assert (back & ~m).sum() <= 0.05 * part.sum()  # where it lands: inside the object


def test_box_past_the_border_pads_and_clips():
    h, w = 64, 64
    m = np.zeros((h, w), bool)
    m[0:10, 0:40] = True                # a wide object at the top-left corner
    b = object_box(m, 64, 0.2)
    assert b.y0 < 0 and b.x0 < 0
    img = np.full((h, w, 3), 200, np.uint8)
    crop = crop_image(img, b)
    assert crop.shape == (64, 64, 3) and crop.dtype == np.uint8
    assert crop[0, 0].max() == 0 and crop[40, 40].min() == 200  # outside the image is black
    back = paste_probs(torch.ones(2, 64, 64), b, (h, w))
    assert back.shape == (2, h, w)
    ry0, ry1, rx0, rx1 = b.region((h, w))
    assert float(back[:, ry0:ry1, rx0:rx1].min()) == pytest.approx(1.0)
    assert float(back.sum()) == pytest.approx(2 * (ry1 - ry0) * (rx1 - rx0), rel=1e-5)


def test_crop_image_matches_nearest_content():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
    b = CropBox(10, 10, 16, 16)        # no resize: an exact cut
    assert np.array_equal(crop_image(img, b), img[10:26, 10:26])


def test_settings_checked():
    assert crop_settings(None) is None
    assert crop_settings({"enabled": False, "size": 128, "margin": 0.1}) is None
    assert crop_settings({"enabled": True, "size": 128, "margin": 0.1, "scale_range": [1, 1]})["size"] == 128
    with pytest.raises(ValueError, match="multiple of 32"):
        crop_settings({"enabled": True, "size": 100, "margin": 0.1})
    with pytest.raises(ValueError, match="margin"):
        crop_settings({"enabled": True, "size": 128, "margin": -1})
    with pytest.raises(ValueError, match="empty"):
        object_box(np.zeros((8, 8), bool), 64, 0.1)


def test_largest_component_box_ignores_stray_blobs():
    m = np.zeros((100, 100), bool)
    m[40:60, 40:60] = True          # the object
    m[2:4, 95:98] = True            # a stray blob far away
    whole = object_box(m, 64, 0.0)
    main = object_box(m, 64, 0.0, "largest_component")
    assert whole.side == 58          # rows 2..59
    assert (main.y0, main.x0, main.side) == (40, 40, 20)
    # one component: the same box either way
    one = np.zeros((100, 100), bool)
    one[10:30, 20:35] = True
    assert object_box(one, 64, 0.1) == object_box(one, 64, 0.1, "largest_component")
    # diagonal neighbours are one component (8-connectivity)
    diag = np.zeros((10, 10), bool)
    diag[2, 2] = diag[3, 3] = True
    assert object_box(diag, 32, 0.0, "largest_component").side == 8
    with pytest.raises(ValueError, match="box"):
        object_box(m, 64, 0.0, "hull")


def test_crop_settings_box_default_and_check():
    # a model artifact written before the key existed cropped around the whole mask
    assert crop_settings({"enabled": True, "size": 128, "margin": 0.1})["box"] == "mask"
    assert crop_settings({"enabled": True, "size": 128, "margin": 0.1, "box": "largest_component"})["box"] \
        == "largest_component"
    with pytest.raises(ValueError, match="crop.box"):
        crop_settings({"enabled": True, "size": 128, "margin": 0.1, "box": "hull"})
