"""Pixel grouping inside an object mask: the paper's part proposals by K-means (§4.2).

As the reference does, K-means runs on the feature cells (stride 8) that fall inside the object
mask, and every full-resolution object pixel then goes to the nearest centroid through the
bilinearly upsampled features. So every part lies inside its object mask by construction.

Colour-aware mining (:class:`Fusion`, ``mining.fusion``) clusters each cell's teacher features
concatenated with its weighted CIELAB colour and (y, x) position instead (issue 14 §3).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from partdistill.models.kmeans import assign, kmeans


@dataclass
class ObjectFeatures:
    """Features around one object and where they sit in the image.

    grid:  float32 (gh, gw, C) feature cells covering the object's box, cell (i, j) centred at
           inference-image pixel ((grid_y0 + i + 0.5) * stride, (grid_x0 + j + 0.5) * stride)
    mask:  bool (H, W) object mask at the original image resolution
    scale: (sy, sx) inference size / original size
    """

    grid: np.ndarray
    mask: np.ndarray
    grid_y0: int
    grid_x0: int
    stride: float
    scale: tuple[float, float] = (1.0, 1.0)


def pixel_features(obj: ObjectFeatures) -> tuple[np.ndarray, torch.Tensor]:
    """The object's pixels (ys, xs) and their upsampled features, float32 (n, C)."""
    ys, xs = np.nonzero(obj.mask)
    gh, gw, c = obj.grid.shape
    sy, sx = obj.scale
    # pixel centre → continuous grid coordinate (cell centres at integer + 0.5)
    gy = ((ys + 0.5) * sy / obj.stride - obj.grid_y0) - 0.5
    gx = ((xs + 0.5) * sx / obj.stride - obj.grid_x0) - 0.5
    # grid_sample wants [-1, 1] with align_corners=True mapping -1 → cell 0 and 1 → last cell
    ny = torch.from_numpy(2 * gy / max(gh - 1, 1) - 1).float()
    nx = torch.from_numpy(2 * gx / max(gw - 1, 1) - 1).float()
    coords = torch.stack([nx, ny], dim=-1)[None, None]  # (1, 1, n, 2)
    grid = torch.from_numpy(np.ascontiguousarray(obj.grid)).float().permute(2, 0, 1)[None]  # (1, C, gh, gw)
    sampled = F.grid_sample(grid, coords.clamp(-1, 1), mode="bilinear", padding_mode="border", align_corners=True)
    return np.stack([ys, xs], 1), sampled[0, :, 0].T.contiguous()


def cell_features(obj: ObjectFeatures) -> torch.Tensor:
    """The feature cells whose centre lies inside the mask, float32 (m, C). An object too thin for
    any cell centre falls back to every cell its mask touches."""
    return torch.from_numpy(np.ascontiguousarray(obj.grid[inside_cells(obj)])).float()


def inside_cells(obj: ObjectFeatures) -> np.ndarray:
    """bool (gh, gw): the cells K-means clusters (see :func:`cell_features`)."""
    gh, gw, c = obj.grid.shape
    h, w = obj.mask.shape
    sy, sx = obj.scale
    cy = ((np.arange(gh) + obj.grid_y0 + 0.5) * obj.stride / sy).astype(int).clip(0, h - 1)
    cx = ((np.arange(gw) + obj.grid_x0 + 0.5) * obj.stride / sx).astype(int).clip(0, w - 1)
    inside = obj.mask[np.ix_(cy, cx)]
    if not inside.any():
        ys, xs = np.nonzero(obj.mask)
        iy = ((ys + 0.5) * sy / obj.stride - obj.grid_y0).astype(int).clip(0, gh - 1)
        ix = ((xs + 0.5) * sx / obj.stride - obj.grid_x0).astype(int).clip(0, gw - 1)
        inside = np.zeros((gh, gw), bool)
        inside[iy, ix] = True
    return inside


