"""Few-shot fine-tuning on labelled parts: the paper's Table 4 protocol on a pipeline's store.

A part model is trained, supervised, on a small labelled subset of the target data and scored on
its val split. Two starting points are compared: the distilled part model (``init='distill'``:
the last `distill` round, everything whose name and shape fit; the class head is new) and the
teacher (``init='teacher'``: its backbone, pixel decoder and transformer decoder, the paper's
"Instance Seg." baseline). Both keep the teacher's backbone and pixel decoder frozen, as the
stages do, so the comparison is about what the part decoder starts from.

Training data: a seeded random ``ceil(fraction × n)`` (at least 1) of the n labelled train images
(``parts_train.json``), with every part of every object as a target, clipped to its object; label
= the part category's index 0..P-1 in ``parts_train.json``'s categories (sorted by id), so the
model has P part classes shared by no object class (num_classes = P, no class conditioning).
Augmentation and schedule are the `distill` stage's (:func:`~partdistill.models.train_parts.
training_config`: flip, large-scale jitter; optimizer and loss weights of the distill artifact),
except that no part is dropped for its size (``min_part_fraction=0``): these are labels, not
noisy pseudo-parts.

Evaluation, on the val split with the GT object masks (``load_gt_objects``), one forward pass per
image:

- AR@1/10/200: every query, binarised at ``mask_threshold``, clipped to the object, ranked by its
  score 1 − P(no-object) (:func:`~partdistill.evaluation.parts_eval.query_proposals`);
- the label map: each object pixel takes the category of its most confident query (argmax over
  queries of mask probability × the query's best class probability, no threshold);
  ``C-mIoU``/``A-mIoU`` (majority and Hungarian mapping, grouped by object class) exactly as the
  `evaluate` stage scores the distilled model (:func:`~partdistill.evaluation.parts_eval.
  score_method`), and ``mIoU``: the identity mapping (the predicted category taken as is), the
  IoU of each GT part category over all val objects, averaged over the categories present.

Reads, from one artifact store: `data` (images, ``instances_*.json``, ``parts_train.json`` and
``parts_val.json``: the part ground truth, evaluation-only for the pipeline, is training data
here), `teacher`, and a `distill_r{n}` artifact, whose manifest names the `data` and `teacher` it
was made from (``init='teacher'`` without a distill artifact uses the newest teacher and its data).
Writes, into ``out``:

- ``checkpoint.pth``  {state_dict, meta}: the fine-tuned PartModel (meta: init, fraction, part
  categories by class index)
- ``model.json``      its PartModel config (:func:`~partdistill.stages.proposals.load_part_model`
  rebuilds the model from the folder)
- ``metrics.json``    what was trained on and how, and the val metrics (fractions in [0, 1])
- ``losses.json``     the training loss per iteration
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from partdistill.progress import NullProgress, ProgressSink
from partdistill.storage import Artifact, ArtifactNotFound, ArtifactStore, mask_to_rle, rle_to_mask, write_json_atomic

INITS = ("distill", "teacher")
# The class head: its classes mean something else in every source (object classes for the
# teacher, part clusters for the distilled model), so it always starts fresh.
CLASS_HEAD = ("decoder.head.cls_embed.", "panoptic_head.cls_embed.")
AR_KS = (1, 10, 200)
RUN_COMMAND = "partdistill run CONFIG --until distill"


class FinetuneError(ValueError):
    """A fine-tuning request the store or its data cannot serve; the message says what to do."""


@dataclass
class Sources:
    """The artifacts one fine-tuning reads."""

    data: Artifact
    teacher: Artifact
    distill: Artifact | None    # the distilled model (None: a teacher-only store, init='teacher')
    settings: dict[str, Any]    # the `distill` config section: model size, augmentation, optimizer

    @property
    def description(self) -> str:
        made = f"{self.distill.stage}/{self.distill.version}" if self.distill else "no distill artifact"
        return f"data/{self.data.version}, teacher/{self.teacher.version}, {made}"


@dataclass
class Finetuned:
    out: Path
    metrics: dict[str, Any]


# ---------------------------------------------------------------------------------------- inputs
def check_fraction(fraction: float) -> float:
    if not 0.0 < float(fraction) <= 1.0:
        raise FinetuneError(f"fraction must be in (0, 1] (0.01 for 1% of the labelled images), got {fraction}")
    return float(fraction)


def find_sources(store_root: str | Path, init: str, distill: str | Path | None = None) -> Sources:
    """The data, teacher and distill artifacts of a store. ``distill``: a reference as
    :func:`~partdistill.predict.resolve_model` reads it (default: the newest distill artifact).
    ``init='teacher'`` works without a distill artifact (unless one is named): then the newest
    teacher and the data it was trained on."""
    from partdistill.config import schema
    from partdistill.predict import ModelNotFound, resolve_model

    if init not in INITS:
        raise FinetuneError(f"init must be one of {INITS}, got {init!r}")
    store = ArtifactStore(store_root)
    if not store.root.is_dir():
        raise FinetuneError(f"no artifact store at {store.root}: make one with `{RUN_COMMAND}` "
                            "(runtime.store, or --store, names it)")
    artifact: Artifact | None = None
    try:
        artifact, _ = resolve_model(store.root, distill)
    except ModelNotFound as err:
        if distill is not None:
            # resolve_model speaks of predict's --model; here the option is --distill
            what = f"--distill {distill}: {str(err).removeprefix(f'--model {distill!r}: ')}"
        else:
            what = f"the store {store.root} has no complete `distill` artifact (distill_r1, ...)"
        if init == "distill" or distill is not None:
            raise FinetuneError(f"{what}. Fine-tuning from the distilled model needs stage `distill`: "
                                f"run `{RUN_COMMAND}`") from None
    try:
        if artifact is not None:
            inputs = artifact.manifest["inputs"]
            teacher = store.open("teacher", inputs["teacher"])
            data = store.open("data", inputs["data"])
            settings = artifact.manifest["config"]
        else:
            versions = store.versions("teacher")
            if not versions:
                raise FinetuneError(f"the store {store.root} has no complete `teacher` artifact (nor a `distill` one): "
                                    f"fine-tuning from the teacher needs stages `data` and `teacher`; run "
                                    f"`{RUN_COMMAND}` (the distill comparison needs the whole pipeline)")
            teacher = store.open("teacher", versions[-1])
            data = store.open("data", teacher.manifest["inputs"]["data"])
            # a teacher made before some distill settings existed records fewer of them
            settings = _overlay(schema()["distill"], teacher.manifest["merged_config"].get("distill", {}))
    except (ArtifactNotFound, KeyError) as err:
        raise FinetuneError(f"the store {store.root} lacks an artifact the fine-tuning needs ({err}): run "
                            f"`{RUN_COMMAND}`") from None
    for split in ("train", "val"):
        if f"parts_{split}.json" not in data.files:
            raise FinetuneError(f"the data artifact {data.path} has no part labels parts_{split}.json: few-shot "
                                "fine-tuning needs a data set with part ground truth for its train and val splits "
                                "(Parts World, PartImageNet, Pascal-Part)")
    return Sources(data, teacher, artifact, dict(settings))


def part_categories(data_dir: Path) -> list[dict[str, Any]]:
    """The part categories of ``parts_train.json``, sorted by id: list index = class index."""
    cats = json.loads((data_dir / "parts_train.json").read_text())["categories"]
    return sorted(cats, key=lambda c: c["id"])


def few_shot_images(image_ids: Sequence[int], fraction: float, seed: int) -> list[int]:
    """A seeded random ``ceil(fraction × n)`` (at least 1) of ``image_ids``, sorted."""
    ids = sorted({int(i) for i in image_ids})
    if not ids:
        raise FinetuneError("no labelled training image to draw from")
    # rounded first: 0.1 × 70 is 7.000000000000001 in floating point, and must stay 7
    n = max(1, math.ceil(round(check_fraction(fraction) * len(ids), 9)))
    chosen = np.random.default_rng(seed).choice(ids, size=n, replace=False)
    return sorted(int(i) for i in chosen)


def labelled_records(data_dir: Path, image_ids: Sequence[int],
                     categories: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """PartsDataset entries of the chosen train images: every object's GT parts, clipped to the
    object, labelled with their category's index in ``categories``."""
    from partdistill.stages.proposals import training_records

    inst = json.loads((data_dir / "instances_train.json").read_text())
    parts = json.loads((data_dir / "parts_train.json").read_text())
    chosen = set(image_ids)
    images = {im["id"]: im for im in inst["images"]}
    index = {c["id"]: i for i, c in enumerate(categories)}
    objects, object_masks = [], {}
    for a in inst["annotations"]:
        if a["image_id"] in chosen:
            im = images[a["image_id"]]
            object_masks[a["id"]] = rle_to_mask(a["segmentation"])
            objects.append({"instance_id": a["id"], "image_id": a["image_id"], "split": "train",
                            "file_name": im["file_name"], "area": int(object_masks[a["id"]].sum()),
                            "height": im["height"], "width": im["width"]})
    rows = []
    for p in parts["annotations"]:
        if p["object_id"] in object_masks:
            mask = rle_to_mask(p["segmentation"]) & object_masks[p["object_id"]]
            rows.append({"instance_id": p["object_id"], "rle": mask_to_rle(mask)["counts"], "area": int(mask.sum()),
                         "height": mask.shape[0], "width": mask.shape[1], "label": index[p["category_id"]],
                         "part": p["id"]})
    records, _ = training_records(objects, rows, data_dir, ["train"], min_object_fraction=0.0)
    return records


