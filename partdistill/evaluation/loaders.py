"""Part ground truth of public data sets, as the :class:`GTObject` lists the evaluation shares.

Each loader reads one split of a part data set and returns a :class:`GTObjectList`: the same
``GTObject`` records :func:`partdistill.evaluation.premise.load_gt_objects` gives for Parts World
(``mask`` bool ``(H, W)``; ``part_labels`` int16 ``(H, W)``, the part category id inside the object,
-1 outside it and on object pixels no part covers; ``part_masks`` the non-empty part masks, bool
``(H, W)``, clipped to the object, in ascending part id), so every metric runs unchanged on them.
``file_name`` is relative to the data set's root: ``load_rgb(root / o.file_name)`` reads the image.
Where parts overlap, ``part_labels`` holds the higher part id; ``part_masks`` keep the overlap.

* :func:`partimagenet` -- PartImageNet's COCO part annotations (or the Parts World layout);
* :func:`pascal_part` -- Pascal-Part's ``.mat`` annotations over VOC2010, fine parts merged into
  coarse ones (:data:`PASCAL_PART_MERGE`, :func:`pascal_part_categories`); :func:`pascal_part_image`
  reads one image's objects, those without parts too (the ``pascalpart`` data source uses it);
* :func:`cityscapes_panoptic_parts` -- Cityscapes-Panoptic-Parts label files
  (:func:`decode_panoptic_parts`, :data:`CITYSCAPES_PARTS`).

Objects without a single labelled part pixel are dropped and counted (``GTObjectList.dropped``).
Every loader checks what it reads and fails naming the file and the field: a missing file, malformed
JSON or ``.mat``, an image that is listed but absent (:class:`ImageLoadError`), a mask whose shape
differs from its image's (:class:`DatasetError`). Reads part ground truth: evaluation only.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from partdistill.data.images import (
    DatasetError,
    GTInstance,
    _header_size,
    coco_images,
    coco_instance_masks,
    load_rgb,
)
from partdistill.evaluation.premise import GTObject, load_gt_objects

__all__ = [
    "CITYSCAPES_PARTS",
    "GTObjectList",
    "PASCAL_PART_MERGE",
    "cityscapes_panoptic_parts",
    "decode_panoptic_parts",
    "partimagenet",
    "pascal_part",
    "pascal_part_categories",
    "pascal_part_image",
]


class GTObjectList(list[GTObject]):
    """A loader's objects, plus what a report on them needs.

    ``part_names[class_name][part_id]`` names every part id the loader can assign for that object
    class; ``dropped`` counts the objects left out because none of their pixels has a part label
    (None where the loader cannot tell). Slicing gives a plain list.
    """

    def __init__(
        self,
        objects: Iterable[GTObject] = (),
        part_names: Mapping[str, Mapping[int, str]] | None = None,
        dropped: int | None = 0,
    ) -> None:
        super().__init__(objects)
        self.part_names: dict[str, dict[int, str]] = {c: dict(p) for c, p in (part_names or {}).items()}
        self.dropped = dropped

    def add(self, obj: GTObject | None, limit: int | None) -> bool:
        """Keep ``obj``, or count it dropped when it is None (no part pixel); True once
        ``limit`` objects are kept."""
        if obj is None:
            self.dropped += 1
            return False
        self.append(obj)
        return limit is not None and len(self) >= limit


# --- shared ------------------------------------------------------------------------------------


def _gt_object(
    image_id: int, file_name: str, class_name: str, mask: np.ndarray, parts: Iterable[tuple[int, np.ndarray]]
) -> GTObject | None:
    """One object from its mask and ``(part id, bool (H, W) mask)`` pairs; pieces of one id are
    merged. None when no part pixel falls inside the object."""
    merged: dict[int, np.ndarray] = {}
    for pid, pm in parts:
        pm = pm & mask
        merged[pid] = merged[pid] | pm if pid in merged else pm
    labels = np.full(mask.shape, -1, np.int16)
    part_masks = []
    for pid in sorted(merged):
        if merged[pid].any():
            labels[merged[pid]] = pid
            part_masks.append(merged[pid])
    if not part_masks:
        return None
    return GTObject(image_id, file_name, class_name, mask, labels, part_masks)


def _image_shape(path: Path) -> tuple[int, int]:
    """(H, W) of the upright image :func:`load_rgb` gives, from the header alone when it can."""
    width, height = _header_size(path)
    if width == 0:
        # The header did not say why; load_rgb raises ImageLoadError with the precise reason.
        return load_rgb(path).shape[:2]
    return height, width


def _check_shape(shape: tuple[int, ...], image_shape: tuple[int, int], image_path: Path, what: str) -> None:
    if tuple(shape) != tuple(image_shape):
        raise DatasetError(
            f"{what}: the mask is {shape[0]}x{shape[1]} (HxW) but image {image_path} is "
            f"{image_shape[0]}x{image_shape[1]}"
        )


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")


# --- PartImageNet ------------------------------------------------------------------------------


def partimagenet(root: str | os.PathLike[str], split: str = "val", limit: int | None = None) -> GTObjectList:
    """PartImageNet's part ground truth: ``{root}/{split}.json`` and images under ``{root}/{split}/``.

    The JSON is COCO: every annotation is one *part* (``category_id`` a part category, a polygon or
    RLE ``segmentation``), and the part category's ``supercategory`` is its object class. An image
    holds one object, so the object is the union of the image's parts of one object class (an image
    with parts of two classes gives two objects, in class name order). ``part_labels`` hold the COCO
    part category ids; ``part_names`` maps them to the categories' ``name``; ``image_id`` is the
    COCO id, ``file_name`` ``"{split}/<file_name>"``. Crowd annotations are skipped; ``dropped``
    counts the images without a part and the objects whose parts are all empty.

    If ``{root}`` holds the Parts World layout instead (``instances_{split}.json`` and
    ``parts_{split}.json``, parts linked to objects by ``object_id``), this is
    :func:`load_gt_objects`; ``dropped`` is then None.

    Args:
        limit: stop after this many objects (images in ascending id).

    Raises:
        DatasetError: no annotation file, unreadable or malformed JSON (see
            :func:`coco_instance_masks` for the checks), a part category without a string
            ``supercategory``, an image whose size differs from the JSON's.
        ImageLoadError: an image of the JSON that is missing or unreadable.
    """
    _check_limit(limit)
    root = Path(root)
    if (root / f"instances_{split}.json").is_file() and (root / f"parts_{split}.json").is_file():
        for name in (f"instances_{split}.json", f"parts_{split}.json"):
            coco_instance_masks(root / name, image_ids=())  # validates, naming file and field; decodes nothing
        objects = load_gt_objects(root, split, limit)
        categories = json.loads((root / f"parts_{split}.json").read_bytes())["categories"]
        return GTObjectList(objects, _coco_part_names(categories), dropped=None)
    json_path = root / f"{split}.json"
    if not json_path.is_file():
        raise DatasetError(
            f"{json_path} does not exist: expected PartImageNet's {split}.json "
            f"(or instances_{split}.json and parts_{split}.json of the Parts World layout) in {root}"
        )
    records = coco_images(json_path, image_root=root / split)  # validates the file's structure
    data = json.loads(json_path.read_bytes())
    object_class: dict[int, str] = {}
    for i, c in enumerate(data.get("categories", [])):
        if not isinstance(c.get("supercategory"), str) or not c["supercategory"]:
            raise DatasetError(
                f"{json_path}: categories[{i}] (id {c['id']}): field 'supercategory' (the object class) "
                f"must be a non-empty string, got {c.get('supercategory')!r}"
            )
        object_class[c["id"]] = c["supercategory"]
    with_parts = {a["image_id"] for a in data.get("annotations", []) if not a.get("iscrowd", 0)}
    to_decode = [r.image_id for r in records if r.image_id in with_parts]

    objects = GTObjectList(part_names=_coco_part_names(data.get("categories", [])))
    masks: dict[int, list[GTInstance]] = {}
    for record in records:
        where = f"{json_path}: image id {record.image_id}"
        _check_shape((record.height, record.width), _image_shape(record.path), record.path, where)
        if record.image_id in with_parts and record.image_id not in masks:
            # Decode the masks of as many images as ``limit`` can still use (each image with a part
            # gives an object or more; another batch only when one had empty parts), else all.
            start = to_decode.index(record.image_id)
            batch = to_decode[start:] if limit is None else to_decode[start : start + limit - len(objects)]
            masks = coco_instance_masks(json_path, batch)
        by_class: dict[str, list[tuple[int, np.ndarray]]] = {}
        for inst in masks.get(record.image_id, []):
            by_class.setdefault(object_class[inst.category_id], []).append((inst.category_id, inst.mask))
        if not by_class:
            objects.dropped += 1
        for class_name in sorted(by_class):
            parts = by_class[class_name]
            mask = np.logical_or.reduce([m for _, m in parts])
            # None (counted as dropped): only empty parts, e.g. degenerate polygons
            obj = _gt_object(record.image_id, f"{split}/{record.file_name}", class_name, mask, parts)
            if objects.add(obj, limit):
                return objects
    return objects


def _coco_part_names(categories: list[dict[str, Any]]) -> dict[str, dict[int, str]]:
    names: dict[str, dict[int, str]] = {}
    for c in categories:
        names.setdefault(c.get("supercategory", ""), {})[c["id"]] = c["name"]
    return names


# --- Pascal-Part -------------------------------------------------------------------------------


def _grouped(groups: Mapping[str, Iterable[str]]) -> dict[str, str]:
    """``{coarse: fine names}`` -> ``{fine: coarse}``."""
    return {fine: coarse for coarse, fines in groups.items() for fine in fines}


_CAT_DOG = {"head": ("head", "leye", "reye", "lear", "rear", "nose", "muzzle"), "torso": ("torso", "neck"),
            "leg": ("lfleg", "lfpa", "rfleg", "rfpa", "lbleg", "lbpa", "rbleg", "rbpa"), "tail": ("tail",)}
_HOOFED_LEGS = ("lfuleg", "lflleg", "rfuleg", "rflleg", "lbuleg", "lblleg", "rbuleg", "rblleg")
_COW_SHEEP = {"head": ("head", "leye", "reye", "lear", "rear", "muzzle", "lhorn", "rhorn"), "torso": ("torso", "neck"),
              "leg": _HOOFED_LEGS, "tail": ("tail",)}
_BUS_CAR = {"body": ("frontside", "leftside", "rightside", "backside", "roofside"),
            "mirror": ("leftmirror", "rightmirror"), "license plate": ("fliplate", "bliplate"),
            "door": ("door",), "wheel": ("wheel",), "light": ("headlight",), "window": ("window",)}

# Our coarse grouping of Pascal-Part's fine parts: {object class: {fine part: coarse part}}, fine
# names with the instance number stripped ("wheel_3" -> "wheel"). In the spirit of the merged-part
# evaluation of the PartDistillation reference (a head, a torso, legs, a tail for animals; body,
# wheels, windows, lights for vehicles), not a copy of its table: numbers from it do not transfer.
# The keys are the complete fine vocabulary of Pascal-Part (its part2ind.m); a fine name outside it
# is an error unless a caller's ``merge`` table names it. Boat, chair, diningtable and sofa have
# object masks only.
PASCAL_PART_MERGE: dict[str, dict[str, str]] = {
    "aeroplane": _grouped({"body": ("body", "stern"), "wing": ("lwing", "rwing"), "tail": ("tail",),
                           "engine": ("engine",), "wheel": ("wheel",)}),
    "bicycle": _grouped({"wheel": ("fwheel", "bwheel"), "saddle": ("saddle",), "handlebar": ("handlebar",),
                         "chainwheel": ("chainwheel",), "light": ("headlight",)}),
    "bird": _grouped({"head": ("head", "leye", "reye", "beak"), "torso": ("torso", "neck"),
                      "wing": ("lwing", "rwing"), "leg": ("lleg", "lfoot", "rleg", "rfoot"), "tail": ("tail",)}),
    "bottle": _grouped({"cap": ("cap",), "body": ("body",)}),
    "bus": _grouped(_BUS_CAR),
    "car": _grouped(_BUS_CAR),
    "cat": _grouped(_CAT_DOG),
    "cow": _grouped(_COW_SHEEP),
    "dog": _grouped(_CAT_DOG),
    "horse": _grouped({"head": ("head", "leye", "reye", "lear", "rear", "muzzle"), "torso": ("torso", "neck"),
                       "leg": (*_HOOFED_LEGS, "lfho", "rfho", "lbho", "rbho"), "tail": ("tail",)}),
    "motorbike": _grouped({"wheel": ("fwheel", "bwheel"), "handlebar": ("handlebar",), "saddle": ("saddle",),
                           "light": ("headlight",)}),
    "person": _grouped({"head": ("hair", "head", "leye", "reye", "lear", "rear", "lebrow", "rebrow", "nose", "mouth"),
                        "torso": ("torso", "neck"), "arm": ("llarm", "luarm", "lhand", "rlarm", "ruarm", "rhand"),
                        "leg": ("llleg", "luleg", "lfoot", "rlleg", "ruleg", "rfoot")}),
    "pottedplant": _grouped({"pot": ("pot",), "plant": ("plant",)}),
    "sheep": _grouped(_COW_SHEEP),
    "train": _grouped({"head": ("head", "hfrontside", "hleftside", "hrightside", "hbackside", "hroofside"),
                       "light": ("headlight",),
                       "coach": ("coach", "cfrontside", "cleftside", "crightside", "cbackside", "croofside")}),
    "tvmonitor": _grouped({"screen": ("screen",)}),
}

_PART_NUMBER = re.compile(r"_\d+$")


def _strip_number(part_name: str) -> str:
    """``"wheel_3"`` -> ``"wheel"``: Pascal-Part numbers the instances of a repeated part."""
    return _PART_NUMBER.sub("", part_name)


def pascal_part_categories(merge: Mapping[str, Mapping[str, str]] | None = None) -> dict[str, list[str]]:
    """The coarse part categories of every Pascal-Part object class: ``{class: [part, ...]}``.

    A part's id is its index in its class's list: the coarse names sorted. They follow from the
    merge table alone (default :data:`PASCAL_PART_MERGE`), never from the data, so ids agree across
    splits. Fine names of the Pascal-Part vocabulary that ``merge`` does not map keep their name.
    """
    table = PASCAL_PART_MERGE if merge is None else merge
    categories = {}
    for class_name in sorted(set(PASCAL_PART_MERGE) | set(table)):
        fine = set(PASCAL_PART_MERGE.get(class_name, {})) | set(table.get(class_name, {}))
        coarse = sorted({table.get(class_name, {}).get(name, name) for name in fine})
        if coarse:
            categories[class_name] = coarse
    return categories


def pascal_part(
    root: str | os.PathLike[str],
    split: str = "val",
    merge: Mapping[str, Mapping[str, str]] | None = None,
    limit: int | None = None,
) -> GTObjectList:
    """Pascal-Part's part ground truth over VOC2010, fine parts merged into coarse ones.

    Reads ``{root}/ImageSets/Main/{split}.txt`` (image ids, one a line), ``{root}/JPEGImages/{id}.jpg``
    and ``{root}/Annotations_Part/{id}.mat``, whose ``anno.objects`` struct array has, per object,
    ``class`` (str), ``mask`` (uint8 (H, W)) and ``parts`` (struct array of ``part_name`` (str) and
    ``mask`` (uint8 (H, W)); empty for classes with object masks only). The files are read with
    ``scipy.io.loadmat``'s defaults (``struct_as_record=True``, no squeezing), so every struct array
    stays 2-D and a 1-pixel-high mask keeps its shape.

    A part name loses its instance number (``"wheel_2"`` -> ``"wheel"``) and is mapped by ``merge``
    (``{class: {fine: coarse}}``, default :data:`PASCAL_PART_MERGE`; a name the table lacks keeps
    its own); the pieces of one coarse part become one part. Part ids index
    ``pascal_part_categories(merge)[class]``; ``part_names`` records them. ``image_id`` is the VOC id's
    digits (``2008_000123`` -> 2008000123); ``file_name`` ``"JPEGImages/{id}.jpg"``.

    Args:
        limit: stop after this many objects (images in split-file order).

    Raises:
        DatasetError: a missing or unreadable split file or ``.mat``, a ``.mat`` without the fields
            above, an id that is not a VOC id, a part name that is neither Pascal-Part's nor in
            ``merge``, a mask whose shape differs from the image's.
        ImageLoadError: a listed image that is missing or unreadable.
    """
    _check_limit(limit)
    root = Path(root)
    table = PASCAL_PART_MERGE if merge is None else merge
    categories = pascal_part_categories(merge)
    part_ids = {c: {name: i for i, name in enumerate(names)} for c, names in categories.items()}
    split_path = root / "ImageSets" / "Main" / f"{split}.txt"
    objects = GTObjectList(part_names={c: dict(enumerate(names)) for c, names in categories.items()})
    for line_no, voc_id in _read_split(split_path):
        file_name, _, annotated = pascal_part_image(root, voc_id, f"{split_path}: line {line_no}", table, part_ids)
        for class_name, mask, labelled in annotated:
            obj = _gt_object(int(voc_id.replace("_", "")), file_name, class_name, mask, labelled)
            if objects.add(obj, limit):
                return objects
    return objects


def pascal_part_image(
    root: Path,
    voc_id: str,
    where: str,
    table: Mapping[str, Mapping[str, str]],
    part_ids: Mapping[str, Mapping[str, int]],
) -> tuple[str, tuple[int, int], list[tuple[str, np.ndarray, list[tuple[int, np.ndarray]]]]]:
    """One listed image of Pascal-Part, every object of its ``.mat`` checked as :func:`pascal_part`
    checks it: ``(file_name, (H, W) of the image, [(class, bool mask, [(part id, bool part mask),
    ...]), ...])``, objects in file order, those with an object mask only too (no parts), part
    masks unclipped and one per fine part. ``where`` names the split file line (for errors);
    ``table`` is the merge table (``{class: {fine: coarse}}``), ``part_ids`` ``{class: {coarse:
    id}}`` from :func:`pascal_part_categories`.

    Raises:
        DatasetError, ImageLoadError: as :func:`pascal_part`.
    """
    if not re.fullmatch(r"\d+(_\d+)*", voc_id):
        raise DatasetError(f"{where}: {voc_id!r} is not a VOC image id (digits and '_', e.g. 2008_000123)")
    mat_path = root / "Annotations_Part" / f"{voc_id}.mat"
    if not mat_path.is_file():
        raise DatasetError(f"{where}: image {voc_id} has no part annotation {mat_path}")
    file_name = f"JPEGImages/{voc_id}.jpg"
    annotated = _read_pascal_mat(mat_path)
    image_shape = _image_shape(root / file_name)
    objects = []
    for k, (class_name, mask, parts) in enumerate(annotated):
        what = f"{mat_path}: objects[{k}] ({class_name})"
        _check_shape(mask.shape, image_shape, root / file_name, f"{what}: field 'mask'")
        labelled = []
        for j, (part_name, part_mask) in enumerate(parts):
            fine = _strip_number(part_name)
            if fine not in PASCAL_PART_MERGE.get(class_name, {}) and fine not in table.get(class_name, {}):
                raise DatasetError(
                    f"{what}: parts[{j}]: part {part_name!r} is not a Pascal-Part part of class {class_name!r}; "
                    "map it in `merge` to load it"
                )
            if part_mask.shape != mask.shape:
                raise DatasetError(
                    f"{what}: parts[{j}] ({part_name}): field 'mask' is {part_mask.shape}, "
                    f"the object's {mask.shape}"
                )
            labelled.append((part_ids[class_name][table.get(class_name, {}).get(fine, fine)], part_mask))
        objects.append((class_name, mask, labelled))
    return file_name, image_shape, objects


def _read_split(path: Path) -> list[tuple[int, str]]:
    """``(line number, image id)`` of a VOC image-set file; the first word of each non-blank line."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise DatasetError(f"split file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read split file {path}: {e}") from e
    return [(n, line.split()[0]) for n, line in enumerate(lines, start=1) if line.strip()]