def mine_parts(
    objects: Sequence[ObjectFeatures],
    k: int = 4,
    metric: str = "cosine",
    iters: int = 20,
    seed: int = 0,
    backend: str = "torch",
    fusion: Fusion | None = None,
    images: Sequence[np.ndarray] | None = None,
) -> list[np.ndarray]:
    """Part label maps: int16 (H, W) per object, -1 outside the mask, 0..k-1 inside.

    K-means runs on the object's stride-8 cells (one batched call for all objects); pixels are
    assigned at full resolution. With an active ``fusion`` (colour or position weight > 0) it runs
    on the fused vectors of :func:`fused_features` instead, with Euclidean distance (``metric``
    does not apply); ``images``, uint8 (H, W, 3) RGB, one per object, give the colour."""
    if fusion is not None and fusion.active:
        if images is None or len(images) != len(objects):
            raise ValueError("colour-aware mining needs one RGB image per object")
        fused = [fused_features(o, im, fusion) for o, im in zip(objects, images, strict=True)]
        results = kmeans([cells for cells, _, _ in fused], k=k, metric="l2", iters=iters, seed=seed,
                         backend=backend)
        maps = []
        for obj, (_, yx, feats), res in zip(objects, fused, results, strict=True):
            labels = np.full(obj.mask.shape, -1, np.int16)
            if len(res.centroids):
                centroids = torch.as_tensor(np.asarray(res.centroids), dtype=torch.float32)
                labels[yx[:, 0], yx[:, 1]] = np.asarray(assign(feats, centroids, "l2")).astype(np.int16)
            maps.append(labels)
        return maps
    cells = [cell_features(o) for o in objects]
    results = kmeans(cells, k=k, metric=metric, iters=iters, seed=seed, backend=backend)
    maps = []
    for obj, res in zip(objects, results, strict=True):
        labels = np.full(obj.mask.shape, -1, np.int16)
        if len(res.centroids) == 0:
            maps.append(labels)
            continue
        yx, feats = pixel_features(obj)
        centroids = torch.as_tensor(np.asarray(res.centroids), dtype=torch.float32)
        labels[yx[:, 0], yx[:, 1]] = np.asarray(assign(feats, centroids, metric)).astype(np.int16)
        maps.append(labels)
    return maps


def rgb_object(image: np.ndarray, mask: np.ndarray) -> ObjectFeatures:
    """Raw RGB as the feature (the floor every table carries): stride 1 over the mask's box,
    in [0, 1]."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    return ObjectFeatures(image[y0:y1, x0:x1].astype(np.float32) / 255.0, mask, int(y0), int(x0), 1.0)


# --- colour-aware mining (issue 14 §3) ----------------------------------------------------------

# CIELAB units per unit of the colour block. A fixed scale, not a per-object one: L* spans 0..100
# (a*, b* about -100..100), so the block spans about the unit range of the L2-normalised feature
# block whatever the object; a per-object scale would blow a uniformly coloured object's noise up
# to the size of a real colour edge and split it by noise.
LAB_SCALE = 100.0
COLOR_SPACES = ("lab", "rgb_direction")

# sRGB (linear) → CIE XYZ, and the D65 reference white (IEC 61966-2-1)
_RGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                        [0.2126729, 0.7151522, 0.0721750],
                        [0.0193339, 0.1191920, 0.9503041]])
_D65_WHITE = np.array([0.95047, 1.0, 1.08883])


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (L*, a*, b*) of sRGB colours under the D65 white: float32 (..., 3) from uint8 (..., 3)
    in 0..255, or from floats in 0..1. L* is in 0..100 (white 100, black 0)."""
    c = np.asarray(rgb, np.float64)
    if np.issubdtype(np.asarray(rgb).dtype, np.integer):
        c = c / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ _RGB_TO_XYZ.T / _D65_WHITE
    delta = 6.0 / 29.0
    f = np.where(xyz > delta ** 3, np.cbrt(xyz), xyz / (3 * delta ** 2) + 4.0 / 29.0)
    lab = np.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]), 200.0 * (f[..., 1] - f[..., 2])], -1)
    return lab.astype(np.float32)


