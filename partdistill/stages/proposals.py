"""Stage `proposals`: the class-agnostic part decoder and its self-training rounds (paper §4.2, Fig. 3).

Round 1 trains a :class:`~partdistill.models.part_model.PartModel` (frozen teacher backbone and
pixel decoder, a Mask2Former transformer decoder with one class, "part") on the mined parts;
round n > 1 trains the next student on what round n − 1's model found, starting from that model
(the teacher of self-training is the previous student's snapshot, paper §3). Each round is its
own artifact, ``proposals_r{n}``, so a failed round reruns alone and asking for more rounds keeps
the finished ones.

Training data: the instances of ``train_splits`` whose mask covers at least
``min_object_fraction`` of the image, with their parts: the mined parts (round 1), or round
n − 1's pseudo-parts, plus, when ``carry_over_iou`` is set, each part round n − 1 trained on that
none of them overlaps at that IoU (:func:`carry_over`); after
flip and large-scale-jitter augmentation, parts under ``min_part_fraction`` of the image's summed
part area are dropped (the reference's filters).

Labelling: the trained model runs on every image that has instances (all splits). A query is kept
when its score is at least ``label.score_threshold`` and its mask (probability >
``label.mask_threshold``) overlaps an object; it goes to the object it overlaps with the highest
IoU (Eq. 1). Inside each object every pixel goes to its most confident kept query
(argmax of mask × score), so an object's pseudo-parts are disjoint and clipped to it; a segment
under ``label.min_fraction`` of the object's area is dropped.

Reads: `data` (images), `teacher` (its weights and config), `instances` (objects), `mining`
(round 1) or the previous round. Writes:

- ``checkpoint.pth``   {state_dict, meta}: the trained PartModel (tensors and built-ins only)
- ``model.json``       the PartModel config (:func:`load_part_model` rebuilds it)
- ``pseudo_parts_r{n}.parquet``  one row per pseudo-part: instance_id:int64, image_id:int64,
  split:str, query:int16, score:float32, rle:str (COCO counts of the full-image mask), area:int64,
  height:int32, width:int32, feature:list<float32> (the query's decoded feature, ``C`` values)
- ``targets.parquet``  (round n > 1 with ``carry_over_iou``) the parts the round trained on:
  instance_id, rle, area, height, width
- ``skipped.parquet``  instance_id, image_id, reason: training instances left out, and why
- ``metrics.json``     training-set counts, losses, timings, pseudo-part statistics
- ``losses.json``, ``loss.png``  the training curve; ``pseudo_parts.png`` a few labelled images
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from partdistill.models.object_crops import crop_settings
from partdistill.parallel import ShardDone, process_cached
from partdistill.stages.base import Stage, StageContext
from partdistill.storage import mask_to_rle, rle_to_mask, write_json_atomic, write_parquet

PSEUDO_SCHEMA = pa.schema([
    ("instance_id", pa.int64()), ("image_id", pa.int64()), ("split", pa.string()), ("query", pa.int16()),
    ("score", pa.float32()), ("rle", pa.string()), ("area", pa.int64()), ("height", pa.int32()),
    ("width", pa.int32()), ("feature", pa.list_(pa.float32())),
])
TARGET_SCHEMA = pa.schema([("instance_id", pa.int64()), ("rle", pa.string()), ("area", pa.int64()),
                           ("height", pa.int32()), ("width", pa.int32())])
SKIPPED_SCHEMA = pa.schema([("instance_id", pa.int64()), ("image_id", pa.int64()), ("reason", pa.string())])


class NoTrainingData(ValueError):
    """No instance of the training splits has a usable part: nothing to train on."""


def pseudo_parts_name(round_: int) -> str:
    return f"pseudo_parts_r{round_}.parquet"


# ---------------------------------------------------------------------------------------- data
def training_records(
    instances: Sequence[Mapping[str, Any]],
    parts: Sequence[Mapping[str, Any]],
    image_dir: Path,
    splits: Sequence[str],
    min_object_fraction: float,
    crop: Mapping[str, Any] | None = None,
    crop_dir: Path | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The PartsDataset entries (one per image with a usable instance) and the skipped instances.

    With ``crop`` (:func:`~partdistill.models.object_crops.crop_settings`) there is one entry per
    usable instance instead: its object-centric crop, written as a PNG into ``crop_dir``, with
    its own parts only (resized with it) and its own class.

    instances: `instances` rows (instance_id, image_id, split, file_name, area, height, width, and
    class_id: the image's ``object_classes``, which the distill head is conditioned on);
    parts: part rows (instance_id, rle, area, height, width, optional label: the training class,
    default 0 "part") — mined parts, pseudo-parts or labelled parts."""
    from partdistill.storage import rle_to_mask

    by_instance: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for p in parts:
        by_instance[int(p["instance_id"])].append(p)
    images: dict[int, dict[str, Any]] = {}
    skipped = []
    for inst in sorted(instances, key=lambda r: r["instance_id"]):
        if inst["split"] not in splits:
            continue
        h, w = int(inst["height"]), int(inst["width"])
        reason = None
        fraction = int(inst["area"]) / max(h * w, 1)
        if fraction < min_object_fraction:
            reason = f"object under min_object_fraction ({fraction:.3f} < {min_object_fraction})"
        elif not by_instance.get(int(inst["instance_id"])):
            reason = "no parts"
        if reason is not None:
            skipped.append({"instance_id": int(inst["instance_id"]), "image_id": int(inst["image_id"]),
                            "reason": reason})
            continue
        if crop:
            entry = _crop_entry(inst, by_instance[int(inst["instance_id"])], image_dir, crop, crop_dir)
            if entry["instances"]:
                images[len(images)] = entry
            else:
                skipped.append({"instance_id": int(inst["instance_id"]), "image_id": int(inst["image_id"]),
                                "reason": "no parts left in the crop"})
            continue
        entry = images.setdefault(int(inst["image_id"]), {
            "img_path": str(image_dir / inst["file_name"]), "img_id": int(inst["image_id"]),
            "height": h, "width": w, "object_classes": [], "instances": []})
        if "class_id" in inst and int(inst["class_id"]) not in entry["object_classes"]:
            entry["object_classes"].append(int(inst["class_id"]))
        for p in sorted(by_instance[int(inst["instance_id"])], key=lambda r: (r.get("part", 0), r.get("query", 0))):
            ys, xs = np.nonzero(rle_to_mask({"size": [h, w], "counts": p["rle"]}))
            if len(ys) == 0:
                continue
            entry["instances"].append({
                "bbox": [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)],
                "bbox_label": int(p.get("label", 0)), "mask": {"size": [h, w], "counts": p["rle"]},
                "ignore_flag": 0})
    records = [images[k] for k in sorted(images) if images[k]["instances"]]
    return records, skipped