# ---------------------------------------------------------------------------------------- model
def model_spec(sources: Sources, num_classes: int) -> dict[str, Any]:
    """The PartModel config: the distill stage's decoder, with ``num_classes`` part classes."""
    from mmengine.config import Config

    from partdistill.models.part_model import model_config

    s = sources.settings
    lw = s["loss_weights"]
    teacher = Config.fromfile(str(sources.teacher.file("mmdet_config.py")))
    return model_config(teacher.model.to_dict(), num_queries=int(s["num_queries"]), num_points=int(s["num_points"]),
                        num_classes=int(num_classes), cls_weight=lw["cls"], mask_weight=lw["mask"],
                        dice_weight=lw["dice"], no_object_weight=lw["no_object"],
                        importance_sample_ratio=s["importance_sample_ratio"],
                        freeze_pixel_decoder=s["freeze_pixel_decoder"])


def init_checkpoint(sources: Sources, init: str) -> Path:
    """The checkpoint the fine-tuning starts from."""
    from partdistill.stages.teacher import teacher_checkpoint

    if init == "distill":
        if sources.distill is None:
            raise FinetuneError(f"init='distill' needs a distill artifact: run `{RUN_COMMAND}`")
        return sources.distill.file("checkpoint.pth")
    return teacher_checkpoint(sources.teacher)


