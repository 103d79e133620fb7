"""Colour-aware mining (issue 14 §3): CIELAB, per-cell colour and the fused K-means."""

import numpy as np
import pytest

from partdistill.models.part_mining import (
    Fusion,
    ObjectFeatures,
    cell_colors,
    fused_features,
    mine_parts,
    rgb_to_lab,
)


def test_rgb_to_lab_known_values():
    # reference values: sRGB, D65, 2° observer (Bruce Lindbloom's / CIE formulas)
    known = {(255, 255, 255): (100.0, 0.0, 0.0), (0, 0, 0): (0.0, 0.0, 0.0),
             (255, 0, 0): (53.2408, 80.0925, 67.2032), (0, 255, 0): (87.7347, -86.1827, 83.1793),
             (0, 0, 255): (32.2970, 79.1875, -107.8602), (128, 128, 128): (53.5850, 0.0, 0.0),
             (255, 255, 0): (97.1393, -21.5537, 94.4780)}
    rgb = np.array(list(known), np.uint8)
    lab = rgb_to_lab(rgb)
    assert lab.dtype == np.float32 and lab.shape == (len(known), 3)
    np.testing.assert_allclose(lab, np.array(list(known.values())), atol=0.01)
    # floats in 0..1 are the same colours; any leading shape
    np.testing.assert_allclose(rgb_to_lab(rgb.astype(np.float64) / 255.0), lab, atol=1e-4)
    assert rgb_to_lab(np.zeros((2, 3, 3), np.uint8)).shape == (2, 3, 3)