def _crop_entry(inst: Mapping[str, Any], parts: Sequence[Mapping[str, Any]], image_dir: Path,
                crop: Mapping[str, Any], crop_dir: Path | None) -> dict[str, Any]:
    """The PartsDataset entry of one instance's object-centric crop (the crop PNG is written)."""
    from PIL import Image

    from partdistill.data.images import load_rgb
    from partdistill.models.object_crops import crop_image, crop_mask, object_box

    if crop_dir is None:
        raise ValueError("crop training needs a crop_dir to write the crops into")
    h, w = int(inst["height"]), int(inst["width"])
    box = object_box(rle_to_mask({"size": [h, w], "counts": inst["rle"]}), crop["size"], crop["margin"],
                     crop.get("box", "mask"))
    crop_dir.mkdir(parents=True, exist_ok=True)
    path = crop_dir / f"{int(inst['instance_id'])}.png"
    Image.fromarray(crop_image(load_rgb(image_dir / inst["file_name"]), box)).save(path)
    size = box.size
    entry: dict[str, Any] = {"img_path": str(path), "img_id": int(inst["instance_id"]), "height": size,
                             "width": size, "object_classes": [int(inst["class_id"])] if "class_id" in inst else [],
                             "instances": []}
    for p in sorted(parts, key=lambda r: (r.get("part", 0), r.get("query", 0))):
        m = crop_mask(rle_to_mask({"size": [h, w], "counts": p["rle"]}), box)
        ys, xs = np.nonzero(m)
        if len(ys) == 0:
            continue
        entry["instances"].append({
            "bbox": [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)],
            "bbox_label": int(p.get("label", 0)), "mask": mask_to_rle(m), "ignore_flag": 0})
    return entry


