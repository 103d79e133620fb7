"""Part segmentation of new images with a trained `distill` model (paper §4.3 at test time).

The pipeline's last model segments the parts of objects it is told about. Here the objects come
from the teacher the model was distilled with, filtered as the `instances` stage filters them
(:func:`~partdistill.stages.instances.select`, with the `instances` section recorded in the
distill artifact); each object's parts are read off the class-conditioned model as the distill
stage labels them (:func:`~partdistill.stages.distill.object_parts`, with the `distill.label`
thresholds of that artifact). With ``instances.source='gt'`` the pipeline trained on ground-truth
objects; new images have none, so prediction always uses the teacher.

Reads, from one artifact store: a `distill_r{n}` artifact (``checkpoint.pth``, ``model.json``) and
the `teacher` and `ranking` artifacts its manifest names. Writes nothing; :func:`write_predictions`
(the ``partdistill predict`` command) writes ``predictions.json`` and ``overlays/<name>.png``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from partdistill.storage import Artifact, ArtifactNotFound, ArtifactStore

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_ROUND = re.compile(r"^distill_r(\d+)$")


class ModelNotFound(ValueError):
    """A distill artifact reference that names no complete `distill_r{n}` artifact."""


@dataclass
class Part:
    """One part of one object: a part cluster of the object's class."""

    cluster: int
    score: float
    mask: np.ndarray  # bool (H, W), inside the object's mask


@dataclass
class ObjectParts:
    """A teacher detection and the parts the distill model found in it."""

    class_id: int
    class_name: str
    score: float
    mask: np.ndarray  # bool (H, W)
    parts: list[Part] = field(default_factory=list)


@dataclass
class ImageParts:
    height: int
    width: int
    objects: list[ObjectParts]

    def label_maps(self) -> list[np.ndarray]:
        """int32 (H, W) per object: its parts' cluster ids, -1 elsewhere (for ``parts_overlay``)."""
        maps = []
        for obj in self.objects:
            lm = np.full((self.height, self.width), -1, np.int32)
            for p in obj.parts:
                lm[p.mask] = p.cluster
            maps.append(lm)
        return maps


@dataclass
class PathPrediction:
    """The prediction for one image file; ``parts`` is None when the file could not be read."""

    path: Path
    parts: ImageParts | None
    error: str | None = None


def overlay(image: np.ndarray, parts: ImageParts) -> np.ndarray:
    """uint8 (H, W, 3): the image with each object's parts coloured by cluster id."""
    from partdistill.evaluation.overlays import parts_overlay

    return parts_overlay(image, parts.label_maps())


