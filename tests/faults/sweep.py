"""The full fault-injection sweep: ``python -m tests.faults.sweep [--stages S ...] [--seeds N]``.

Builds the tiny uninterrupted run, then for every stage tries each kill point of
:func:`tests.faults.harness.kill_points` (named points in the write path, and ``--seeds``
random moments), reruns and compares. Prints one line per kill and a table per stage, and
writes every result to ``--out`` (JSON). Exits 1 if any kill point failed.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from tests.faults.harness import build_base, kill_once, kill_points, stage_names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults.sweep")
    parser.add_argument("--stages", nargs="*", help="stages to sweep (default: all)")
    parser.add_argument("--seeds", type=int, default=3, help="random-moment kills per stage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="one point of each kind per stage")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/faults.json"))
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="partdistill-faults-") as tmp:
        base = Path(tmp) / "base"
        print("building the uninterrupted run ...", flush=True)
        cfg, reference, seconds = build_base(base)
        stages = args.stages or stage_names(cfg)
        results = []
        for stage in stages:
            for point in kill_points(stage, seconds[stage], args.seeds, rng, full=not args.quick):
                r = kill_once(base, Path(tmp) / "work", cfg, reference, stage, point)
                results.append(r.as_dict())
                print(f"{stage:<13} {point:<20} {r.outcome:<12} left: {r.partial_after_kill:<16} "
                      f"{r.seconds:6.1f} s {'; '.join(r.visible_problems + r.differing)[:300]}", flush=True)
    print("\n| stage | kill points | killed | passed | not reached | failed |\n|---|---|---|---|---|---|")
    for stage in stages:
        rs = [r for r in results if r["stage"] == stage]
        c = Counter(r["outcome"] for r in rs)
        print(f"| {stage} | {len(rs)} | {sum(r['killed'] for r in rs)} | {c['passed']} | {c['not reached']} "
              f"| {c['failed']} |")
    c = Counter(r["outcome"] for r in results)
    print(f"| all | {len(results)} | {sum(r['killed'] for r in results)} | {c['passed']} | {c['not reached']} "
          f"| {c['failed']} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": "python -m tests.faults.sweep " + " ".join(argv or sys.argv[1:]),
                                    "machine": f"{platform.node()} {platform.processor()} {platform.python_version()}",
                                    "seconds": round(time.monotonic() - start), "results": results}, indent=1))
    print(f"results: {args.out} ({time.monotonic() - start:.0f} s)")
    return 1 if c["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