# ---------------------------------------------------------------------------------------- labelling
def label_image(
    masks: np.ndarray,
    scores: np.ndarray,
    objects: Sequence[np.ndarray],
    score_threshold: float,
    mask_threshold: float = 0.5,
    min_fraction: float = 0.05,
    max_fraction: float = 1.0,
    pixel_rule: str = "mask_score",
) -> list[list[tuple[int, np.ndarray]]]:
    """Pseudo-parts of one image's objects.

    masks: float (Q, H, W) mask probabilities; scores: float (Q,); objects: bool (H, W) masks.
    Returns per object a list of (query index, bool (H, W) segment): the queries this object wins
    by IoU (Eq. 1, :func:`~partdistill.models.ranking.associate`), each pixel of the object going
    to its most confident one (argmax of mask × score among queries whose mask covers it); a
    query scoring at most ``score_threshold`` or covering under ``min_fraction`` of the object
    is dropped, and so is one covering more than ``max_fraction`` of it
    (:func:`~partdistill.models.ranking.candidates`; ``pixel_rule='mask'``: the pixel goes to the
    query of highest mask probability among those scoring above the threshold). Segments are
    disjoint and inside the object."""
    from partdistill.models.ranking import associate, candidates

    out: list[list[tuple[int, np.ndarray]]] = [[] for _ in objects]
    if len(objects) == 0 or len(scores) == 0:
        return out
    owner = associate(masks, np.stack([np.asarray(o, bool) for o in objects]), mask_threshold)
    for o, omask in enumerate(objects):
        mine = np.nonzero(owner == o)[0]
        if len(mine) == 0:
            continue
        found = candidates(masks[mine], scores[mine], omask, score_threshold=score_threshold,
                           min_fraction=min_fraction, mask_threshold=mask_threshold, max_fraction=max_fraction,
                           pixel_rule=pixel_rule)
        out[o] = [(int(mine[q]), seg) for q, seg in zip(found.queries, found.segments, strict=True)]
    return out


def load_part_model(artifact: Any, device: str = "cpu"):
    """The trained PartModel of a `proposals_r{n}` (or `distill`) artifact, in eval mode."""
    from mmdet.registry import MODELS

    import partdistill.models.part_model  # noqa: F401  (registers PartModel)
    from partdistill.models.teacher import check_and_load, load_state_dict, register_mmdet

    register_mmdet()
    model = MODELS.build(json.loads(artifact.file("model.json").read_text()))
    path = artifact.file("checkpoint.pth")
    check_and_load(model, load_state_dict(path), path)
    # how the model was trained to see objects: their crops, or whole images (no file: whole images)
    inference = artifact.path / "inference.json"
    model.part_crop = crop_settings(json.loads(inference.read_text()).get("crop")) if inference.exists() else None
    return model.to(device).eval()


def proposal_labeller(cfg: Mapping[str, Any]) -> Callable[[Mapping[str, Any], Mapping[str, Any], list], list]:
    """PSEUDO_SCHEMA rows of one image: (prediction, image item, object masks) → rows."""
    lab = cfg["label"]

    def label(pred: Mapping[str, Any], item: Mapping[str, Any], objects: list[np.ndarray]) -> list[dict[str, Any]]:
        masks, scores = pred["masks"].cpu().numpy(), pred["scores"].cpu().numpy()
        feats = pred["query_features"].cpu().numpy()
        rows = []
        found = label_image(masks, scores, objects, lab["score_threshold"], lab["mask_threshold"], lab["min_fraction"],
                            lab.get("max_fraction", 1.0), lab.get("pixel_rule", "mask_score"))
        for inst, parts in zip(item["instances"], found, strict=True):
            for q, seg in parts:
                rows.append({"instance_id": int(inst["instance_id"]), "image_id": int(item["image_id"]),
                             "split": item["split"], "query": q, "score": float(scores[q]),
                             "rle": mask_to_rle(seg)["counts"], "area": int(seg.sum()),
                             "height": seg.shape[0], "width": seg.shape[1],
                             "feature": feats[q].astype(np.float32).tolist()})
        return rows

    return label


