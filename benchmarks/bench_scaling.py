"""Per-image seconds and bytes of the sharded stages: the measured basis of SCALING.md.

    python benchmarks/bench_scaling.py --store /tmp/scaling-store [--images 96]
        [--task-runner local|dask] [--workers 2] [-o key=value ...]

Runs, in this process, on a Parts World of ``--images`` images (the demo's 256×192):

1. ``instances`` with the demo teacher (its inference cost; the teacher is trained for 3
   iterations only, since inference costs the same whatever the weights);
2. ``instances`` with ground-truth objects (``instances.source='gt'``), then ``features``,
   ``mining`` (K-means + CRF) and ``proposals_r1`` (4 training iterations; its labelling pass is
   timed) on them: realistic object counts for the per-instance costs.

and prints one row per stage: seconds, seconds per image, artifact bytes, bytes per image and per
instance. The store is wiped first. ``--task-runner dask`` runs the shards on a local Dask cluster
of ``--workers`` processes (its start-up is included in the first sharded stage's time).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import time
from pathlib import Path

from partdistill.config import load_config
from partdistill.pipeline import run_pipeline
from partdistill.storage import ArtifactStore

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--task-runner", default="local", choices=["local", "dask", "ray"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("-o", "--cfg-options", action="append", default=[])
    args = ap.parse_args()

    root = Path(args.store)
    shutil.rmtree(root, ignore_errors=True)
    store = ArtifactStore(root)
    base = {"data.partsworld.images": args.images, "teacher.train.max_iters": 3,
            "teacher.train.checkpoint_interval": 3, "runtime.store": str(root),
            "runtime.task_runner": args.task_runner, "runtime.workers": args.workers,
            "proposals.rounds": 1, "proposals.max_iters": 4, "proposals.checkpoint_interval": 4}
    cfg_path = REPO / "configs" / "demo_partsworld.py"

    print(f"machine: {os.cpu_count()} cores, python {platform.python_version()}, "
          f"task_runner={args.task_runner}" + (f" ({args.workers} workers)" if args.task_runner != "local" else ""))
    rows = []
    teacher_cfg = load_config(cfg_path, [f"{k}={v!r}" for k, v in base.items()] + args.cfg_options)
    start = time.perf_counter()
    outcomes = {o.stage: o for o in run_pipeline(teacher_cfg, store, until="instances")}
    rows.append(("instances (teacher)", outcomes["instances"], store))
    print(f"data + 3-iteration teacher + instances: {time.perf_counter() - start:.1f} s", flush=True)

    gt_cfg = load_config(cfg_path, [f"{k}={v!r}" for k, v in {**base, "instances.source": "gt"}.items()]
                         + args.cfg_options)
    outcomes = {o.stage: o for o in run_pipeline(gt_cfg, store, until="proposals_r1")}
    for name in ("instances", "features", "mining", "proposals_r1"):
        rows.append((name + (" (gt)" if name == "instances" else ""), outcomes[name], store))

    images = args.images
    instances = outcomes["instances"].summary["instances"]
    print(f"images {images}, ground-truth instances kept {instances}")
    print("| stage | seconds | s / image | artifact bytes | bytes / image | bytes / instance |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, out, st in rows:
        art = st.open(out.stage, out.version)
        seconds = out.seconds
        if out.stage.startswith("proposals"):  # the labelling pass only (training is per iteration)
            seconds = out.summary["label_seconds"]
            label += " labelling"
        n_bytes = art.bytes
        if out.stage.startswith("proposals"):
            n_bytes = sum(f["bytes"] for name, f in art.files.items() if name.startswith("pseudo_parts_r"))
        per_instance = "–" if "teacher" in label else f"{n_bytes / max(instances, 1):,.0f}"
        print(f"| {label} | {seconds:.1f} | {seconds / images:.3f} | {n_bytes:,} | {n_bytes / images:,.0f} | "
              f"{per_instance} |", flush=True)


if __name__ == "__main__":
    main()
