"""Does the distilled model fit the ranking's labels it trains on, and does it keep them on val?

    python benchmarks/distill_fit.py --config configs/quality_partsworld.py --store STORE
    python benchmarks/distill_fit.py --store store -o "distill.head_init.mode='prototypes'"

The `distill` stage trains the final model on the `ranking` stage's labelled parts of the train
split (label = object class × k + cluster) and then labels every split with that model. Both
label the same teacher instances, so their label maps can be compared pixel by pixel, with no
ground truth at all:

- coverage: the share of the ranking-labelled pixels that distill labels at all;
- same cluster: the share of them that distill gives the ranking's cluster (class-level identity:
  what C-mIoU and FG-NMI reward);
- same segment: the same after the best one-to-one matching of the two maps' clusters inside
  each object (Hungarian), i.e. whether the segments agree whatever their ids;
- parts per object for each.

On the train split that is the model's fit to its own training labels; on val, whether it
reproduces the ranking where it was not trained. Reads the planned `ranking` and `distill_r1`
artifacts of the config (with ``-o`` overrides). Writes ``OUT/table.md`` (also printed).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from scipy.optimize import linear_sum_assignment

from partdistill.config import load_config
from partdistill.pipeline import plan, store_for
from partdistill.storage import rle_to_mask

REPO = Path(__file__).resolve().parents[1]


def label_maps(table_path: Path) -> dict[int, tuple[str, np.ndarray]]:
    """instance_id → (split, int16 (H, W) cluster map, −1 where unlabelled); later rows paint over
    earlier ones (the stages' parts of one object do not overlap)."""
    out: dict[int, tuple[str, np.ndarray]] = {}
    for r in pq.read_table(table_path, columns=["instance_id", "split", "cluster", "rle", "height",
                                                "width"]).to_pylist():
        iid = int(r["instance_id"])
        if iid not in out:
            out[iid] = (r["split"], np.full((r["height"], r["width"]), -1, np.int16))
        out[iid][1][rle_to_mask({"size": [r["height"], r["width"]], "counts": r["rle"]})] = r["cluster"]
    return out


def compare(ranked: np.ndarray, distilled: np.ndarray) -> tuple[int, int, int, int]:
    """(ranking-labelled pixels, of them labelled by distill, with the same cluster, in the same
    segment after the best one-to-one cluster matching)."""
    on = ranked >= 0
    a, b = ranked[on].astype(np.int64), distilled[on].astype(np.int64)
    both = b >= 0
    same = int((a == b).sum())
    if not both.any():
        return int(on.sum()), 0, same, 0
    ua, ia = np.unique(a[both], return_inverse=True)
    ub, ib = np.unique(b[both], return_inverse=True)
    counts = np.zeros((len(ua), len(ub)), np.int64)
    np.add.at(counts, (ia, ib), 1)
    rows, cols = linear_sum_assignment(-counts)
    return int(on.sum()), int(both.sum()), same, int(counts[rows, cols].sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "demo_partsworld.py"))
    ap.add_argument("--store", default=None)
    ap.add_argument("--out", default="/tmp/distill_fit")
    ap.add_argument("-o", "--cfg-options", action="append", default=[])
    args = ap.parse_args()
    wall = time.perf_counter()
    cfg = load_config(args.config, args.cfg_options)
    store = store_for(cfg, args.store)
    wanted = {p.name: p for p in plan(cfg) if p.name in ("ranking", "distill_r1")}
    missing = [f"  {n} {p.version}" for n, p in wanted.items() if not store.is_complete(n, p.version)]
    if len(wanted) < 2 or missing:
        sys.exit(f"distill_fit: {store.root} lacks\n" + "\n".join(missing) + "\nmake them with:\n  partdistill run "
                 f"{args.config} --until distill --store {store.root} " + " ".join(f"-o {shlex.quote(o)}"
                                                                                  for o in args.cfg_options))
    ranking = label_maps(store.open("ranking", wanted["ranking"].version).file("labeled_parts.parquet"))
    distill = label_maps(store.open("distill_r1", wanted["distill_r1"].version).file("labeled_parts_r1.parquet"))
    totals: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(4, np.int64))
    parts: dict[str, list[list[int]]] = defaultdict(lambda: [[], []])
    objects: dict[str, int] = defaultdict(int)
    for iid, (split, rmap) in ranking.items():
        dmap = distill.get(iid, (split, np.full_like(rmap, -1)))[1]
        totals[split] += compare(rmap, dmap)
        objects[split] += 1
        parts[split][0].append(len(np.unique(rmap[rmap >= 0])))
        parts[split][1].append(len(np.unique(dmap[dmap >= 0])))
    lines = [
        f"`{' '.join(['python', 'benchmarks/distill_fit.py', *sys.argv[1:]])}`, "
        f"{datetime.date.today().isoformat()}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{time.perf_counter() - wall:.0f} s; ranking {wanted['ranking'].version}, distill_r1 "
        f"{wanted['distill_r1'].version}",
        "",
        "| split | objects | coverage | same cluster | same segment | parts / object: ranking | distill |",
        "|---|---|---|---|---|---|---|",
    ]
    for split in sorted(totals):
        n, lab, same, seg = totals[split]
        lines.append(f"| {split} | {objects[split]} | {100 * lab / max(n, 1):.1f} | {100 * same / max(n, 1):.1f} | "
                     f"{100 * seg / max(n, 1):.1f} | {np.mean(parts[split][0]):.2f} | {np.mean(parts[split][1]):.2f} |")
    lines += ["", "Shares of the ranking-labelled pixels, %."]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
