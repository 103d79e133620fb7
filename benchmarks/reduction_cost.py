"""What shrinking the feature store costs in mined-part quality (issue #3, item 4).

    python benchmarks/reduction_cost.py --store /tmp/ablation-store [--dims 16 32 64]

Mines Parts World val's ground-truth objects (CRF off, so only the features differ) with the
teacher's res3+res4 features stored as fp16, then with a fixed random projection to d' dims, and
also with fused mining (features computed on the fly, never stored). Scores with
evaluate_mined, and prints the bytes per instance beside AR@1 / AR@10 / NMI / ARI.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from partdistill.config import load_config
from partdistill.evaluation.mined import evaluate_mined
from partdistill.pipeline import run_pipeline, store_for

REPO = Path(__file__).resolve().parents[1]
BASE = {"instances.source": "gt", "instances.splits": ["val"], "instances.min_object_fraction": 0.0,
        "mining.crf.enabled": False}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "demo_partsworld.py"))
    ap.add_argument("--store", default=None)
    ap.add_argument("--dims", type=int, nargs="+", default=[16, 32, 64])
    args = ap.parse_args()
    variants = {"stored fp16, 152-d (default)": {}}
    for d in args.dims:
        variants[f"random projection to {d}-d"] = {"features.reduction.type": "random_projection",
                                                    "features.reduction.dim": d}
    variants["fused (features never stored)"] = {"mining.fused": True}
    print("| features | bytes / instance in the store | AR@1 | AR@10 | NMI | ARI |")
    print("|---|---|---|---|---|---|")
    for name, extra in variants.items():
        cfg = load_config(args.config, {**BASE, **extra})
        if args.store:
            cfg["runtime"]["store"] = args.store
        out = {o.stage: o for o in run_pipeline(cfg, until="mining")}
        store = store_for(cfg)
        m = evaluate_mined(store.path("data", out["data"].version), store.open("instances", out["instances"].version),
                           store.open("mining", out["mining"].version))
        size = out["features"].summary["bytes_per_instance"] if "features" in out else 0
        print(f"| {name} | {size:,} | {100 * m['AR@1']:.1f} | {100 * m['AR@10']:.1f} | {100 * m['NMI']:.1f} | "
              f"{100 * m['ARI']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