def _read_pascal_mat(path: Path) -> list[tuple[str, np.ndarray, list[tuple[str, np.ndarray]]]]:
    """``(class, bool (H, W) mask, [(part name, bool (H, W) mask), ...])`` per object of a ``.mat``."""
    from scipy.io import loadmat

    try:
        mat = loadmat(path, squeeze_me=False, struct_as_record=True)
    except Exception as e:  # scipy raises MatReadError, ValueError, TypeError... for a bad file
        raise DatasetError(f"cannot read {path} as a MATLAB file: {type(e).__name__}: {e}") from e
    if "anno" not in mat:
        raise DatasetError(f"{path}: missing variable 'anno' (has {sorted(k for k in mat if not k.startswith('__'))})")
    anno = _structs(mat["anno"], ("objects",), f"{path}: anno")
    if len(anno) != 1:
        raise DatasetError(f"{path}: anno must be one struct, got {len(anno)}")
    objects = []
    for k, obj in enumerate(_structs(anno[0]["objects"], ("class", "mask", "parts"), f"{path}: anno.objects")):
        class_name = _mat_str(obj["class"], f"{path}: objects[{k}]: field 'class'")
        where = f"{path}: objects[{k}] ({class_name})"
        mask = _mat_mask(obj["mask"], f"{where}: field 'mask'")
        parts = []
        for j, part in enumerate(_structs(obj["parts"], ("part_name", "mask"), f"{where}: field 'parts'")):
            name = _mat_str(part["part_name"], f"{where}: parts[{j}]: field 'part_name'")
            parts.append((name, _mat_mask(part["mask"], f"{where}: parts[{j}] ({name}): field 'mask'")))
        objects.append((class_name, mask, parts))
    return objects


