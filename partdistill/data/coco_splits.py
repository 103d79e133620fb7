"""A COCO data set given as one instance JSON per split, with part JSONs for some splits.

``data.coco`` names the files (:func:`split_files`):

* ``instances``: one JSON (the split ``data.coco.split``; an image's own ``split`` field wins in
  ``images.parquet``), or ``dict(train=..., val=...)``, one JSON per split;
* ``parts``: None, one JSON (for ``data.coco.split``), or ``dict(val=...)``: part annotations in
  PartImageNet's COCO format, each part's ``object_id`` naming its object in the same split's
  instance JSON and each part category's ``supercategory`` naming its object class;
* ``root``: the folder relative ``file_name``s are relative to: None (each JSON's own folder), one
  folder, or ``dict(train=..., val=...)``. An absolute ``file_name`` is kept as it is.

:func:`read_splits` reads and checks them all before anything is written, and every error names
the file and the id: an image id in two splits, a part whose ``object_id`` names no object of its
split, a part on another image than its object, a part category whose object class is not a
category of the instance JSON, an image file that is not there.

Two released layouts are read into the same per-split JSONs: PartImageNet's folder
(:func:`partimagenet_splits`) and Pascal-Part's annotations in a VOC2010 folder
(:func:`pascal_part_splits`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from partdistill.data.images import DatasetError, _read_json, _validate_coco

__all__ = ["SPLITS", "CocoSplit", "partimagenet_splits", "pascal_part_splits", "read_splits", "split_files"]

SPLITS = ("train", "val", "test")  # the data artifact hides parts_{split}.json of each from training stages


@dataclass
class CocoSplit:
    """One split: its files, and its JSONs with every ``file_name`` made absolute."""

    name: str
    instances_path: Path
    root: Path
    parts_path: Path | None = None
    instances: dict[str, Any] = field(default_factory=dict)
    parts: dict[str, Any] | None = None

    def files(self) -> list[Path]:
        return [self.instances_path] + ([self.parts_path] if self.parts_path is not None else [])


def split_files(cfg: Mapping[str, Any]) -> list[CocoSplit]:
    """The splits ``data.coco`` names, in the order given (files not read yet).

    Raises:
        DatasetError: no instance JSON, a part JSON or a root for a split without an instance
            JSON, or a setting of the wrong kind.
    """
    instances, parts, root = cfg.get("instances"), cfg.get("parts"), cfg.get("root")
    default_split = cfg.get("split") or "val"
    if default_split not in SPLITS:
        raise DatasetError(f"data.coco.split {default_split!r} is not one of {', '.join(SPLITS)}")
    if not instances:
        raise DatasetError("data.coco.instances is not set: give a COCO instance JSON, or "
                           "dict(train=..., val=...) with one per split")
    inst = _per_split("instances", instances, default_split)
    prt = _per_split("parts", parts, default_split) if parts else {}
    for split in prt:
        if split not in inst:
            raise DatasetError(f"data.coco.parts names split {split!r}, which data.coco.instances lacks "
                               f"(it has {sorted(inst)})")
    roots = root if isinstance(root, Mapping) else None
    if roots is not None:
        for split in roots:
            if split not in inst:
                raise DatasetError(f"data.coco.root names split {split!r}, which data.coco.instances lacks "
                                   f"(it has {sorted(inst)})")
    elif root is not None and not isinstance(root, str | os.PathLike):
        raise DatasetError(f"data.coco.root must be a folder, a dict of one per split, or None; got {root!r}")
    out = []
    for split, path in inst.items():
        given = roots.get(split) if roots is not None else root
        folder = Path(given).expanduser() if given else path.parent
        out.append(CocoSplit(split, path, folder, prt.get(split)))
    return out


def _per_split(key: str, value: Any, default_split: str) -> dict[str, Path]:
    if isinstance(value, str | os.PathLike):
        return {default_split: Path(value).expanduser()}
    if isinstance(value, Mapping) and value:
        out = {}
        for split, path in value.items():
            if not isinstance(split, str) or not split or not isinstance(path, str | os.PathLike) or not path:
                raise DatasetError(f"data.coco.{key}: expected dict(split=path, ...), got {split!r}: {path!r}")
            if split not in SPLITS:
                raise DatasetError(f"data.coco.{key}: split {split!r} is not one of {', '.join(SPLITS)}")
            out[split] = Path(path).expanduser()
        return out
    raise DatasetError(f"data.coco.{key} must be a JSON path or dict(train=..., val=...), got {value!r}")


def read_splits(cfg: Mapping[str, Any], check_images: bool = True) -> list[CocoSplit]:
    """Read and check every file ``data.coco`` names; see the module docstring for the checks.

    Raises:
        DatasetError: naming the file and the id.
    """
    splits = split_files(cfg)
    seen_images: dict[int, tuple[str, Path]] = {}
    for s in splits:
        data = _read_json(s.instances_path)
        images = _validate_coco(s.instances_path, data, need_masks=False)
        for image_id in sorted(images):
            if image_id in seen_images:
                other, path = seen_images[image_id]
                raise DatasetError(
                    f"{s.instances_path}: image id {image_id} is also in {path} (split {other!r}); image ids "
                    "must be unique across splits, or the splits' objects would mix")
            seen_images[image_id] = (s.name, s.instances_path)
        s.instances = _absolute(data, s.root)
        if check_images:
            _check_images(s.instances_path, s.instances, s.root)
        if s.parts_path is not None:
            s.parts = _absolute(_check_parts(s.parts_path, s.instances_path, data), s.root)
    return splits


def _absolute(data: dict[str, Any], root: Path) -> dict[str, Any]:
    """The JSON with every image's ``file_name`` resolved against ``root`` (absolute ones kept)."""
    images = []
    for im in data.get("images", []):
        name = Path(str(im["file_name"])).expanduser()
        images.append({**im, "file_name": str(name if name.is_absolute() else (root / name).resolve())})
    return {**data, "images": images}


