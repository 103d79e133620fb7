"""Does self-training improve the part proposals? Paper Fig. 3, on Parts World val with GT objects.

    python benchmarks/proposal_rounds.py --config configs/demo_partsworld.py --store STORE
    python benchmarks/proposal_rounds.py --store STORE -o proposals.rounds=3 --out /tmp/rounds

Reads an existing store and computes nothing the pipeline would: `data`, `instances`, `mining` and
every planned `proposals_r{n}` must be complete (``partdistill run CONFIG --until proposals``), for
the versions the config and the ``-o`` options plan. The paper's ablation protocol: every val GT
object is one "image", its predictions clipped to the GT object mask, and

- RGB K-means (floor): K-means (k=4) on the pixel colours of each instance
  (:func:`~partdistill.evaluation.mined.rgb_label_maps`), the instance matched to its GT object;
- mined parts: the `mining` artifact's parts of the instance matched to each GT object
  (:func:`~partdistill.evaluation.mined.match_instances`, as ``evaluate_mined`` does); an object
  no instance matches predicts nothing but keeps its parts in the denominator;
- proposals round n: the round's model runs once on each val image; an object's proposals are
  all Q query masks binarised at probability > 0.5, clipped to the object, empty ones dropped,
  ranked by score.

- pseudo-parts of round n: what round n's model labelled on the instance matched to each GT
  object (round n + 1's training parts), and targets of round n: the parts round n trained on,
  when it carried parts over (``proposals.carry_over_iou``); scored like the mined parts.

Every row is scored the same way: proposals clipped to the object, empty ones dropped (for the
label-map rows, parts ranked by area, as ``evaluate_mined`` ranks them), AR@1 / AR@10 / AR@200
with :func:`~partdistill.evaluation.metrics.average_recall` (k is capped by what a row has: AR@200
of a round is AR@Q), "parts found": the fraction of GT parts some top-10 proposal covers at IoU
>= 0.5, and "new vs mined": those found that the mined parts did not find.

Writes ``OUT/table.md`` (also printed) and ``OUT/rounds.png``: 4 val images x [GT parts, mined
parts, round 1, round 2, ...]; a round colours each object's pixels by their most probable query
among those scoring above 0.3.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from partdistill.config import load_config
from partdistill.data.images import load_rgb
from partdistill.evaluation.metrics import average_recall, mask_iou
from partdistill.evaluation.mined import instance_label_maps, match_instances, object_label_maps, rgb_label_maps
from partdistill.evaluation.overlays import grid, parts_overlay, save_png
from partdistill.evaluation.premise import GTObject, load_gt_objects
from partdistill.models.part_model import predict_objects
from partdistill.pipeline import plan, store_for
from partdistill.stages.instances import read_instances
from partdistill.stages.proposals import TARGET_COLUMNS, TARGETS_FILE, load_part_model, pseudo_parts_name
from partdistill.storage import Artifact, ArtifactStore, rle_to_mask

REPO = Path(__file__).resolve().parents[1]
MAX_DETS = (1, 10, 200)
FOUND_TOP, FOUND_IOU = 10, 0.5
MASK_THRESHOLD = 0.5     # a query's pixels: probability above this
PICTURE_SCORE = 0.3      # queries shown in the picture: score above this
PICTURE_IMAGES = 4


def open_artifacts(cfg: Mapping[str, Any], store: ArtifactStore, command: str) -> dict[str, Artifact]:
    """The planned data, instances, mining and proposals_r{n} artifacts, by planned name; exits
    naming what is missing and the command that makes it."""
    wanted = [p for p in plan(cfg) if p.name in ("data", "instances", "mining") or p.stage_name == "proposals"]
    missing = [p for p in wanted if not store.is_complete(p.name, p.version)]
    if missing:
        lines = []
        for p in missing:
            others = store.versions(p.name)
            note = f" (the store has {', '.join(others)}: made with other settings?)" if others else ""
            lines.append(f"  {p.name} {p.version}{note}")
        sys.exit(f"proposal_rounds: {store.root} has no complete artifact for\n" + "\n".join(lines)
                 + f"\nmake them with:\n  {command}")
    return {p.name: store.open(p.name, p.version) for p in wanted}


def box(mask: np.ndarray) -> tuple[slice, slice]:
    ys, xs = np.nonzero(mask)
    return slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1)


def label_map_proposals(objects: Sequence[GTObject], maps: Sequence[np.ndarray | None]) -> list[list[np.ndarray]]:
    """Per GT object, its label map's parts ranked by area (the order ``evaluate_mined`` scores),
    clipped to the object and cropped to its box, empty ones dropped. ``None``: no proposal."""
    out = []
    for o, lm in zip(objects, maps, strict=True):
        if lm is None:
            out.append([])
            continue
        ids, counts = np.unique(lm[lm >= 0], return_counts=True)
        ys, xs = box(o.mask)
        inside, crop = o.mask[ys, xs], lm[ys, xs]
        parts = [(crop == i) & inside for i in ids[np.argsort(-counts, kind="stable")]]
        out.append([p for p in parts if p.any()])
    return out


def part_row_proposals(objects: Sequence[GTObject], matches: Mapping[int, int],
                       rows: Sequence[Mapping[str, Any]]) -> list[list[np.ndarray]]:
    """Per GT object, the part rows (instance_id, rle, area, height, width: a round's pseudo-parts
    or training targets, which may overlap) of its matched instance, largest first, clipped to the
    object and cropped to its box, empty ones dropped; an unmatched object has none."""
    by_instance: dict[int, list[Mapping[str, Any]]] = {}
    for r in rows:
        by_instance.setdefault(int(r["instance_id"]), []).append(r)
    out: list[list[np.ndarray]] = []
    for i, o in enumerate(objects):
        parts = sorted(by_instance.get(matches[i], []), key=lambda r: -r["area"]) if i in matches else []
        ys, xs = box(o.mask)
        masks = [rle_to_mask({"size": [r["height"], r["width"]], "counts": r["rle"]})[ys, xs] & o.mask[ys, xs]
                 for r in parts]
        out.append([m for m in masks if m.any()])
    return out


def argmax_label_map(probs: np.ndarray, scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """int16 (H, W): each object pixel's most probable query among those scoring above
    PICTURE_SCORE, renumbered by area (0 the largest, as mined parts are), -1 elsewhere."""
    lm = np.full(mask.shape, -1, np.int16)
    strong = np.nonzero(scores > PICTURE_SCORE)[0]
    if len(strong) == 0:
        return lm
    best = strong[probs[strong][:, mask].argmax(0)]
    ids, counts = np.unique(best, return_counts=True)
    rank = {q: r for r, q in enumerate(ids[np.argsort(-counts, kind="stable")])}
    lm[mask] = [rank[q] for q in best]
    return lm


def model_proposals(model: Any, objects: Sequence[GTObject], image_dir: Path, device: str,
                    pictured: set[str]) -> tuple[list[list[np.ndarray]], dict[int, np.ndarray]]:
    """Run a round's model on each val image (or object crop). Returns per GT object its proposals (bool, cropped
    to the object's box: binarised, clipped, non-empty, best score first) and, for the objects of
    the ``pictured`` images, their argmax label maps (object index → int16 (H, W))."""
    by_image: dict[str, list[int]] = {}
    for i, o in enumerate(objects):
        by_image.setdefault(o.file_name, []).append(i)
    names = sorted(by_image)
    proposals: list[list[np.ndarray]] = [[] for _ in objects]
    pictures: dict[int, np.ndarray] = {}
    for name in names:
        idx = by_image[name]
        with torch.inference_mode():
            # a model trained on object crops runs on each object's crop, one without once per image
            preds = predict_objects(model, load_rgb(image_dir / name), [objects[i].mask for i in idx], device)
        for i, pred in zip(idx, preds, strict=True):
            o = objects[i]
            binary = (pred["masks"] > MASK_THRESHOLD).cpu().numpy()
            scores = pred["scores"].float().cpu().numpy()
            ys, xs = box(o.mask)
            clipped = binary[:, ys, xs] & o.mask[ys, xs]
            keep = np.nonzero(clipped.any((1, 2)))[0]
            proposals[i] = list(clipped[keep[np.argsort(-scores[keep], kind="stable")]])
            if name in pictured:
                pictures[i] = argmax_label_map(pred["masks"].float().cpu().numpy(), scores, o.mask)
    return proposals, pictures


def score_row(objects: Sequence[GTObject], proposals: Sequence[Sequence[np.ndarray]]) -> dict[str, Any]:
    """AR@k, the GT parts found (bool, one per GT part, objects in order) and proposals per object.
    Proposals are already clipped, ranked and cropped to each object's box; so are the GT parts."""
    gts = [[p[box(o.mask)] for p in o.part_masks] for o in objects]
    out: dict[str, Any] = dict(average_recall(gts, proposals, max_dets=MAX_DETS))
    found = []
    for g, props in zip(gts, proposals, strict=True):
        iou = mask_iou(g, list(props[:FOUND_TOP]))
        found.append(iou.max(1) >= FOUND_IOU if iou.shape[1] else np.zeros(len(g), bool))
    out["found"] = np.concatenate(found) if found else np.zeros(0, bool)
    out["per_object"] = float(np.mean([len(p) for p in proposals])) if proposals else float("nan")
    return out


