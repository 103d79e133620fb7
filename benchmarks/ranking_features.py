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
teacher features, per pixel. Nothing is written into the store; the table goes to stdout and
``--out``.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "demo_partsworld.py"))
    ap.add_argument("--store", default=None)
    ap.add_argument("--split", default="val")
    ap.add_argument("--features", nargs="+", default=["query", "teacher", "both"])
    ap.add_argument("--k", nargs="+", type=int, default=None, help="clusters per class (default: the config's)")
    ap.add_argument("--out", default=None, help="write the table (markdown) here too")
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
        for mode in args.features:
            start = time.perf_counter()
            rcfg = {**cfg["ranking"], "k": k, "part_features": mode}
            _, labeled, classes, cands = rank_parts(rcfg, parts, arts["instances"], arts["features"], NullProgress())
            m = score_method(objects, ranked_predictions(labeled, objects, matches, args.split), True, class_ids)
            m["candidates"] = len(cands)
            rows.append((f"proposals + ranking, part_features={mode}, k={k}", m))
            print(f"{rows[-1][0]}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
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