def _check_images(json_path: Path, data: dict[str, Any], root: Path) -> None:
    missing = [im for im in data["images"] if not Path(im["file_name"]).is_file()]
    if missing:
        first = ", ".join(f"id {im['id']}: {im['file_name']}" for im in missing[:3])
        raise DatasetError(
            f"{json_path}: {len(missing)} of {len(data['images'])} image files are missing ({first}). Relative "
            f"file_names are read from {root}; set data.coco.root (one folder, or dict(train=..., val=...)) "
            "to the folder they are relative to")


def _check_parts(parts_path: Path, instances_path: Path, instances: dict[str, Any]) -> dict[str, Any]:
    """Read a part JSON and check it against its split's instance JSON."""
    data = _read_json(parts_path)
    _validate_coco(parts_path, data, need_masks=False)
    classes = {c["name"] for c in instances.get("categories", [])}
    for i, c in enumerate(data.get("categories", [])):
        sup = c.get("supercategory")
        if not isinstance(sup, str) or not sup:
            raise DatasetError(f"{parts_path}: categories[{i}] (id {c['id']}, {c['name']!r}): field 'supercategory' "
                               f"(its object class) must be a non-empty string, got {sup!r}")
        if sup not in classes:
            raise DatasetError(
                f"{parts_path}: part category id {c['id']} ({c['name']!r}) has object class {sup!r}, which is "
                f"not a category of {instances_path} (it has {sorted(classes)})")
    objects = {a["id"]: a for a in instances.get("annotations", [])}
    for i, a in enumerate(data.get("annotations", [])):
        where = f"{parts_path}: annotations[{i}] (id {a['id']})"
        if "object_id" not in a:
            raise DatasetError(f"{where}: missing field 'object_id' (the id of its object in {instances_path})")
        obj = objects.get(a["object_id"])
        if obj is None:
            raise DatasetError(f"{where}: object_id {a['object_id']!r} names no object of {instances_path}")
        if a["image_id"] != obj["image_id"]:
            raise DatasetError(f"{where}: image_id {a['image_id']} differs from its object's ({obj['image_id']}, "
                               f"object id {a['object_id']} in {instances_path})")
    return data