def label_images(model: Any, items: Sequence[Mapping[str, Any]], image_dir: Path, labeller: Callable,
                 device: str, batch_size: int, max_pixels: int | None = None) -> list[dict[str, Any]]:
    """Run the model on a group of images and label their objects. items: per image {file_name,
    image_id, split, instances: [`instances` rows]}; each image's metainfo carries its objects'
    classes (``object_classes``), which a class-conditioned model uses. A model with object
    crops (``part_crop``) runs on each object's crop, and each object is labelled alone from the
    queries of its own crop."""
    from partdistill.data.images import DEFAULT_MAX_PIXELS, load_rgb
    from partdistill.models.part_model import predict_objects, predict_parts

    limit = max_pixels or DEFAULT_MAX_PIXELS
    rows: list[dict[str, Any]] = []
    if getattr(model, "part_crop", None):
        for it in items:
            img = load_rgb(image_dir / it["file_name"], limit)
            objects = [rle_to_mask({"size": [int(r["height"]), int(r["width"])], "counts": r["rle"]})
                       for r in it["instances"]]
            preds = predict_objects(model, img, objects, device, [int(i["class_id"]) for i in it["instances"]],
                                    batch_size=batch_size)
            for inst, obj, pred in zip(it["instances"], objects, preds, strict=True):
                rows += labeller(pred, {**it, "instances": [inst]}, [obj])
        return rows
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        metas = [{"object_classes": sorted({int(i["class_id"]) for i in it["instances"]})} for it in batch]
        preds = predict_parts(model, [load_rgb(image_dir / it["file_name"], limit) for it in batch], device, metas)
        for it, pred in zip(batch, preds, strict=True):
            objects = [rle_to_mask({"size": [int(r["height"]), int(r["width"])], "counts": r["rle"]})
                       for r in it["instances"]]
            rows += labeller(pred, it, objects)
    return rows


# ---------------------------------------------------------------------------------------- training
def prepare_training(cfg: Mapping[str, Any], teacher: Any, records: list[dict[str, Any]], work: Path,
                     model_kwargs: Mapping[str, Any], init_from: Path, device: str = "cpu",
                     gpus: int = 1) -> tuple[Any, dict[str, Any], list[str]]:
    """The mmengine training config of one round's PartModel on ``records`` (PartsDataset
    entries), written into ``work``: (runner config, PartModel config, the keys left at their
    fresh initialisation). ``cfg``: a `proposals` / `distill` section; ``teacher``: the `teacher`
    artifact (its mmdet config); ``init_from``: the checkpoint the model starts from (a
    teacher's or a PartModel's: whatever fits is copied)."""
    import torch
    from mmdet.registry import MODELS
    from mmengine.config import Config

    import partdistill.models.part_model  # noqa: F401
    from partdistill.models.part_model import model_config, teacher_init_state
    from partdistill.models.teacher import load_state_dict, register_mmdet
    from partdistill.models.train_parts import has_checkpoint, training_config

    register_mmdet()
    tcfg = Config.fromfile(str(teacher.file("mmdet_config.py")))
    lw = cfg["loss_weights"]
    mcfg = model_config(tcfg.model.to_dict(), num_queries=int(cfg["num_queries"]), num_points=int(cfg["num_points"]),
                        cls_weight=lw["cls"], mask_weight=lw["mask"], dice_weight=lw["dice"],
                        no_object_weight=lw["no_object"], importance_sample_ratio=cfg["importance_sample_ratio"],
                        freeze_pixel_decoder=cfg["freeze_pixel_decoder"], **model_kwargs)
    work.mkdir(parents=True, exist_ok=True)
    ann = work / "parts.json"
    write_json_atomic(ann, records)
    init = work / "init.pth"
    fresh_file = work / "fresh_keys.json"  # kept beside the run, so that a resumed run reports them too
    if not has_checkpoint(work / "runner") or not fresh_file.exists():
        # the fresh decoder's initial weights come from the section's seed, not from whatever the
        # process drew before (shards run here or on a cluster: the same bytes either way)
        with torch.random.fork_rng():
            torch.manual_seed(int(cfg["seed"]))
            model = MODELS.build(mcfg)
            model.init_weights()
        state, fresh = teacher_init_state(model, load_state_dict(init_from))
        torch.save({"state_dict": state}, init)
        write_json_atomic(fresh_file, fresh)
    fresh: list[str] = json.loads(fresh_file.read_text())
    opt = cfg["optimizer"]
    crop = crop_settings(cfg.get("crop"))
    image_size = [crop["size"], crop["size"]] if crop else cfg["image_size"]
    scale_range = cfg["crop"]["scale_range"] if crop else cfg["scale_range"]
    rcfg = training_config(
        mcfg, ann, work / "runner", init, image_size=image_size, max_iters=int(cfg["max_iters"]),
        batch_size=int(cfg["batch_size"]), lr=opt["lr"], weight_decay=opt["weight_decay"],
        clip_grad=opt["clip_grad"], accumulate=int(cfg["accumulate"]), scale_range=scale_range,
        flip=bool(cfg["flip"]), min_part_fraction=cfg["min_part_fraction"], seed=int(cfg["seed"]),
        checkpoint_interval=int(cfg["checkpoint_interval"]), amp=device == "cuda",
        launcher="pytorch" if gpus > 1 else "none", warmup_iters=int(opt.get("warmup_iters", 50)),
        milestones=opt.get("milestones", (0.8, 0.9)))
    return rcfg, mcfg, fresh