def picture(path: Path, data_dir: Path, objects: Sequence[GTObject], images: Sequence[str],
            columns: Sequence[tuple[str, Mapping[int, np.ndarray | None]]]) -> Path:
    """One row per image: GT parts, then each column's label maps (object index → map), per object."""
    rows = []
    for name in images:
        image = load_rgb(data_dir / name)
        idx = [i for i, o in enumerate(objects) if o.file_name == name]
        panels = [parts_overlay(image, [objects[i].part_labels for i in idx])]
        for _, maps in columns:
            panels.append(parts_overlay(image, [np.where(objects[i].mask, maps[i], -1) for i in idx
                                                if maps.get(i) is not None]))
        f = max(1, 192 // image.shape[0])  # small renders: enlarge, nearest, so part edges stay crisp
        rows.append([p.repeat(f, 0).repeat(f, 1) for p in panels])
    return save_png(path, grid(rows, ["GT parts"] + [title for title, _ in columns]))


def pictured_images(objects: Sequence[GTObject], n: int) -> list[str]:
    """n val images, first those that bring an object class not shown yet, in file order."""
    names = sorted({o.file_name for o in objects})
    classes = {name: {o.class_name for o in objects if o.file_name == name} for name in names}
    chosen, seen = [], set()
    for name in names:
        if classes[name] - seen:
            chosen.append(name)
            seen |= classes[name]
    return (chosen + [m for m in names if m not in chosen])[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "demo_partsworld.py"))
    ap.add_argument("--store", default=None, help="artifact store root (default: the config's runtime.store)")
    ap.add_argument("--split", default="val")
    ap.add_argument("--out", default=str(REPO / "docs" / "proposal_rounds"), help="folder for table.md, rounds.png")
    ap.add_argument("-o", "--cfg-options", action="append", default=[],
                    help="key=value, as given to `partdistill run` (the versions to read)")
    args = ap.parse_args()
    torch.manual_seed(0)
    wall = time.perf_counter()

    cfg = load_config(args.config, args.cfg_options)
    store = store_for(cfg, args.store)
    make = shlex.join(["partdistill", "run", args.config, "--until", "proposals", "--store", str(store.root)]
                      + [a for o in args.cfg_options for a in ("-o", o)])
    arts = open_artifacts(cfg, store, make)
    rounds = sorted((n for n in arts if n.startswith("proposals_r")), key=lambda n: int(n.rsplit("_r", 1)[1]))
    device = cfg["runtime"].get("device", "cpu")
    mcfg = cfg["mining"]
    data = arts["data"]
    objects = load_gt_objects(data.path, args.split)
    if not objects:
        sys.exit(f"proposal_rounds: {data.path} has no {args.split} object with parts")
    shown = pictured_images(objects, PICTURE_IMAGES)

    rows: list[tuple[str, dict[str, Any]]] = []
    columns: list[tuple[str, Mapping[int, np.ndarray | None]]] = []

    def log(name: str, start: float) -> None:
        print(f"{name}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)

    start = time.perf_counter()
    instances = [r for r in read_instances(arts["instances"]).to_pylist() if r["split"] == args.split]
    matches = match_instances(objects, instances)
    rgb = object_label_maps(objects, matches, rgb_label_maps(
        data.path, arts["instances"], args.split, k=4, metric=mcfg["metric"], seed=int(mcfg["seed"]),
        min_part_area=int(mcfg["min_part_area"])))
    kept: list[Sequence[Sequence[np.ndarray]]] = []   # each row's proposals, for the matched-objects table
    kept.append(label_map_proposals(objects, rgb))
    rows.append(("RGB K-means (floor)", score_row(objects, kept[-1])))
    log(rows[-1][0], start)

    start = time.perf_counter()
    mined = object_label_maps(objects, matches, instance_label_maps(arts["mining"], args.split))
    mined_name = "mined parts (K-means + CRF)" if mcfg["crf"]["enabled"] else "mined parts (K-means, CRF off)"
    kept.append(label_map_proposals(objects, mined))
    rows.append((mined_name, score_row(objects, kept[-1])))
    columns.append(("mined parts", dict(enumerate(mined))))
    log(rows[-1][0], start)

    for name in rounds:
        n = name.rsplit("_r", 1)[1]
        # what round n learnt from when it carries targets over, and what it leaves the next round
        # (teacher instances, like the mined parts)
        targets = arts[name].path / TARGETS_FILE
        for label, path in ((f"targets of round {n}", targets), (f"pseudo-parts of round {n}",
                                                                 arts[name].file(pseudo_parts_name(int(n))))):
            if path.exists():
                table = pq.read_table(path).select(TARGET_COLUMNS).to_pylist()
                split_ids = {r["instance_id"] for r in instances}
                kept.append(part_row_proposals(objects, matches, [r for r in table if r["instance_id"] in split_ids]))
                rows.append((f"{label} (teacher instances)", score_row(objects, kept[-1])))
        start = time.perf_counter()
        model = load_part_model(arts[name], device)
        proposals, maps = model_proposals(model, objects, data.path, device, set(shown))
        kept.append(proposals)
        rows.append((f"proposals round {n}", score_row(objects, proposals)))
        columns.append((f"round {n}", maps))
        log(rows[-1][0], start)
        del model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = picture(out / "rounds.png", data.path, objects, shown, columns)

    # --- report -------------------------------------------------------------------------------
    gt_parts = sum(len(o.part_masks) for o in objects)
    mined_found = rows[1][1]["found"]
    q = cfg["proposals"]["num_queries"]
    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], Path.cwd())] + sys.argv[1:])
    versions = ", ".join(f"{n} {a.version}" for n, a in arts.items())
    lines = [
        f"`{cmd}` — {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads, {device}); {time.perf_counter() - wall:.0f} s in all",
        "",
        f"Parts World {args.split}: {len(objects)} GT objects with parts, {gt_parts} GT parts, in "
        f"{len({o.file_name for o in objects})} images. GT object masks: every row's predictions are clipped "
        f"to the object, empty ones dropped. Instances ({cfg['instances']['source']}) matched to "
        f"{len(matches)}/{len(objects)} GT objects (IoU >= 0.5), for the RGB and mined rows. A round's "
        f"proposals: its {q} queries, probability > {MASK_THRESHOLD}, ranked by score; k is capped by what a "
        f"row has: AR@200 is AR@{q} for a round, and the K-means rows have at most {max(4, mcfg['k'])} parts. "
        f"Parts found: GT parts some top-{FOUND_TOP} proposal covers at IoU >= {FOUND_IOU}; new vs mined: "
        f"found here but not by the mined parts. Numbers in %, over all GT parts.",
        "",
        f"Artifacts: {versions}.",
        "",
        "| proposals | AR@1 | AR@10 | AR@200 | parts found | new vs mined | proposals / object |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in rows:
        new = "–" if m is rows[1][1] else f"{100 * np.mean(m['found'] & ~mined_found):.1f}"
        lines.append(f"| {name} | {100 * m['AR@1']:.1f} | {100 * m['AR@10']:.1f} | {100 * m['AR@200']:.1f} | "
                     f"{100 * np.mean(m['found']):.1f} | {new} | {m['per_object']:.1f} |")
    # the same rows on the objects an instance matched, where every row predicts something
    idx = sorted(matches)
    sub = [objects[i] for i in idx]
    lines += ["", f"The same, on the {len(idx)} GT objects a teacher instance matched (every row predicts "
              "for each):",
              "", "| proposals | AR@1 | AR@10 | AR@200 | parts found | proposals / object |",
              "|---|---|---|---|---|---|"]
    for (name, _), props in zip(rows, kept, strict=True):
        m = score_row(sub, [props[i] for i in idx])
        lines.append(f"| {name} | {100 * m['AR@1']:.1f} | {100 * m['AR@10']:.1f} | {100 * m['AR@200']:.1f} | "
                     f"{100 * np.mean(m['found']):.1f} | {m['per_object']:.1f} |")
    lines += ["", f"Picture: {written}"]
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    print()
    print(text, end="")


if __name__ == "__main__":
    main()