def initial_state(model: Any, checkpoint: Path) -> tuple[dict[str, Any], list[str]]:
    """(the model's starting state dict, the keys left at their own initialisation): every
    tensor of ``checkpoint`` whose name and shape fit (:func:`~partdistill.models.part_model.
    teacher_init_state`), but never the class head."""
    from partdistill.models.part_model import teacher_init_state
    from partdistill.models.teacher import load_state_dict

    source = {k: v for k, v in load_state_dict(checkpoint).items() if not k.startswith(CLASS_HEAD)}
    return teacher_init_state(model, source)


def build_model(spec: Mapping[str, Any], init_weights: bool = True) -> Any:
    """A PartModel from its config; ``init_weights``: run its own initialisation (skip it when a
    full state dict follows)."""
    from mmdet.registry import MODELS

    import partdistill.models.part_model  # noqa: F401  (registers PartModel)
    from partdistill.models.teacher import register_mmdet

    register_mmdet()
    model = MODELS.build(dict(spec))
    if init_weights:
        model.init_weights()
    return model


# ---------------------------------------------------------------------------------------- evaluation
def identity_miou(gt: Sequence[np.ndarray], pred: Sequence[np.ndarray], num_classes: int) -> dict[str, Any]:
    """mIoU with predicted class ids read as GT ids. gt, pred: per object int arrays of the same
    shape (class index, < 0: unlabelled in gt, no prediction in pred); pixels unlabelled in gt
    are ignored. Returns {"mIoU": mean over the classes present in gt, "per_class": [IoU or
    None]}."""
    g = np.concatenate([np.asarray(a).ravel() for a in gt]).astype(np.int64) if gt else np.zeros(0, np.int64)
    p = np.concatenate([np.asarray(a).ravel() for a in pred]).astype(np.int64) if pred else np.zeros(0, np.int64)
    keep = g >= 0
    g, p = g[keep], p[keep]
    gt_area = np.bincount(g, minlength=num_classes)
    pred_area = np.bincount(p[p >= 0], minlength=num_classes)
    inter = np.bincount(g[g == p], minlength=num_classes)
    present = gt_area > 0
    iou = inter / np.maximum(gt_area + pred_area - inter, 1)
    per_class = [float(v) if ok else None for v, ok in zip(iou, present, strict=True)]
    return {"mIoU": float(iou[present].mean()) if present.any() else float("nan"), "per_class": per_class}


