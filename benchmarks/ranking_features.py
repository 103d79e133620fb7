"""What should the class-specific ranking cluster a part by? (issue 14: PartDistillation against
the one-stage baseline.)

    python benchmarks/ranking_features.py --config configs/demo_partsworld.py --store store
    python benchmarks/ranking_features.py --config configs/quality_partsworld.py --store STORE --k 4 8

Reads a store whose `proposals` (last round), `instances`, `features` and `data` artifacts the
config plans are complete, and runs the `ranking` stage's algorithm
(:func:`partdistill.stages.ranking.rank_parts`) on the round's pseudo-parts once per row, with
``ranking.part_features``:

- ``query`` (the paper): the decoder's decoded query feature;
- ``teacher``: the mean of the teacher's normalised pixel features under the part's mask;
- ``both``: the two concatenated.

Each row is scored as `evaluate` scores its "proposals + ranking" row (the pipeline's instances
matched to the val GT objects; an unmatched object predicts nothing): C-mIoU (majority mapping),
FG-NMI, NMI within object and AR@10, with :func:`partdistill.evaluation.parts_eval.score_method`.
The one-stage K-means baseline (no self-training) is the row to beat; its clusters are the same
teacher features, per pixel. ``--oracle`` adds, for the one-stage baseline and for the first
ranking row of each k, an oracle row (ground truth used, labelled as such): every segment of the
method (one cluster inside one object) gets the GT part most of its object pixels belong to. It
keeps the method's segments and replaces only their ids, so it bounds what a better clustering
of the same segments could reach: if the oracle is far above the method, the ids (the
class-level clustering) lose the points; if not, the segments do. Nothing is written into the
store; the table goes to stdout and ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from partdistill.config import load_config
from partdistill.evaluation.mined import match_instances
from partdistill.evaluation.parts_eval import ObjectPrediction, from_label_map, score_method
from partdistill.evaluation.premise import load_gt_objects
from partdistill.pipeline import plan, store_for
from partdistill.progress import NullProgress
from partdistill.stages.evaluate import one_stage_maps, ranked_predictions
from partdistill.stages.instances import read_instances
from partdistill.stages.ranking import pseudo_parts_file, rank_parts

REPO = Path(__file__).resolve().parents[1]


def oracle_ids(objects, preds):
    """Each prediction's segments relabelled with the GT part most of their object pixels hold
    (ORACLE: uses the ground truth); pixels outside the object or in unlabelled GT keep the id
    of their segment's majority."""
    out = []
    for o, p in zip(objects, preds, strict=True):
        if p.label_map is None:
            out.append(p)
            continue
        lm = np.full_like(p.label_map, -1)
        for seg in np.unique(p.label_map[p.label_map >= 0]):
            where = p.label_map == seg
            gt = o.part_labels[where & o.mask]
            gt = gt[gt >= 0]
            if len(gt):
                lm[where] = np.bincount(gt).argmax()
        out.append(from_label_map(lm))
    return out