def _train(ctx: StageContext, records: list[dict[str, Any]], work: Path, model_kwargs: Mapping[str, Any],
           init_from: Path) -> dict[str, Any]:
    """Train this round's PartModel (resuming from ``work``), starting from the checkpoint
    ``init_from``; returns {state_dict, losses, iters, model, fresh_keys, resumed_from}."""
    from partdistill.models.train_teacher import resume_iter, train

    cfg = ctx.config
    device = ctx.runtime.get("device", "cpu")
    gpus = int(ctx.runtime.get("gpus", 1))
    rcfg, mcfg, fresh = prepare_training(cfg, ctx.inputs["teacher"], records, work, model_kwargs, init_from,
                                         device, gpus)
    resumed_from = resume_iter(work / "runner")
    with ctx.progress.task(f"{ctx.stage} r{ctx.round}: training", total=int(cfg["max_iters"])) as bar:
        bar.advance(resumed_from)
        if gpus > 1:
            result = _train_distributed(rcfg, work, gpus)
            bar.advance(int(cfg["max_iters"]) - resumed_from)
        else:
            with ctx.training_threads():
                result = train(rcfg, on_iter=lambda i, loss: bar.advance(1), device=device)
    result.update(model=mcfg, fresh_keys=fresh, resumed_from=resumed_from)
    return result


def _train_distributed(rcfg: Any, work: Path, gpus: int) -> dict[str, Any]:
    """Data-parallel training: ``torchrun`` runs :mod:`partdistill.models.train_parts` on the dumped config."""
    import torch

    path = work / "runner_config.py"
    rcfg.dump(str(path))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
           "-m", "partdistill.models.train_parts", str(path), "--launcher", "pytorch"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"distributed training failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                           f"{proc.stderr[-4000:]}")
    runner_dir = Path(rcfg.work_dir)
    state = torch.load(runner_dir / "result.pth", map_location="cpu", weights_only=True)
    return {"state_dict": state["state_dict"], "iters": state["meta"]["iters"],
            "losses": json.loads((runner_dir / "losses.json").read_text())}


# ---------------------------------------------------------------------------------------- stage
TARGET_COLUMNS = ["instance_id", "rle", "area", "height", "width"]
TARGETS_FILE = "targets.parquet"


def carry_over(pseudo: Sequence[Mapping[str, Any]], previous: Sequence[Mapping[str, Any]],
               max_iou: float) -> list[dict[str, Any]]:
    """Round n's training parts: round n − 1's pseudo-parts, plus every part round n − 1 trained
    on that none of its instance's pseudo-parts overlaps at IoU >= ``max_iou``.

    Without it each round keeps only the parts its model scored above the label threshold, and
    the parts per object fall round after round (BENCHMARKS.md, "Self-training rounds"); a target
    the model missed stays a target until a prediction replaces it (the rule CutLER's
    self-training uses for its masks). Rows carry ``TARGET_COLUMNS``; the pseudo-parts come
    first, then the carried parts in their input order."""
    from pycocotools import mask as mask_utils

    def rle(row: Mapping[str, Any]) -> dict[str, Any]:
        return {"size": [int(row["height"]), int(row["width"])], "counts": row["rle"].encode()}

    found: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for row in pseudo:
        found[int(row["instance_id"])].append(rle(row))
    out = [{c: row[c] for c in TARGET_COLUMNS} for row in pseudo]
    for row in previous:
        mine = found.get(int(row["instance_id"]), [])
        if mine:
            best = float(np.max(mask_utils.iou([rle(row)], mine, [0] * len(mine))))
            if best >= max_iou:
                continue
        out.append({c: row[c] for c in TARGET_COLUMNS})
    return out