def _structs(value: Any, fields: tuple[str, ...], where: str) -> list[np.void]:
    """The records of a loaded struct array (any shape; an empty array of any type has none)."""
    if isinstance(value, np.ndarray) and value.size == 0:
        return []
    if not isinstance(value, np.ndarray) or value.dtype.names is None:
        raise DatasetError(f"{where} must be a struct array, got {type(value).__name__}")
    missing = [f for f in fields if f not in value.dtype.names]
    if missing:
        raise DatasetError(f"{where}: missing field(s) {missing}; has {list(value.dtype.names)}")
    return list(value.ravel())


def _mat_str(value: Any, where: str) -> str:
    if isinstance(value, np.ndarray) and value.dtype.kind == "U" and value.size == 1:
        value = value.item()
    if not isinstance(value, str) or not value:
        raise DatasetError(f"{where} must be a non-empty string, got {value!r}")
    return value


def _mat_mask(value: Any, where: str) -> np.ndarray:
    if not isinstance(value, np.ndarray) or value.ndim != 2 or value.dtype.kind not in "biu":
        shape = getattr(value, "shape", None)
        raise DatasetError(f"{where} must be a 2-D integer or logical array, got {type(value).__name__} {shape}")
    return np.ascontiguousarray(value != 0)


# --- Cityscapes-Panoptic-Parts -----------------------------------------------------------------

