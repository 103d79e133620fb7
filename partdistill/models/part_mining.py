"""Pixel grouping inside an object mask: the paper's part proposals by K-means (§4.2).

As the reference does, K-means runs on the feature cells (stride 8) that fall inside the object
mask, and every full-resolution object pixel then goes to the nearest centroid through the
bilinearly upsampled features. So every part lies inside its object mask by construction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
    return torch.from_numpy(np.ascontiguousarray(obj.grid[inside])).float()


def mine_parts(
    objects: Sequence[ObjectFeatures],
    k: int = 4,
    metric: str = "cosine",
    iters: int = 20,
    seed: int = 0,
    backend: str = "torch",
) -> list[np.ndarray]:
    """Part label maps: int16 (H, W) per object, -1 outside the mask, 0..k-1 inside.

    K-means runs on the object's stride-8 cells (one batched call for all objects); pixels are
    assigned at full resolution."""
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