def _part_rows(ctx: StageContext) -> list[dict[str, Any]]:
    """This round's training parts: the mined parts (round 1); round n − 1's pseudo-parts, with
    what it trained on and did not find when ``carry_over_iou`` is set (round n > 1)."""
    import pyarrow.parquet as pq

    if ctx.round in (None, 1):
        return pq.read_table(ctx.inputs["mining"].path / "mined_parts").select(TARGET_COLUMNS).to_pylist()
    prev = ctx.inputs["proposals"]
    pseudo = pq.read_table(prev.file(pseudo_parts_name(ctx.round - 1))).select(TARGET_COLUMNS).to_pylist()
    max_iou = ctx.config.get("carry_over_iou")
    if max_iou is None:
        return pseudo
    if ctx.round == 2:
        previous = pq.read_table(ctx.inputs["mining"].path / "mined_parts")
    else:
        path = prev.file(TARGETS_FILE)
        if not path.exists():
            raise FileNotFoundError(f"{path}: round {ctx.round - 1} kept no training parts to carry over; it was "
                                    f"made with proposals.carry_over_iou unset: rerun it, or unset the key")
        previous = pq.read_table(path)
    rows = carry_over(pseudo, previous.select(TARGET_COLUMNS).to_pylist(), float(max_iou))
    write_parquet(ctx.writer.path / TARGETS_FILE, {c: [r[c] for r in rows] for c in TARGET_COLUMNS}, TARGET_SCHEMA)
    return rows


@dataclass
class RoundSpec:
    """What differs between a `proposals` round and a `distill` round."""

    parts: list[dict[str, Any]]        # training parts: instance_id, rle, area, height, width[, label]
    model_kwargs: dict[str, Any]       # PartModel arguments beyond the section's
    init_from: Path                    # the checkpoint the round starts from
    output: str                        # the labelled-parts file name
    schema: pa.Schema                  # its schema
    labeller: Callable                 # (prediction, image item, object masks) → rows
    hint: str                          # what to check when nothing is usable


def run(ctx: StageContext) -> dict[str, Any]:
    from partdistill.stages.teacher import teacher_checkpoint

    r = ctx.round or 1
    init = (teacher_checkpoint(ctx.inputs["teacher"]) if r == 1 or ctx.config["round_init"] == "teacher"
            else ctx.inputs["proposals"].file("checkpoint.pth"))
    return run_round(ctx, RoundSpec(_part_rows(ctx), {}, init, pseudo_parts_name(r), PSEUDO_SCHEMA,
                                    proposal_labeller(ctx.config),
                                    "the teacher's detections (instances.score_threshold) and the mined parts"))


