"""Where does the learning chain break? Oracle diagnostics and learning curves for the part decoder.

    python benchmarks/part_learning.py --store STORE --targets gt mined rgb --iters 600 --every 150
    python benchmarks/part_learning.py --store STORE -o proposals.crop.enabled=False --targets gt

Trains the `proposals` stage's part decoder (the same PartModel, training config and schedule as
the stage: :func:`~partdistill.stages.proposals.prepare_training`) on one of three kinds of
targets on the train split, and scores checkpoints along the way:

- ``gt``: **ORACLE** — the part ground truth of the train split. Part labels are evaluation-only
  for the pipeline; a benchmark may use them to ask whether the decoder can learn perfect targets.
  If it cannot, the decoder or its training regime is the bottleneck, whatever the mining does.
- ``mined``: the `mining` artifact's parts (what round 1 of the stage trains on);
- ``rgb``: K-means (k=4) on each object's pixel colours (the floor, as targets).

Objects are the `instances` artifact's (with ``instances.source='gt'`` the GT objects). Every
checkpoint is scored on

- *train fit*: for each training target part, the best IoU of any query's mask (probability >
  0.5, clipped to its object) — median, and the share of targets reaching 0.5 and 0.75;
  measured on the first ``--fit-objects`` training objects;
- *val AR@10 / AR@200* with GT objects: all queries, clipped to the object, ranked by score,
  against the val part ground truth (:func:`~partdistill.evaluation.metrics.average_recall`);
- parts per object: queries with score > 0.3 that win at least 5 % of their object.

Needs a store with `data`, `teacher`, `instances` and (for ``mined``) `mining` complete for the
config and ``-o`` options (``partdistill run CONFIG --until mining``). Writes ``OUT/table.md``,
``OUT/curves.json`` and ``OUT/learning_curves.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from partdistill.config import load_config
from partdistill.data.images import load_rgb
from partdistill.evaluation.metrics import average_recall, mask_iou
from partdistill.evaluation.mined import match_instances, rgb_label_maps
from partdistill.evaluation.premise import GTObject, load_gt_objects
from partdistill.models.object_crops import crop_settings
from partdistill.models.part_model import predict_objects
from partdistill.models.ranking import candidates
from partdistill.pipeline import plan, store_for
from partdistill.stages.instances import read_instances
from partdistill.stages.proposals import prepare_training, training_records
from partdistill.stages.teacher import teacher_checkpoint
from partdistill.storage import mask_to_rle, rle_to_mask

REPO = Path(__file__).resolve().parents[1]
MASK_THRESHOLD = 0.5
PART_SCORE, PART_FRACTION = 0.3, 0.05


def target_rows(kind: str, arts: Mapping[str, Any], instances: Sequence[Mapping[str, Any]],
                mcfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Training parts (instance_id, rle, area, height, width) of the train split's instances."""
    train = [r for r in instances if r["split"] == "train"]
    if kind == "mined":
        import pyarrow.parquet as pq

        table = pq.read_table(arts["mining"].path / "mined_parts")
        return [r for r in table.select(["instance_id", "rle", "area", "height", "width", "split"]).to_pylist()
                if r["split"] == "train"]
    if kind == "rgb":
        maps = rgb_label_maps(arts["data"].path, arts["instances"], "train", k=int(mcfg["k"]), metric=mcfg["metric"],
                              seed=int(mcfg["seed"]), min_part_area=int(mcfg["min_part_area"]))
        return [_row(iid, lm == p) for iid, lm in maps.items() for p in np.unique(lm[lm >= 0])]
    if kind == "gt":  # ORACLE: the train split's part ground truth, through the matched instance
        objects = load_gt_objects(arts["data"].path, "train")
        matches = match_instances(objects, train)
        by_id = {r["instance_id"]: r for r in train}
        rows = []
        for i, iid in matches.items():
            inst = rle_to_mask({"size": [by_id[iid]["height"], by_id[iid]["width"]], "counts": by_id[iid]["rle"]})
            rows += [_row(iid, p & inst) for p in objects[i].part_masks if (p & inst).sum() >= mcfg["min_part_area"]]
        return rows
    raise ValueError(f"unknown targets {kind!r}: gt, mined or rgb")


