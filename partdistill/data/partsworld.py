"""Parts World: a deterministic synthetic data set of objects made of parts.

Each image is a cluttered, textured background with ``min_instances`` to
``max_instances`` (default 2-5) object instances drawn on top of it. Every object
is built from part categories; every object pixel belongs to exactly one part (the
topmost in the class's z-order), so the parts partition the object. Two COCO files describe each split:

* ``instances_{split}.json`` -- the *objects* only. This is all a teacher
  instance-segmentation model may train on.
* ``parts_{split}.json`` -- PartImageNet-style part masks, one mask per object
  instance per part category (several pieces of one category, e.g. the two wheels
  of a car, are merged). Used for evaluation only.

Classes and their part categories (bottom of the z-order first; parts in the
same ``[colour group]`` get the same per-instance colour):

=========  ===================================================================
robot      leg [limb], arm [limb], torso [body], head [body], antenna
car        cabin [paint], body [paint], window, wheel (2 pieces), light
bird       tail [plumage], body [skin], wing [plumage], head [skin], beak
fish       tail fin [fin], dorsal fin [fin], body, eye
chair      leg (2 pieces), seat [wood], back [wood]
house      chimney [tiles], wall, roof [tiles], door, window (2 pieces)
lamp       pole [metal], bulb, shade, base [metal]
tree       trunk, crown (3 pieces), fruit (4 pieces)
=========  ===================================================================

Why it is a fair test of unsupervised part discovery:

* Parts differ in *shape and position* within the object, and carry texture
  (stripes, dots, checker, bricks, wood grain, noise grain), a light-direction
  shading gradient and a dark outline -- they are not flat colour regions.
* Colour alone does not separate parts: parts in one colour group share the
  instance's colour, and several pairs share colour *and* texture and differ only
  in shape/position (robot arm vs leg, car body vs cabin, bird wing vs tail, fish
  tail fin vs dorsal fin, chair seat vs back, lamp pole vs base).
* Colour does not identify the class either: the main colour of robots, cars,
  birds, fish and lamps is sampled over the full hue circle per instance, and
  background distractor shapes use the same texture vocabulary as the objects.
* Instances vary in scale, rotation, horizontal flip, aspect ratio, per-part
  size/position and HSV colour, and occlude one another (a placement is rejected
  if any instance would keep less than ``min_visible_fraction`` of its pixels).

Determinism: image ``index`` is rendered from ``np.random.default_rng([seed,
index])`` only, and its split from a Weyl sequence over ``(seed, index)``, so any
image can be rendered alone and shard boundaries never change the output. Byte
identity of the written files is promised for one numpy/pycocotools/Pillow/zlib
installation (numpy does not promise identical random streams across releases).

Annotation ids are derived, never counted: image id = ``index + 1``; the ``k``-th
drawn object (1-based) has id ``image_id * 100 + k``; its part with 1-based
position ``j`` in the class's part list has id ``object_id * 100 + j``.
"""

from __future__ import annotations

import colorsys
import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

__all__ = [
    "PartsWorldConfig",
    "RenderedImage",
    "RenderedInstance",
    "CLASSES",
    "PART_IDS",
    "assemble",
    "generate_shard",
    "object_categories",
    "part_categories",
    "preview",
    "render_image",
    "split_of",
    "write_json",
    "write_partsworld",
]


@dataclass(frozen=True)
class PartsWorldConfig:
    """How many images to render and how they look.

    ``scale_min``/``scale_max`` are an object's half-extent as a fraction of
    ``min(width, height)``; ``min_object_fraction`` is the smallest in-image object
    area as a fraction of the image area; ``min_part_pixels`` is the smallest
    visible part that gets annotated.
    """

    images: int = 64
    seed: int = 0
    width: int = 256
    height: int = 192
    val_fraction: float = 0.25
    min_instances: int = 2
    max_instances: int = 5
    scale_min: float = 0.13
    scale_max: float = 0.32
    min_visible_fraction: float = 0.4
    min_object_fraction: float = 0.004
    min_part_pixels: int = 6
    placement_attempts: int = 10  # per requested instance
    distractors: tuple[int, int] = (3, 8)
    noise_sigma: float = 3.0

    def __post_init__(self) -> None:
        if self.images < 0 or self.seed < 0:
            raise ValueError("images and seed must be non-negative")
        if self.width < 32 or self.height < 32:
            raise ValueError("width and height must be at least 32")
        if not 0.0 <= self.val_fraction <= 1.0:
            raise ValueError("val_fraction must lie in [0, 1]")
        # Object ids are image_id * 100 + k, so k must stay below 100.
        if not 1 <= self.min_instances <= self.max_instances <= 99:
            raise ValueError("need 1 <= min_instances <= max_instances <= 99")
        if not 0.0 < self.scale_min <= self.scale_max:
            raise ValueError("need 0 < scale_min <= scale_max")


# --------------------------------------------------------------------------- shapes
# Shapes live in an object's local frame: u to the right, v downwards, the object
# roughly inside [-1, 1]^2. Each is an implicit function evaluated on a pixel grid
# that has been mapped into that frame.


