"""Colour-aware mining (issue 14 §3): K-means (k=4) inside ground-truth objects of Parts World val
on the teacher's features, on colour (``mining.fusion.color_space``: CIELAB or the brightness-
invariant RGB direction), and on both fused (``mining.fusion``).

    python benchmarks/color_mining.py --store /tmp/cm_store
    python benchmarks/color_mining.py --store /tmp/cm_store --copy-from store   # reuse a demo's teacher
    python benchmarks/color_mining.py --store /tmp/cm_store --weights 0.25 0.5 1 --no-crf-rows
    python benchmarks/color_mining.py --store /tmp/cm_store --crf-weights 2 8 16 --per-class

Every row but the floor is the `mining` stage itself (``run_pipeline(cfg, until="mining")``, one
store, ``instances.source='gt'`` on the val split, the CRF off unless the row says so), scored
with :func:`partdistill.evaluation.mined.evaluate_mined` against the part ground truth (an oracle
that only a benchmark may read): AR@1 / AR@10 per object, per-object NMI / ARI. The floor is the
raw-RGB K-means of the evaluate stage (cosine, stride 1), unchanged.

``--copy-from STORE`` copies the `data` and `teacher` artifacts this config plans from another
store (the demo's, say) into ``--store`` first, so no teacher is trained and nothing is written
into the other store.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from partdistill.config import load_config, parse_options
from partdistill.evaluation.mined import (
    evaluate_label_maps,
    instance_label_maps,
    match_instances,
    object_label_maps,
    rgb_label_maps,
    score_label_maps,
)
from partdistill.evaluation.premise import load_gt_objects
from partdistill.pipeline import plan, run_pipeline, store_for
from partdistill.stages.instances import read_instances
from partdistill.storage import ArtifactStore

REPO = Path(__file__).resolve().parents[1]
SPLIT = "val"  # --split train: the same rows on the train split, to check weights picked on val
GT_OBJECTS = {"instances.source": "gt", "instances.min_object_fraction": 0.0,
              "mining.k": 4, "mining.crf.enabled": False}


def fusion(feature: float = 1.0, color: float = 0.0, position: float = 0.0, space: str = "lab") -> dict[str, Any]:
    return {"mining.fusion.feature_weight": feature, "mining.fusion.color_weight": color,
            "mining.fusion.position_weight": position, "mining.fusion.color_space": space}


def copy_upstream(cfg: Mapping[str, Any], source: Path, store: ArtifactStore) -> None:
    """Copy the complete `data` and `teacher` artifacts that ``cfg`` plans from ``source``."""
    other = ArtifactStore(source)
    for p in plan(cfg):
        if p.name not in ("data", "teacher") or store.is_complete(p.name, p.version):
            continue
        if not other.is_complete(p.name, p.version):
            sys.exit(f"{source} has no complete {p.name} {p.version} (have {other.versions(p.name)}): "
                     "give the config and -o options the demo ran with")
        target = store.path(p.name, p.version)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(other.path(p.name, p.version), target, symlinks=True)
        print(f"copied {p.name} {p.version} from {source}", file=sys.stderr, flush=True)


def fmt(m: Mapping[str, float]) -> str:
    return (f"{100 * m['AR@1']:.1f} | {100 * m['AR@10']:.1f} | {100 * m['NMI']:.1f} | {100 * m['ARI']:.1f} | "
            f"{m['matched']}/{m['objects']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "demo_partsworld.py"))
    ap.add_argument("--store", default=None, help="artifact store root (default: the config's runtime.store)")
    ap.add_argument("--copy-from", default=None, help="store to copy the data and teacher artifacts from")
    ap.add_argument("--weights", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0],
                    help="colour weights fused with the teacher's features (feature weight 1)")
    ap.add_argument("--spaces", nargs="+", default=["lab", "rgb_direction"], help="mining.fusion.color_space values")
    ap.add_argument("--position", type=float, nargs="*", default=[0.25],
                    help="position weights, each with the best colour weight")
    ap.add_argument("--no-crf-rows", action="store_true", help="skip the rows with the dense CRF")
    ap.add_argument("--crf-weights", type=float, nargs="*", default=None,
                    help="colour weights that also get a row with the CRF (default: the best without it)")
    ap.add_argument("--per-class", action="store_true", help="AR@10 per object class")
    ap.add_argument("--split", default=SPLIT, help="the split whose GT objects are mined and scored")
    ap.add_argument("-o", "--cfg-options", action="append", default=[], help="key=value, for every row")
    args = ap.parse_args()
    split = args.split
    torch.manual_seed(0)
    wall = time.perf_counter()

    def cfg_for(over: Mapping[str, Any]) -> dict[str, Any]:
        cfg = load_config(args.config, {**GT_OBJECTS, "instances.splits": [split], **parse_options(args.cfg_options),
                                        **over})
        if args.store:
            cfg["runtime"]["store"] = args.store
        return cfg

    store = store_for(cfg_for({}), args.store)
    if args.copy_from:
        copy_upstream(cfg_for({}), Path(args.copy_from), store)

    def run(name: str, over: Mapping[str, Any]):
        start = time.perf_counter()
        cfg = cfg_for(over)
        out = {o.stage: o for o in run_pipeline(cfg, store, until="mining")}
        computed = [s for s, o in out.items() if o.state == "computed"]
        s = out["mining"].summary.get("seconds", {})
        print(f"  {name}: {time.perf_counter() - start:.1f} s"
              f"{' (computed ' + ', '.join(computed) + ')' if computed else ''}", file=sys.stderr, flush=True)
        return cfg, out, float(s.get("kmeans", 0.0)) + float(s.get("crf", 0.0)) + float(s.get("read", 0.0))

    rows: list[tuple[str, dict[str, float], float, dict[int, np.ndarray]]] = []
    cfg, base, seconds = run("teacher features only", fusion())
    data, instances = store.open("data", base["data"].version), store.open("instances", base["instances"].version)
    objects = load_gt_objects(data.path, split)
    inst_rows = [r for r in read_instances(instances).to_pylist() if r["split"] == split]
    matches = match_instances(objects, inst_rows)

    def add(name: str, over: Mapping[str, Any]) -> dict[str, float]:
        _, out, secs = run(name, over)
        maps = instance_label_maps(store.open("mining", out["mining"].version), split)
        m = evaluate_label_maps(data.path, instances, maps, split, objects)
        rows.append((name, m, secs, maps))
        return m

    mcfg = cfg["mining"]
    start = time.perf_counter()
    rgb = rgb_label_maps(data.path, instances, split, k=4, metric=mcfg["metric"], seed=int(mcfg["seed"]),
                         min_part_area=int(mcfg["min_part_area"]))
    rows.append(("raw-RGB K-means (floor; cosine, stride 1)", evaluate_label_maps(data.path, instances, rgb, split,
                                                                                   objects),
                 time.perf_counter() - start, rgb))
    add("teacher features only (default, fusion off)", fusion())
    for p in args.position:
        add(f"teacher + position {p:g} (no colour)", fusion(1.0, 0.0, p))
    best: dict[str, float] = {}
    for space in args.spaces:
        add(f"{space} colour only (feature 0, colour 1)", fusion(0.0, 1.0, 0.0, space))
        for p in args.position:
            add(f"{space} colour 1 + position {p:g} (no teacher)", fusion(0.0, 1.0, p, space))
        by_weight = {w: add(f"teacher + {space} colour {w:g}", fusion(1.0, w, 0.0, space)) for w in args.weights}
        best[space] = max(by_weight, key=lambda w: by_weight[w]["AR@10"])
        for p in args.position:
            add(f"teacher + {space} colour {best[space]:g} + position {p:g}", fusion(1.0, best[space], p, space))
    if not args.no_crf_rows:
        crf = {"mining.crf.enabled": True}
        add("teacher features only, + dense CRF (the stage's default)", {**fusion(), **crf})
        for space in args.spaces:
            for w in sorted({best[space], *(args.crf_weights or [])}):
                add(f"teacher + {space} colour {w:g}, + dense CRF", {**fusion(1.0, w, 0.0, space), **crf})
            for p in args.position:
                add(f"teacher + {space} colour {best[space]:g} + position {p:g}, + dense CRF",
                    {**fusion(1.0, best[space], p, space), **crf})
            add(f"{space} colour only, + dense CRF", {**fusion(0.0, 1.0, 0.0, space), **crf})

    teacher = base.get("teacher")
    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], Path.cwd())] + sys.argv[1:])
    print()
    print(f"`{cmd}` — {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, "
          f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), python "
          f"{platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads); "
          f"{time.perf_counter() - wall:.0f} s in all")
    print()
    print(f"Parts World {split}: {len(objects)} GT objects with parts in {len({o.image_id for o in objects})} "
          f"images; instances = GT objects; teacher {teacher.version if teacher else 'n/a'}, features "
          f"{'+'.join(cfg['features']['layers'])}; K-means k=4, {mcfg['iters']} iters, seed {mcfg['seed']}; "
          f"parts < {mcfg['min_part_area']} px dropped; no CRF unless said. Numbers in %.")
    print()
    print("| K-means on | AR@1 | AR@10 | NMI | ARI | matched | s |")
    print("|---|---|---|---|---|---|---|")
    for name, m, secs, _ in rows:
        print(f"| {name} | {fmt(m)} | {secs:.1f} |")
    if args.per_class:
        classes = sorted({o.class_name for o in objects})
        print()
        print("| AR@10 by class | " + " | ".join(f"{c} ({sum(o.class_name == c for o in objects)})"
                                                 for c in classes) + " |")
        print("|---|" + "---|" * len(classes))
        for name, _, _, maps in rows:
            per_obj = object_label_maps(objects, matches, maps)
            cells = []
            for c in classes:
                idx = [i for i, o in enumerate(objects) if o.class_name == c]
                cells.append(100 * score_label_maps([objects[i] for i in idx], [per_obj[i] for i in idx])["AR@10"])
            print(f"| {name} | " + " | ".join(f"{v:.1f}" for v in cells) + " |")


if __name__ == "__main__":
    main()