def gt_object_predictions(cfg, art, image_root, objects, model_ids):
    """The final model's label maps on the GT object masks, as `evaluate` makes its GT-object
    "PartDistillation" row (one forward pass per image, each object conditioned on its class;
    ``model_ids``: class name → the class id the models were trained with)."""
    from partdistill.data.images import load_rgb
    from partdistill.models.part_model import predict_objects
    from partdistill.stages.distill import object_parts
    from partdistill.stages.proposals import load_part_model

    device = cfg["runtime"].get("device", "cpu")
    lab = cfg["distill"]["label"]
    model = load_part_model(art, device)
    k = int(model.decoder.head.parts_per_class)
    by_image = {}
    for i, o in enumerate(objects):
        by_image.setdefault(o.file_name, []).append(i)
    preds = [ObjectPrediction(None) for _ in objects]
    n_model = model.decoder.num_classes // k
    for name, idx in sorted(by_image.items()):
        idx = [i for i in idx if model_ids.get(objects[i].class_name, n_model) < n_model]
        if not idx:
            continue
        img = load_rgb(image_root / name)
        classes = [model_ids[objects[i].class_name] for i in idx]
        with torch.inference_mode():
            outs = predict_objects(model, img, [objects[i].mask for i in idx], device, classes)
        for i, c, out in zip(idx, classes, outs, strict=True):
            parts = object_parts(out["masks"].cpu().numpy(), out["class_scores"].cpu().numpy(), [objects[i].mask],
                                 [c], k, lab["score_threshold"], lab["mask_threshold"], lab["min_fraction"],
                                 lab.get("score", "class"))[0]
            lm = np.full(objects[i].mask.shape, -1, np.int32)
            for part in parts:
                lm[part["mask"]] = c * k + part["cluster"]
            preds[i] = from_label_map(lm)
    return preds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "demo_partsworld.py"))
    ap.add_argument("--store", default=None)
    ap.add_argument("--split", default="val")
    ap.add_argument("--features", nargs="+", default=["query", "teacher", "both"])
    ap.add_argument("--k", nargs="+", type=int, default=None, help="clusters per class (default: the config's)")
    ap.add_argument("--out", default=None, help="write the table (markdown) here too")
    ap.add_argument("--oracle", action="store_true", help="add the oracle-id rows (GT part ids on the segments)")
    ap.add_argument("--distill", action="store_true",
                    help="also score the config's last distill round's labelled parts (and their oracle row)")
    ap.add_argument("-o", "--cfg-options", action="append", default=[])
    args = ap.parse_args()
    wall = time.perf_counter()
    cfg = load_config(args.config, args.cfg_options)
    store = store_for(cfg, args.store)
    planned = {p.name: p for p in plan(cfg)}
    last = max((n for n in planned if n.startswith("proposals_r")), key=lambda n: int(n.rsplit("_r", 1)[1]))
    need = ["data", "instances", "features", last]
    missing = [n for n in need if not store.is_complete(n, planned[n].version)]
    if missing:
        sys.exit(f"ranking_features: {store.root} lacks {missing}; make them with\n  partdistill run {args.config} "
                 f"--until proposals --store {store.root}")
    arts = {n: store.open(n, planned[n].version) for n in need}
    objects = load_gt_objects(arts["data"].path, args.split)
    insts = read_instances(arts["instances"]).to_pylist()
    matches = match_instances(objects, [r for r in insts if r["split"] == args.split])
    names = sorted({r["class_name"] for r in insts} | {o.class_name for o in objects})
    class_ids = {n: i for i, n in enumerate(names)}
    parts = pq.read_table(arts[last].file(pseudo_parts_file(arts[last]))).to_pylist()
    rows = []
    for k in args.k or [int(cfg["ranking"]["k"])]:
        one = one_stage_maps(arts["features"], insts, args.split, k, cfg["mining"]["metric"],
                             int(cfg["mining"]["seed"]))
        preds = [from_label_map(one.get(matches[i], np.full(o.mask.shape, -1, np.int32))) if i in matches
                 else ObjectPrediction(None) for i, o in enumerate(objects)]
        rows.append((f"one-stage K-means (no self-training), k={k}", score_method(objects, preds, True, class_ids)))
        if args.oracle:
            rows.append((f"*oracle ids on the one-stage segments, k={k}*",
                         score_method(objects, oracle_ids(objects, preds), True, class_ids)))
        for j, mode in enumerate(args.features):
            start = time.perf_counter()
            rcfg = {**cfg["ranking"], "k": k, "part_features": mode}
            _, labeled, classes, cands = rank_parts(rcfg, parts, arts["instances"], arts["features"], NullProgress())
            ranked = ranked_predictions(labeled, objects, matches, args.split)
            m = score_method(objects, ranked, True, class_ids)
            m["candidates"] = len(cands)
            rows.append((f"proposals + ranking, part_features={mode}, k={k}", m))
            if args.oracle and j == 0:
                rows.append((f"*oracle ids on the ranking's segments, {mode}, k={k}*",
                             score_method(objects, oracle_ids(objects, ranked), True, class_ids)))
            print(f"{rows[-1][0]}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    if args.distill:
        from partdistill.stages.distill import labeled_parts_name
        last_d = max((n for n in planned if n.startswith("distill_r")), key=lambda n: int(n.rsplit("_r", 1)[1]))
        if not store.is_complete(last_d, planned[last_d].version):
            sys.exit(f"ranking_features: {store.root} lacks {last_d} {planned[last_d].version}")
        art = store.open(last_d, planned[last_d].version)
        labeled = pq.read_table(art.file(labeled_parts_name(int(last_d.rsplit("_r", 1)[1])))).to_pylist()
        dpreds = ranked_predictions(labeled, objects, matches, args.split)
        rows.append((f"PartDistillation ({last_d})", score_method(objects, dpreds, True, class_ids)))
        if args.oracle:
            rows.append((f"*oracle ids on the segments of {last_d}*",
                         score_method(objects, oracle_ids(objects, dpreds), True, class_ids)))
        from partdistill.stages.instances import read_object_classes
        teacher = store.open("teacher", planned["teacher"].version)
        model_ids = {n: i for i, n in enumerate(read_object_classes(arts["instances"], arts["data"], teacher))}
        gpreds = gt_object_predictions(cfg, art, arts["data"].path, objects, model_ids)
        if args.oracle:
            # the floor's segments (RGB K-means per GT object, ids arbitrary) with oracle ids: how
            # well colour alone cuts the same objects into parts
            from partdistill.data.images import load_rgb
            from partdistill.models.part_mining import mine_parts, rgb_object
            mcfg = cfg["mining"]
            rgb = mine_parts([rgb_object(load_rgb(arts["data"].path / o.file_name), o.mask) for o in objects],
                             k=int(mcfg["k"]), metric=mcfg["metric"], seed=int(mcfg["seed"]))
            rows.append((f"*GT objects: oracle ids on the RGB K-means segments (k={mcfg['k']})*",
                         score_method(objects, oracle_ids(objects, [from_label_map(lm) for lm in rgb]), True,
                                      class_ids)))
        rows.append((f"GT objects: PartDistillation ({last_d})", score_method(objects, gpreds, True, class_ids)))
        if args.oracle:
            rows.append((f"*GT objects: oracle ids on the segments of {last_d}*",
                         score_method(objects, oracle_ids(objects, gpreds), True, class_ids)))
    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], Path.cwd())] + sys.argv[1:])
    lines = [f"`{cmd}` — {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
             f"{time.perf_counter() - wall:.0f} s",
             "", f"Parts World {args.split}: {len(objects)} GT objects, {len(matches)} matched by the pipeline's "
             f"instances (the others predict nothing). {last} {arts[last].version}, {len(parts)} pseudo-parts.", "",
             "| clusters by | C-mIoU | FG-NMI | NMI within object | AR@10 |", "|---|---|---|---|---|"]
    for name, m in rows:
        lines.append(f"| {name} | {100 * m['C-mIoU']:.1f} | {100 * m['FG-NMI']:.1f} | "
                     f"{100 * m['NMI (within object)']:.1f} | {100 * m['AR@10']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