def run_round(ctx: StageContext, spec: RoundSpec) -> dict[str, Any]:
    """Train one round's PartModel, then label every image that has instances."""
    import pyarrow.parquet as pq

    from partdistill.models.train_teacher import save_checkpoint
    from partdistill.stages.instances import read_instances
    from partdistill.stages.teacher import _plot_losses, _tail_mean

    cfg, r = ctx.config, ctx.round or 1
    out = ctx.writer.path
    data = ctx.inputs["data"]
    columns = ["instance_id", "image_id", "split", "file_name", "class_id", "class_name", "rle", "area", "height",
               "width"]
    instances = read_instances(ctx.inputs["instances"]).select(columns).to_pylist()
    times: dict[str, float] = {}

    # ---- train (one resumable step: the Runner resumes inside it; its marker skips it after)
    if not ctx.writer.shard_done("train"):
        start = time.monotonic()
        records, skipped = training_records(instances, spec.parts, data.path, cfg["train_splits"],
                                            cfg["min_object_fraction"], crop_settings(cfg.get("crop")),
                                            out / "work" / "crops")
        if not records:
            reasons = Counter(s["reason"].split(" (")[0] for s in skipped)
            raise NoTrainingData(
                f"{ctx.stage} round {r}: no usable instance to train on: {len(instances)} instances in the "
                f"`instances` artifact, {sum(1 for i in instances if i['split'] in cfg['train_splits'])} in splits "
                f"{list(cfg['train_splits'])}, skipped: {dict(reasons) or 'none'}. Check {spec.hint}, or lower "
                f"{ctx.stage}.min_object_fraction.")
        write_parquet(out / "skipped.parquet", {c: [s[c] for s in skipped] for c in SKIPPED_SCHEMA.names},
                      SKIPPED_SCHEMA)
        result = _train(ctx, records, out / "work", spec.model_kwargs, spec.init_from)
        save_checkpoint(out / "checkpoint.pth", result["state_dict"],
                             {"round": r, "iters": result["iters"], "fresh_keys": result["fresh_keys"]})
        write_json_atomic(out / "model.json", result["model"])
        write_json_atomic(out / "inference.json", {"crop": crop_settings(cfg.get("crop"))})
        write_json_atomic(out / "losses.json", result["losses"])
        _plot_losses(result["losses"], out / "loss.png")
        ctx.writer.complete_shard("train", ["checkpoint.pth", "model.json", "inference.json", "losses.json",
                                            "skipped.parquet"], meta={
            "images": len(records), "parts": sum(len(e["instances"]) for e in records),
            "instances_used": sum(1 for i in instances if i["split"] in cfg["train_splits"]) - len(skipped),
            "skipped": len(skipped), "skipped_reasons": dict(Counter(s["reason"].split(" (")[0] for s in skipped)),
            "iters": result["iters"], "resumed_from": result["resumed_from"],
            "seconds": round(time.monotonic() - start, 1)})
        shutil.rmtree(out / "work", ignore_errors=True)
    train_meta = ctx.writer.shard_meta("train")
    times["train"] = train_meta["seconds"]

    # ---- label every image that has instances, in resumable shards
    start = time.monotonic()
    by_image: dict[int, dict[str, Any]] = {}
    for inst in sorted(instances, key=lambda i: i["instance_id"]):
        by_image.setdefault(int(inst["image_id"]), {"image_id": int(inst["image_id"]), "file_name": inst["file_name"],
                                                    "split": inst["split"], "instances": []})["instances"].append(inst)
    items = [by_image[k] for k in sorted(by_image)]
    size = int(cfg["label"]["shard_images"])
    shards = [items[i:i + size] for i in range(0, len(items), size)]
    (out / "pseudo").mkdir(exist_ok=True)
    names = [f"pseudo-{index:05d}" for index in range(len(shards))]
    ctx.writer.plan_shards(["train", *names])
    todo = [i for i, name in enumerate(names) if not ctx.writer.shard_done(name)]
    # one job per unfinished shard: it runs here or on a cluster worker (runtime.task_runner), which
    # loads this round's model from the partial folder once
    jobs = [{"name": names[i], "items": shards[i], "image_dir": str(data.path), "labeller": spec.labeller,
             "schema": spec.schema, "device": ctx.runtime.get("device", "cpu"), "batch_size": int(cfg["batch_size"]),
             "max_pixels": ctx.max_pixels, "out": str(out)} for i in todo]
    with ctx.progress.task(f"{ctx.stage} r{r}: labelling", total=len(items)) as bar:
        bar.advance(len(items) - sum(len(shards[i]) for i in todo))
        for j, done in ctx.map_shards(label_shard, jobs, [f"{ctx.stage}-r{r}-{job['name']}" for job in jobs]):
            ctx.writer.complete_shard(done.name, done.files, meta=done.meta)
            bar.advance(len(jobs[j]["items"]))
    tables = [pq.read_table(out / "pseudo" / f"pseudo-{i:05d}.parquet") for i in range(len(shards))]
    table = pa.concat_tables(tables) if tables else spec.schema.empty_table()
    pq.write_table(table, out / spec.output)
    shutil.rmtree(out / "pseudo")
    times["label"] = round(time.monotonic() - start, 1)

    _preview(table, items, data.path, out / spec.output.replace(f"_r{r}.parquet", ".png"), ctx.max_pixels)
    losses = json.loads((out / "losses.json").read_text())
    per_instance = Counter(table.column("instance_id").to_pylist())
    scores = table.column("score").to_numpy() if table.num_rows else np.zeros(0)
    metrics = {
        "round": r,
        "train": {k: train_meta[k] for k in ("images", "parts", "instances_used", "skipped", "skipped_reasons",
                                              "iters")},
        "loss": {"first": round(float(np.mean(losses[:10])), 4) if losses else None,
                 "last": round(_tail_mean(losses), 4) if losses else None},
        "pseudo_parts": {"images": len(items), "instances": len(instances), "instances_with_parts": len(per_instance),
                         "parts": table.num_rows,
                         "parts_per_instance": round(table.num_rows / max(len(per_instance), 1), 2),
                         "mean_score": round(float(scores.mean()), 4) if len(scores) else None},
    }
    # Timings and resumption are facts about this run, not about the model: they go in the
    # manifest's summary, so that a resumed run's files equal an uninterrupted run's byte for byte.
    write_json_atomic(out / "metrics.json", metrics)
    return {"round": r, "train_images": train_meta["images"], "train_parts": train_meta["parts"],
            "skipped_instances": train_meta["skipped"], "iters": train_meta["iters"],
            "final_loss": metrics["loss"]["last"], "pseudo_parts": table.num_rows,
            "parts_per_instance": metrics["pseudo_parts"]["parts_per_instance"],
            "train_seconds": times["train"], "label_seconds": times["label"],
            "resumed_from": train_meta["resumed_from"]}


