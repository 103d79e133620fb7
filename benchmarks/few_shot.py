"""Few-shot part segmentation (paper Table 4) on a pipeline's store: distilled model vs teacher.

    python benchmarks/few_shot.py --store STORE
    python benchmarks/few_shot.py --store STORE --iters 100 --fractions 0.01 0.1 --seeds 0 1

For each fraction and seed, :func:`partdistill.finetune.finetune` trains a part model on that
fraction of the labelled train images, once from the distilled part model (``init=distill``) and
once from the teacher (``init=teacher``, the paper's "Instance Seg." rows), the same subset, seed
and schedule for both, and scores it on the val split with the GT object masks: AR@200 (every
query, by score 1 − P(no-object)), mIoU with the predicted part category taken as is, and C-mIoU
(majority mapping per object class, as the `evaluate` stage scores the distilled model).

Needs a store with a complete `distill` artifact (``partdistill run CONFIG --until distill``).
Writes the fine-tuned models under ``--work`` (default a temporary folder; a rerun with the same
``--work`` keeps the fine-tunes an interrupted run finished) and the markdown table,
with the command, date and machine, to stdout and ``--out`` (default ``docs/few_shot.md``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from partdistill.finetune import INITS, FinetuneError, find_sources, finetune

REPO = Path(__file__).resolve().parents[1]
# The paper's Table 4, fine-tuned on PartImageNet (SwinL Mask2Former; AR@200, mIoU in %): other
# data, other scale, for orientation. "Instance Seg." is the COCO instance model, our teacher row.
PAPER = {("distill", 0.01): (67.8, 36.3), ("teacher", 0.01): (65.3, 32.0),
         ("distill", 0.1): (74.1, 64.5), ("teacher", 0.1): (73.5, 63.2)}
LABEL = {"distill": "PartDistillation (distill init)", "teacher": "teacher (instance seg.) init"}


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.node() or 'unknown host'}: {os.cpu_count()} CPU cores visible, {gpu}, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def pct(v: Any) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def table(runs: Sequence[Mapping[str, Any]], fractions: Sequence[float], seeds: Sequence[int]) -> list[str]:
    """One row per (fraction, init): the mean over seeds (± the spread when several)."""
    lines = ["| fraction | train images | init | iters | AR@200 | mIoU (identity) | C-mIoU (majority) | seconds "
             "| paper, PartImageNet: AR@200 / mIoU |", "|---" * 9 + "|"]
    for fraction in fractions:
        for init in INITS:
            rows = [r for r in runs if r["fraction"] == fraction and r["init"] == init]
            if not rows:
                continue

            def cell(key: str, rows=rows) -> str:
                vals = [r[key] for r in rows if r[key] is not None and not math.isnan(r[key])]
                if not vals:
                    return "–"
                if len(vals) == 1:
                    return pct(vals[0])
                return f"{pct(float(np.mean(vals)))} ± {100 * float(np.std(vals)):.1f}"

            paper = PAPER.get((init, fraction))
            images = "/".join(dict.fromkeys(str(r["images"]) for r in rows))   # the same size for every seed
            lines.append(f"| {100 * fraction:g}% | {images} of "
                         f"{rows[0]['labelled_images']} | {LABEL[init]} | {rows[0]['iters']} | {cell('AR@200')} | "
                         f"{cell('mIoU')} | {cell('C-mIoU')} | {np.mean([r['seconds'] for r in rows]):.0f} | "
                         + (f"{paper[0]:.1f} / {paper[1]:.1f}" if paper else "–") + " |")
    return lines


def finished(out: Path, iters: int, lr: float | None, sources: Any) -> dict[str, Any] | None:
    """The metrics of a fine-tune an earlier, interrupted benchmark finished in ``out`` with the
    same settings and sources, or None."""
    path = out / "metrics.json"
    if not path.is_file():
        return None
    m = json.loads(path.read_text())
    made = (m["iters"], m["sources"]["distill"], m["sources"]["teacher"])
    want = (iters, f"{sources.distill.stage}/{sources.distill.version}", sources.teacher.version)
    if made != want or (lr is not None and m["training"]["lr"] != lr):
        return None
    return m


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True, help="artifact store root with a complete distill artifact")
    ap.add_argument("--distill", default=None, help="distill_rN/<version> (default: the newest)")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the distill stage's)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--work", default=None, help="folder for the fine-tuned models (default: a temporary one)")
    ap.add_argument("--out", default=str(REPO / "docs" / "few_shot.md"), help="the markdown table")
    args = ap.parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, Path.cwd()),
                                                               *(argv if argv is not None else sys.argv[1:])])
    try:
        sources = find_sources(args.store, "distill", args.distill)
    except FinetuneError as err:
        sys.exit(f"few_shot: {err}")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="few-shot-"))
    runs = []
    for fraction in args.fractions:
        for seed in args.seeds:
            for init in INITS:
                out = work / f"{init}_{fraction:g}_seed{seed}"
                m = finished(out, args.iters, args.lr, sources)
                if m is None:
                    m = finetune(args.store, fraction, init, args.distill, args.iters, seed, out, args.device,
                                 args.lr).metrics
                runs.append(m)
                print(f"{init:<8} {100 * fraction:g}% seed {seed}: {m['images']} image(s), AR@200 {pct(m['AR@200'])}, "
                      f"mIoU {pct(m['mIoU'])}, C-mIoU {pct(m['C-mIoU'])}, {m['seconds']:.0f} s", file=sys.stderr)
    first = runs[0]
    s = first["training"]
    lines = [
        "# Few-shot fine-tuning (paper Table 4) on the demo store", "",
        f"Command: `{command}`  ", f"Date: {datetime.date.today().isoformat()}  ", f"Machine: {machine()}  ",
        f"Store: `{args.store}` ({sources.description}); val split: {first['val']['objects']} GT objects in "
        f"{first['val']['images']} images, {len(first['part_categories'])} part categories.", "",
        *table(runs, args.fractions, args.seeds), "",
        f"Both inits train the same decoder (frozen teacher backbone and pixel decoder, {s['num_queries']} queries, "
        f"a fresh {len(first['part_categories'])}+1-way class head) on the same seeded image subset with the distill "
        f"stage's augmentation (flip, scale jitter {s['scale_range']}, {s['image_size'][0]}×{s['image_size'][1]} "
        f"crops), batch {s['batch_size']}, lr {s['lr']:g}, on {s['device']}. Seeds: {', '.join(map(str, args.seeds))} "
        "(several: mean ± standard deviation over seeds; each seed draws its own images and its own class-head "
        "initialisation). AR@200 ranks every query (here fewer than 200) by 1 − P(no-object); "
        "mIoU takes each object pixel's predicted part category as is, C-mIoU maps predicted categories to GT parts "
        "by majority per object class (as `evaluate` scores the distilled model). In %. Seconds: training and "
        "evaluation of one fine-tune, on a machine shared with other work (so timings vary several-fold). The "
        "paper's numbers are for a SwinL Mask2Former on PartImageNet, tens of thousands of iterations: for "
        "orientation only.", "",
    ]
    text = "\n".join(lines)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