def _object(h=32, w=48, stride=8, channels=6, constant=True, seed=0):
    """A box-shaped object over the whole image, its stride-8 grid (constant features by default)."""
    mask = np.zeros((h, w), bool)
    mask[4:28, 4:44] = True
    grid = (np.ones((h // stride, w // stride, channels), np.float32) if constant
            else np.random.default_rng(seed).normal(size=(h // stride, w // stride, channels)).astype(np.float32))
    return ObjectFeatures(grid, mask, 0, 0, float(stride))


def _two_colours(h=32, w=48):
    """Top half red, bottom half blue: the colour edge lies on a cell boundary (y = 16)."""
    image = np.zeros((h, w, 3), np.uint8)
    image[:16] = (200, 30, 30)
    image[16:] = (30, 30, 200)
    return image


def test_cell_colors_are_the_mean_lab_of_the_objects_pixels():
    obj = _object()
    image = _two_colours()
    image[0:4] = (0, 255, 0)  # background above the object, in the first cell row
    colors = cell_colors(obj, image)
    assert colors.shape == (4, 6, 3)
    red, blue = rgb_to_lab(np.array([200, 30, 30], np.uint8)), rgb_to_lab(np.array([30, 30, 200], np.uint8))
    np.testing.assert_allclose(colors[1], np.broadcast_to(red, (6, 3)), atol=1e-3)
    np.testing.assert_allclose(colors[2:], np.broadcast_to(blue, (2, 6, 3)), atol=1e-3)
    # row 0 holds object pixels (rows 4..7) and green background: only the object's count
    np.testing.assert_allclose(colors[0], np.broadcast_to(red, (6, 3)), atol=1e-3)


def test_colour_splits_an_object_whose_features_are_constant():
    obj, image = _object(), _two_colours()
    [plain] = mine_parts([obj], k=2)
    # constant features: one part whatever the metric, and so with colour weight 0
    assert set(np.unique(plain[obj.mask])) == {0}
    [zero] = mine_parts([obj], k=2, fusion=Fusion(color_weight=0.0), images=[image])
    assert np.array_equal(zero, plain)
    [coloured] = mine_parts([obj], k=2, fusion=Fusion(color_weight=0.5), images=[image])
    assert coloured.dtype == np.int16 and (coloured[~obj.mask] == -1).all()
    top, bottom = coloured[4:16, 4:44], coloured[16:28, 4:44]
    assert len(np.unique(top)) == 1 and len(np.unique(bottom)) == 1 and top[0, 0] != bottom[0, 0]
    # colour alone (feature weight 0) gives the same split
    [colour_only] = mine_parts([obj], k=2, fusion=Fusion(feature_weight=0.0, color_weight=1.0), images=[image])
    assert np.array_equal(colour_only >= 0, obj.mask) and len(np.unique(colour_only[4:16, 4:44])) == 1
    assert colour_only[4, 4] != colour_only[27, 4]


def test_rgb_direction_ignores_brightness_lab_does_not():
    """Two halves of one hue, one twice as bright as the other (a shaded or striped part):
    'rgb_direction' keeps them together, CIELAB splits them; two hues split in both."""
    obj = _object()
    shaded = np.zeros((32, 48, 3), np.uint8)
    shaded[:16], shaded[16:] = (200, 60, 20), (100, 30, 10)
    lab_fusion = Fusion(feature_weight=0.0, color_weight=1.0)
    direction = Fusion(feature_weight=0.0, color_weight=1.0, color_space="rgb_direction")
    [by_lab] = mine_parts([obj], k=2, fusion=lab_fusion, images=[shaded])
    [by_direction] = mine_parts([obj], k=2, fusion=direction, images=[shaded])
    assert by_lab[4, 4] != by_lab[27, 4] and len(np.unique(by_lab[4:16, 4:44])) == 1
    assert set(np.unique(by_direction[obj.mask])) == {0}
    [hues] = mine_parts([obj], k=2, fusion=Fusion(color_weight=0.5, color_space="rgb_direction"),
                        images=[_two_colours()])
    assert hues[4, 4] != hues[27, 4] and len(np.unique(hues[16:28, 4:44])) == 1
    # the block is unit-norm per cell and per pixel, times the weight
    cells, _, pixels = fused_features(obj, shaded, Fusion(0.0, 3.0, 0.0, "rgb_direction"))
    np.testing.assert_allclose(cells.norm(dim=1).numpy(), 3.0, rtol=1e-5)
    np.testing.assert_allclose(pixels.norm(dim=1).numpy(), 3.0, rtol=1e-5)


def test_position_splits_a_uniform_object_spatially():
    obj = _object()
    image = np.full((32, 48, 3), 120, np.uint8)
    [colour] = mine_parts([obj], k=2, fusion=Fusion(color_weight=1.0), images=[image])
    assert set(np.unique(colour[obj.mask])) == {0}  # uniform colour, constant features: no split
    [placed] = mine_parts([obj], k=2, fusion=Fusion(position_weight=1.0), images=[image])
    assert set(np.unique(placed[obj.mask])) == {0, 1}
    # the object is 40 px wide and 24 px high: K-means cuts it into a left and a right part,
    # every pixel column in one part, one switch from left to right
    inside = placed[4:28, 4:44]
    assert (inside == inside[:1]).all()
    assert np.count_nonzero(np.diff(inside[0])) == 1 and 12 <= np.argmax(np.diff(inside[0]) != 0) < 28


def test_fused_blocks_are_normalised_and_weighted():
    obj, image = _object(constant=False), _two_colours()
    cells, yx, pixels = fused_features(obj, image, Fusion(feature_weight=2.0, color_weight=0.5,
                                                          position_weight=0.25))
    c = obj.grid.shape[-1]
    assert cells.shape[1] == pixels.shape[1] == c + 3 + 2 and len(yx) == len(pixels) == obj.mask.sum()
    np.testing.assert_allclose(cells[:, :c].norm(dim=1).numpy(), 2.0, rtol=1e-5)
    np.testing.assert_allclose(pixels[:, :c].norm(dim=1).numpy(), 2.0, rtol=1e-5)
    # colour: centred on the object's mean
    assert abs(float(cells[:, c:c + 3].mean(0).abs().max())) < 1e-5
    # position: centred, RMS radius = the weight
    pos = cells[:, c + 3:].numpy()
    np.testing.assert_allclose(pos.mean(0), 0.0, atol=1e-5)
    assert np.sqrt((pos ** 2).sum(1).mean()) == pytest.approx(0.25, rel=1e-5)
    # blocks of weight 0 are left out
    cells, _, _ = fused_features(obj, image, Fusion(feature_weight=0.0, color_weight=1.0))
    assert cells.shape[1] == 3


def test_fusion_config_is_checked():
    assert not Fusion.from_config(None).active and not Fusion.from_config({"feature_weight": 3.0}).active
    assert Fusion.from_config({"color_weight": 0.5}).active and Fusion(position_weight=1).active
    with pytest.raises(ValueError, match="unknown key"):
        Fusion.from_config({"colour_weight": 0.5})
    with pytest.raises(ValueError, match="color_space must be one of"):
        Fusion.from_config({"color_weight": 0.5, "color_space": "hsv"})
    with pytest.raises(ValueError, match="must be a number >= 0"):
        Fusion(color_weight=-1.0)
    with pytest.raises(ValueError, match="must be a number >= 0"):
        Fusion(color_weight=float("nan"))
    with pytest.raises(ValueError, match="every weight is 0"):
        fused_features(_object(), _two_colours(), Fusion(0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="one RGB image per object"):
        mine_parts([_object()], k=2, fusion=Fusion(color_weight=1.0))
