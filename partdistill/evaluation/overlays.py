"""Pictures of parts over images, for people who would rather look than read."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

# Distinct colours for part ids 0..11 (then they repeat).
PALETTE = np.array([
    [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
    [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [170, 110, 40],
], np.uint8)


def parts_overlay(image: np.ndarray, label_maps: Sequence[np.ndarray], alpha: float = 0.6) -> np.ndarray:
    """image: uint8 (H, W, 3); label_maps: int (H, W) per object, -1 outside, part id inside.
    Returns uint8 (H, W, 3): the image dimmed outside objects, parts coloured by id, object
    outlines in white."""
    out = (image.astype(np.float32) * 0.45).astype(np.float32)
    for lm in label_maps:
        inside = lm >= 0
        colours = PALETTE[np.where(inside, lm, 0) % len(PALETTE)].astype(np.float32)
        out[inside] = (1 - alpha) * image[inside] + alpha * colours[inside]
        edge = inside & ~_eroded(inside)
        out[edge] = 255
    return out.clip(0, 255).astype(np.uint8)


def _eroded(mask: np.ndarray) -> np.ndarray:
    m = mask.copy()
    m[1:] &= mask[:-1]
    m[:-1] &= mask[1:]
    m[:, 1:] &= mask[:, :-1]
    m[:, :-1] &= mask[:, 1:]
    return m


def grid(rows: Sequence[Sequence[np.ndarray]], titles: Sequence[str] | None = None, pad: int = 4) -> np.ndarray:
    """Tile images (uint8 H×W×3, each row's images the same height) into one picture."""
    from PIL import Image, ImageDraw

    widths = [sum(im.shape[1] for im in row) + pad * (len(row) - 1) for row in rows]
    header = 14 if titles else 0
    height = sum(row[0].shape[0] for row in rows) + pad * (len(rows) - 1) + header
    canvas = np.full((height, max(widths), 3), 255, np.uint8)
    y = header
    for row in rows:
        x = 0
        for im in row:
            canvas[y:y + im.shape[0], x:x + im.shape[1]] = im
            x += im.shape[1] + pad
        y += row[0].shape[0] + pad
    picture = Image.fromarray(canvas)
    if titles:
        draw = ImageDraw.Draw(picture)
        x = 0
        for title, im in zip(titles, rows[0], strict=False):
            draw.text((x + 2, 1), title, fill=(0, 0, 0))
            x += im.shape[1] + pad
    return np.asarray(picture)


def save_png(path: Path | str, image: np.ndarray) -> Path:
    from PIL import Image

    from partdistill.storage import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    return path