def _rotate(u: np.ndarray, v: np.ndarray, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    if degrees == 0.0:
        return u, v
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return c * u + s * v, -s * u + c * v


@dataclass(frozen=True)
class Ellipse:
    cx: float
    cy: float
    rx: float
    ry: float
    angle: float = 0.0

    def inside(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        p, q = _rotate(u - self.cx, v - self.cy, self.angle)
        return (p / self.rx) ** 2 + (q / self.ry) ** 2 <= 1.0

    def scaled(self, sx: float, sy: float, du: float, dv: float,
               anchor: tuple[float, float] | None) -> Ellipse:
        ax, ay = anchor if anchor is not None else (self.cx, self.cy)
        return Ellipse(ax + (self.cx - ax) * sx + du, ay + (self.cy - ay) * sy + dv,
                       self.rx * sx, self.ry * sy, self.angle)


@dataclass(frozen=True)
class Box:
    cx: float
    cy: float
    hw: float
    hh: float
    angle: float = 0.0
    round: float = 0.0  # corner radius, local units

    def inside(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        p, q = _rotate(u - self.cx, v - self.cy, self.angle)
        r = min(self.round, self.hw, self.hh)
        if r <= 0.0:
            return (np.abs(p) <= self.hw) & (np.abs(q) <= self.hh)
        # Rounded-box signed distance <= 0.
        qx = np.abs(p) - (self.hw - r)
        qy = np.abs(q) - (self.hh - r)
        outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
        return outside + np.minimum(np.maximum(qx, qy), 0.0) <= r

    def scaled(self, sx: float, sy: float, du: float, dv: float,
               anchor: tuple[float, float] | None) -> Box:
        ax, ay = anchor if anchor is not None else (self.cx, self.cy)
        return Box(ax + (self.cx - ax) * sx + du, ay + (self.cy - ay) * sy + dv,
                   self.hw * sx, self.hh * sy, self.angle, self.round * min(sx, sy))


@dataclass(frozen=True)
class Poly:
    """A convex polygon (either winding)."""

    points: tuple[tuple[float, float], ...]

    def inside(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        pts = self.points
        n = len(pts)
        area2 = sum(pts[i][0] * pts[(i + 1) % n][1] - pts[(i + 1) % n][0] * pts[i][1]
                    for i in range(n))
        sign = 1.0 if area2 >= 0 else -1.0
        out = np.ones(u.shape, dtype=bool)
        for i in range(n):
            x0, y0 = pts[i]
            x1, y1 = pts[(i + 1) % n]
            out &= sign * ((x1 - x0) * (v - y0) - (y1 - y0) * (u - x0)) >= 0.0
        return out

    def scaled(self, sx: float, sy: float, du: float, dv: float,
               anchor: tuple[float, float] | None) -> Poly:
        if anchor is None:
            anchor = (sum(p[0] for p in self.points) / len(self.points),
                      sum(p[1] for p in self.points) / len(self.points))
        ax, ay = anchor
        return Poly(tuple((ax + (x - ax) * sx + du, ay + (y - ay) * sy + dv)
                          for x, y in self.points))


@dataclass(frozen=True)
class Ring:
    cx: float
    cy: float
    outer: float
    inner: float

    def inside(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        d2 = (u - self.cx) ** 2 + (v - self.cy) ** 2
        return (d2 <= self.outer ** 2) & (d2 >= self.inner ** 2)

    def scaled(self, sx: float, sy: float, du: float, dv: float,
               anchor: tuple[float, float] | None) -> Ring:
        s = math.sqrt(sx * sy)
        ax, ay = anchor if anchor is not None else (self.cx, self.cy)
        return Ring(ax + (self.cx - ax) * sx + du, ay + (self.cy - ay) * sy + dv,
                    self.outer * s, self.inner * s)


Shape = Ellipse | Box | Poly | Ring


# ------------------------------------------------------------------------ class specs


@dataclass(frozen=True)
class Texture:
    """A pattern in the object's local frame: ``freq`` cycles per local unit,
    ``angle`` in degrees, ``amp`` > 0 darkens and < 0 lightens the base colour."""

    kind: str = "plain"  # plain | stripes | dots | checker | bricks | wood | grain
    freq: float = 4.0
    angle: float = 0.0
    amp: float = 0.3


@dataclass(frozen=True)
class ColourSpec:
    """HSV ranges sampled once per instance (hue wraps around 1)."""

    hue: tuple[float, float] = (0.0, 1.0)
    sat: tuple[float, float] = (0.4, 0.9)
    val: tuple[float, float] = (0.5, 0.95)


@dataclass(frozen=True)
class PartSpec:
    name: str
    pieces: tuple[Shape, ...]
    group: int  # index into ClassSpec.groups: parts of one group share a colour
    texture: Texture = Texture()
    anchor: tuple[float, float] | None = None  # fixed point of the size jitter
    jitter: float = 0.12  # relative size jitter per axis


@dataclass(frozen=True)
class ClassSpec:
    name: str
    parts: tuple[PartSpec, ...]  # z-order: the first is drawn first (bottom)
    groups: tuple[ColourSpec, ...]
    max_rotation: float = 20.0  # degrees
    offset_jitter: float = 0.03  # per-part position jitter, local units
    aspect_jitter: float = 0.12


ANY = ColourSpec()
GREYISH = ColourSpec(sat=(0.0, 0.3), val=(0.35, 0.7))

CLASSES: tuple[ClassSpec, ...] = (
    ClassSpec(
        "robot",
        groups=(ANY, GREYISH, ColourSpec(sat=(0.8, 1.0), val=(0.9, 1.0))),
        parts=(
            PartSpec("leg", (Box(-0.25, 0.62, 0.12, 0.3, round=0.03),
                             Box(0.25, 0.62, 0.12, 0.3, round=0.03)),
                     group=1, texture=Texture("stripes", 5.0, 90.0, 0.35), anchor=(0.0, 0.35)),
            PartSpec("arm", (Box(-0.52, 0.0, 0.1, 0.36, angle=15.0, round=0.05),
                             Box(0.52, 0.0, 0.1, 0.36, angle=-15.0, round=0.05)),
                     group=1, texture=Texture("stripes", 5.0, 90.0, 0.35)),
            PartSpec("torso", (Box(0.0, 0.0, 0.45, 0.45, round=0.08),),
                     group=0, texture=Texture("checker", 4.0, 0.0, 0.22)),
            PartSpec("head", (Box(0.0, -0.62, 0.28, 0.2, round=0.08),),
                     group=0, texture=Texture("plain"), anchor=(0.0, -0.45)),
            PartSpec("antenna", (Box(0.0, -0.88, 0.035, 0.1), Ellipse(0.0, -0.98, 0.08, 0.08)),
                     group=2, texture=Texture("plain"), jitter=0.08),
        ),
    ),
    ClassSpec(
        "car",
        groups=(ColourSpec(sat=(0.5, 0.9), val=(0.5, 0.95)),
                ColourSpec(hue=(0.5, 0.6), sat=(0.2, 0.45), val=(0.75, 0.95)),
                ColourSpec(sat=(0.0, 0.15), val=(0.1, 0.28)),
                ColourSpec(hue=(0.12, 0.17), sat=(0.5, 0.9), val=(0.9, 1.0))),
        parts=(
            PartSpec("cabin", (Poly(((-0.55, -0.08), (-0.35, -0.55), (0.3, -0.55),
                                     (0.6, -0.08))),),
                     group=0, texture=Texture("grain", amp=0.15), anchor=(0.0, -0.08)),
            PartSpec("body", (Box(0.0, 0.15, 0.95, 0.27, round=0.12),),
                     group=0, texture=Texture("grain", amp=0.15)),
            PartSpec("window", (Poly(((-0.45, -0.15), (-0.3, -0.47), (-0.05, -0.47),
                                      (-0.05, -0.15))),
                                Poly(((0.05, -0.15), (0.05, -0.47), (0.26, -0.47),
                                      (0.48, -0.15)))),
                     group=1, texture=Texture("stripes", 3.0, 45.0, -0.4), jitter=0.05),
            PartSpec("wheel", (Ellipse(-0.55, 0.43, 0.22, 0.22), Ellipse(0.55, 0.43, 0.22, 0.22)),
                     group=2, texture=Texture("dots", 7.0, 0.0, -0.5)),
            PartSpec("light", (Ellipse(0.87, 0.04, 0.07, 0.06),),
                     group=3, texture=Texture("plain"), jitter=0.2),
        ),
        max_rotation=15.0,
    ),
    ClassSpec(
        "bird",
        groups=(ColourSpec(sat=(0.4, 0.8), val=(0.5, 0.9)),
                ColourSpec(sat=(0.4, 0.9), val=(0.3, 0.7)),
                ColourSpec(hue=(0.06, 0.12), sat=(0.7, 1.0), val=(0.8, 1.0))),
        parts=(
            PartSpec("tail", (Poly(((-0.45, 0.0), (-1.0, -0.25), (-1.0, 0.35), (-0.45, 0.25))),),
                     group=1, texture=Texture("stripes", 6.0, 0.0, 0.35), anchor=(-0.45, 0.1)),
            PartSpec("body", (Ellipse(0.0, 0.1, 0.55, 0.38),),
                     group=0, texture=Texture("grain", amp=0.25)),
            PartSpec("wing", (Ellipse(-0.12, 0.02, 0.42, 0.2, angle=-15.0),),
                     group=1, texture=Texture("stripes", 6.0, 0.0, 0.35)),
            PartSpec("head", (Ellipse(0.55, -0.3, 0.26, 0.26),),
                     group=0, texture=Texture("plain")),
            PartSpec("beak", (Poly(((0.74, -0.4), (1.05, -0.28), (0.74, -0.18))),),
                     group=2, texture=Texture("plain"), anchor=(0.74, -0.29)),
        ),
        max_rotation=40.0,
    ),
    ClassSpec(
        "fish",
        groups=(ColourSpec(sat=(0.5, 0.9), val=(0.6, 0.95)),
                ColourSpec(sat=(0.5, 0.9), val=(0.4, 0.8)),
                ColourSpec(sat=(0.0, 0.1), val=(0.05, 0.2))),
        parts=(
            PartSpec("tail fin", (Poly(((-0.55, 0.0), (-1.0, -0.45), (-1.0, 0.45))),),
                     group=1, texture=Texture("stripes", 7.0, 0.0, 0.4), anchor=(-0.55, 0.0)),
            PartSpec("dorsal fin", (Poly(((-0.35, -0.25), (-0.05, -0.68), (0.3, -0.25))),),
                     group=1, texture=Texture("stripes", 7.0, 0.0, 0.4), anchor=(0.0, -0.25)),
            PartSpec("body", (Ellipse(0.05, 0.0, 0.68, 0.36),),
                     group=0, texture=Texture("dots", 7.0, 45.0, 0.3)),
            PartSpec("eye", (Ellipse(0.5, -0.08, 0.08, 0.08),),
                     group=2, texture=Texture("plain"), jitter=0.15),
        ),
        max_rotation=40.0,
    ),
    ClassSpec(
        "chair",
        groups=(ColourSpec(hue=(0.04, 0.12), sat=(0.4, 0.8), val=(0.35, 0.85)),
                ColourSpec(sat=(0.0, 0.3), val=(0.15, 0.5))),
        parts=(
            PartSpec("leg", (Box(-0.42, 0.55, 0.055, 0.4), Box(0.42, 0.55, 0.055, 0.4)),
                     group=1, texture=Texture("plain"), anchor=(0.0, 0.15)),
            PartSpec("seat", (Box(0.0, 0.1, 0.55, 0.1, round=0.03),),
                     group=0, texture=Texture("wood", 5.0, 90.0, 0.3)),
            PartSpec("back", (Box(-0.45, -0.45, 0.1, 0.5, round=0.03),),
                     group=0, texture=Texture("wood", 5.0, 90.0, 0.3), anchor=(-0.45, 0.05)),
        ),
    ),
    ClassSpec(
        "house",
        groups=(ColourSpec(hue=(0.0, 0.15), sat=(0.2, 0.6), val=(0.6, 0.95)),
                ColourSpec(hue=(0.95, 1.05), sat=(0.5, 0.9), val=(0.35, 0.75)),
                ColourSpec(hue=(0.05, 0.1), sat=(0.5, 0.8), val=(0.25, 0.5)),
                ColourSpec(hue=(0.5, 0.6), sat=(0.15, 0.4), val=(0.75, 0.95))),
        parts=(
            PartSpec("chimney", (Box(0.45, -0.62, 0.09, 0.22),),
                     group=1, texture=Texture("bricks", 10.0, 0.0, 0.3)),
            PartSpec("wall", (Box(0.0, 0.3, 0.7, 0.55),),
                     group=0, texture=Texture("bricks", 6.0, 0.0, 0.3)),
            PartSpec("roof", (Poly(((-0.9, -0.2), (0.0, -0.95), (0.9, -0.2))),),
                     group=1, texture=Texture("stripes", 8.0, 90.0, 0.35), anchor=(0.0, -0.2)),
            PartSpec("door", (Box(0.0, 0.6, 0.15, 0.25),),
                     group=2, texture=Texture("wood", 5.0, 0.0, 0.3), anchor=(0.0, 0.85)),
            PartSpec("window", (Box(-0.4, 0.15, 0.14, 0.13), Box(0.4, 0.15, 0.14, 0.13)),
                     group=3, texture=Texture("checker", 7.0, 0.0, -0.35)),
        ),
        max_rotation=12.0,
    ),
    ClassSpec(
        "lamp",
        groups=(ColourSpec(sat=(0.3, 0.8), val=(0.7, 1.0)),
                GREYISH,
                ColourSpec(hue=(0.13, 0.17), sat=(0.3, 0.7), val=(0.95, 1.0))),
        parts=(
            PartSpec("pole", (Box(0.0, 0.25, 0.06, 0.65),),
                     group=1, texture=Texture("grain", amp=0.3)),
            PartSpec("bulb", (Ellipse(0.0, -0.28, 0.15, 0.15),),
                     group=2, texture=Texture("plain")),
            PartSpec("shade", (Poly(((-0.25, -0.95), (0.25, -0.95), (0.55, -0.35),
                                     (-0.55, -0.35))),),
                     group=0, texture=Texture("stripes", 5.0, 0.0, 0.25)),
            PartSpec("base", (Box(0.0, 0.88, 0.4, 0.09, round=0.06),),
                     group=1, texture=Texture("grain", amp=0.3), anchor=(0.0, 0.97)),
        ),
    ),
    ClassSpec(
        "tree",
        groups=(ColourSpec(hue=(0.22, 0.4), sat=(0.5, 0.9), val=(0.35, 0.75)),
                ColourSpec(hue=(0.05, 0.1), sat=(0.5, 0.8), val=(0.25, 0.5)),
                ColourSpec(hue=(-0.03, 0.1), sat=(0.7, 1.0), val=(0.7, 1.0))),
        parts=(
            PartSpec("trunk", (Box(0.0, 0.5, 0.13, 0.5),),
                     group=1, texture=Texture("wood", 6.0, 0.0, 0.35), anchor=(0.0, 1.0)),
            PartSpec("crown", (Ellipse(-0.38, -0.25, 0.42, 0.36), Ellipse(0.38, -0.25, 0.42, 0.36),
                               Ellipse(0.0, -0.6, 0.48, 0.4)),
                     group=0, texture=Texture("dots", 5.0, 30.0, 0.3), anchor=(0.0, 0.05)),
            PartSpec("fruit", (Ellipse(-0.45, -0.2, 0.08, 0.08), Ellipse(0.35, -0.1, 0.08, 0.08),
                               Ellipse(0.1, -0.6, 0.08, 0.08), Ellipse(-0.2, -0.75, 0.08, 0.08)),
                     group=2, texture=Texture("plain"), jitter=0.2),
        ),
        max_rotation=12.0,
    ),
)


def _part_ids() -> list[list[int]]:
    ids, next_id = [], 1
    for cls in CLASSES:
        ids.append(list(range(next_id, next_id + len(cls.parts))))
        next_id += len(cls.parts)
    return ids


# PART_IDS[c][j]: global part category id of part j of class c (both 0-based).
PART_IDS: list[list[int]] = _part_ids()


def object_categories() -> list[dict]:
    """COCO categories of the object classes: ``id`` = 1-based class index."""
    return [{"id": c + 1, "name": cls.name, "supercategory": "object"}
            for c, cls in enumerate(CLASSES)]


def part_categories() -> list[dict]:
    """PartImageNet-style part categories: ``name`` "car wheel", ``supercategory``
    the object class name, plus ``part`` and ``object_category_id``."""
    return [{"id": PART_IDS[c][j], "name": f"{cls.name} {part.name}", "supercategory": cls.name,
             "part": part.name, "object_category_id": c + 1}
            for c, cls in enumerate(CLASSES) for j, part in enumerate(cls.parts)]


# ------------------------------------------------------------------------- rendering


@dataclass
class RenderedInstance:
    """One object as visible in the final image.

    ``mask``: bool (H, W), the visible object pixels (= union of all visible part
    pixels, including fragments too small to be listed in ``parts``).
    ``parts``: (part category id, bool (H, W) visible part mask) for each part with
    at least ``min_part_pixels`` visible pixels, in the class's part order; the
    masks are disjoint and lie inside ``mask``.
    ``full_area``: in-image pixel count before later instances occluded it.
    """

    category_id: int
    mask: np.ndarray
    parts: list[tuple[int, np.ndarray]] = field(default_factory=list)
    full_area: int = 0


@dataclass
class RenderedImage:
    """``image``: uint8 (H, W, 3) RGB. ``instances`` in drawing order (later ones
    occlude earlier ones)."""

    image: np.ndarray
    instances: list[RenderedInstance]


def _hsv(rng: np.random.Generator, spec: ColourSpec) -> np.ndarray:
    h = rng.uniform(*spec.hue) % 1.0
    s = rng.uniform(*spec.sat)
    v = rng.uniform(*spec.val)
    return np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32) * 255.0


def _texture(rng: np.random.Generator, tex: Texture, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Pattern intensity in [0, 1] at local coordinates ``u``, ``v`` (float32, 1-D).

    Frequency, phase and angle are jittered per call so that instances differ."""
    if tex.kind == "plain":
        return np.zeros(u.shape, np.float32)
    if tex.kind == "grain":
        return rng.random(u.shape, dtype=np.float32)
    f = tex.freq * rng.uniform(0.8, 1.25)
    p, q = _rotate(u, v, -(tex.angle + rng.uniform(-10.0, 10.0)))
    ph_p, ph_q = rng.random(2)
    if tex.kind == "stripes":
        return 0.5 + 0.5 * np.clip(3.0 * np.sin(2 * np.pi * (f * p + ph_p)), -1.0, 1.0)
    if tex.kind == "wood":
        wobble = 0.12 * np.sin(2 * np.pi * (1.3 * q + ph_q))
        return 0.5 + 0.5 * np.sin(2 * np.pi * (f * (p + wobble) + ph_p))
    if tex.kind == "dots":
        a = (f * p + ph_p) % 1.0 - 0.5
        b = (f * q + ph_q) % 1.0 - 0.5
        return (a * a + b * b < 0.09).astype(np.float32)
    if tex.kind == "checker":
        return ((np.floor(f * p + ph_p) + np.floor(f * q + ph_q)) % 2.0).astype(np.float32)
    if tex.kind == "bricks":
        # Local v runs down the object, so rows are horizontal whatever the angle jitter.
        rows = f * v + ph_q
        row = np.floor(rows)
        cols = 0.5 * f * u + 0.5 * (row % 2.0) + ph_p
        return (((rows % 1.0) < 0.18) | ((cols % 1.0) < 0.09)).astype(np.float32)
    raise ValueError(f"unknown texture {tex.kind!r}")


def _apply_texture(base: np.ndarray, t: np.ndarray, amp: float) -> np.ndarray:
    """(N, 3) float32 colours of base (3,) modulated by pattern t (N,)."""
    t = t[:, None] * abs(amp)
    if amp >= 0:
        return base[None, :] * (1.0 - t)
    return base[None, :] + (255.0 - base[None, :]) * t


@dataclass
class _Placement:
    """An instance's local frame on the image: a crop window and local coords in it."""

    y0: int
    x0: int
    u: np.ndarray  # float32 (h, w)
    v: np.ndarray  # float32 (h, w)
    dx: np.ndarray  # float32 (h, w), pixel offset from the centre in units of scale
    dy: np.ndarray


def _frame(cx: float, cy: float, scale: float, angle: float, flip: bool,
           aspect: tuple[float, float], extent: float, h: int, w: int) -> _Placement | None:
    radius = extent * scale * max(aspect) * math.sqrt(2.0)
    x0, x1 = max(0, int(math.floor(cx - radius))), min(w, int(math.ceil(cx + radius)) + 1)
    y0, y1 = max(0, int(math.floor(cy - radius))), min(h, int(math.ceil(cy + radius)) + 1)
    if x1 <= x0 or y1 <= y0:
        return None
    xs = (np.arange(x0, x1, dtype=np.float32) + 0.5 - cx) / scale
    ys = (np.arange(y0, y1, dtype=np.float32) + 0.5 - cy) / scale
    dx, dy = np.meshgrid(xs, ys)
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    u = (c * dx + s * dy) / aspect[0]
    v = (-s * dx + c * dy) / aspect[1]
    if flip:
        u = -u
    return _Placement(y0, x0, u, v, dx, dy)


def _outline(labels: np.ndarray, width: int) -> np.ndarray:
    """bool mask of labelled pixels within ``width`` px of a different label.

    Edge padding keeps the image border from drawing an outline."""
    h, w = labels.shape
    pad = np.pad(labels, width, mode="edge")
    edge = np.zeros(labels.shape, dtype=bool)
    for d in range(1, width + 1):
        edge |= pad[width - d:width - d + h, width:width + w] != labels
        edge |= pad[width + d:width + d + h, width:width + w] != labels
        edge |= pad[width:width + h, width - d:width - d + w] != labels
        edge |= pad[width:width + h, width + d:width + d + w] != labels
    return edge & (labels > 0)


def _paint(rng: np.random.Generator, canvas: np.ndarray, pl: _Placement, labels: np.ndarray,
           colours: list[np.ndarray], textures: list[Texture], light: np.ndarray,
           outline_width: int) -> None:
    """Paint labelled pixels (label l>0 uses colours[l-1], textures[l-1]) into canvas
    (float32 (H, W, 3)) with shading and outlines."""
    h, w = labels.shape
    crop = canvas[pl.y0:pl.y0 + h, pl.x0:pl.x0 + w]
    # Linear light gradient in image space, so all objects of an image agree on it.
    shade = np.clip(1.0 + 0.2 * (pl.dx * light[0] + pl.dy * light[1]), 0.6, 1.35)
    edge = _outline(labels, outline_width) if outline_width > 0 else np.zeros_like(labels, bool)
    for lab, (base, tex) in enumerate(zip(colours, textures, strict=True), start=1):
        sel = labels == lab
        if not sel.any():
            continue
        t = _texture(rng, tex, pl.u[sel], pl.v[sel])
        rgb = _apply_texture(base, t, tex.amp) * shade[sel][:, None]
        e = edge[sel]
        rgb[e] = base * 0.28
        crop[sel] = rgb


def _random_shape(rng: np.random.Generator) -> Shape:
    kind = rng.integers(5)
    if kind == 0:
        return Ellipse(0.0, 0.0, 1.0, rng.uniform(0.3, 1.0))
    if kind == 1:
        return Box(0.0, 0.0, 1.0, rng.uniform(0.15, 1.0), round=rng.uniform(0.0, 0.3))
    if kind == 2:
        return Ring(0.0, 0.0, 1.0, rng.uniform(0.4, 0.8))
    # Random convex polygon: sorted angles on a jittered circle.
    n = int(rng.integers(3, 7))
    angles = np.sort(rng.uniform(0.0, 2 * np.pi, n))
    return Poly(tuple((float(np.cos(a)), float(np.sin(a))) for a in angles))


_BG_TEXTURES = ("plain", "stripes", "dots", "checker", "bricks", "wood", "grain")


def _background(rng: np.random.Generator, cfg: PartsWorldConfig, light: np.ndarray) -> np.ndarray:
    """float32 (H, W, 3): gradient + low-frequency noise + optional pattern + distractors."""
    h, w = cfg.height, cfg.width
    c1 = _hsv(rng, ColourSpec(sat=(0.05, 0.6), val=(0.3, 0.9)))
    c2 = _hsv(rng, ColourSpec(sat=(0.05, 0.6), val=(0.3, 0.9)))
    a = rng.uniform(0.0, 2 * np.pi)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    g = xs * math.cos(a) + ys * math.sin(a)
    g = (g - g.min()) / max(float(g.max() - g.min()), 1.0)
    canvas = c1 * (1.0 - g[..., None]) + c2 * g[..., None]
    cell = int(rng.integers(12, 40))
    small = rng.random((h // cell + 2, w // cell + 2)).astype(np.float32)
    blotch = np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))
    canvas *= (0.75 + 0.5 * blotch)[..., None]
    if rng.random() < 0.5:
        tex = Texture(_BG_TEXTURES[int(rng.integers(1, len(_BG_TEXTURES)))],
                      freq=rng.uniform(0.05, 0.15), angle=rng.uniform(0, 180),
                      amp=rng.uniform(0.08, 0.2))
        t = _texture(rng, tex, xs.ravel(), ys.ravel())
        canvas = _apply_texture(np.ones(3, np.float32), t, tex.amp).reshape(h, w, 3) * canvas
    side = min(h, w)
    for _ in range(int(rng.integers(cfg.distractors[0], cfg.distractors[1] + 1))):
        scale = rng.uniform(0.03, 0.18) * side
        pl = _frame(rng.uniform(0, w), rng.uniform(0, h), scale, rng.uniform(0, 360), False,
                    (1.0, 1.0), 1.05, h, w)
        if pl is None:
            continue
        shape = _random_shape(rng)
        labels = shape.inside(pl.u, pl.v).astype(np.int8)
        tex = Texture(_BG_TEXTURES[int(rng.integers(len(_BG_TEXTURES)))], rng.uniform(2.0, 6.0),
                      rng.uniform(0, 180), rng.uniform(-0.4, 0.4))
        colour = _hsv(rng, ColourSpec(sat=(0.1, 0.9), val=(0.25, 0.95)))
        width = int(rng.integers(0, 3))
        _paint(rng, canvas, pl, labels, [colour], [tex], light, width)
    return canvas


def _instance_labels(cls: ClassSpec, rng: np.random.Generator, pl: _Placement) -> np.ndarray:
    """int8 (h, w) crop labels: 0 background, j+1 for part j (topmost part wins)."""
    labels = np.zeros(pl.u.shape, dtype=np.int8)
    for j, part in enumerate(cls.parts):
        sx, sy = 1.0 + part.jitter * rng.uniform(-1.0, 1.0, 2)
        du, dv = cls.offset_jitter * rng.uniform(-1.0, 1.0, 2)
        inside = np.zeros(labels.shape, dtype=bool)
        for piece in part.pieces:
            inside |= piece.scaled(sx, sy, du, dv, part.anchor).inside(pl.u, pl.v)
        labels[inside] = j + 1
    return labels


def render_image(cfg: PartsWorldConfig, index: int) -> RenderedImage:
    """Render image ``index`` from ``default_rng([cfg.seed, index])`` alone."""
    rng = np.random.default_rng([cfg.seed, index])
    h, w = cfg.height, cfg.width
    a = rng.uniform(0.0, 2 * np.pi)
    light = np.array([math.cos(a), math.sin(a)], dtype=np.float32)
    canvas = _background(rng, cfg, light)

    owner = np.full((h, w), -1, dtype=np.int16)  # instance index per pixel
    part_of = np.zeros((h, w), dtype=np.int8)  # 1-based part position within its class
    classes: list[int] = []
    full_area: list[int] = []
    visible = np.zeros(0, dtype=np.int64)
    side = min(h, w)
    min_area = max(cfg.min_object_fraction * h * w, 4 * cfg.min_part_pixels)
    wanted = int(rng.integers(cfg.min_instances, cfg.max_instances + 1))
    for _ in range(wanted):
        # The class is drawn before the placement attempts so that large classes,
        # which are rejected more often, are not under-represented.
        c = int(rng.integers(len(CLASSES)))
        cls = CLASSES[c]
        for _ in range(cfg.placement_attempts):
            scale = rng.uniform(cfg.scale_min, cfg.scale_max) * side
            aspect = tuple(1.0 + cls.aspect_jitter * rng.uniform(-1.0, 1.0, 2))
            angle = rng.uniform(-cls.max_rotation, cls.max_rotation)
            flip = bool(rng.random() < 0.5)
            cx = rng.uniform(0.6 * scale, w - 0.6 * scale)
            cy = rng.uniform(0.6 * scale, h - 0.6 * scale)
            pl = _frame(cx, cy, scale, angle, flip, aspect, 1.25, h, w)
            if pl is None:
                continue
            labels = _instance_labels(cls, rng, pl)
            obj = labels > 0
            area = int(obj.sum())
            if area < min_area:
                continue
            ch, cw = labels.shape
            win = (slice(pl.y0, pl.y0 + ch), slice(pl.x0, pl.x0 + cw))
            covered = owner[win][obj]
            lost = np.bincount(covered[covered >= 0], minlength=len(classes))
            if np.any(visible - lost < cfg.min_visible_fraction * np.asarray(full_area)):
                continue
            visible = np.append(visible - lost, area)
            full_area.append(area)
            classes.append(c)
            owner[win][obj] = len(classes) - 1
            part_of[win][obj] = labels[obj]
            colours = [_hsv(rng, g) for g in cls.groups]
            _paint(rng, canvas, pl, labels, [colours[p.group] for p in cls.parts],
                   [p.texture for p in cls.parts], light, 1 if scale < 30 else 2)
            break

    canvas += rng.normal(0.0, cfg.noise_sigma, canvas.shape).astype(np.float32)
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    instances = []
    for k, c in enumerate(classes):
        mask = owner == k
        parts = []
        for j, pid in enumerate(PART_IDS[c]):
            pm = mask & (part_of == j + 1)
            if int(pm.sum()) >= cfg.min_part_pixels:
                parts.append((pid, pm))
        instances.append(RenderedInstance(c + 1, mask, parts, full_area[k]))
    return RenderedImage(image, instances)


# ------------------------------------------------------------------------ annotation

# Weyl-sequence step (golden ratio): successive indices spread evenly over [0, 1),
# so even a handful of images gets close to val_fraction.
_GOLDEN = 0.6180339887498949


def split_of(cfg: PartsWorldConfig, index: int) -> str:
    """"train" or "val", a function of (seed, index) only."""
    offset = float(np.random.default_rng([cfg.seed, 0x5B1175]).random())
    return "val" if (offset + index * _GOLDEN) % 1.0 < cfg.val_fraction else "train"


def _file_name(index: int) -> str:
    return f"images/{index:06d}.png"


def _encode(mask: np.ndarray) -> tuple[dict, int, list[float]]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    bbox = [float(x) for x in mask_utils.toBbox(rle)]
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}, \
        int(mask.sum()), bbox


def generate_shard(cfg: PartsWorldConfig, indices: Sequence[int], out_dir: Path) -> dict:
    """Render ``indices``, write ``out_dir/images/{index:06d}.png``, and return a JSON
    fragment ``{"images", "instances", "parts"}`` (image dicts carry ``"split"``)."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    images, objects, parts = [], [], []
    for index in indices:
        index = int(index)
        r = render_image(cfg, index)
        Image.fromarray(r.image).save(out_dir / _file_name(index), format="PNG")
        image_id = index + 1
        images.append({"id": image_id, "file_name": _file_name(index), "width": cfg.width,
                       "height": cfg.height, "split": split_of(cfg, index)})
        for k, inst in enumerate(r.instances, start=1):
            obj_id = image_id * 100 + k
            seg, area, bbox = _encode(inst.mask)
            objects.append({"id": obj_id, "image_id": image_id, "category_id": inst.category_id,
                            "segmentation": seg, "area": area, "bbox": bbox, "iscrowd": 0})
            first = PART_IDS[inst.category_id - 1][0]
            for pid, pm in inst.parts:
                seg, area, bbox = _encode(pm)
                parts.append({"id": obj_id * 100 + (pid - first + 1), "image_id": image_id,
                              "category_id": pid, "segmentation": seg, "area": area,
                              "bbox": bbox, "iscrowd": 0, "object_id": obj_id,
                              "object_category_id": inst.category_id})
    return {"images": images, "instances": objects, "parts": parts}


def _info(cfg: PartsWorldConfig, kind: str, split: str) -> dict:
    return {"description": f"Parts World synthetic {kind} ({split})", "version": "1.0",
            "config": asdict(cfg)}


def assemble(cfg: PartsWorldConfig, fragments: list[dict]) -> dict[str, dict]:
    """Merge shard fragments into the five output files, everything sorted by id."""
    images = sorted((im for f in fragments for im in f["images"]), key=lambda im: im["id"])
    split_by_image = {im["id"]: im["split"] for im in images}
    out: dict[str, dict] = {}
    for split in ("train", "val"):
        ims = [{k: v for k, v in im.items() if k != "split"}
               for im in images if im["split"] == split]
        for kind, cats in (("instances", object_categories()), ("parts", part_categories())):
            anns = sorted((a for f in fragments for a in f[kind]
                           if split_by_image[a["image_id"]] == split), key=lambda a: a["id"])
            out[f"{kind}_{split}.json"] = {"info": _info(cfg, kind, split), "licenses": [],
                                          "images": ims, "annotations": anns,
                                          "categories": cats}
    out["splits.json"] = {s: [im["file_name"] for im in images if im["split"] == s]
                          for s in ("train", "val")}
    return out


def write_json(path: Path, obj) -> None:
    """Write ``obj`` as compact JSON plus a newline; same object -> same bytes."""
    Path(path).write_text(json.dumps(obj, separators=(",", ":")) + "\n", encoding="utf-8")


def write_partsworld(out_dir: Path, cfg: PartsWorldConfig, shard_size: int = 32,
                     progress: Callable[[int], None] | None = None) -> dict:
    """Render all ``cfg.images`` images shard by shard into ``out_dir`` and write the
    JSON files. Returns a summary: images/objects/parts per split, objects per class."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fragments = []
    for start in range(0, cfg.images, max(1, shard_size)):
        fragments.append(generate_shard(cfg, range(start, min(cfg.images, start + shard_size)),
                                        out_dir))
        if progress is not None:
            progress(min(cfg.images, start + shard_size))
    files = assemble(cfg, fragments)
    for name, obj in files.items():
        write_json(out_dir / name, obj)
    names = {c["id"]: c["name"] for c in object_categories()}
    per_class = {name: 0 for name in names.values()}
    summary: dict = {"images": {}, "objects": {}, "parts": {}, "objects_per_class": per_class}
    for split in ("train", "val"):
        inst = files[f"instances_{split}.json"]
        summary["images"][split] = len(inst["images"])
        summary["objects"][split] = len(inst["annotations"])
        summary["parts"][split] = len(files[f"parts_{split}.json"]["annotations"])
        for a in inst["annotations"]:
            per_class[names[a["category_id"]]] += 1
    return summary


# --------------------------------------------------------------------------- preview


def _palette(i: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((i * _GOLDEN) % 1.0, 0.75 if i % 2 else 1.0, 1.0 if i % 3 else 0.8)
    return int(r * 255), int(g * 255), int(b * 255)


def _decode(segmentation: dict) -> np.ndarray:
    """bool (H, W) mask of a COCO RLE."""
    with warnings.catch_warnings():
        # pycocotools' decode trips numpy 2's __array__(copy=...) deprecation; harmless.
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(segmentation).astype(bool)


def preview(out_dir: Path, path: Path, n: int = 6) -> Path:
    """Write a contact sheet of the first ``n`` images of ``out_dir`` to ``path``: per row
    the image, its object instances (one colour per instance, class names), and its
    parts (one colour per part category). Returns ``path``."""
    out_dir, path = Path(out_dir), Path(path)
    images, objects, parts = {}, {}, {}
    for split in ("train", "val"):
        inst = json.loads((out_dir / f"instances_{split}.json").read_text())
        prt = json.loads((out_dir / f"parts_{split}.json").read_text())
        images.update({im["id"]: im for im in inst["images"]})
        for a in inst["annotations"]:
            objects.setdefault(a["image_id"], []).append(a)
        for a in prt["annotations"]:
            parts.setdefault(a["image_id"], []).append(a)
    names = {c["id"]: c["name"] for c in object_categories()}
    chosen = sorted(images)[:n]
    if not chosen:
        raise ValueError(f"no images in {out_dir}")
    w, h = images[chosen[0]]["width"], images[chosen[0]]["height"]
    gap = 4
    sheet = Image.new("RGB", (3 * w + 2 * gap, len(chosen) * (h + gap) - gap), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for row, image_id in enumerate(chosen):
        y = row * (h + gap)
        with Image.open(out_dir / images[image_id]["file_name"]) as im:
            rgb = np.asarray(im.convert("RGB"))
        sheet.paste(Image.fromarray(rgb), (0, y))
        grey = (rgb.mean(axis=2, keepdims=True) * 0.35).astype(np.uint8).repeat(3, axis=2)
        obj_view, part_view = grey.copy(), grey.copy()
        for k, a in enumerate(objects.get(image_id, [])):
            obj_view[_decode(a["segmentation"])] = _palette(k)
        for a in parts.get(image_id, []):
            part_view[_decode(a["segmentation"])] = _palette(a["category_id"])
        sheet.paste(Image.fromarray(obj_view), (w + gap, y))
        sheet.paste(Image.fromarray(part_view), (2 * (w + gap), y))
        for a in objects.get(image_id, []):
            bx, by = a["bbox"][:2]
            draw.text((w + gap + bx + 1, y + by + 1), names[a["category_id"]], fill=(255, 255, 255))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG")
    return path
