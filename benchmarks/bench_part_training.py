"""Seconds per training iteration of the part model, for the proposals and the distill heads.

    python benchmarks/bench_part_training.py --store STORE [--iters 16] [-o key=value ...]

Reads the store's `teacher`, `instances` and `mining` artifacts of the config (run the pipeline up
to `mining` first), trains a few iterations of batch ``proposals.batch_size`` with the stage's
augmentation, and reports the mean time of iterations 4..N (the first ones warm up). Settings:
the config's (50 queries, 2,048 points), fewer points, fewer queries, and the class-conditioned
distill head (k × 8 classes). Run it on an idle machine: 2 torch processes on 2 cores slow each
other down many times over.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
from mmengine.config import Config

from partdistill.config import load_config
from partdistill.models.part_model import model_config
from partdistill.models.train_parts import training_config
from partdistill.models.train_teacher import train
from partdistill.pipeline import plan, store_for
from partdistill.stages.instances import read_instances
from partdistill.stages.proposals import training_records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo_partsworld.py")
    ap.add_argument("--store", default=None)
    ap.add_argument("--iters", type=int, default=16)
    ap.add_argument("-o", "--cfg-options", action="append", default=[])
    args = ap.parse_args()
    cfg = load_config(args.config, args.cfg_options)
    store = store_for(cfg, args.store)
    planned = {p.name: p for p in plan(cfg)}
    for stage in ("data", "teacher", "instances", "mining"):
        if not store.is_complete(stage, planned[stage].version):
            raise SystemExit(f"{stage}/{planned[stage].version} is not in {store.root}: run "
                             f"`partdistill run {args.config} --until mining --store {store.root}` first")
    teacher = Config.fromfile(str(store.open("teacher", planned["teacher"].version).file("mmdet_config.py")))
    instances = read_instances(store.open("instances", planned["instances"].version)).to_pylist()
    parts = pq.read_table(store.open("mining", planned["mining"].version).path / "mined_parts").to_pylist()
    data_dir = store.open("data", planned["data"].version).path
    records, _ = training_records(instances, parts, data_dir, ["train"], 0.05)
    k = cfg["ranking"]["k"]
    for r in records:  # spread labels over the classes, for the class-conditioned head
        for j, inst in enumerate(r["instances"]):
            inst["bbox_label"] = j % k
        r["object_classes"] = [0]
    p = cfg["proposals"]
    settings = [(f"{p['num_queries']} queries, {p['num_points']} points (the config)", {}),
                (f"{p['num_queries']} queries, 1024 points", {"num_points": 1024}),
                ("30 queries, 1024 points", {"num_points": 1024, "num_queries": 30}),
                (f"class-conditioned distill head, {k} × 8 classes", {"num_classes": 8 * k, "parts_per_class": k})]
    lines = [f"`python benchmarks/bench_part_training.py --iters {args.iters}` on {platform.machine()}, "
             f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}; batch {p['batch_size']}, "
             f"crop {p['image_size']}", "", "| setting | s / iteration |", "|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        ann = Path(tmp) / "parts.json"
        ann.write_text(json.dumps(records))
        for name, kw in settings:
            kw = {"num_queries": p["num_queries"], "num_points": p["num_points"], **kw}
            model = model_config(teacher.model.to_dict(), **kw)
            work = Path(tmp) / "work"
            shutil.rmtree(work, ignore_errors=True)
            rc = training_config(model, ann, work, None, image_size=p["image_size"], max_iters=args.iters,
                                 batch_size=p["batch_size"], lr=1e-4, checkpoint_interval=10 ** 6)
            stamps: list[float] = []
            train(rc, on_iter=lambda i, loss, stamps=stamps: stamps.append(time.perf_counter()))
            per = (stamps[-1] - stamps[3]) / (len(stamps) - 4)
            lines.append(f"| {name} | {per:.3f} |")
            print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