def _row(instance_id: int, mask: np.ndarray) -> dict[str, Any]:
    return {"instance_id": int(instance_id), "rle": mask_to_rle(mask)["counts"], "area": int(mask.sum()),
            "height": mask.shape[0], "width": mask.shape[1]}


def fit(model: Any, records_by_instance: Mapping[int, list[np.ndarray]], instances: Mapping[int, Mapping[str, Any]],
        image_dir: Path, device: str) -> dict[str, float]:
    """Best-query IoU of each training target (clipped to its object)."""
    ious = []
    for iid, parts in records_by_instance.items():
        r = instances[iid]
        obj = rle_to_mask({"size": [r["height"], r["width"]], "counts": r["rle"]})
        pred = predict_objects(model, load_rgb(image_dir / r["file_name"]), [obj], device)[0]
        binary = (pred["masks"].cpu().numpy() > MASK_THRESHOLD) & obj[None]
        iou = mask_iou(parts, list(binary))
        ious += list(iou.max(1)) if iou.shape[1] else [0.0] * len(parts)
    ious = np.asarray(ious)
    return {"fit_median": float(np.median(ious)), "fit@0.5": float(np.mean(ious >= 0.5)),
            "fit@0.75": float(np.mean(ious >= 0.75)), "fit_targets": len(ious)}


