"""Where do the proposals lose recall on the teacher's objects? (issue 14: proposals against their
mined parts, like for like.)

    python benchmarks/crop_boxes.py --config configs/demo_partsworld.py --store store
    python benchmarks/crop_boxes.py --config configs/quality_partsworld.py --store STORE -o proposals.crop.box=mask

On the val GT objects a pipeline instance matches (IoU >= 0.5), the last `proposals` round runs
on each object's crop with the crop box drawn around

- the GT object mask (what ``benchmarks/proposal_rounds.py`` does),
- the matched teacher instance mask, whole (``crop.box='mask'``),
- its largest 8-connected component (``crop.box='largest_component'``),

and its masks are clipped to either the GT or the teacher mask. `evaluate`'s like-for-like row is
"teacher box, teacher clip": the mined parts only ever see the teacher's mask. Every row is scored
as ``proposal_rounds.py`` scores (each object one "image", predictions clipped to the GT object,
AR@10 with :func:`~partdistill.evaluation.metrics.average_recall`), beside the mined parts of the
same objects. Also printed: how the teacher's masks differ from the GT ones (IoU, components,
box sizes). Reads the store; writes nothing.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proposal_rounds import box, label_map_proposals, open_artifacts, score_row  # noqa: E402

from partdistill.config import load_config  # noqa: E402
from partdistill.data.images import load_rgb  # noqa: E402
from partdistill.evaluation.mined import instance_label_maps, match_instances, object_label_maps  # noqa: E402
from partdistill.evaluation.premise import load_gt_objects  # noqa: E402
from partdistill.models.object_crops import largest_component, object_box  # noqa: E402
from partdistill.models.part_model import predict_objects  # noqa: E402
from partdistill.pipeline import store_for  # noqa: E402
from partdistill.stages.instances import read_instances  # noqa: E402
from partdistill.stages.proposals import load_part_model  # noqa: E402
from partdistill.storage import rle_to_mask  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "demo_partsworld.py"))
    ap.add_argument("--store", default=None)
    ap.add_argument("--split", default="val")
    ap.add_argument("-o", "--cfg-options", action="append", default=[])
    args = ap.parse_args()
    wall = time.perf_counter()
    cfg = load_config(args.config, args.cfg_options)
    store = store_for(cfg, args.store)
    arts = open_artifacts(cfg, store, f"partdistill run {args.config} --until proposals --store {store.root}")
    last = max((n for n in arts if n.startswith("proposals_r")), key=lambda n: int(n.rsplit("_r", 1)[1]))
    data = arts["data"]
    objects = load_gt_objects(data.path, args.split)
    insts = [r for r in read_instances(arts["instances"]).to_pylist() if r["split"] == args.split]
    matches = match_instances(objects, insts)
    by_id = {r["instance_id"]: r for r in insts}
    idx = sorted(matches)
    sub = [objects[i] for i in idx]
    gt = [o.mask for o in sub]
    teacher = [rle_to_mask({"size": [by_id[matches[i]]["height"], by_id[matches[i]]["width"]],
                            "counts": by_id[matches[i]]["rle"]}) for i in idx]
    main_part = [largest_component(t) for t in teacher]
    model = load_part_model(arts[last], cfg["runtime"].get("device", "cpu"))
    crop = dict(model.part_crop or {})
    if not crop:
        sys.exit(f"crop_boxes: {last} was trained on whole images (proposals.crop.enabled=False): no crop boxes")

    def proposals(box_masks, clip_masks):
        out = []
        for o, bm, cm in zip(sub, box_masks, clip_masks, strict=True):
            with torch.inference_mode():
                p = predict_objects(model, load_rgb(data.path / o.file_name), [bm], "cpu",
                                    crop={**crop, "box": "mask"})[0]
            binary = (p["masks"] > 0.5).numpy() & cm[None]
            scores = p["scores"].float().numpy()
            ys, xs = box(o.mask)
            clipped = binary[:, ys, xs] & o.mask[ys, xs]
            keep = np.nonzero(clipped.any((1, 2)))[0]
            out.append(list(clipped[keep[np.argsort(-scores[keep], kind="stable")]]))
        return out

    mined = object_label_maps(objects, matches, instance_label_maps(arts["mining"], args.split))
    rows = [("mined parts (inside the teacher's mask)",
             score_row(sub, label_map_proposals(sub, [mined[i] for i in idx])))]
    for name, bm, cm in [("GT mask", gt, gt), ("GT mask", gt, teacher), ("teacher mask, whole", teacher, gt),
                         ("teacher mask, whole", teacher, teacher), ("teacher mask, largest component", main_part, gt),
                         ("teacher mask, largest component", main_part, teacher)]:
        clip = "GT" if cm is gt else "teacher"
        rows.append((f"{last}: box around the {name}, clipped to the {clip} mask", score_row(sub, proposals(bm, cm))))
        print(rows[-1][0], f"{100 * rows[-1][1]['AR@10']:.1f}", file=sys.stderr, flush=True)

    from scipy import ndimage

    ious = [(g & t).sum() / (g | t).sum() for g, t in zip(gt, teacher, strict=True)]
    n_comp = [ndimage.label(t, structure=np.ones((3, 3), bool))[1] for t in teacher]
    ratio = np.array([object_box(t, 64, 0.0).side / object_box(g, 64, 0.0).side
                      for t, g in zip(teacher, gt, strict=True)])
    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], Path.cwd())] + sys.argv[1:])
    lines = [f"`{cmd}` — {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
             f"{time.perf_counter() - wall:.0f} s",
             "", f"Parts World {args.split}: {len(idx)} of {len(objects)} GT objects matched by a teacher instance; "
             f"{last} {arts[last].version}, trained with crop.box={crop.get('box', 'mask')!r}. Teacher vs GT mask: "
             f"IoU median {np.median(ious):.2f}; {100 * np.mean(np.array(n_comp) > 1):.0f} % have more than one "
             f"component; whole-mask box side / GT box side median {np.median(ratio):.2f}, over 1.3 for "
             f"{100 * np.mean(ratio > 1.3):.0f} %.", "",
             "| proposals | AR@1 | AR@10 | GT parts found |", "|---|---|---|---|"]
    for name, m in rows:
        lines.append(f"| {name} | {100 * m['AR@1']:.1f} | {100 * m['AR@10']:.1f} | {100 * np.mean(m['found']):.1f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