def fingerprint(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What a COCO data version covers beyond the config: every JSON it reads (path, size, mtime)
    and every image root (resolved). Image files themselves are listed by the JSONs."""
    try:
        splits = split_files(cfg)
    except DatasetError:
        return {}  # the stage says what is wrong
    files, roots = [], {}
    for s in splits:
        roots[s.name] = str(s.root.resolve())
        for path in s.files():
            if path.is_file():
                st = path.stat()
                files.append(f"{s.name}:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return {"files": files, "roots": roots} if files else {}


def partimagenet_splits(root: Path | str, check_images: bool = True) -> list[CocoSplit]:
    """A folder in PartImageNet's released layout as per-split instance and part JSONs.

    ``{root}/{split}.json`` (COCO, every annotation a *part*, every part category's
    ``supercategory`` its object class) with the images under ``{root}/{split}/``, for each split
    of train, val and test that has a JSON. The format has no object annotations: an object is
    the union of an image's parts of one object class (as :func:`partdistill.evaluation.loaders.partimagenet`
    reads it), with an id of its own; each part gets that ``object_id``. Object classes are
    numbered in the order the part categories first name them. Image ids are kept when they are
    unique across the splits, else each split's are offset by ``10_000_000 × its index``.
    Crowd parts are skipped. Images are decoded one at a time.

    Raises:
        DatasetError: no split JSON, a malformed JSON, a part category without a string
            ``supercategory``, a missing image file; naming the file and the id.
    """
    from partdistill.data.images import decode_segmentation
    from partdistill.storage import mask_to_rle

    root = Path(root).expanduser()
    found = [(s, root / f"{s}.json") for s in SPLITS if (root / f"{s}.json").is_file()]
    if not found:
        raise DatasetError(f"{root}: no PartImageNet split JSON ({', '.join(f'{s}.json' for s in SPLITS)})")
    datas = []
    for _, path in found:
        data = _read_json(path)
        _validate_coco(path, data, need_masks=True)
        datas.append(data)
    ids = [{im["id"] for im in d["images"]} for d in datas]
    collide = any(ids[i] & ids[j] for i in range(len(ids)) for j in range(i))
    classes: list[str] = []
    for (_, path), data in zip(found, datas, strict=True):
        for i, c in enumerate(data.get("categories", [])):
            sup = c.get("supercategory")
            if not isinstance(sup, str) or not sup:
                raise DatasetError(f"{path}: categories[{i}] (id {c['id']}, {c['name']!r}): field 'supercategory' "
                                   f"(its object class) must be a non-empty string, got {sup!r}")
            if sup not in classes:
                classes.append(sup)
    object_categories = [{"id": i + 1, "name": name, "supercategory": "object"} for i, name in enumerate(classes)]
    out, next_object = [], 1
    for n, ((split, path), data) in enumerate(zip(found, datas, strict=True)):
        offset = 10_000_000 * n if collide else 0
        folder = root / split
        object_class = {c["id"]: c["supercategory"] for c in data.get("categories", [])}
        by_image: dict[int, list[dict[str, Any]]] = {}
        for a in data.get("annotations", []):
            if not a.get("iscrowd", 0):
                by_image.setdefault(a["image_id"], []).append(a)
        images, objects, parts = [], [], []
        for im in sorted(data["images"], key=lambda im: im["id"]):
            image_id = int(im["id"]) + offset
            images.append({**im, "id": image_id})
            h, w = int(im["height"]), int(im["width"])
            per_class: dict[str, list[tuple[dict[str, Any], Any]]] = {}
            for a in sorted(by_image.get(im["id"], []), key=lambda a: a["id"]):
                mask = decode_segmentation(a["segmentation"], h, w)
                if mask.any():
                    per_class.setdefault(object_class[a["category_id"]], []).append((a, mask))
            for name in sorted(per_class):
                union = per_class[name][0][1].copy()
                for _, m in per_class[name][1:]:
                    union |= m
                ys, xs = union.nonzero()
                bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                        float(ys.max() - ys.min() + 1)]
                objects.append({"id": next_object, "image_id": image_id, "category_id": classes.index(name) + 1,
                                "segmentation": mask_to_rle(union), "area": int(union.sum()), "bbox": bbox,
                                "iscrowd": 0})
                for a, m in per_class[name]:
                    parts.append({**a, "image_id": image_id, "object_id": next_object,
                                  "segmentation": mask_to_rle(m), "area": int(m.sum())})
                next_object += 1
        instances = _absolute({"images": images, "annotations": objects, "categories": object_categories}, folder)
        if check_images:
            _check_images(path, instances, folder)
        part_json = _absolute({"images": images, "annotations": parts, "categories": data.get("categories", [])},
                              folder)
        out.append(CocoSplit(split, path, folder, path, instances, part_json))
    return out


def partimagenet_fingerprint(root: Path | str | None) -> dict[str, Any]:
    """The split JSONs of a PartImageNet folder (path, size, mtime) and the folder."""
    if not root or not Path(root).expanduser().is_dir():
        return {}
    root = Path(root).expanduser().resolve()
    files = []
    for s in SPLITS:
        path = root / f"{s}.json"
        if path.is_file():
            st = path.stat()
            files.append(f"{s}:{path}:{st.st_size}:{st.st_mtime_ns}")
    return {"files": files, "root": str(root)} if files else {}


PASCAL_PART_SPLITS = {"train": "train", "val": "val"}  # our split -> VOC2010 image set (ImageSets/Main/{set}.txt)


def _pascal_part_lists(root: Path, splits: Mapping[str, str] | None) -> list[tuple[str, Path]]:
    """``(our split, its image-set file)`` of ``data.pascalpart.splits``, checked (files not read)."""
    given = splits or PASCAL_PART_SPLITS  # None or dict(): VOC2010's own train and val
    if not isinstance(given, Mapping):
        raise DatasetError(f"data.pascalpart.splits must be dict(train='train', val='val') (our split: its VOC "
                           f"image set), got {given!r}")
    out = []
    for split, image_set in given.items():
        if split not in SPLITS:
            raise DatasetError(f"data.pascalpart.splits: split {split!r} is not one of {', '.join(SPLITS)}")
        if not isinstance(image_set, str) or not image_set or "/" in image_set or "\\" in image_set:
            raise DatasetError(f"data.pascalpart.splits.{split} must be the name of a VOC image set "
                               f"(ImageSets/Main/<name>.txt, e.g. 'val'), got {image_set!r}")
        out.append((split, root / "ImageSets" / "Main" / f"{image_set}.txt"))
    return out


def pascal_part_splits(root: Path | str, splits: Mapping[str, str] | None = None,
                       progress: Any = None) -> list[CocoSplit]:
    """A VOC2010 folder with Pascal-Part's annotations as per-split instance and part JSONs.

    ``root`` is read as :func:`partdistill.evaluation.loaders.pascal_part` reads it:
    ``{root}/ImageSets/Main/{set}.txt`` (VOC image ids), ``{root}/JPEGImages/{id}.jpg`` and
    ``{root}/Annotations_Part/{id}.mat`` (the per-image MATLAB files of the Pascal-Part release,
    copied or linked into the VOC folder). ``splits`` maps each of our splits to its VOC image set
    (None or ``dict()``: ``dict(train='train', val='val')``, VOC2010's own split, which Pascal-Part
    follows).

    Every object of a ``.mat`` is an object, its object mask the segmentation, those with an object
    mask only (boat, chair, ...) too; objects with an empty mask are skipped. Object categories are
    the classes present in any split, sorted (VOC's order), the same list in every split. Parts are
    Pascal-Part's fine parts merged into the coarse ones of
    :data:`~partdistill.evaluation.loaders.PASCAL_PART_MERGE` exactly as the evaluation loader merges
    them: the pieces of one coarse part are one annotation, clipped to its object, with the object's
    ``object_id``; empty ones are left out. Part categories are those of the present classes, in
    class order then the loader's part order (so an overlap labels as the loader's), each with its
    class as ``supercategory``. ``image_id`` is the VOC id's digits (``2008_000123`` -> 2008000123);
    ``file_name`` the image's absolute path. Each ``.mat`` is decoded and encoded one at a time.

    Args:
        progress: a :class:`partdistill.progress.ProgressSink` to count the images on, or None.

    Raises:
        DatasetError: no ``Annotations_Part`` or ``JPEGImages`` folder, a split setting of the wrong
            kind, a missing image-set file (naming it and the setting), an image id listed twice (in
            one file or two), a listed image without a ``.mat``, a ``.mat`` that cannot be read or
            lacks a field, a part name Pascal-Part does not have, a mask whose shape differs from
            its image's; naming the file.
        ImageLoadError: a listed image that is missing or unreadable.
    """
    from partdistill.evaluation.loaders import (
        PASCAL_PART_MERGE,
        _read_split,
        pascal_part_categories,
        pascal_part_image,
    )
    from partdistill.progress import NullProgress

    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"data.pascalpart.root: {root} is not a folder (the VOC2010 folder with JPEGImages/, "
                           "ImageSets/Main/ and Pascal-Part's Annotations_Part/)")
    for folder, what in (("Annotations_Part", "Pascal-Part's per-image .mat files: copy or link the release's "
                                              "Annotations_Part/ into the VOC folder"),
                         ("JPEGImages", "the VOC2010 images")):
        if not (root / folder).is_dir():
            raise DatasetError(f"data.pascalpart.root: {root} has no {folder}/ folder ({what})")
    lists = _pascal_part_lists(root, splits)
    listed: list[tuple[str, Path, list[tuple[int, str]]]] = []
    seen: dict[str, str] = {}
    for split, path in lists:
        if not path.is_file():
            raise DatasetError(f"data.pascalpart.splits.{split}: image-set file {path} does not exist (VOC2010's "
                               "ImageSets/Main/ lists each split's image ids, one a line)")
        lines = _read_split(path)
        for line_no, voc_id in lines:
            where = f"{path}: line {line_no}"
            if voc_id in seen:
                raise DatasetError(f"{where}: image {voc_id} is also listed at {seen[voc_id]}; an image "
                                   "belongs to one split")
            seen[voc_id] = where
        listed.append((split, path, lines))

    categories = pascal_part_categories()
    part_index = {c: {name: i for i, name in enumerate(names)} for c, names in categories.items()}
    read: list[tuple[str, Path, list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]] = []
    next_object = next_part = 1
    sink = progress if progress is not None else NullProgress()
    with sink.task("data: reading Pascal-Part", total=sum(len(lines) for _, _, lines in listed)) as bar:
        for split, path, lines in listed:
            images, objects, parts = [], [], []
            for line_no, voc_id in lines:
                file_name, (h, w), annotated = pascal_part_image(root, voc_id, f"{path}: line {line_no}",
                                                                 PASCAL_PART_MERGE, part_index)
                image_id = int(voc_id.replace("_", ""))
                images.append({"id": image_id, "file_name": str((root / file_name).resolve()), "width": w,
                               "height": h})
                for class_name, mask, labelled in annotated:
                    if not mask.any():
                        continue
                    objects.append({"id": next_object, "image_id": image_id, "category_id": class_name,
                                    **_mask_fields(mask)})
                    merged: dict[int, Any] = {}
                    for pid, pm in labelled:
                        pm = pm & mask
                        merged[pid] = merged[pid] | pm if pid in merged else pm
                    for pid in sorted(merged):
                        if merged[pid].any():
                            parts.append({"id": next_part, "image_id": image_id, "category_id": (class_name, pid),
                                          "object_id": next_object, **_mask_fields(merged[pid])})
                            next_part += 1
                    next_object += 1
                bar.advance(1)
            read.append((split, path, images, objects, parts))

    classes = sorted({a["category_id"] for _, _, _, objects, _ in read for a in objects})
    object_categories = [{"id": i + 1, "name": name, "supercategory": "object"} for i, name in enumerate(classes)]
    part_categories: list[dict[str, Any]] = []
    part_id: dict[tuple[str, int], int] = {}
    for class_name in classes:
        for i, name in enumerate(categories.get(class_name, [])):
            part_id[class_name, i] = len(part_categories) + 1
            part_categories.append({"id": len(part_categories) + 1, "name": name, "supercategory": class_name})
    out = []
    for split, path, images, objects, parts in read:
        for a in objects:
            a["category_id"] = classes.index(a["category_id"]) + 1
        for a in parts:
            a["category_id"] = part_id[a["category_id"]]
        instances = {"images": images, "annotations": objects, "categories": object_categories}
        part_json = {"images": images, "annotations": parts, "categories": part_categories}
        out.append(CocoSplit(split, path, root / "JPEGImages", None, instances, part_json))
    return out


def _mask_fields(mask: Any) -> dict[str, Any]:
    """A non-empty bool (H, W) mask as COCO annotation fields: RLE, area, bbox."""
    from partdistill.storage import mask_to_rle

    ys, xs = mask.nonzero()
    return {"segmentation": mask_to_rle(mask), "area": int(mask.sum()), "iscrowd": 0,
            "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]}


def pascal_part_fingerprint(root: Path | str | None, splits: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Every file a Pascal-Part source reads (path, size, mtime, hashed: one entry per file would be
    tens of thousands): the image-set files, and the ``.mat`` and image of every listed id; and the
    folder."""
    from partdistill.evaluation.loaders import _read_split

    if not root or not Path(root).expanduser().is_dir():
        return {}
    root = Path(root).expanduser().resolve()
    try:
        lists = _pascal_part_lists(root, splits)
    except DatasetError:
        return {}  # the stage says what is wrong
    import hashlib

    h, files = hashlib.sha256(), 0

    def add(tag: str, path: Path) -> None:
        nonlocal files
        try:
            st = path.stat()
        except OSError:
            return
        h.update(f"{tag}:{path}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        files += 1

    for split, path in lists:
        add(split, path)
        try:
            lines = _read_split(path) if path.is_file() else []
        except DatasetError:
            lines = []
        for _, voc_id in lines:
            add(split, root / "Annotations_Part" / f"{voc_id}.mat")
            add(split, root / "JPEGImages" / f"{voc_id}.jpg")
    return {"files": files, "files_sha256": h.hexdigest(), "root": str(root)} if files else {}