def find_images(inputs: Iterable[str | Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Image files named by ``inputs``: files as given, folders searched recursively for
    IMAGE_EXTENSIONS (any case), sorted. Returns (files, [(input, reason)] for inputs that are
    neither)."""
    files: list[Path] = []
    missing: list[tuple[Path, str]] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                            and p.is_file() and not p.name.startswith("."))
        elif item.exists():
            files.append(item)
        else:
            missing.append((item, "no such file or folder"))
    return list(dict.fromkeys(files)), missing


def resolve_model(store_root: str | Path, model: str | Path | None = None) -> tuple[Artifact, str]:
    """The distill artifact a reference names, and how it was chosen.

    ``model``: an artifact folder (``STORE/distill_r1/<version>``; its store is the folder two
    levels up), ``distill_rN/<version>`` or ``distill_rN`` (its newest version) in ``store_root``,
    or None: the newest complete ``distill_r*`` artifact in the store (the latest created, the
    higher round on a tie)."""
    if model is None:
        store = ArtifactStore(store_root)
        found = [(store.open(s, v), s) for s in store.stages() if _ROUND.match(s) for v in store.versions(s)]
        if not found:
            raise ModelNotFound(f"no complete distill_r* artifact in the store {store.root}: run the pipeline "
                                "up to 'distill' first, or name one with --model")
        artifact = max(found, key=lambda a: (a[0].manifest["created"], int(_ROUND.match(a[1]).group(1))))[0]
        return artifact, f"{artifact.stage}/{artifact.version} (the newest distill artifact in {store.root})"
    path = Path(model)
    if (path / "manifest.json").is_file():
        store, stage, version = ArtifactStore(path.resolve().parents[1]), path.resolve().parent.name, path.name
    else:
        store = ArtifactStore(store_root)
        stage, _, version = str(model).strip("/").partition("/")
        if not _ROUND.match(stage):
            raise ModelNotFound(f"--model {model!r}: not an artifact folder, nor 'distill_rN/<version>' "
                                f"in the store {store.root}")
        if not version:
            versions = store.versions(stage)
            if not versions:
                raise ModelNotFound(f"--model {model!r}: no complete {stage} artifact in the store {store.root}")
            version = versions[-1]
    if not _ROUND.match(stage):
        raise ModelNotFound(f"--model {model!r}: {stage}/{version} is not a distill artifact (distill_rN)")
    try:
        artifact = store.open(stage, version)
    except ArtifactNotFound as err:
        known = ", ".join(f"{s}/{v}" for s in store.stages() if _ROUND.match(s) for v in store.versions(s))
        raise ModelNotFound(f"--model {model!r}: {err}; distill artifacts there: {known or 'none'}") from None
    return artifact, f"{stage}/{version}"


class Predictor:
    """A distill model with its teacher, ready to segment parts in new images.

    Build with :meth:`from_store`; thresholds default to those the distill artifact was made with."""

    def __init__(self, model: Any, teacher: Any, artifact: Artifact, k: int, device: str = "cpu",
                 instances: Mapping[str, Any] | None = None, label: Mapping[str, Any] | None = None,
                 batch_size: int = 4, description: str = "", class_names: Sequence[str] | None = None):
        from partdistill.config import max_pixels

        self.model, self.teacher, self.artifact, self.k, self.device = model, teacher, artifact, k, device
        merged = artifact.manifest.get("merged_config") or {}
        self.instances = dict(instances or merged["instances"])
        self.label = dict(label or artifact.manifest["config"]["label"])
        self.batch_size = batch_size
        self.max_pixels = max_pixels(merged)  # larger images are skipped, as the `instances` stage skips them
        self.description = description or f"{artifact.stage}/{artifact.version}"
        spec = json.loads(artifact.file("model.json").read_text())
        self.object_classes = int(spec["num_classes"]) // int(spec["parts_per_class"])
        # the run's class numbering (its `instances` artifact's): the model's class slices follow it,
        # whatever order the teacher's labels come in; a teacher's class is matched to it by name
        self.class_names = list(class_names) if class_names is not None else list(teacher.class_names)
        self.class_ids = {name: i for i, name in enumerate(self.class_names)}

    @classmethod
    def from_store(cls, store_root: str | Path, model: str | Path | None = None, device: str = "cpu",
                   **thresholds: float) -> Predictor:
        """``model``: see :func:`resolve_model`. ``thresholds``: ``score_threshold``,
        ``mask_threshold`` or ``min_fraction`` overriding the artifact's ``distill.label`` ones.
        Raises ModelNotFound for a reference that names no distill artifact."""
        from partdistill.stages.proposals import load_part_model
        from partdistill.stages.ranking import read_classes
        from partdistill.stages.teacher import load_teacher

        artifact, description = resolve_model(store_root, model)
        store = ArtifactStore(artifact.path.parents[1])
        inputs = artifact.manifest["inputs"]
        for needed in ("teacher", "ranking"):
            if needed not in inputs:
                raise ModelNotFound(f"{description}: its manifest names no {needed!r} input")
        try:
            teacher_artifact = store.open("teacher", inputs["teacher"])
            ranking = store.open("ranking", inputs["ranking"])
        except ArtifactNotFound as err:
            raise ModelNotFound(f"{description}: {err}") from None
        unknown = set(thresholds) - {"score_threshold", "mask_threshold", "min_fraction"}
        if unknown:
            raise TypeError(f"unknown threshold(s): {', '.join(sorted(unknown))}")
        merged = artifact.manifest.get("merged_config") or {}
        label = {**artifact.manifest["config"]["label"], **thresholds}
        teacher = load_teacher(teacher_artifact, device, (merged.get("teacher") or {}).get("resize_long_side"))
        k = int(read_classes(ranking)["k"])
        return cls(load_part_model(artifact, device), teacher, artifact, k, device, label=label,
                   batch_size=int(merged.get("instances", {}).get("batch_size", 4)), description=description,
                   class_names=_run_classes(store, inputs, teacher_artifact, description))

    # ------------------------------------------------------------------------------------ objects
    def detect(self, images: Sequence[np.ndarray]) -> list[list[Any]]:
        """The teacher's objects per image, filtered as the `instances` stage does: a list of
        :class:`~partdistill.stages.instances.Detection` by descending score."""
        from partdistill.stages.instances import Detection, select

        cfg = self.instances
        out = []
        names = self.teacher.class_names
        for pred in self.teacher.predict(list(images), layers=()):
            found = [Detection(m, float(s), self.class_ids.get(names[int(c)], -1), names[int(c)])
                     for m, s, c in zip(pred.masks, pred.scores, pred.labels, strict=True)]
            # the head has slices for the classes the pipeline saw; any other class has no parts
            found = [d for d in found if 0 <= d.class_id < self.object_classes]
            out.append(select(found, cfg["score_threshold"], cfg["topk_per_image"], cfg["min_object_fraction"]))
        return out

    # ------------------------------------------------------------------------------------ parts
    def predict(self, images: Sequence[np.ndarray]) -> list[ImageParts]:
        """images: RGB uint8 (H, W, 3), any sizes. Returns one ImageParts per image, its objects
        by descending score, each object's parts by cluster id."""
        from partdistill.models.part_model import predict_objects
        from partdistill.stages.distill import object_parts

        results: list[ImageParts] = []
        lab = self.label
        for start in range(0, len(images), self.batch_size):
            batch = [np.asarray(im) for im in images[start:start + self.batch_size]]
            for im in batch:
                if im.ndim != 3 or im.shape[2] != 3 or im.dtype != np.uint8:
                    raise ValueError(f"expected RGB uint8 (H, W, 3) images, got {im.dtype} {im.shape}")
            detections = self.detect(batch)
            # one model call per image (or per object crop, for a model trained on crops): padding a
            # small image to a larger one's size would change its prediction with the company it keeps
            for img, dets in zip(batch, detections, strict=True):
                objects = [ObjectParts(d.class_id, d.class_name, d.score, d.mask) for d in dets]
                if dets:
                    masks, classes = [d.mask for d in dets], [d.class_id for d in dets]
                    preds = predict_objects(self.model, img, masks, self.device, classes)
                    for o, (obj, pred) in enumerate(zip(objects, preds, strict=True)):
                        same = [j for j, p in enumerate(preds) if p is pred]
                        found = object_parts(pred["masks"].cpu().numpy(), pred["class_scores"].cpu().numpy(),
                                             [masks[j] for j in same], [classes[j] for j in same], self.k,
                                             lab["score_threshold"], lab["mask_threshold"], lab["min_fraction"],
                                             lab.get("score", "class"))[same.index(o)]
                        obj.parts = [Part(p["cluster"], p["score"], p["mask"]) for p in found]
                results.append(ImageParts(img.shape[0], img.shape[1], objects))
        return results

    def iter_paths(self, paths: Iterable[str | Path]) -> Iterator[tuple[PathPrediction, np.ndarray | None]]:
        """(prediction, the RGB image or None) per path, in order; an unreadable file gives a
        PathPrediction with ``error`` (``ImageLoadError``'s reason) and no parts."""
        from partdistill.data.images import ImageLoadError, load_rgb

        pending: list[tuple[Path, np.ndarray]] = []

        def flush() -> Iterator[tuple[PathPrediction, np.ndarray]]:
            for (path, img), parts in zip(pending, self.predict([img for _, img in pending]), strict=True):
                yield PathPrediction(path, parts), img
            pending.clear()

        for path in map(Path, paths):
            try:
                pending.append((path, load_rgb(path, self.max_pixels)))
            except ImageLoadError as err:
                yield from flush()  # keep the output in input order
                yield PathPrediction(path, None, err.reason), None
                continue
            if len(pending) >= self.batch_size:
                yield from flush()
        yield from flush()

    def predict_paths(self, paths: Iterable[str | Path]) -> list[PathPrediction]:
        return [p for p, _ in self.iter_paths(paths)]

    # ------------------------------------------------------------------------------------ COCO
    def categories(self) -> list[dict[str, Any]]:
        """COCO categories of the part labels: id = class_id × k + cluster."""
        return [{"id": c * self.k + cl, "name": f"{name}/part{cl}", "supercategory": name}
                for c, name in enumerate(self.class_names[:self.object_classes]) for cl in range(self.k)]

    def to_coco(self, results: Sequence[ImageParts], image_ids: Sequence[int]) -> list[dict[str, Any]]:
        """COCO results, one per part: image_id, object_id (the object's index in its image),
        category_id (class_id × k + cluster), object_class, part_cluster, segmentation (RLE, str
        counts), score (the part's), area, bbox (x, y, w, h)."""
        return to_coco(results, image_ids, self.k)


def _run_classes(store: ArtifactStore, inputs: Mapping[str, str], teacher: Artifact, description: str) -> list[str]:
    """The class numbering of the run a distill artifact belongs to: its `instances` artifact's."""
    from partdistill.stages.instances import read_object_classes

    try:
        instances = store.open("instances", inputs["instances"])
        data = store.open("data", inputs["data"]) if "data" in inputs else None
    except (KeyError, ArtifactNotFound) as err:
        raise ModelNotFound(f"{description}: its instances artifact is not in the store ({err})") from None
    return read_object_classes(instances, data, teacher)


def to_coco(results: Sequence[ImageParts], image_ids: Sequence[int], k: int) -> list[dict[str, Any]]:
    """See :meth:`Predictor.to_coco`."""
    from partdistill.storage import mask_to_rle

    out = []
    for image_id, res in zip(image_ids, results, strict=True):
        for o, obj in enumerate(res.objects):
            for p in obj.parts:
                out.append({"image_id": int(image_id), "object_id": o, "category_id": obj.class_id * k + p.cluster,
                            "object_class": obj.class_id, "part_cluster": p.cluster,
                            "segmentation": mask_to_rle(p.mask), "score": round(float(p.score), 6),
                            "area": int(p.mask.sum()), "bbox": _bbox(p.mask)})
    return out


def coco_objects(results: Sequence[ImageParts], image_ids: Sequence[int]) -> list[dict[str, Any]]:
    """The objects the parts belong to: image_id, object_id, class_id, class_name, score,
    segmentation (RLE), area, bbox."""
    from partdistill.storage import mask_to_rle

    return [{"image_id": int(image_id), "object_id": o, "class_id": obj.class_id, "class_name": obj.class_name,
             "score": round(float(obj.score), 6), "segmentation": mask_to_rle(obj.mask),
             "area": int(obj.mask.sum()), "bbox": _bbox(obj.mask)}
            for image_id, res in zip(image_ids, results, strict=True) for o, obj in enumerate(res.objects)]


def _bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


@dataclass
class PredictionSummary:
    images: int
    objects: int
    parts: int
    failed: list[tuple[Path, str]]
    path: Path


@dataclass
class GivenObject:
    """An object mask given with an image (the paper's GT-object setting): its annotation id in a
    COCO JSON, its class name and bool (H, W) mask."""

    object_id: int
    class_name: str
    mask: np.ndarray


@dataclass
class CocoInput:
    """The images of a COCO JSON (:func:`coco_input`): files, their COCO ids and, when asked, their
    objects."""

    paths: list[Path]
    image_ids: dict[Path, int]
    objects: dict[Path, list[GivenObject]] | None = None


def coco_input(json_path: str | Path, image_root: str | Path | None = None, with_objects: bool = False) -> CocoInput:
    """The images of a COCO instance JSON: ``file_name`` relative to ``image_root`` (default: the
    JSON's folder), an absolute one as it is; with ``with_objects``, its object masks.

    Raises:
        DatasetError: a malformed JSON, naming the file and the field.
    """
    from partdistill.data.images import coco_images, coco_instance_masks

    records = coco_images(json_path, image_root)
    paths = [Path(r.path) for r in records]
    ids = {Path(r.path): r.image_id for r in records}
    if not with_objects:
        return CocoInput(paths, ids)
    masks = coco_instance_masks(json_path)
    objects = {Path(r.path): [GivenObject(g.annotation_id, g.category_name, g.mask) for g in masks[r.image_id]]
               for r in records}
    return CocoInput(paths, ids, objects)


class _GivenTeacher:
    """Stands in for the teacher: the given objects of the image being predicted."""

    def __init__(self, class_names: Sequence[str]):
        self.class_names = list(class_names)
        self.current: list[GivenObject] = []

    def predict(self, images: Sequence[np.ndarray], layers: Sequence[str] = ()) -> list[Any]:
        from partdistill.models.teacher import TeacherOutput

        outs = []
        for img in images:
            for o in self.current:
                if o.class_name not in self.class_names:
                    self.class_names.append(o.class_name)  # not the run's: detect drops it (no part logits)
            outs.append(TeacherOutput(
                [o.mask for o in self.current], np.ones(len(self.current), np.float32),
                np.array([self.class_names.index(o.class_name) for o in self.current], np.int64), {},
                img.shape[:2]))
        return outs


def _iter_given(predictor: Predictor, paths: Sequence[Path], objects: Mapping[Path, Sequence[GivenObject]]
                ) -> Iterator[tuple[PathPrediction, np.ndarray | None, list[int]]]:
    """Like :meth:`Predictor.iter_paths`, on the given objects instead of the teacher's, all of them
    (no score, top-k or size filter); also yields each output object's ``object_id``."""
    from partdistill.data.images import ImageLoadError, load_rgb

    given = _GivenTeacher(predictor.class_names)
    teacher, settings = predictor.teacher, predictor.instances
    predictor.teacher = given
    predictor.instances = {**settings, "score_threshold": 0.0, "topk_per_image": 2**31, "min_object_fraction": 0.0}
    try:
        for path in map(Path, paths):
            try:
                img = load_rgb(path, predictor.max_pixels)
            except ImageLoadError as err:
                yield PathPrediction(path, None, err.reason), None, []
                continue
            mine = list(objects.get(path, []))
            wrong = [o for o in mine if o.mask.shape != img.shape[:2]]
            if wrong:
                yield PathPrediction(path, None, f"object {wrong[0].object_id}'s mask is {wrong[0].mask.shape} (H, W), "
                                                 f"the image {img.shape[:2]}"), None, []
                continue
            given.current = mine
            [parts] = predictor.predict([img])
            unused = list(mine)
            ids = []
            for obj in parts.objects:  # the objects come back in the given order, those of the run's classes
                match = next(o for o in unused if o.mask is obj.mask or np.array_equal(o.mask, obj.mask))
                unused.remove(match)
                ids.append(match.object_id)
            yield PathPrediction(path, parts), img, ids
    finally:
        predictor.teacher, predictor.instances = teacher, settings


def write_predictions(predictor: Predictor, paths: Sequence[Path], out: Path,
                      on_image: Callable[[PathPrediction], None] | None = None,
                      image_ids: Mapping[Path, int] | None = None,
                      objects: Mapping[Path, Sequence[GivenObject]] | None = None) -> PredictionSummary:
    """Predict ``paths`` and write ``out/predictions.json`` and ``out/overlays/<name>.png``.

    predictions.json: {model, images: [{id, file_name, height, width, overlay}], categories,
    objects: :func:`coco_objects`, annotations: :meth:`Predictor.to_coco` rows with an ``id``,
    object_ids, failed: [{file_name, error}]}; ``images``/``categories``/``annotations`` make it
    loadable with pycocotools' ``COCO``, and ``annotations`` is a COCO results list. Image ids are
    ``image_ids[path]`` (a COCO JSON's ids, :func:`coco_input`) or positions in ``paths`` from 1, so
    an id names the same file whether or not other files failed.

    ``objects``: given object masks per path, used instead of the teacher's (the GT-object setting);
    then an object's ``object_id`` is its annotation id and ``object_ids`` is ``"annotation"``
    (``partdistill score`` matches parts to objects by it), else ``object_id`` is the object's
    index in its image and ``object_ids`` is ``"index"``."""
    from partdistill.evaluation.overlays import save_png
    from partdistill.storage import write_json_atomic

    out.mkdir(parents=True, exist_ok=True)
    (out / "overlays").mkdir(exist_ok=True)
    ids = dict(image_ids) if image_ids is not None else {Path(p): i for i, p in enumerate(paths, start=1)}
    images, objs, annotations, failed, names = [], [], [], [], set()
    stream = (_iter_given(predictor, paths, objects) if objects is not None
              else ((pred, img, None) for pred, img in predictor.iter_paths(paths)))
    for pred, img, object_ids in stream:
        image_id = ids[pred.path]
        if pred.parts is None:
            failed.append((pred.path, pred.error or "unreadable"))
        else:
            name = pred.path.stem if pred.path.stem not in names else f"{pred.path.stem}-{image_id}"
            names.add(name)
            save_png(out / "overlays" / f"{name}.png", overlay(img, pred.parts))
            images.append({"id": image_id, "file_name": str(pred.path), "height": pred.parts.height,
                           "width": pred.parts.width, "overlay": f"overlays/{name}.png"})
            found, parts = coco_objects([pred.parts], [image_id]), predictor.to_coco([pred.parts], [image_id])
            if object_ids is not None:
                for row in found + parts:
                    row["object_id"] = object_ids[row["object_id"]]
            objs += found
            annotations += parts
        if on_image is not None:
            on_image(pred)
    for i, a in enumerate(annotations, start=1):
        a["id"] = i
    write_json_atomic(out / "predictions.json", {
        "model": f"{predictor.artifact.stage}/{predictor.artifact.version}", "images": images,
        "categories": predictor.categories(), "objects": objs, "annotations": annotations,
        "object_ids": "annotation" if objects is not None else "index",
        "object_classes": predictor.class_names[:predictor.object_classes], "k": predictor.k,
        "failed": [{"file_name": str(p), "error": e} for p, e in failed]})
    return PredictionSummary(len(images), len(objs), len(annotations), failed, out / "predictions.json")