@dataclass(frozen=True)
class Fusion:
    """The blocks K-means clusters on when mining with colour (``mining.fusion``), each weighted.

    Per cell (and per pixel at the assignment) the fused vector is the concatenation of
      feature_weight  x the teacher's features, L2-normalised (per cell; per pixel after upsampling),
      color_weight    x its colour (``color_space``):
                        'lab': CIELAB minus the object's mean colour, / :data:`LAB_SCALE`;
                        'rgb_direction': sRGB / its L2 norm, the brightness-invariant colour that
                        the raw-RGB floor's cosine K-means sees (unit norm like the feature block),
      position_weight x its (y, x) centre minus the object's centroid, / the object's RMS radius
                        (the RMS distance of its cells from their centroid): position relative
                        to the object's size, so a small and a large object split alike;
    and K-means uses Euclidean distance, which on the unit-norm feature block is the cosine
    distance (|a - b|^2 = 2 - 2 cos). A cell's colour is the mean colour of the object's pixels
    in it; a pixel is assigned with its own colour and position and the upsampled features.
    Nothing is fused (mining is the features-only K-means) when the colour and position weights
    are both 0, whatever ``feature_weight`` is: :attr:`active` is then False."""

    feature_weight: float = 1.0
    color_weight: float = 0.0
    position_weight: float = 0.0
    color_space: str = "lab"

    def __post_init__(self) -> None:
        if self.color_space not in COLOR_SPACES:
            raise ValueError(f"mining.fusion.color_space must be one of {COLOR_SPACES}, got {self.color_space!r}")
        for f in fields(self):
            if f.name == "color_space":
                continue
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise ValueError(f"mining.fusion.{f.name} must be a number >= 0, got {value!r}")

    @property
    def active(self) -> bool:
        return self.color_weight > 0 or self.position_weight > 0

    @classmethod
    def from_config(cls, cfg: Mapping[str, float] | None) -> Fusion:
        cfg = dict(cfg or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - names)
        if unknown:
            raise ValueError(f"mining.fusion: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**cfg)


def _cell_index(coords: np.ndarray, start: int, scale: float, stride: float, n: int) -> np.ndarray:
    """Cell (along one axis) of original-image pixels at integer ``coords``; -1 outside 0..n-1."""
    idx = np.floor((coords + 0.5) * scale / stride - start).astype(np.int64)
    return np.where((idx >= 0) & (idx < n), idx, -1)


def pixel_colors(rgb: np.ndarray, space: str = "lab") -> np.ndarray:
    """Colours to average per cell, float32 (..., 3), from uint8 RGB: CIELAB for 'lab', sRGB in
    0..1 for 'rgb_direction' (normalised to unit length after averaging, see :func:`fused_features`)."""
    return rgb_to_lab(rgb) if space == "lab" else np.asarray(rgb, np.float32) / 255.0


def cell_colors(obj: ObjectFeatures, image: np.ndarray, space: str = "lab") -> np.ndarray:
    """Mean colour per cell (:func:`pixel_colors`; CIELAB by default), float32 (gh, gw, 3): of the
    object's pixels in the cell; of all its image pixels when none is the object's; the object's
    mean colour for a cell off the image. image: uint8 (H, W, 3) RGB of the mask's size."""
    gh, gw = obj.grid.shape[:2]
    h, w = obj.mask.shape
    sy, sx = obj.scale
    iy = _cell_index(np.arange(h), obj.grid_y0, sy, obj.stride, gh)
    ix = _cell_index(np.arange(w), obj.grid_x0, sx, obj.stride, gw)
    rows, cols = np.nonzero(iy >= 0)[0], np.nonzero(ix >= 0)[0]
    out = np.zeros((gh * gw, 3), np.float64)
    ys, xs = np.nonzero(obj.mask)
    object_mean = pixel_colors(image[ys, xs], space).astype(np.float64).mean(0) if len(ys) else np.zeros(3)
    if len(rows) and len(cols):
        # the cell index is monotonic in the pixel coordinate: the covered pixels are one rectangle
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        lab = pixel_colors(image[r0:r1, c0:c1], space).reshape(-1, 3).astype(np.float64)
        cell = (iy[r0:r1, None] * gw + ix[None, c0:c1]).ravel()
        inside = obj.mask[r0:r1, c0:c1].ravel()
        n_all = np.bincount(cell, minlength=gh * gw)
        n_in = np.bincount(cell[inside], minlength=gh * gw)
        for ch in range(3):
            s_all = np.bincount(cell, lab[:, ch], minlength=gh * gw)
            s_in = np.bincount(cell[inside], lab[inside, ch], minlength=gh * gw)
            out[:, ch] = np.where(n_in > 0, s_in / np.maximum(n_in, 1),
                                  np.where(n_all > 0, s_all / np.maximum(n_all, 1), object_mean[ch]))
    else:
        out[:] = object_mean
    return out.reshape(gh, gw, 3).astype(np.float32)


def fused_features(obj: ObjectFeatures, image: np.ndarray, fusion: Fusion
                   ) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
    """The fused vectors of :class:`Fusion` for one object: (cells float32 (m, D) that K-means
    clusters (those of :func:`cell_features`), object pixels (ys, xs) int (n, 2), their vectors
    float32 (n, D)). Blocks of weight 0 are left out. image: uint8 (H, W, 3) RGB."""
    if image.shape[:2] != obj.mask.shape:
        raise ValueError(f"image is {image.shape[:2]}, mask is {obj.mask.shape}")
    inside = inside_cells(obj)
    yx = np.stack(np.nonzero(obj.mask), 1)  # the order of pixel_features
    cell_blocks, pixel_blocks = [], []
    if fusion.feature_weight > 0:
        _, pixel_feats = pixel_features(obj)
        cell_blocks.append(fusion.feature_weight * F.normalize(cell_features(obj), dim=1))
        pixel_blocks.append(fusion.feature_weight * F.normalize(pixel_feats, dim=1))
    if fusion.color_weight > 0:
        cells = torch.from_numpy(cell_colors(obj, image, fusion.color_space)[inside]).float()
        pixels = torch.from_numpy(pixel_colors(image[yx[:, 0], yx[:, 1]], fusion.color_space)).float()
        if fusion.color_space == "lab":
            mean = cells.mean(0)
            cells, pixels = (cells - mean) / LAB_SCALE, (pixels - mean) / LAB_SCALE
        else:  # a direction: unit norm, as the cosine K-means on raw RGB sees it (black stays 0)
            cells, pixels = F.normalize(cells, dim=1), F.normalize(pixels, dim=1)
        cell_blocks.append(fusion.color_weight * cells)
        pixel_blocks.append(fusion.color_weight * pixels)
    if fusion.position_weight > 0:
        gh, gw = obj.grid.shape[:2]
        sy, sx = obj.scale
        cy = (np.arange(gh) + obj.grid_y0 + 0.5) * obj.stride / sy
        cx = (np.arange(gw) + obj.grid_x0 + 0.5) * obj.stride / sx
        centres = np.stack(np.meshgrid(cy, cx, indexing="ij"), -1)[inside]  # original-image pixels
        centroid = centres.mean(0)
        radius = float(np.sqrt(((centres - centroid) ** 2).sum(1).mean())) or 1.0  # one cell: any scale
        scale = fusion.position_weight / radius
        cell_blocks.append(torch.from_numpy(scale * (centres - centroid)).float())
        pixel_blocks.append(torch.from_numpy(scale * (yx + 0.5 - centroid)).float())
    if not cell_blocks:
        raise ValueError("mining.fusion: every weight is 0, nothing to cluster")
    return torch.cat(cell_blocks, 1), yx, torch.cat(pixel_blocks, 1)