def val_scores(model: Any, objects: Sequence[GTObject], image_dir: Path, device: str) -> dict[str, float]:
    """AR@10 / AR@200 and parts per object on GT val objects."""
    gts, props, n_parts = [], [], []
    for name in sorted({o.file_name for o in objects}):
        idx = [i for i, o in enumerate(objects) if o.file_name == name]
        preds = predict_objects(model, load_rgb(image_dir / name), [objects[i].mask for i in idx], device)
        for i, pred in zip(idx, preds, strict=True):
            o = objects[i]
            masks, scores = pred["masks"].cpu().numpy(), pred["scores"].cpu().numpy()
            binary = (masks > MASK_THRESHOLD) & o.mask[None]
            keep = np.nonzero(binary.reshape(len(binary), -1).any(1))[0]
            order = keep[np.argsort(-scores[keep], kind="stable")]
            gts.append(list(o.part_masks))
            props.append([binary[q] for q in order])
            n_parts.append(len(candidates(masks, scores, o.mask, PART_SCORE, PART_FRACTION, MASK_THRESHOLD)))
    ar = average_recall(gts, props, max_dets=(10, 200))
    return {"AR@10": float(ar["AR@10"]), "AR@200": float(ar["AR@200"]), "parts_per_object": float(np.mean(n_parts))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "demo_partsworld.py"))
    ap.add_argument("--store", default=None)
    ap.add_argument("-o", "--cfg-options", action="append", default=[])
    ap.add_argument("--targets", nargs="+", default=["gt", "mined", "rgb"])
    ap.add_argument("--iters", type=int, default=None, help="training iterations (default: proposals.max_iters)")
    ap.add_argument("--every", type=int, default=None, help="score a checkpoint every this many iterations")
    ap.add_argument("--fit-objects", type=int, default=40)
    ap.add_argument("--val-objects", type=int, default=None)
    ap.add_argument("--out", default=str(REPO / "docs" / "part_learning"))
    args = ap.parse_args()
    wall = time.perf_counter()
    cfg = load_config(args.config, args.cfg_options)
    section = dict(cfg["proposals"])
    iters = int(args.iters or section["max_iters"])
    every = int(args.every or iters)
    section["max_iters"] = iters
    section["checkpoint_interval"] = every
    store = store_for(cfg, args.store)
    wanted = {p.name: p for p in plan(cfg) if p.name in ("data", "teacher", "instances", "mining")}
    missing = [n for n, p in wanted.items() if not store.is_complete(p.name, p.version)]
    if missing:
        sys.exit(f"part_learning: {store.root} lacks {missing}; make them with "
                 f"partdistill run {args.config} --until mining --store {store.root}")
    arts = {n: store.open(p.name, p.version) for n, p in wanted.items()}
    device = cfg["runtime"].get("device", "cpu")
    instances = read_instances(arts["instances"]).to_pylist()
    inst_by_id = {r["instance_id"]: r for r in instances}
    val_objects = load_gt_objects(arts["data"].path, "val")[:args.val_objects]
    crop = crop_settings(section.get("crop"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    curves: dict[str, list[dict[str, Any]]] = {}
    for kind in args.targets:
        start = time.perf_counter()
        parts = target_rows(kind, arts, instances, cfg["mining"])
        work = out / f"work-{kind}"
        shutil.rmtree(work, ignore_errors=True)
        records, _ = training_records(instances, parts, arts["data"].path, section["train_splits"],
                                      section["min_object_fraction"], crop, work / "crops")
        rcfg, mcfg, _ = prepare_training(section, arts["teacher"], records, work, {},
                                         teacher_checkpoint(arts["teacher"]), device)
        rcfg.default_hooks.checkpoint.max_keep_ckpts = -1
        from partdistill.models.train_teacher import train

        result = train(rcfg, device=device)
        train_s = time.perf_counter() - start
        # targets of the first fit-objects training instances, as full-image masks
        by_inst: dict[int, list[np.ndarray]] = {}
        for p in sorted(parts, key=lambda r: r["instance_id"]):
            if p["instance_id"] in inst_by_id and (p["instance_id"] in by_inst or len(by_inst) < args.fit_objects):
                by_inst.setdefault(p["instance_id"], []).append(
                    rle_to_mask({"size": [p["height"], p["width"]], "counts": p["rle"]}))
        from mmdet.registry import MODELS

        from partdistill.models.teacher import register_mmdet

        register_mmdet()
        model = MODELS.build(mcfg)
        model.part_crop = crop
        rows = []
        for it in range(every, iters + 1, every):
            ckpt = work / "runner" / f"iter_{it}.pth"
            state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
            model.load_state_dict(state)
            model.eval()
            row = {"iter": it, **fit(model, by_inst, inst_by_id, arts["data"].path, device),
                   **val_scores(model, val_objects, arts["data"].path, device)}
            rows.append(row)
            print(kind, json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}),
                  flush=True)
        curves[kind] = [{**r, "train_images": len(records), "train_parts": sum(len(e["instances"]) for e in records),
                         "train_seconds": round(train_s, 1), "losses_tail": float(np.mean(result["losses"][-25:]))}
                        for r in rows]
        shutil.rmtree(work, ignore_errors=True)
    (out / "curves.json").write_text(json.dumps(curves, indent=1))
    _plot(curves, out / "learning_curves.png")
    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], Path.cwd())] + sys.argv[1:])
    lines = [f"`{cmd}` — {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
             f"{time.perf_counter() - wall:.0f} s in all. Crops: {crop or 'off (whole images)'}.", "",
             "| targets | iters | train objects | fit median IoU | fit ≥0.5 | fit ≥0.75 | val AR@10 | val AR@200 "
             "| parts / object | train s |", "|---|---|---|---|---|---|---|---|---|---|"]
    names = {"gt": "GT parts (ORACLE)", "mined": "mined parts", "rgb": "RGB K-means parts"}
    for kind, rows in curves.items():
        for r in rows:
            lines.append(f"| {names[kind]} | {r['iter']} | {r['train_images']} | {r['fit_median']:.2f} | "
                         f"{100 * r['fit@0.5']:.0f} % | {100 * r['fit@0.75']:.0f} % | {100 * r['AR@10']:.1f} | "
                         f"{100 * r['AR@200']:.1f} | {r['parts_per_object']:.2f} | {r['train_seconds']:.0f} |")
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    print(text)


def _plot(curves: Mapping[str, Sequence[Mapping[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for kind, rows in curves.items():
        its = [r["iter"] for r in rows]
        axes[0].plot(its, [r["fit_median"] for r in rows], marker="o", label=kind)
        axes[1].plot(its, [100 * r["AR@10"] for r in rows], marker="o", label=kind)
    axes[0].set(title="train fit: median best-query IoU", xlabel="iteration")
    axes[1].set(title="val AR@10 (GT objects)", xlabel="iteration")
    for a in axes:
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
