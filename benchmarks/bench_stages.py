"""Throughput and peak memory of each stage, one process per stage.

    python benchmarks/bench_stages.py [--config configs/demo_partsworld.py] [--stages instances features]
        [-o key=value ...]

Runs the pipeline up to the stages' inputs (reusing complete artifacts), then runs each named
stage alone (`partdistill run --only`) in a fresh process and reports wall time, images/s and
the process's peak RSS (from wait4). Stages already complete are recomputed in a scratch copy.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from partdistill.config import load_config
from partdistill.pipeline import plan, run_pipeline, store_for

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "demo_partsworld.py"))
    ap.add_argument("--store", default=None)
    ap.add_argument("--stages", nargs="+", default=["instances", "features"])
    ap.add_argument("-o", "--cfg-options", action="append", default=[])
    args = ap.parse_args()
    cfg = load_config(args.config, args.cfg_options)
    if args.store:
        cfg["runtime"]["store"] = args.store
    store = store_for(cfg)
    planned = {p.name: p for p in plan(cfg)}
    for stage in args.stages:
        for up in planned[stage].inputs:
            run_pipeline(cfg, store, until=up)
    images = None
    print(f"machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
          f"python {platform.python_version()}")
    print("| stage | images | wall s | images/s | peak RSS MiB |")
    print("|---|---|---|---|---|")
    for stage in args.stages:
        scratch = Path(tempfile.mkdtemp(prefix="bench-store-"))
        for up in planned[stage].inputs:  # the stage's inputs, linked read-only into a scratch store
            (scratch / up).mkdir(parents=True, exist_ok=True)
            os.symlink(store.path(up, planned[up].version), scratch / up / planned[up].version)
        cmd = [sys.executable, "-m", "partdistill", "run", args.config, "--only", stage, "--engine", "local",
               "--store", str(scratch)] + [x for o in args.cfg_options for x in ("-o", o)]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        if status != 0:
            sys.exit(f"{stage} failed:\n{proc.stderr.read().decode()[-2000:]}")
        import json

        summary = json.loads((scratch / stage / planned[stage].version / "manifest.json").read_text())["summary"]
        images = summary.get("images", images) or images
        n = images or 0
        print(f"| {stage} | {n} | {wall:.1f} | {n / wall:.2f} | {usage.ru_maxrss / 1024:.0f} |", flush=True)
        extra = {k: v for k, v in summary.items() if k != "images"}
        print(f"  {stage} summary: {extra}", file=sys.stderr, flush=True)
        shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