def label_shard(job: dict[str, Any]) -> ShardDone:
    """One labelling shard of a `proposals` / `distill` round (see :func:`run_round` for the job's
    keys), here or on a cluster worker: writes ``pseudo/{name}.parquet`` into the partial folder."""
    out = Path(job["out"])
    checkpoint = (out / "checkpoint.pth").stat()
    model = process_cached(("part-model", str(out), checkpoint.st_mtime_ns, checkpoint.st_size, job["device"]),
                           lambda: load_part_model(_Local(out), job["device"]))
    rows = label_images(model, job["items"], Path(job["image_dir"]), job["labeller"], job["device"],
                        job["batch_size"], job["max_pixels"])
    name, schema = job["name"], job["schema"]
    write_parquet(out / "pseudo" / f"{name}.parquet", {c: [row[c] for row in rows] for c in schema.names}, schema)
    return ShardDone(name, [f"pseudo/{name}.parquet"], {"parts": len(rows)})


class _Local:
    """The artifact interface ``load_part_model`` needs, over the folder being written."""

    def __init__(self, path: Path):
        self.path = path

    def file(self, name: str) -> Path:
        return self.path / name


def _preview(table: pa.Table, items: Sequence[Mapping[str, Any]], image_dir: Path, path: Path, max_pixels: int,
             n: int = 6) -> None:
    """A strip of the first ``n`` labelled images with their pseudo-parts."""
    from partdistill.data.images import load_rgb
    from partdistill.evaluation.overlays import grid, parts_overlay, save_png
    from partdistill.storage import rle_to_mask

    by_instance: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for row in table.select(["instance_id", "rle", "height", "width"]).to_pylist():
        by_instance[row["instance_id"]].append(row)
    tiles = []
    for it in items[:n]:
        img = load_rgb(image_dir / it["file_name"], max_pixels)
        maps = []
        for inst in it["instances"]:
            labels = np.full(img.shape[:2], -1, np.int32)
            for i, r in enumerate(by_instance[int(inst["instance_id"])]):
                labels[rle_to_mask({"size": [r["height"], r["width"]], "counts": r["rle"]})] = i
            maps.append(labels)
        tiles.append(parts_overlay(img, maps))
    if tiles:
        save_png(path, grid([tiles]))


def _rounds(section: dict[str, Any]) -> int:
    return section["rounds"]


def _relevant(section: dict[str, Any], cfg: Any) -> dict[str, Any]:
    # the paper's pixel rule is the default: a store made before label.pixel_rule existed keeps its version
    label = section.get("label")
    if isinstance(label, dict) and label.get("pixel_rule", "mask_score") == "mask_score":
        section = {**section, "label": {k: v for k, v in label.items() if k != "pixel_rule"}}
    return section


STAGE = Stage("proposals", ("data", "teacher", "instances", "mining"), "2", run, summary="part decoder",
              rounds=_rounds, round_keys=("rounds",), later_round_keys=("carry_over_iou",), relevant=_relevant)
