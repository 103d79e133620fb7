"""How many parts should mining cut an object into? `mining.k` against the part ground truth.

    python benchmarks/mining_k.py --store /tmp/mk_store --copy-from store
    python benchmarks/mining_k.py --store /tmp/mk_store --ks 3 4 5 6 8 --split train

The chain under-segments (BENCHMARKS.md, "Where the class-level points go"): Parts World's GT
objects have 4.1 parts, the mined parts 3.1, the final model 2.6, and with oracle part ids the
segments, not the ids, bound the class-level scores. This benchmark runs the config's own
`mining` stage (its fusion and CRF as configured) on the ground-truth objects of a split
(``instances.source='gt'``) for each k, and scores it with the part ground truth (an oracle only a
benchmark may read): AR@1 / AR@10 per object, NMI / ARI within object, and the mined parts per
object. Each row has the raw-RGB floor at the same k beside it (the evaluate stage's floor follows
``mining.k`` too), so a gain that is k alone shows as a gain of the floor.
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
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from color_mining import copy_upstream  # noqa: E402

from partdistill.config import load_config, parse_options  # noqa: E402
from partdistill.evaluation.mined import (  # noqa: E402
    evaluate_label_maps,
    instance_label_maps,
    rgb_label_maps,
)
from partdistill.evaluation.premise import load_gt_objects  # noqa: E402
from partdistill.pipeline import run_pipeline, store_for  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def parts_per_object(maps: dict[int, np.ndarray]) -> float:
    return float(np.mean([len(np.unique(lm[lm >= 0])) for lm in maps.values()])) if maps else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "demo_partsworld.py"))
    ap.add_argument("--store", default=None, help="artifact store root (default: the config's runtime.store)")
    ap.add_argument("--copy-from", default=None, help="store to copy the data and teacher artifacts from")
    ap.add_argument("--ks", type=int, nargs="+", default=[3, 4, 5, 6, 8])
    ap.add_argument("--split", default="val")
    ap.add_argument("-o", "--cfg-options", action="append", default=[], help="key=value, for every row")
    args = ap.parse_args()
    wall = time.perf_counter()
    gt = {"instances.source": "gt", "instances.min_object_fraction": 0.0, "instances.splits": [args.split]}

    def cfg_for(k: int) -> dict:
        cfg = load_config(args.config, {**gt, **parse_options(args.cfg_options), "mining.k": k})
        if args.store:
            cfg["runtime"]["store"] = args.store
        return cfg

    store = store_for(cfg_for(args.ks[0]), args.store)
    if args.copy_from:
        copy_upstream(cfg_for(args.ks[0]), Path(args.copy_from), store)
    lines = []
    objects = None
    for k in args.ks:
        cfg = cfg_for(k)
        out = {o.stage: o for o in run_pipeline(cfg, store, until="mining")}
        data, instances = store.open("data", out["data"].version), store.open("instances", out["instances"].version)
        if objects is None:
            objects = load_gt_objects(data.path, args.split)
        maps = instance_label_maps(store.open("mining", out["mining"].version), args.split)
        m = evaluate_label_maps(data.path, instances, maps, args.split, objects)
        mc = cfg["mining"]
        rgb = rgb_label_maps(data.path, instances, args.split, k=k, metric=mc["metric"], seed=int(mc["seed"]),
                             min_part_area=int(mc["min_part_area"]))
        f = evaluate_label_maps(data.path, instances, rgb, args.split, objects)
        lines.append(f"| {k} | {100 * m['AR@1']:.1f} | {100 * m['AR@10']:.1f} | {100 * m['NMI']:.1f} | "
                     f"{100 * m['ARI']:.1f} | {parts_per_object(maps):.2f} | {100 * f['AR@10']:.1f} | "
                     f"{100 * f['NMI']:.1f} | {parts_per_object(rgb):.2f} |")
        print(lines[-1], file=sys.stderr, flush=True)
    gt_parts = float(np.mean([len(o.part_masks) for o in objects]))
    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], Path.cwd())] + sys.argv[1:])
    mc = cfg_for(args.ks[0])["mining"]
    print(f"\n`{cmd}` — {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, {os.cpu_count()} cores "
          f"({platform.processor() or platform.machine()}), torch {torch.__version__}; "
          f"{time.perf_counter() - wall:.0f} s in all\n")
    print(f"Parts World {args.split}: {len(objects)} GT objects ({gt_parts:.2f} GT parts each); instances = GT "
          f"objects; mining as configured (fusion {mc['fusion']}, CRF {'on' if mc['crf']['enabled'] else 'off'}); "
          f"parts < {mc['min_part_area']} px dropped. Numbers in %.\n")
    print("| k | AR@1 | AR@10 | NMI | ARI | parts / object | floor AR@10 | floor NMI | floor parts / object |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
