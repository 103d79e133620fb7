"""Image loading and the image-set readers the `instances` stage runs its teacher over.

:func:`load_rgb` turns any file Pillow can decode into one array convention -- ``uint8``
``(H, W, 3)`` RGB, C-contiguous, upright -- and turns every way that can fail into one
exception, :class:`ImageLoadError`, whose ``reason`` is short enough to record as a skip.

The readers list an image set as :class:`ImageRecord` rows, sorted and numbered
deterministically, and validate the set up front (:class:`DatasetError`, naming the file
and the field) so a bad annotation file fails before hours of teacher inference, not in
the middle of it:

* :func:`imagenet_folder` -- ``root/<class>/<image>`` folders (ImageNet-style);
* :func:`coco_images` -- the ``images`` of a COCO instance JSON;
* :func:`coco_instance_masks` -- that JSON's ground-truth object masks (the paper's
  "GT object" setting), decoded to boolean arrays;
* :func:`partsworld_images` -- ``images.parquet`` of a Parts World `data` artifact.

Alpha: transparent pixels are composited over **white** (see :func:`load_rgb`).
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "DatasetError",
    "GTInstance",
    "ImageLoadError",
    "ImageRecord",
    "coco_images",
    "coco_instance_masks",
    "decode_segmentation",
    "imagenet_folder",
    "load_rgb",
    "partsworld_images",
    "rle_counts",
]

DEFAULT_MAX_PIXELS = 64_000_000
IMAGENET_EXTENSIONS = (".jpg", ".jpeg", ".png", ".JPEG")

# A COCO box or polygon may overhang the image by this much: annotation tools and float
# rounding put coordinates on the far pixel edge (x == width) or a hair beyond it.
_BOUNDS_TOLERANCE = 1.0

_EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the transpose that makes the image upright; the same table as
# PIL.ImageOps.exif_transpose (a test checks they agree).
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


# --- errors ------------------------------------------------------------------------------


class ImageLoadError(ValueError):
    """An image file could not be turned into an RGB array.

    ``path`` is the file, ``reason`` a short human phrase ("empty file", "not an image
    (cannot identify format)", "truncated or corrupt: ...", "too large: ...") that a stage
    can record as the reason it skipped the image.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot load image {self.path}: {reason}")

    # Workers (DataLoader, process pools) send exceptions back pickled; the default
    # reduction would call __init__ with the message alone and fail.
    def __reduce__(self) -> tuple[type[ImageLoadError], tuple[Path, str]]:
        return (type(self), (self.path, self.reason))


class DatasetError(ValueError):
    """An image set or annotation file is malformed; the message names the file and field."""


# --- records -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRecord:
    """One image of an image set.

    ``width``/``height`` are those of the *upright* image, i.e. of the array
    :func:`load_rgb` returns (0 when the file could not be read even at header level).
    """

    image_id: int
    path: Path
    file_name: str  # relative to the set's root, "/"-separated
    width: int
    height: int
    class_name: str | None
    split: str | None


# eq=False: the generated __eq__ would compare the mask arrays with ==, which raises.
@dataclass(eq=False)
class GTInstance:
    """A ground-truth object mask. ``mask`` is ``bool`` ``(H, W)``, C-contiguous."""

    annotation_id: int
    category_id: int
    category_name: str
    mask: np.ndarray
    score: float = 1.0


# --- image loading -----------------------------------------------------------------------


def load_rgb(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an image file to an upright RGB array: ``uint8`` ``(H, W, 3)``, C-contiguous, writable.

    * The EXIF orientation is applied, so a camera JPEG stored sideways comes out upright
      (``H``/``W`` are those of the upright image).
    * Multi-frame files (animated GIF/PNG/WebP, multi-page TIFF): the first frame.
    * Grayscale (``1``, ``L``) is replicated to three channels; palette, CMYK, YCbCr, LAB
      and HSV are converted with Pillow's conversions (CMYK naively, without ICC profiles).
    * 16-bit images (``I;16*``) are scaled by the dtype's full range, ``v >> 8``
      (65535 -> 255, 32768 -> 128), never clipped. Mode ``I`` (int32) holding values in
      0..65535 -- what 16-bit PNG/PPM/TIFF decode to in some Pillow versions -- is
      treated the same; other ``I`` data is mapped from the full int32 range. Float
      (``F``) data has no intrinsic range: data within 0..1 is taken as 0..1, anything
      else as Pillow's own 0..255 convention (clipped); NaN becomes 0.
    * Alpha (``RGBA``, ``LA``, ``PA``, premultiplied modes, palette or colour-key
      transparency) is composited over white rather than dropped: the colour stored
      under fully transparent pixels is undefined (often black or left-over pixels) and
      would show the teacher edges and shapes no viewer of the image ever sees; white is
      what the image looks like on a page, and what cut-out product photos assume.

    The size is checked from the header *before* any pixel is decoded: images with more
    than ``max_pixels`` pixels are refused. Pillow's own decompression-bomb guard (twice
    ``PIL.Image.MAX_IMAGE_PIXELS``) also still applies when ``max_pixels`` is larger.

    Raises:
        ImageLoadError: for every failure -- missing/empty/unreadable file, a file that
            is not an image, a truncated or corrupt one (truncated data is never padded:
            ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left off), or one too large.
    """
    path = Path(path)
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")
    _check_file(path)
    with warnings.catch_warnings():
        # The size check below is ours; Pillow's warning for images above its soft limit
        # would only be noise for images the caller explicitly allowed.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = _open(path)
        with im:
            width, height = im.size
            if width * height > max_pixels:
                raise ImageLoadError(
                    path, f"too large: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}"
                )
            if width * height == 0:
                raise ImageLoadError(path, f"truncated or corrupt: header gives an empty {width}x{height} image")
            try:
                im.load()
            except Exception as e:  # Pillow's decoders raise a zoo of types for bad data
                raise ImageLoadError(path, f"truncated or corrupt: {_describe(e)}") from e
            upright = _upright(im)
            try:
                return _to_rgb(upright)
            except Exception as e:
                raise ImageLoadError(path, f"unsupported pixel format (mode {im.mode}): {_describe(e)}") from e


def _check_file(path: Path) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ImageLoadError(path, "file not found") from None
    except OSError as e:
        raise ImageLoadError(path, f"cannot read file: {e.strerror or e}") from e
    if not stat.S_ISREG(st.st_mode):
        raise ImageLoadError(path, "not a regular file")
    if st.st_size == 0:
        raise ImageLoadError(path, "empty file")


def _open(path: Path) -> Image.Image:
    """Image.open (header only) with its failures mapped to ImageLoadError."""
    try:
        return Image.open(path)
    except UnidentifiedImageError as e:
        raise ImageLoadError(path, "not an image (cannot identify format)") from e
    except Image.DecompressionBombError as e:
        # Pillow refuses sizes above twice its MAX_IMAGE_PIXELS while reading the header,
        # before we see the size; its message carries the pixel count.
        m = re.search(r"\((\d+) pixels\)", str(e))
        count = f"{m.group(1)} pixels" if m else "the image"
        raise ImageLoadError(
            path, f"too large: {count} exceeds Pillow's decompression-bomb limit of {2 * Image.MAX_IMAGE_PIXELS}"
        ) from e
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        raise ImageLoadError(path, f"cannot read file: {e.strerror or e}") from e
    except Exception as e:  # a format was recognised but its header is broken
        raise ImageLoadError(path, f"truncated or corrupt: {_describe(e)}") from e


def _describe(e: BaseException) -> str:
    text = str(e).strip()
    return text if text else type(e).__name__


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation (1-8), 1 when absent or unreadable; never decodes pixels."""
    # PngImageFile.getexif() decodes the whole image when no eXIf chunk came before the
    # pixel data; header readers must not pay for that (and such files are rare).
    if im.format == "PNG" and "exif" not in im.info:
        return 1
    try:
        value = im.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # malformed EXIF must not make the pixels unreadable
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _upright(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation, like ImageOps.exif_transpose.

    exif_transpose also re-serialises the EXIF block without the orientation tag, which
    can raise on malformed EXIF; we discard metadata, so only the transpose is done.
    """
    method = _ORIENTATION_TRANSPOSE.get(_orientation(im))
    return im if method is None else im.transpose(method)


def _has_alpha(im: Image.Image) -> bool:
    return "A" in im.getbands() or "a" in im.getbands() or "transparency" in im.info


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(gray.astype(np.uint8)[:, :, None], 3, axis=2))


def _to_rgb(im: Image.Image) -> np.ndarray:
    """A decoded image of any mode -> uint8 (H, W, 3), C-contiguous, writable."""
    mode = im.mode
    if mode.startswith("I;16"):
        a = np.asarray(im)
        if a.dtype.kind == "i":  # signed 16-bit: shift the dtype range to 0..65535
            a = a.astype(np.int32) + 32768
        return _gray_to_rgb(a.astype(np.uint32) >> 8)
    if mode == "I":
        a = np.asarray(im).astype(np.int64)
        if a.min() >= 0 and a.max() <= 0xFFFF:
            return _gray_to_rgb(a >> 8)
        return _gray_to_rgb((a + 2**31) >> 24)
    if mode == "F":
        a = np.nan_to_num(np.asarray(im).astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        scale = 255.0 if a.max() <= 1.0 else 1.0
        return _gray_to_rgb(np.clip(np.rint(a * scale), 0, 255))
    if _has_alpha(im):
        rgba = np.asarray(im.convert("RGBA")).astype(np.uint32)
        rgb, alpha = rgba[:, :, :3], rgba[:, :, 3:]
        # out = rgb * a + white * (1 - a), in integers with rounding
        out = (rgb * alpha + 255 * (255 - alpha) + 127) // 255
        return np.ascontiguousarray(out.astype(np.uint8))
    rgb = np.array(im if mode == "RGB" else im.convert("RGB"), dtype=np.uint8)
    return np.ascontiguousarray(rgb)


def _header_size(path: Path) -> tuple[int, int]:
    """(width, height) of the upright image from the header alone; (0, 0) when unreadable."""
    try:
        if path.stat().st_size == 0:
            return 0, 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
                if _orientation(im) in (5, 6, 7, 8):  # the transposing orientations
                    width, height = height, width
                return int(width), int(height)
    except Exception:  # any failure: the stage's load_rgb records the precise reason later
        return 0, 0


# --- ImageNet-style folders --------------------------------------------------------------


def imagenet_folder(
    root: str | os.PathLike[str], extensions: Sequence[str] = IMAGENET_EXTENSIONS
) -> list[ImageRecord]:
    """List ``root/<class>/<image>``: one record per image, ``class_name`` = the folder name.

    * Extensions match case-insensitively (``.JPG`` counts as ``.jpg``).
    * Images in sub-folders of a class folder belong to that class (as with torchvision's
      ``ImageFolder``); files directly in ``root`` and hidden files/folders (``.*``, e.g.
      ``.ipynb_checkpoints``) are ignored; symlinked folders are followed (once each).
    * ``image_id`` is 1..N in sorted order of the relative path; ``split`` is None.
    * Width/height come from the image header only (one small read per file). A file
      unreadable even at header level is kept, with width = height = 0: the stage then
      records why :func:`load_rgb` skipped it, instead of it vanishing silently here.

    Raises:
        DatasetError: ``root`` missing or not a folder, or no image found in any class folder.
    """
    root = Path(root)
    if isinstance(extensions, str):
        extensions = (extensions,)
    exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    if not exts:
        raise DatasetError("imagenet_folder: no extensions given")
    if not root.exists():
        raise DatasetError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"image folder {root} is not a folder")

    found: list[tuple[str, str, Path]] = []  # (relative posix path, class, path)
    for class_dir in sorted(root.iterdir()):
        if class_dir.name.startswith(".") or not class_dir.is_dir():
            continue
        seen: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in seen:  # a symlink cycle
                dirnames[:] = []
                continue
            seen.add(real)
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if name.startswith(".") or os.path.splitext(name)[1].lower() not in exts:
                    continue
                p = Path(dirpath) / name
                if p.is_file():
                    found.append((p.relative_to(root).as_posix(), class_dir.name, p))
    if not found:
        raise DatasetError(
            f"image folder {root} has no images with extensions {sorted(exts)} in class folders "
            "(expected the layout root/<class>/<image>)"
        )
    found.sort(key=lambda t: t[0])
    records = []
    for image_id, (rel, class_name, p) in enumerate(found, start=1):
        width, height = _header_size(p)
        records.append(ImageRecord(image_id, p, rel, width, height, class_name, None))
    return records


# --- COCO --------------------------------------------------------------------------------


def coco_images(
    json_path: str | os.PathLike[str], image_root: str | os.PathLike[str] | None = None
) -> list[ImageRecord]:
    """The ``images`` of a COCO JSON as records sorted by image id.

    ``path`` is ``image_root / file_name`` (``image_root`` defaults to the JSON's folder);
    ``split`` is the image's ``split`` field when present, else None; ``class_name`` None.
    The whole file is validated first (see :func:`coco_instance_masks` for the rules), so
    annotations that would break a later stage fail here, naming the file and field.

    Raises:
        DatasetError: unreadable JSON, a missing or ill-typed field, duplicate image or
            annotation ids, an annotation of an unknown image, or a box/segmentation
            outside its image.
    """
    json_path = Path(json_path)
    data = _read_json(json_path)
    images = _validate_coco(json_path, data, need_masks=False)
    root = json_path.parent if image_root is None else Path(image_root)
    return [
        ImageRecord(int(im["id"]), root / im["file_name"], im["file_name"], int(im["width"]), int(im["height"]),
                    None, im.get("split"))
        for im in sorted(images.values(), key=lambda im: im["id"])
    ]


def coco_instance_masks(
    json_path: str | os.PathLike[str], image_ids: Iterable[int] | None = None
) -> dict[int, list[GTInstance]]:
    """Ground-truth object masks per image id, decoded to ``bool`` ``(H, W)`` arrays.

    Every image of the file (or of ``image_ids``, to bound memory: masks are
    ``H * W`` bytes each, so decode a whole large set in pieces) gets an entry -- an
    empty list when it has no annotations -- in ascending image id, instances in
    ascending annotation id. Crowd annotations (``iscrowd: 1``) are skipped. Segmentations
    may be polygons (lists of ``[x0, y0, x1, y1, ...]``; polygons under 3 points are
    dropped as degenerate), uncompressed RLE (``counts`` a list of ints) or compressed
    RLE (``counts`` a str or bytes).

    Validation (also done by :func:`coco_images`), every error naming file and field:
    required image fields ``id``, ``file_name``, ``width``, ``height``; required annotation
    fields ``id``, ``image_id`` (plus ``category_id`` and, for non-crowd annotations,
    ``segmentation`` here); unique image, annotation and category ids; every
    ``image_id``/``category_id`` known; ``bbox`` and polygon coordinates within the image
    (1 px tolerance); RLE ``size`` equal to the image's ``[height, width]`` and run
    lengths non-negative, summing to ``height * width`` (pycocotools would read or write
    out of bounds otherwise).

    Raises:
        DatasetError: as above, or an ``image_ids`` entry the file does not have.
    """
    json_path = Path(json_path)
    data = _read_json(json_path)
    images = _validate_coco(json_path, data, need_masks=True)
    names = {c["id"]: c["name"] for c in data.get("categories", [])}
    if image_ids is None:
        wanted = sorted(images)
    else:
        wanted = sorted({int(i) for i in image_ids})
        unknown = [i for i in wanted if i not in images]
        if unknown:
            raise DatasetError(f"{json_path}: image_ids not in the file: {unknown[:10]}")
    out: dict[int, list[GTInstance]] = {i: [] for i in wanted}
    anns = sorted((a for a in data.get("annotations", []) if a["image_id"] in out), key=lambda a: a["id"])
    for a in anns:
        if a.get("iscrowd", 0):
            continue
        im = images[a["image_id"]]
        mask = decode_segmentation(a["segmentation"], int(im["height"]), int(im["width"]))
        out[a["image_id"]].append(GTInstance(int(a["id"]), int(a["category_id"]), names[a["category_id"]], mask))
    return out


def decode_segmentation(seg: Any, height: int, width: int) -> np.ndarray:
    """A COCO ``segmentation`` (polygons, uncompressed or compressed RLE) of a ``height`` x
    ``width`` image as a ``bool`` ``(H, W)`` C-contiguous mask; polygons under 3 points are dropped."""
    from pycocotools import mask as mask_utils

    h, w = int(height), int(width)
    with warnings.catch_warnings():
        # pycocotools' decode trips numpy 2's __array__(copy=...) deprecation; harmless
        warnings.simplefilter("ignore", DeprecationWarning)
        if isinstance(seg, list):
            polys = [[float(v) for v in p] for p in seg if len(p) >= 6]
            if polys:
                mask = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, h, w)))
            else:
                mask = np.zeros((h, w), np.uint8)
        elif isinstance(seg["counts"], list):
            mask = mask_utils.decode(mask_utils.frPyObjects(seg, h, w))
        else:
            counts = seg["counts"].encode("ascii") if isinstance(seg["counts"], str) else bytes(seg["counts"])
            mask = mask_utils.decode({"size": [h, w], "counts": counts})
    return np.ascontiguousarray(mask, dtype=bool)


def _read_json(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"annotation file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from e
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON: {e}") from e


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _entry_with_id(path: Path, field: str, i: int, entry: Any) -> str:
    """Check that ``data[field][i]`` is an object with an int id; returns how errors name it."""
    where = f"{path}: {field}[{i}]"
    if not isinstance(entry, dict):
        raise DatasetError(f"{where} must be an object")
    if "id" not in entry:
        raise DatasetError(f"{where}: missing field 'id'")
    if not _is_int(entry["id"]):
        raise DatasetError(f"{where}: field 'id' must be an int, got {entry['id']!r}")
    return f"{where} (id {entry['id']})"


def _validate_coco(path: Path, data: Any, need_masks: bool) -> dict[int, dict]:
    """Check a COCO JSON (see coco_instance_masks); return its images by id."""
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: top level must be a JSON object, got {type(data).__name__}")
    if "images" not in data:
        raise DatasetError(f"{path}: missing field 'images'")
    if not isinstance(data["images"], list):
        raise DatasetError(f"{path}: field 'images' must be a list")

    images: dict[int, dict] = {}
    for i, im in enumerate(data["images"]):
        where = _entry_with_id(path, "images", i, im)
        for field in ("file_name", "width", "height"):
            if field not in im:
                raise DatasetError(f"{where}: missing field {field!r}")
        if not isinstance(im["file_name"], str) or not im["file_name"]:
            raise DatasetError(f"{where}: field 'file_name' must be a non-empty string, got {im['file_name']!r}")
        for field in ("width", "height"):
            if not _is_int(im[field]) or im[field] < 1:
                raise DatasetError(f"{where}: field {field!r} must be a positive int, got {im[field]!r}")
        if "split" in im and not isinstance(im["split"], str | None):
            raise DatasetError(f"{where}: field 'split' must be a string, got {im['split']!r}")
        if im["id"] in images:
            raise DatasetError(f"{where}: duplicate image id {im['id']}")
        images[im["id"]] = im

    categories: set[int] = set()
    cats = data.get("categories", [])
    if need_masks and "categories" not in data:
        raise DatasetError(f"{path}: missing field 'categories'")
    if not isinstance(cats, list):
        raise DatasetError(f"{path}: field 'categories' must be a list")
    for i, c in enumerate(cats):
        where = f"{path}: categories[{i}]"
        if not isinstance(c, dict):
            raise DatasetError(f"{where} must be an object")
        for field in ("id", "name"):
            if field not in c:
                raise DatasetError(f"{where}: missing field {field!r}")
        if not _is_int(c["id"]):
            raise DatasetError(f"{where}: field 'id' must be an int, got {c['id']!r}")
        if not isinstance(c["name"], str):
            raise DatasetError(f"{where} (id {c['id']}): field 'name' must be a string, got {c['name']!r}")
        if c["id"] in categories:
            raise DatasetError(f"{where}: duplicate category id {c['id']}")
        categories.add(c["id"])

    anns = data.get("annotations", [])
    if not isinstance(anns, list):
        raise DatasetError(f"{path}: field 'annotations' must be a list")
    ann_ids: set[int] = set()
    for i, a in enumerate(anns):
        where = _entry_with_id(path, "annotations", i, a)
        if a["id"] in ann_ids:
            raise DatasetError(f"{where}: duplicate annotation id {a['id']}")
        ann_ids.add(a["id"])
        if "image_id" not in a:
            raise DatasetError(f"{where}: missing field 'image_id'")
        if not _is_int(a["image_id"]) or a["image_id"] not in images:
            raise DatasetError(f"{where}: field 'image_id' {a['image_id']!r} is not an image of the file")
        crowd = a.get("iscrowd", 0)
        if crowd not in (0, 1):
            raise DatasetError(f"{where}: field 'iscrowd' must be 0 or 1, got {crowd!r}")
        if "category_id" in a or need_masks:
            if "category_id" not in a:
                raise DatasetError(f"{where}: missing field 'category_id'")
            if not _is_int(a["category_id"]) or ((need_masks or categories) and a["category_id"] not in categories):
                raise DatasetError(f"{where}: field 'category_id' {a['category_id']!r} is not a category of the file")
        im = images[a["image_id"]]
        width, height = im["width"], im["height"]
        if "bbox" in a:
            _check_bbox(where, a["bbox"], width, height)
        if "segmentation" in a:
            _check_segmentation(where, a["segmentation"], width, height)
        elif need_masks and not crowd:
            raise DatasetError(f"{where}: missing field 'segmentation'")
    return images


def _check_bbox(where: str, bbox: Any, width: int, height: int) -> None:
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        raise DatasetError(f"{where}: field 'bbox' must be 4 finite numbers [x, y, w, h], got {bbox!r}")
    x, y, w, h = bbox
    tol = _BOUNDS_TOLERANCE
    if w < 0 or h < 0:
        raise DatasetError(f"{where}: field 'bbox' {bbox} has a negative size")
    if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
        raise DatasetError(f"{where}: field 'bbox' {bbox} lies outside the {width}x{height} image")


def _check_segmentation(where: str, seg: Any, width: int, height: int) -> None:
    tol = _BOUNDS_TOLERANCE
    if isinstance(seg, list):
        for j, poly in enumerate(seg):
            if not isinstance(poly, list) or len(poly) % 2 or not all(_is_number(v) for v in poly):
                raise DatasetError(
                    f"{where}: field 'segmentation'[{j}] must be a polygon [x0, y0, x1, y1, ...] of finite numbers"
                )
            if not poly:
                continue
            xs, ys = poly[0::2], poly[1::2]
            if min(xs) < -tol or min(ys) < -tol or max(xs) > width + tol or max(ys) > height + tol:
                raise DatasetError(
                    f"{where}: field 'segmentation'[{j}] has points outside the {width}x{height} image "
                    f"(x in [{min(xs)}, {max(xs)}], y in [{min(ys)}, {max(ys)}])"
                )
        return
    if not isinstance(seg, dict) or "counts" not in seg or "size" not in seg:
        raise DatasetError(f"{where}: field 'segmentation' must be a polygon list or an RLE {{'size', 'counts'}}")
    size = seg["size"]
    if not isinstance(size, list) or len(size) != 2 or not all(_is_int(v) for v in size):
        raise DatasetError(f"{where}: field 'segmentation.size' must be [height, width], got {size!r}")
    if size != [height, width]:
        raise DatasetError(
            f"{where}: field 'segmentation.size' {size} does not match the image's [height, width] "
            f"[{height}, {width}]: the mask lies outside the image"
        )
    counts = seg["counts"]
    if isinstance(counts, list):
        if not all(_is_int(v) for v in counts):
            raise DatasetError(f"{where}: field 'segmentation.counts' must be a list of ints")
        runs = np.asarray(counts, dtype=np.int64)
    elif isinstance(counts, str | bytes):
        try:
            runs = rle_counts(counts)
        except ValueError as e:
            raise DatasetError(f"{where}: field 'segmentation.counts' is not a valid compressed RLE: {e}") from e
    else:
        raise DatasetError(f"{where}: field 'segmentation.counts' must be a list of ints, a str or bytes")
    if runs.size and runs.min() < 0:
        raise DatasetError(f"{where}: field 'segmentation.counts' has a negative run length")
    if int(runs.sum()) != height * width:
        raise DatasetError(
            f"{where}: field 'segmentation.counts' covers {int(runs.sum())} pixels, not the image's "
            f"{height}x{width} = {height * width}"
        )


def rle_counts(counts: str | bytes) -> np.ndarray:
    """Decode a COCO compressed-RLE ``counts`` string to its run lengths (int64, 1-D).

    The same LEB128-like code as pycocotools' ``rleFrString``, in numpy: 5 data bits per
    character (offset 48), bit 0x20 = "more characters follow", bit 0x10 of a run's last
    character = sign, and runs after the second are stored as deltas to the run two before.
    pycocotools does not check what it decodes; this lets validation reject bad strings.

    Raises:
        ValueError: a character outside '0'..'o', an unfinished last run, or a run too long.
    """
    raw = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    c = np.frombuffer(raw, dtype=np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return np.zeros(0, np.int64)
    if c.min() < 0 or c.max() > 63:
        raise ValueError("characters must lie in '0'..'o'")
    last = (c & 0x20) == 0  # the last character of each run
    if not last[-1]:
        raise ValueError("the last run is unfinished")
    ends = np.flatnonzero(last)
    starts = np.concatenate([[0], ends[:-1] + 1])
    k = np.arange(c.size) - np.repeat(starts, ends - starts + 1)  # character index within its run
    if k.max() > 11:  # 12 * 5 bits: beyond int64 arithmetic and any real image
        raise ValueError("a run length is too long")
    x = np.add.reduceat((c & 0x1F) << (5 * k), starts)
    negative = (c[ends] & 0x10) != 0
    x = np.where(negative, x - (np.int64(1) << (5 * (k[ends] + 1))), x)
    runs = x.copy()
    # runs[m] = x[m] + runs[m - 2] for m > 2: cumulative sums over each parity from index 1 / 2
    runs[1::2] = np.cumsum(x[1::2])
    runs[2::2] = np.cumsum(x[2::2])
    return runs


# --- Parts World -------------------------------------------------------------------------


def partsworld_images(artifact_dir: Any) -> list[ImageRecord]:
    """Records of a Parts World `data` artifact, from its ``images.parquet``, sorted by image id.

    ``artifact_dir`` is the artifact folder (str/path) or an opened
    :class:`partdistill.storage.Artifact` (whose access rules then apply). Columns read:
    ``image_id``, ``file_name`` (relative to the folder), ``split``, ``width``, ``height``;
    ``class_name`` is None.

    Raises:
        DatasetError: no or unreadable ``images.parquet``, a missing column, a null or
            ill-typed value, or duplicate image ids.
    """
    import pyarrow.parquet as pq

    if hasattr(artifact_dir, "file") and hasattr(artifact_dir, "path"):
        folder = Path(artifact_dir.path)
        table_path = Path(artifact_dir.file("images.parquet"))
    else:
        folder = Path(artifact_dir)
        table_path = folder / "images.parquet"
    if not table_path.is_file():
        raise DatasetError(f"{folder} has no images.parquet (is it a Parts World data artifact?)")
    try:
        table = pq.read_table(table_path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid/OSError family
        raise DatasetError(f"cannot read {table_path}: {e}") from e
    columns = ("image_id", "file_name", "split", "width", "height")
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DatasetError(f"{table_path}: missing column(s) {missing}; has {table.column_names}")
    cols = {c: table.column(c).to_pylist() for c in columns}
    records = []
    seen: set[int] = set()
    for row in range(table.num_rows):
        values = {c: cols[c][row] for c in columns}
        for c, v in values.items():
            ok = isinstance(v, str) and v if c in ("file_name", "split") else _is_int(v) and v >= 0
            if not ok:
                raise DatasetError(f"{table_path}: row {row}: column {c!r} has an invalid value {v!r}")
        if values["image_id"] in seen:
            raise DatasetError(f"{table_path}: row {row}: duplicate image_id {values['image_id']}")
        seen.add(values["image_id"])
        records.append(ImageRecord(values["image_id"], folder / values["file_name"], values["file_name"],
                                   values["width"], values["height"], None, values["split"]))
    records.sort(key=lambda r: r.image_id)
    return records