# Semantic id -> (class, part names by part id - 1) of the classes Cityscapes-Panoptic-Parts gives
# parts: the human classes and the vehicle classes.
_HUMAN_PARTS = ("torso", "head", "arm", "leg")
_VEHICLE_PARTS = ("window", "wheel", "light", "license plate", "chassis")
CITYSCAPES_PARTS: dict[int, tuple[str, tuple[str, ...]]] = {
    24: ("person", _HUMAN_PARTS),
    25: ("rider", _HUMAN_PARTS),
    26: ("car", _VEHICLE_PARTS),
    27: ("truck", _VEHICLE_PARTS),
    28: ("bus", _VEHICLE_PARTS),
}


def decode_panoptic_parts(uids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split Cityscapes-Panoptic-Parts universal ids into semantic, instance and part ids.

    ``uids``: int array, any shape, values in ``[0, 10**7)``. Up to three digits hold the semantic
    id alone; up to five ``sid * 1000 + iid``; up to seven ``sid * 10**5 + iid * 100 + pid``.
    Returns int64 ``(sid, iid, pid)`` of ``uids``' shape, -1 where a level is not encoded
    (``pid`` 0 is the data set's own "void part").

    Raises:
        ValueError: a negative uid or one of more than seven digits.
    """
    u = np.asarray(uids).astype(np.int64)
    if u.size and (u.min() < 0 or u.max() >= 10**7):
        raise ValueError(f"uids must lie in [0, 10**7), got values in [{u.min()}, {u.max()}]")
    semantic_only, with_instance = u < 1000, u < 10**5
    sid = np.where(semantic_only, u, np.where(with_instance, u // 1000, u // 10**5))
    iid = np.where(semantic_only, -1, np.where(with_instance, u % 1000, (u // 100) % 1000))
    pid = np.where(with_instance, -1, u % 100)
    return sid, iid, pid


def cityscapes_panoptic_parts(
    root: str | os.PathLike[str], split: str = "val", limit: int | None = None
) -> GTObjectList:
    """Cityscapes-Panoptic-Parts' part ground truth: the person, rider, car, truck and bus instances.

    Reads every ``{root}/gtFinePanopticParts/{split}/{city}/{name}_gtFinePanopticParts.tif`` (sorted)
    and checks its image ``{root}/leftImg8bit/{split}/{city}/{name}_leftImg8bit.png``. An object is one
    (semantic id, instance id) of the :data:`CITYSCAPES_PARTS` classes (instance id 0 included:
    Cityscapes counts instances from 0); its mask covers the instance's pixels with or without a part
    id; its part ids are the data set's part id - 1 (``part_names`` from :data:`CITYSCAPES_PARTS`),
    void parts (part id 0) -1. Pixels with a semantic id alone (crowds) belong to no object.
    ``image_id`` is 1..N in sorted label-file order; ``file_name`` the image's path from ``root``.

    Args:
        limit: stop after this many objects.

    Raises:
        DatasetError: no label folder or file, an unreadable label file, one that is not a 2-D integer
            image, a uid outside ``[0, 10**7)``, a part id beyond its class's parts, or a label whose
            shape differs from the image's.
        ImageLoadError: the image of a label file missing or unreadable.
    """
    _check_limit(limit)
    root = Path(root)
    label_dir = root / "gtFinePanopticParts" / split
    suffix = "_gtFinePanopticParts.tif"
    if not label_dir.is_dir():
        raise DatasetError(f"label folder {label_dir} does not exist")
    label_paths = sorted(label_dir.glob(f"*/*{suffix}"))
    if not label_paths:
        raise DatasetError(f"label folder {label_dir} has no {{city}}/*{suffix} files")
    part_names = {name: dict(enumerate(parts)) for name, parts in CITYSCAPES_PARTS.values()}
    objects = GTObjectList(part_names=part_names)
    for image_id, label_path in enumerate(label_paths, start=1):
        city, name = label_path.parent.name, label_path.name[: -len(suffix)]
        file_name = f"leftImg8bit/{split}/{city}/{name}_leftImg8bit.png"
        uids = _read_label(label_path)
        _check_shape(uids.shape, _image_shape(root / file_name), root / file_name, str(label_path))
        try:
            sid, iid, pid = decode_panoptic_parts(uids)
        except ValueError as e:
            raise DatasetError(f"{label_path}: {e}") from e
        has_object = np.isin(sid, list(CITYSCAPES_PARTS)) & (iid >= 0)
        keys = np.unique(sid[has_object] * 1000 + iid[has_object])
        for key in keys.tolist():
            s, i = divmod(key, 1000)
            class_name, parts = CITYSCAPES_PARTS[s]
            mask = has_object & (sid == s) & (iid == i)
            found = np.unique(pid[mask])
            if found.max() > len(parts):
                raise DatasetError(
                    f"{label_path}: instance {i} of {class_name} (sid {s}) has part id {found.max()}; "
                    f"{class_name} has parts 1..{len(parts)}"
                )
            labelled = [(p - 1, mask & (pid == p)) for p in found.tolist() if p >= 1]
            if objects.add(_gt_object(image_id, file_name, class_name, mask, labelled), limit):
                return objects
    return objects


def _read_label(path: Path) -> np.ndarray:
    """A label image as int64 (H, W)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            labels = np.array(im)
    except Exception as e:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError... for bad files
        raise DatasetError(f"cannot read label file {path}: {type(e).__name__}: {e}") from e
    if labels.ndim != 2 or labels.dtype.kind not in "iu":
        raise DatasetError(f"{path}: expected a 2-D integer label image, got {labels.dtype} {labels.shape}")
    return labels.astype(np.int64)