def object_label_map(masks: np.ndarray, class_scores: np.ndarray, object_mask: np.ndarray) -> np.ndarray:
    """int32 (H, W): each object pixel's class, that of its most confident query (argmax over
    queries of mask probability × best class probability); -1 outside the object.
    masks: float (Q, H, W); class_scores: float (Q, P + 1), the last column no-object."""
    probs = class_scores[:, :-1]
    conf = masks * probs.max(1)[:, None, None]
    return np.where(object_mask, probs.argmax(1)[conf.argmax(0)], -1).astype(np.int32)


def evaluate(model: Any, data_dir: Path, categories: Sequence[Mapping[str, Any]], split: str = "val",
             device: str = "cpu", mask_threshold: float = 0.5, progress: ProgressSink | None = None) -> dict[str, Any]:
    """AR@k, C-/A-mIoU (majority, Hungarian) and identity mIoU of a model with P = len(categories)
    part classes on the GT objects of ``split`` (see the module docstring)."""
    from partdistill.data.images import load_rgb
    from partdistill.evaluation.parts_eval import ObjectPrediction, query_proposals, score_method
    from partdistill.evaluation.premise import load_gt_objects
    from partdistill.models.part_model import predict_parts

    objects = load_gt_objects(data_dir, split)
    if not objects:
        raise FinetuneError(f"no object with part labels in split {split!r} of {data_dir}")
    index = {int(c["id"]): i for i, c in enumerate(categories)}
    class_ids = {n: i for i, n in enumerate(sorted({o.class_name for o in objects}))}
    by_image: dict[str, list[int]] = {}
    for i, o in enumerate(objects):
        by_image.setdefault(o.file_name, []).append(i)
    preds: list[ObjectPrediction] = [ObjectPrediction(None) for _ in objects]
    progress = progress or NullProgress()
    model.eval()
    with progress.task("finetune: evaluating", total=len(by_image)) as bar:
        for name in sorted(by_image):
            # one image per call: padding to a batch's largest image would change the prediction
            out = predict_parts(model, [load_rgb(data_dir / name)], device)[0]
            masks, scores = out["masks"].cpu().numpy(), out["scores"].cpu().numpy()
            class_scores = out["class_scores"].cpu().numpy()
            for i in by_image[name]:
                props = query_proposals(masks, scores, objects[i].mask, mask_threshold)
                preds[i] = ObjectPrediction(object_label_map(masks, class_scores, objects[i].mask), props.proposals,
                                            props.scores)
            bar.advance(1)
    # the GT as class indices; part ids the categories don't list are unlabelled
    lookup = np.full(max(index, default=0) + 2, -1, np.int64)
    for cid, i in index.items():
        lookup[cid] = i
    gt = [np.where(o.part_labels >= 0, lookup[np.clip(o.part_labels, 0, len(lookup) - 1)], -1)[o.mask]
          for o in objects]
    scored = score_method(objects, preds, True, class_ids, AR_KS)
    identity = identity_miou(gt, [p.label_map[o.mask] for p, o in zip(preds, objects, strict=True)], len(categories))
    return {"split": split, "objects": len(objects), "images": len(by_image),
            **{f"AR@{k}": scored[f"AR@{k}"] for k in AR_KS},
            "mIoU": identity["mIoU"], "C-mIoU": scored["C-mIoU"], "A-mIoU": scored["A-mIoU"],
            "C-mIoU (Hungarian)": scored["C-mIoU (Hungarian)"], "A-mIoU (Hungarian)": scored["A-mIoU (Hungarian)"],
            "per_category_IoU": {c["name"]: v for c, v in zip(categories, identity["per_class"], strict=True)
                                 if v is not None}}


