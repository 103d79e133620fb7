"""The premise check: K-means (k=4, cosine) inside ground-truth object masks, per feature source.

    python benchmarks/premise_check.py                      # the demo config's data and teacher
    python benchmarks/premise_check.py --limit 60 --split val

Runs (or reuses) the pipeline's `data` and `teacher` stages, then scores each feature source's
clusters against the part ground truth (AR@1, AR@10, per-object NMI/ARI) and prints a markdown
table with the paper's numbers beside ours. Raw RGB is the floor.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch

from partdistill.config import load_config
from partdistill.data.images import load_rgb
from partdistill.evaluation.premise import load_gt_objects, part_oracle, run_source, score
from partdistill.models.backbones import EfficientNetLite0, pixel_features
from partdistill.models.teacher import Teacher, stack_features
from partdistill.pipeline import run_pipeline, store_for
from partdistill.stages.teacher import load_teacher, resolve_path

REPO = Path(__file__).resolve().parents[1]
# Paper Table 5/6 (PartImageNet-test, GT objects): AR@1, AR@10
PAPER = {
    "Mask2Former Swin-L COCO, res3+res4, cosine": (6.6, 27.6),
    "Swin-L IN-21K classification": (5.3, 9.4),
    "ResNet-101 IN-21K classification": (2.8, 6.4),
}


def teacher_source(teacher: Teacher, layers, normalize=False):
    def source(img: np.ndarray, file_name: str):
        [out] = teacher.predict([img], layers=layers)
        h, w = out.inference_size
        grid = stack_features(out.features, layers, 8, normalize).permute(1, 2, 0).numpy()
        return grid, (h / img.shape[0], w / img.shape[1])
    return source


def effnet_source(model: EfficientNetLite0):
    def source(img: np.ndarray, file_name: str):
        return pixel_features(model, [img], strides=(4, 8, 16))[0].permute(1, 2, 0).numpy(), (1.0, 1.0)
    return source


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "demo_partsworld.py"))
    ap.add_argument("--store", default=None)
    ap.add_argument("--split", default="val")
    ap.add_argument("--limit", type=int, default=None, help="at most this many objects")
    ap.add_argument("-o", "--cfg-options", action="append", default=[])
    ap.add_argument("--per-class", action="store_true",
                    help="also AR@10 per object class for RGB and the teacher (where does colour win?)")
    args = ap.parse_args()
    torch.manual_seed(0)

    cfg = load_config(args.config, args.cfg_options)
    if args.store:
        cfg["runtime"]["store"] = args.store
    outcomes = {o.stage: o for o in run_pipeline(cfg, until="teacher")}
    store = store_for(cfg)
    data = store.open("data", outcomes["data"].version)
    teacher = load_teacher(store.open("teacher", outcomes["teacher"].version))
    random_teacher = Teacher.from_config(resolve_path(cfg["teacher"]["mmdet_config"]), None,
                                         cfg_options={"model.backbone.pretrained": False})
    effnet = EfficientNetLite0(pretrained=True).eval()
    teacher_2x = load_teacher(store.open("teacher", outcomes["teacher"].version),
                              resize_long_side=2 * cfg["data"]["partsworld"]["width"])

    objects = load_gt_objects(data.path, args.split, args.limit)
    images = {o.file_name: load_rgb(data.path / o.file_name) for o in objects}
    sources = {
        "raw RGB (floor)": None,
        "random-init teacher, res3+res4": teacher_source(random_teacher, ["res3", "res4"]),
        "trained teacher, res3+res4": teacher_source(teacher, ["res3", "res4"]),
        "trained teacher, res3+res4, each L2-normalised": teacher_source(teacher, ["res3", "res4"], True),
        "trained teacher, pixel decoder (stride 8)": teacher_source(teacher, ["pixel_decoder"]),
        "trained teacher, mask features (stride 4, pooled to 8)": teacher_source(teacher, ["mask_features"]),
        "EfficientNet-Lite0 alone, strides 4+8+16, each L2": effnet_source(effnet),
        # diagnostics: is resolution what holds the features back?
        "trained teacher, res3+res4, input upsampled 2x (stride 4 in the original)": teacher_source(
            teacher_2x, ["res3", "res4"]),
        "oracle: ground-truth parts pooled to stride 8": part_oracle(objects),
    }
    rows, maps_by_source = [], {}
    for name, source in sources.items():
        start = time.perf_counter()
        maps = run_source(objects, images, source)
        seconds = time.perf_counter() - start
        m = score(objects, maps)
        rows.append((name, m, seconds / max(len(images), 1)))
        maps_by_source[name] = maps
        print(f"{name}: {m} ({seconds:.1f} s)", flush=True)

    metrics = teacher_metrics(store, outcomes["teacher"].version)
    print()
    print(f"Parts World {args.split}: {len(objects)} objects in {len(images)} images; k=4, cosine; "
          f"teacher {outcomes['teacher'].version} (val mask AP50 {metrics.get('mask_AP50', 'n/a')}); "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print()
    print("| feature source | AR@1 | AR@10 | NMI (per object) | ARI (per object) | s / image |")
    print("|---|---|---|---|---|---|")
    for name, m, spi in rows:
        print(f"| {name} | {100 * m['AR@1']:.1f} | {100 * m['AR@10']:.1f} | {100 * m['NMI']:.1f} | "
              f"{100 * m['ARI']:.1f} | {spi:.3f} |")
    for name, (ar1, ar10) in PAPER.items():
        print(f"| paper (PartImageNet-test): {name} | {ar1} | {ar10} | – | – | – |")
    if args.per_class:
        shown = ["raw RGB (floor)", "trained teacher, res3+res4",
                 "trained teacher, mask features (stride 4, pooled to 8)"]
        classes = sorted({o.class_name for o in objects})
        print()
        print("| class | objects | " + " | ".join(f"AR@10 {n}" for n in shown) + " |")
        print("|---|---|" + "---|" * len(shown))
        for c in classes:
            idx = [i for i, o in enumerate(objects) if o.class_name == c]
            cells = [100 * score([objects[i] for i in idx], [maps_by_source[n][i] for i in idx])["AR@10"]
                     for n in shown]
            print(f"| {c} | {len(idx)} | " + " | ".join(f"{v:.1f}" for v in cells) + " |")


def teacher_metrics(store, version):
    import json

    art = store.open("teacher", version)
    return json.loads(art.file("metrics.json").read_text()) if "metrics.json" in art.files else {}


if __name__ == "__main__":
    main()
