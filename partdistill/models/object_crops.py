"""Object-centric crops: the paper's one-large-object-per-image regime on multi-object images.

The paper trains and labels on ImageNet photos, where the object fills most of the image. In a
scene of several small objects (a Parts World object spans about 60 px, a part about 7×7 cells
of the stride-4 mask map), the part decoder sees each object at a few cells. Here every object
is cut out of its image in a square box around it (its bounding box plus a margin), resized to a
fixed side, and the part models run on that crop; their mask probabilities are resized back and
pasted into the image, so everything downstream (labelling, ranking, evaluation) works on
full-image masks as before.

Which pixels the box is drawn around (``crop.box``): ``'mask'``, the whole mask, or
``'largest_component'``, the mask's largest 8-connected component. A predicted instance mask
often carries stray blobs away from its object (two thirds of the demo teacher's matched val
masks have more than one component, and 37 % of their boxes are over 1.3× the GT object's box):
around the whole mask the object comes out small and off-centre in its crop. The crop is only
the model's view; the masks stay clipped to the whole instance mask downstream.

A box may reach past the image border (a square around a wide object near an edge): the pixels
outside the image are zero (black) in the crop, and pasting back keeps only the part inside.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class CropBox:
    """A square box in image pixels, ``[y0, y0 + side) × [x0, x0 + side)``, possibly past the
    image border, and the side ``size`` of the crop it is resized to."""

    y0: int
    x0: int
    side: int
    size: int

    @property
    def scale(self) -> float:
        """crop pixels per image pixel"""
        return self.size / self.side

    def region(self, shape: tuple[int, int]) -> tuple[int, int, int, int]:
        """(y0, y1, x0, x1): the part of the box inside an image of ``shape`` (H, W)."""
        h, w = shape[:2]
        return max(self.y0, 0), min(self.y0 + self.side, h), max(self.x0, 0), min(self.x0 + self.side, w)


def crop_settings(cfg: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The crop settings of a `proposals` / `distill` section's ``crop`` key, checked; None when
    crops are off (the whole image is the model's input)."""
    if not cfg or not cfg.get("enabled", False):
        return None
    size, margin = int(cfg["size"]), float(cfg["margin"])
    box = cfg.get("box", "mask")  # an artifact written before the key existed: its boxes were the whole mask's
    if box not in BOX_MODES:
        raise ValueError(f"crop.box must be one of {BOX_MODES}, got {box!r}")
    if size < 32 or size % 32:
        raise ValueError(f"crop.size must be a multiple of 32 and at least 32, got {size}")
    if not 0.0 <= margin <= 2.0:
        raise ValueError(f"crop.margin must be in [0, 2] (a fraction of the object's box side), got {margin}")
    return {"enabled": True, "size": size, "margin": margin, "box": box}


BOX_MODES = ("mask", "largest_component")


def largest_component(mask: np.ndarray) -> np.ndarray:
    """bool (H, W): the mask's largest 8-connected component (the mask itself when it has one)."""
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n <= 1:
        return np.asarray(mask, bool)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    return labels == 1 + int(np.argmax(sizes))


def object_box(mask: np.ndarray, size: int, margin: float, box: str = "mask") -> CropBox:
    """The square crop box of an object: centred on its bounding box, whose longer side plus
    ``margin`` × that side on each side is the box's side (at least 8 px). ``box``: the bounding
    box of the whole mask (``'mask'``) or of its largest component (``'largest_component'``)."""
    if box not in BOX_MODES:
        raise ValueError(f"box must be one of {BOX_MODES}, got {box!r}")
    mask = np.asarray(mask, bool)
    if box == "largest_component" and mask.any():
        mask = largest_component(mask)
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        raise ValueError("cannot crop around an empty object mask")
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    long = max(y1 - y0, x1 - x0)
    side = max(8, int(round(long * (1.0 + 2.0 * margin))))
    cy, cx = (y0 + y1) / 2.0, (x0 + x1) / 2.0
    return CropBox(int(round(cy - side / 2.0)), int(round(cx - side / 2.0)), side, int(size))


def _padded(array: np.ndarray, box: CropBox) -> np.ndarray:
    """array[box] with zeros where the box leaves the array (leading two dims are H, W)."""
    h, w = array.shape[:2]
    out = np.zeros((box.side, box.side, *array.shape[2:]), array.dtype)
    ry0, ry1, rx0, rx1 = box.region((h, w))
    if ry1 > ry0 and rx1 > rx0:
        out[ry0 - box.y0:ry1 - box.y0, rx0 - box.x0:rx1 - box.x0] = array[ry0:ry1, rx0:rx1]
    return out


def crop_image(image: np.ndarray, box: CropBox) -> np.ndarray:
    """uint8 (size, size, 3): the box of an RGB uint8 (H, W, 3) image, resized bilinearly
    (antialiased when shrinking)."""
    import torch
    import torch.nn.functional as F

    patch = torch.from_numpy(_padded(np.asarray(image), box)).permute(2, 0, 1)[None].float()
    out = F.interpolate(patch, size=(box.size, box.size), mode="bilinear", align_corners=False,
                        antialias=box.size < box.side)
    return out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def crop_mask(mask: np.ndarray, box: CropBox) -> np.ndarray:
    """bool (size, size): the box of a bool (H, W) mask, resized (a crop pixel is in the mask when
    the area-weighted share of mask pixels under it is at least one half)."""
    import torch
    import torch.nn.functional as F

    patch = torch.from_numpy(_padded(np.asarray(mask, bool), box).astype(np.float32))[None, None]
    out = F.interpolate(patch, size=(box.size, box.size), mode="bilinear", align_corners=False,
                        antialias=box.size < box.side)
    return (out[0, 0] >= 0.5).numpy()


def paste_probs(probs: Any, box: CropBox, shape: tuple[int, int]) -> Any:
    """Crop-space mask probabilities back in the image: float tensor (Q, size, size) → float
    tensor (Q, H, W), zero outside the box."""
    import torch.nn.functional as F

    h, w = shape[:2]
    q = probs.shape[0]
    out = probs.new_zeros((q, h, w))
    ry0, ry1, rx0, rx1 = box.region((h, w))
    if q == 0 or ry1 <= ry0 or rx1 <= rx0:
        return out
    full = F.interpolate(probs[None].float(), size=(box.side, box.side), mode="bilinear", align_corners=False)[0]
    out[:, ry0:ry1, rx0:rx1] = full[:, ry0 - box.y0:ry1 - box.y0, rx0 - box.x0:rx1 - box.x0]
    return out