# ---------------------------------------------------------------------------------------- the run
def finetune(
    store: str | Path,
    fraction: float,
    init: str,
    distill: str | Path | None = None,
    iters: int = 200,
    seed: int = 0,
    out: str | Path | None = None,
    device: str = "cpu",
    lr: float | None = None,
    progress: ProgressSink | None = None,
) -> Finetuned:
    """Fine-tune a part model on ``fraction`` of the labelled train images, from ``init``
    ('distill' or 'teacher'), for ``iters`` iterations, and score it on the val split. ``out``
    (default ``finetune/{init}_{fraction}_seed{seed}``) receives the files the module docstring
    lists; an earlier run's files there are replaced. ``lr``: the peak learning rate (default the
    distill stage's; the paper tunes it for its fine-tuning)."""
    import torch

    from partdistill.models.teacher import check_and_load
    from partdistill.models.train_parts import training_config
    from partdistill.models.train_teacher import save_checkpoint, train

    fraction = check_fraction(fraction)
    if int(iters) < 1:
        raise FinetuneError(f"iters must be at least 1, got {iters}")
    sources = find_sources(store, init, distill)
    out = Path(out) if out is not None else Path("finetune") / f"{init}_{fraction:g}_seed{seed}"
    progress = progress or NullProgress()
    start = time.monotonic()
    data_dir = sources.data.path
    categories = part_categories(data_dir)
    labelled = [im["id"] for im in json.loads((data_dir / "parts_train.json").read_text())["images"]]
    chosen = few_shot_images(labelled, fraction, seed)
    records = labelled_records(data_dir, chosen, categories)
    if not records:
        raise FinetuneError(f"the {len(chosen)} chosen train image(s) have no part labels in {data_dir}")

    spec = model_spec(sources, len(categories))
    source = init_checkpoint(sources, init)
    torch.manual_seed(int(seed))  # the fresh class head's initialisation: the same seed, the same run
    state, fresh = initial_state(build_model(spec), source)
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)  # always a fresh run: a stale runner would resume it
    work.mkdir(parents=True)
    write_json_atomic(work / "parts.json", records)
    torch.save({"state_dict": state}, work / "init.pth")
    s, opt = sources.settings, sources.settings["optimizer"]
    lr = float(opt["lr"] if lr is None else lr)
    rcfg = training_config(
        spec, work / "parts.json", work / "runner", work / "init.pth", image_size=s["image_size"],
        max_iters=int(iters), batch_size=int(s["batch_size"]), lr=lr, weight_decay=opt["weight_decay"],
        clip_grad=opt["clip_grad"], scale_range=s["scale_range"], flip=bool(s["flip"]), min_part_fraction=0.0,
        seed=int(seed), checkpoint_interval=int(iters), amp=device == "cuda")
    with progress.task(f"finetune {init} {fraction:g}: training", total=int(iters)) as bar:
        result = train(rcfg, on_iter=lambda i, loss: bar.advance(1), device=device)
    train_seconds = time.monotonic() - start
    shutil.rmtree(work, ignore_errors=True)

    names = [{"id": int(c["id"]), "name": c["name"]} for c in categories]
    meta = {"init": init, "init_checkpoint": str(source), "fraction": fraction, "seed": int(seed),
            "iters": result["iters"], "part_categories": names, "fresh_keys": fresh}
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / "checkpoint.pth", result["state_dict"], meta)
    write_json_atomic(out / "model.json", spec)
    write_json_atomic(out / "losses.json", result["losses"])

    model = build_model(spec, init_weights=False)
    check_and_load(model, result["state_dict"], out / "checkpoint.pth")
    model = model.to(device).eval()
    eval_start = time.monotonic()
    scores = evaluate(model, data_dir, categories, "val", device, float(s["label"]["mask_threshold"]), progress)
    losses = result["losses"]
    metrics = {
        "fraction": fraction, "init": init, "seed": int(seed), "iters": result["iters"],
        "images": len(chosen), "labelled_images": len(labelled), "image_ids": chosen,
        "parts": sum(len(r["instances"]) for r in records),
        "AR@200": scores["AR@200"], "mIoU": scores["mIoU"], "C-mIoU": scores["C-mIoU"],
        "seconds": round(time.monotonic() - start, 1),
        "seconds_train": round(train_seconds, 1), "seconds_evaluate": round(time.monotonic() - eval_start, 1),
        "val": scores,
        "loss": {"first": _mean(losses[:10]), "last": _mean(losses[-10:])},
        "sources": {"data": sources.data.version, "teacher": sources.teacher.version,
                    "distill": f"{sources.distill.stage}/{sources.distill.version}" if sources.distill else None,
                    "init_checkpoint": str(source)},
        "fresh_keys": fresh,
        "training": {"batch_size": int(s["batch_size"]), "image_size": list(s["image_size"]), "lr": lr,
                     "scale_range": list(s["scale_range"]), "flip": bool(s["flip"]),
                     "num_queries": int(s["num_queries"]), "device": device},
        "part_categories": names,
    }
    write_json_atomic(out / "metrics.json", _finite(metrics))
    return Finetuned(out, metrics)


def _overlay(defaults: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    """``given`` over ``defaults``, nested dicts merged key by key."""
    out = dict(defaults)
    for key, value in given.items():
        out[key] = _overlay(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) \
            else value
    return out


def _mean(values: Sequence[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return round(float(np.mean(finite)), 4) if finite else None


def _finite(node: Any) -> Any:
    """NaN → None, so metrics.json is strict JSON."""
    if isinstance(node, dict):
        return {k: _finite(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_finite(v) for v in node]
    if isinstance(node, float) and math.isnan(node):
        return None
    return node
