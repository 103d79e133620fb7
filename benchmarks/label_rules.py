"""Which labelling rule turns a round's proposals into the best pseudo-parts? (self-training's targets)

    python benchmarks/label_rules.py --config configs/quality_partsworld.py --store STORE
    python benchmarks/label_rules.py --store STORE --round 1 --split train --out /tmp/rules

Self-training trains round n + 1 on what round n's model labels (`proposals.label`). On Parts World
those pseudo-parts score far below the proposals they come from (BENCHMARKS.md, "Carry-over"):
this benchmark finds out which part of the rule loses them. It reads a complete `proposals_r{n}`
artifact (and its `data`, `instances`), runs the model once on every teacher instance matched to a
GT object of the split (as the stage labels them: the instance's crop, or the whole image), and
applies each rule to the same predictions:

- argmax, then filter (the stage's rule, :func:`~partdistill.stages.proposals.label_image`):
  every instance pixel goes to its most confident query (mask × score) among all queries, and
  then queries scoring at most t, or winning under ``min_fraction`` / over ``max_fraction`` of
  the instance, are dropped, their pixels left unlabelled;
- argmax of the mask alone (``proposals.label.pixel_rule='mask'``): the same, but the pixel goes
  to the query of highest mask probability among those scoring above t;
- filter, then argmax: the queries are filtered first (score > t, their own mask covering
  ``min_fraction``..``max_fraction`` of the instance), and only the survivors compete for pixels;
- own masks + NMS: the survivors' own masks (overlapping), greedy non-maximum suppression at
  mask IoU 0.5, best score first.

Scored like `proposal_rounds.py`'s rows: each rule's parts clipped to the GT object, AR@1/10 and
"parts found" (IoU >= 0.5 with some top-10 part), parts per object, the share of the instance
the parts cover, and NMI within object (the parts as a partition of the GT object). Ground truth
is only the yardstick. Writes ``OUT/table.md`` (also printed).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from proposal_rounds import box, open_artifacts, score_row  # noqa: E402

from partdistill.config import load_config  # noqa: E402
from partdistill.data.images import load_rgb  # noqa: E402
from partdistill.evaluation.metrics import per_object_nmi_ari  # noqa: E402
from partdistill.evaluation.mined import match_instances  # noqa: E402
from partdistill.evaluation.premise import load_gt_objects  # noqa: E402
from partdistill.models.part_model import predict_objects  # noqa: E402
from partdistill.pipeline import store_for  # noqa: E402
from partdistill.stages.instances import read_instances  # noqa: E402
from partdistill.stages.proposals import label_image, load_part_model  # noqa: E402
from partdistill.storage import rle_to_mask  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MASK = 0.5
Rule = Callable[[np.ndarray, np.ndarray, np.ndarray], list[np.ndarray]]


def argmax_then_filter(t: float, min_f: float, max_f: float, pixel_rule: str = "mask_score") -> Rule:
    """The stage's rule (:func:`label_image`); ``pixel_rule='mask'``: each pixel goes to the query
    of highest mask probability among those scoring above t."""
    def rule(masks, scores, inst):
        found = label_image(masks, scores, [inst], t, MASK, min_f, max_f, pixel_rule=pixel_rule)[0]
        return [seg for q, seg in sorted(found, key=lambda f: -scores[f[0]])]
    return rule


def _survivors(masks, scores, inst, t, min_f, max_f):
    area = inst.sum()
    own = (masks > MASK) & inst
    frac = own.reshape(len(masks), -1).sum(1) / max(area, 1)
    keep = np.nonzero((scores > t) & (frac >= min_f) & (frac <= max_f))[0]
    return keep[np.argsort(-scores[keep], kind="stable")], own


def filter_then_argmax(t: float, min_f: float, max_f: float) -> Rule:
    def rule(masks, scores, inst):
        keep, _ = _survivors(masks, scores, inst, t, min_f, max_f)
        if len(keep) == 0:
            return []
        m = masks[keep]
        conf = np.where(m > MASK, m * scores[keep, None, None], -1.0)
        win = conf.argmax(0)
        win[(conf.max(0) < 0) | ~inst] = -1
        area = inst.sum()
        segs = [win == i for i in range(len(keep))]
        return [s for s in segs if s.sum() >= max(1, min_f * area)]
    return rule


def own_masks_nms(t: float, min_f: float, max_f: float, iou: float = 0.5) -> Rule:
    def rule(masks, scores, inst):
        keep, own = _survivors(masks, scores, inst, t, min_f, max_f)
        chosen: list[np.ndarray] = []
        for q in keep:
            m = own[q]
            if all((m & c).sum() / max((m | c).sum(), 1) < iou for c in chosen):
                chosen.append(m)
        return chosen
    return rule


def within_nmi(objects, proposals) -> float:
    """`evaluate`'s NMI within object of each object's parts (cropped to its box, best first)."""
    gts, preds = [], []
    for o, props in zip(objects, proposals, strict=True):
        ys, xs = box(o.mask)
        inside = o.mask[ys, xs]
        lm = np.full(inside.shape, -1, np.int32)
        for j, p in reversed(list(enumerate(props))):
            lm[p] = j
        gts.append(o.part_labels[ys, xs][inside])
        preds.append(lm[inside])
    return float(per_object_nmi_ari(gts, preds)["NMI"])


def rules() -> list[tuple[str, Rule]]:
    out: list[tuple[str, Rule]] = []
    for t in (0.3, 0.1, 0.0):
        out.append((f"argmax, then filter (t={t}, max 0.5)", argmax_then_filter(t, 0.05, 0.5)))
    for f in (0.7, 0.9, 1.0):
        out.append((f"argmax, then filter (t=0.3, max {f})", argmax_then_filter(0.3, 0.05, f)))
    for f in (0.5, 0.9):
        out.append((f"argmax of the mask alone (pixel_rule='mask'), then filter (t=0.3, max {f})",
                    argmax_then_filter(0.3, 0.05, f, pixel_rule="mask")))
    for t in (0.3, 0.0):
        for f in (0.5, 0.7, 1.0):
            out.append((f"filter, then argmax (t={t}, max {f})", filter_then_argmax(t, 0.05, f)))
    for f in (0.5, 1.0):
        out.append((f"own masks + NMS 0.5 (t=0.3, max {f})", own_masks_nms(0.3, 0.05, f)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "demo_partsworld.py"))
    ap.add_argument("--store", default=None)
    ap.add_argument("--round", type=int, default=1)
    ap.add_argument("--split", default="val")
    ap.add_argument("--out", default="/tmp/label_rules")
    ap.add_argument("-o", "--cfg-options", action="append", default=[])
    args = ap.parse_args()
    wall = time.perf_counter()
    cfg = load_config(args.config, args.cfg_options)
    store = store_for(cfg, args.store)
    name = f"proposals_r{args.round}"
    arts = open_artifacts(cfg, store, f"partdistill run {args.config} --until {name} --store {store.root}")
    if name not in arts:
        sys.exit(f"label_rules: the config plans no {name} (-o proposals.rounds=N)")
    device = cfg["runtime"].get("device", "cpu")
    objects = load_gt_objects(arts["data"].path, args.split)
    instances = {r["instance_id"]: r for r in read_instances(arts["instances"]).to_pylist()
                 if r["split"] == args.split}
    matches = match_instances(objects, list(instances.values()))
    idx = sorted(matches)
    model = load_part_model(arts[name], device)
    chosen = rules()
    props: dict[str, list[list[np.ndarray]]] = {r: [] for r, _ in chosen}
    cover: dict[str, list[float]] = {r: [] for r, _ in chosen}
    by_image: dict[str, list[int]] = {}
    for i in idx:
        by_image.setdefault(objects[i].file_name, []).append(i)
    order = []
    for file_name in sorted(by_image):
        image = load_rgb(arts["data"].path / file_name)
        group = by_image[file_name]
        insts = [instances[matches[i]] for i in group]
        masks = [rle_to_mask({"size": [r["height"], r["width"]], "counts": r["rle"]}) for r in insts]
        with torch.inference_mode():
            preds = predict_objects(model, image, masks, device, [int(r["class_id"]) for r in insts])
        for i, inst, pred in zip(group, masks, preds, strict=True):
            m = pred["masks"].float().cpu().numpy()
            s = pred["scores"].float().cpu().numpy()
            ys, xs = box(objects[i].mask)
            for r, rule in chosen:
                parts = rule(m, s, inst)
                union = np.zeros_like(inst)
                for p in parts:
                    union |= p
                cover[r].append(float(union.sum() / max(inst.sum(), 1)))
                clipped = [p[ys, xs] & objects[i].mask[ys, xs] for p in parts]
                props[r].append([c for c in clipped if c.any()])
            order.append(i)
    sub = [objects[i] for i in order]
    sizes = np.array([p.sum() / o.mask.sum() for o in sub for p in o.part_masks])
    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], Path.cwd())] + sys.argv[1:])
    lines = [f"`{cmd}` — {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
             f"{time.perf_counter() - wall:.0f} s",
             "", f"{name} {arts[name].version} on the {len(sub)} {args.split} GT objects a teacher instance "
             f"matched; every rule labels the same predictions of the instance. Numbers in %. Of their "
             f"{len(sizes)} GT parts, {100 * np.mean(sizes > 0.5):.0f} % cover over half their object "
             f"(median {100 * np.median(sizes):.0f} %).", "",
             "| labelling rule | AR@1 | AR@10 | parts found | parts / object | instance covered | NMI within object |",
             "|---|---|---|---|---|---|---|"]
    for r, _ in chosen:
        m = score_row(sub, props[r])
        lines.append(f"| {r} | {100 * m['AR@1']:.1f} | {100 * m['AR@10']:.1f} | {100 * np.mean(m['found']):.1f} | "
                     f"{m['per_object']:.2f} | {100 * np.mean(cover[r]):.0f} | {100 * within_nmi(sub, props[r]):.1f} |")
    lines += ["", "NMI within object: the parts as one partition of the GT object (ids arbitrary; a pixel in "
              "several parts goes to the first, best score first; unlabelled pixels form one more segment), "
              "against its GT parts, averaged over objects as `evaluate` does: how well a rule cuts the object, "
              "whatever the ids."]
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
