"""Stage `evaluate`: part quality of the run and of its baselines against the part ground truth.

On the ``split`` (val) of the data's part ground truth (``parts_{split}.json``, evaluation-only:
this is the one stage allowed to read it), every method is scored by one protocol
(:mod:`partdistill.evaluation.parts_eval`), in two settings: with the ground-truth object masks
(and classes), and with the pipeline's own instances matched to the GT objects.

Methods, all from this run's artifacts:

- ``RGB K-means (floor)``: K-means (k = mining.k) on each object's raw colours;
- ``mined parts``: the `mining` stage's K-means (+ CRF) parts (pipeline objects only: they
  exist for the pipeline's instances);
- ``proposals``: the last `proposals` round's queries, class-agnostic (no ranking);
- ``one-stage K-means (no self-training)``: the paper's one-stage baseline without its
  self-training rounds: per class, K-means over all its training objects' teacher features
  (pipeline objects only; needs the stored `features`);
- ``proposals + ranking``: the `ranking` stage's class-specific clusters (pipeline objects only);
- ``PartDistillation``: the last `distill` round's class-conditioned model.

Writes ``predictions.json``: the final model's parts on the GT objects as a part-results file
(:func:`partdistill.evaluation.score.write_results`; ``partdistill score`` on it gives the table's
PartDistillation row with GT objects, to the last digit). Class ids are the run's one numbering,
that of its `instances` artifact (:func:`~partdistill.stages.instances.read_object_classes`).
Writes ``metrics.json`` ({setting: {method: metrics}} plus the paper's numbers, and how many
objects the size filter dropped), ``table.md``,
``report.html`` with the tables, per-class overlays (``overlays/``) and 3×3 purity grids per part
cluster (``purity/``, the paper's Fig. 5: nine objects of a class with the cluster's part lit).
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from partdistill.stages.base import Stage, StageContext
from partdistill.storage import write_json_atomic

# The paper's Table 3, PartImageNet (ImageNet-21K training), for orientation: other data, other scale.
PAPER = {"gt": {"PartDistillation": {"AR@200": 0.580, "mIoU": 0.480}, "one-stage": {"AR@200": 0.362, "mIoU": 0.319}},
         "pipeline": {"PartDistillation": {"AR@200": 0.514, "mIoU": 0.361},
                      "one-stage": {"AR@200": 0.318, "mIoU": 0.266}}}
SETTINGS = {"gt": "ground-truth object masks", "pipeline": "the pipeline's own object instances"}
COLUMNS = ["AR@1", "AR@10", "AR@200", "C-mIoU", "A-mIoU", "C-mIoU (Hungarian)", "FG-NMI", "FG-ARI",
           "NMI (within object)", "ARI (within object)"]


def run(ctx: StageContext) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from partdistill.data.images import load_rgb
    from partdistill.evaluation.mined import instance_label_maps, match_instances
    from partdistill.evaluation.parts_eval import ObjectPrediction, from_label_map, query_proposals, score_method
    from partdistill.models.part_mining import mine_parts, rgb_object
    from partdistill.models.part_model import predict_objects
    from partdistill.stages.distill import object_parts
    from partdistill.stages.instances import read_instances, read_object_classes
    from partdistill.stages.proposals import load_part_model
    from partdistill.stages.ranking import read_classes
    from partdistill.storage import rle_to_mask

    cfg, full = ctx.config, ctx.full_config
    split = cfg["split"]
    ar_ks = tuple(int(k_) for k_ in cfg["ar_max_dets"])
    data = ctx.inputs["data"]
    objects, image_root, external = gt_objects(cfg, data)
    if cfg.get("max_objects"):
        objects = objects[:int(cfg["max_objects"])]
    ranking_classes = read_classes(ctx.inputs["ranking"])
    k = int(ranking_classes["k"])
    # the pipeline's instances cover the data artifact's images; an external GT set has none of them
    inst_rows = [] if external else [r for r in read_instances(ctx.inputs["instances"]).to_pylist()
                                     if r["split"] == split]
    # one class numbering for the run: the one the instances (and so the part models) were made with
    names = read_object_classes(ctx.inputs["instances"], data, ctx.inputs["teacher"])
    class_ids = {n: i for i, n in enumerate(names)}
    for o in objects:
        class_ids.setdefault(o.class_name, len(class_ids))
    matches = match_instances(objects, inst_rows)
    inst_by_id = {r["instance_id"]: r for r in inst_rows}
    inst_mask = {iid: rle_to_mask({"size": [r["height"], r["width"]], "counts": r["rle"]}) for iid, r in
                 inst_by_id.items()}
    device = ctx.runtime.get("device", "cpu")
    images = {o.file_name for o in objects}
    img_cache: dict[str, np.ndarray] = {}

    def image(name: str) -> np.ndarray:
        if name not in img_cache:
            img_cache[name] = load_rgb(image_root / name, ctx.max_pixels)
        return img_cache[name]

    preds: dict[str, dict[str, list[ObjectPrediction]]] = {"gt": {}, "pipeline": {}}
    consistent = {"RGB K-means (floor)": False, "mined parts": False, "proposals": False,
                  "one-stage K-means (no self-training)": True, "proposals + ranking": True,
                  "PartDistillation": True}
    by_image: dict[str, list[int]] = defaultdict(list)
    for i, o in enumerate(objects):
        by_image[o.file_name].append(i)

    with ctx.progress.task("evaluate", total=5) as bar:
        # RGB floor
        mcfg = full["mining"]
        gt_maps = mine_parts([rgb_object(image(o.file_name), o.mask) for o in objects], k=int(mcfg["k"]),
                             metric=mcfg["metric"], seed=int(mcfg["seed"]))
        preds["gt"]["RGB K-means (floor)"] = [from_label_map(lm) for lm in gt_maps]
        matched = [(i, matches[i]) for i in range(len(objects)) if i in matches]
        pipe_maps = mine_parts([rgb_object(image(objects[i].file_name), inst_mask[iid]) for i, iid in matched],
                               k=int(mcfg["k"]), metric=mcfg["metric"], seed=int(mcfg["seed"])) if matched else []
        rgb_pipe: list[np.ndarray | None] = [None] * len(objects)
        for (i, _), lm in zip(matched, pipe_maps, strict=True):
            rgb_pipe[i] = lm
        preds["pipeline"]["RGB K-means (floor)"] = [from_label_map(lm) for lm in rgb_pipe]
        bar.advance(1)

        # mined parts
        mined = {} if external else instance_label_maps(ctx.inputs["mining"], split)
        preds["pipeline"]["mined parts"] = [
            from_label_map(mined.get(matches[i], np.full(o.mask.shape, -1, np.int16)) if i in matches else None)
            for i, o in enumerate(objects)]
        bar.advance(1)

        # proposals (class-agnostic) and the final model: one forward pass per image and setting
        lab = full["distill"]["label"]
        proposal_model = load_part_model(ctx.inputs["proposals"], device)
        final_model = load_part_model(ctx.inputs["distill"], device)
        n_model_classes = final_model.decoder.num_classes // k
        for setting in ("gt", "pipeline"):
            preds[setting]["proposals"] = [ObjectPrediction(None) for _ in objects]
            preds[setting]["PartDistillation"] = [ObjectPrediction(None) for _ in objects]
        for name in sorted(images):
            idx = by_image[name]
            img = image(name)
            # objects in each setting: GT masks, and the pipeline's matched instances; a model with
            # object crops sees each object's own crop, one without the whole image once
            settings = {"gt": [(i, objects[i].mask, class_ids[objects[i].class_name]) for i in idx],
                        "pipeline": [(i, inst_mask[matches[i]], int(inst_by_id[matches[i]]["class_id"])) for i in idx
                                     if i in matches]}
            for setting, targets in settings.items():
                if not targets:
                    continue
                for (i, mask, _), p in zip(targets, predict_objects(proposal_model, img, [m for _, m, _ in targets],
                                                                    device), strict=True):
                    preds[setting]["proposals"][i] = query_proposals(p["masks"].cpu().numpy(),
                                                                     p["scores"].cpu().numpy(), mask,
                                                                     lab["mask_threshold"])
                # a class the model has no part logits for (a data set's own classes) cannot be conditioned on
                targets = [t for t in targets if t[2] < n_model_classes]
                if not targets:
                    continue
                outs = predict_objects(final_model, img, [m for _, m, _ in targets], device,
                                       [c for *_, c in targets])
                for (i, mask, c), out in zip(targets, outs, strict=True):
                    fm, fs = out["masks"].cpu().numpy(), out["class_scores"].cpu().numpy()
                    # with object crops each object has its own queries; without, all objects share them
                    same = [(j, m, c_) for (j, m, c_), o in zip(targets, outs, strict=True) if o is out]
                    parts = object_parts(fm, fs, [m for _, m, _ in same], [c_ for *_, c_ in same], k,
                                         lab["score_threshold"], lab["mask_threshold"], lab["min_fraction"],
                                         lab.get("score", "class"))[[j for j, *_ in same].index(i)]
                    lm = np.full(mask.shape, -1, np.int32)
                    for part in parts:
                        lm[part["mask"]] = c * k + part["cluster"]
                    slice_scores = fs[:, c * k:(c + 1) * k].sum(1) if (c + 1) * k < fs.shape[1] else np.zeros(len(fs))
                    props = query_proposals(fm, slice_scores, mask, lab["mask_threshold"])
                    preds[setting]["PartDistillation"][i] = ObjectPrediction(lm, props.proposals, props.scores)
        bar.advance(2)

        # ranking clusters (pipeline objects: the ranking labelled the pipeline's instances)
        labeled = pq.read_table(ctx.inputs["ranking"].file("labeled_parts.parquet")).to_pylist()
        ranked = ranked_predictions(labeled, objects, matches, split)
        preds["pipeline"]["proposals + ranking"] = ranked
        if "features" in ctx.inputs and not external:
            one_stage = one_stage_maps(ctx.inputs["features"], read_instances(ctx.inputs["instances"]).to_pylist(),
                                       split, int(ranking_classes["k"]), mcfg["metric"], int(mcfg["seed"]))
            preds["pipeline"]["one-stage K-means (no self-training)"] = [
                from_label_map(one_stage.get(matches[i], np.full(o.mask.shape, -1, np.int32)) if i in matches
                               else None) for i, o in enumerate(objects)]
        bar.advance(1)

    if external:
        preds.pop("pipeline")
    unconditioned = sum(1 for o in objects if class_ids[o.class_name] >= n_model_classes)
    metrics: dict[str, Any] = {"split": split, "gt_source": cfg["gt"]["source"], "objects": len(objects),
                               "matched_objects": len(matches), "k": k, "settings": SETTINGS,
                               "objects_of_classes_the_model_lacks": unconditioned,
                               "paper_table3_partimagenet": PAPER}
    for setting, methods in preds.items():
        metrics[setting] = {m: score_method(objects, p, consistent[m], class_ids, ar_ks) for m, p in methods.items()}
    if not external:
        dropped = _size_filtered(ctx.inputs["instances"], split)
        if dropped is not None:
            metrics["size_filter"] = {"min_object_fraction": full["instances"]["min_object_fraction"],
                                      "dropped": dropped[0], "found": dropped[1]}
        # the final model's parts on the GT objects, as a part-results file: `partdistill score` on it gives
        # the numbers of the table's PartDistillation row (GT objects)
        from partdistill.evaluation.score import write_results

        metrics["predictions"] = {"file": "predictions.json", "setting": "gt", "method": "PartDistillation",
                                  "parts": write_results(ctx.writer.path / "predictions.json", objects,
                                                         preds["gt"]["PartDistillation"], class_ids, k,
                                                         setting="gt", method="PartDistillation", split=split)}
    # per object class, with GT objects: where do the methods win and lose?
    by_cls: dict[str, list[int]] = defaultdict(list)
    for i, o in enumerate(objects):
        by_cls[o.class_name].append(i)
    metrics["per_class"] = {
        cls: {m: score_method([objects[i] for i in idx], [preds["gt"][m][i] for i in idx], consistent[m], class_ids,
                              ar_ks)
              for m in preds["gt"]} | {"objects": len(idx)}
        for cls, idx in sorted(by_cls.items())}
    out = ctx.writer.path
    write_json_atomic(out / "metrics.json", _finite(metrics))
    table = metrics_table(metrics)
    (out / "table.md").write_text(table)
    pictures = _pictures(out, objects, preds["gt"], image, ctx.inputs["distill"], data.path, ctx.max_pixels)
    _report(out / "report.html", metrics, table, pictures)
    final = metrics["gt"]["PartDistillation"]
    size = {"objects_dropped_by_size_filter": metrics["size_filter"]["dropped"]} if "size_filter" in metrics else {}
    return {"objects": len(objects), "matched": len(matches), "AR@200": _r(final["AR@200"]), **size,
            "C-mIoU": _r(final["C-mIoU"]), "FG-NMI": _r(final["FG-NMI"]),
            "floor AR@200": _r(metrics["gt"]["RGB K-means (floor)"]["AR@200"]),
            "report": str(ctx.writer.path.parent / ctx.version / "report.html")}


def _size_filtered(instances: Any, split: str) -> tuple[int, int] | None:
    """(objects the `instances` stage dropped as under ``min_object_fraction`` of the image, objects
    it found) on a split; None for an artifact made before it counted them."""
    from partdistill.storage import read_parquet

    rows = read_parquet(instances.file("images.parquet")).to_pylist()
    if rows and "small" not in rows[0]:
        return None
    rows = [r for r in rows if r["split"] == split]
    return sum(r["small"] for r in rows), sum(r["detections"] for r in rows)


def gt_objects(cfg: Mapping[str, Any], data: Any) -> tuple[list[Any], Path, bool]:
    """The split's GT objects with parts, the folder their ``file_name`` is relative to, and
    whether they come from outside the data artifact."""
    from partdistill.evaluation import loaders
    from partdistill.evaluation.premise import load_gt_objects

    split, gt = cfg["split"], dict(cfg["gt"])
    source = gt["source"]
    if source == "data":
        if f"parts_{split}.json" not in data.files:
            raise FileNotFoundError(
                f"evaluate: the data artifact {data.path} has no part ground truth parts_{split}.json; set "
                "evaluate.gt.source to 'partimagenet', 'pascal_part' or 'cityscapes_parts' with evaluate.gt.root, "
                "or use a data set with part labels (Parts World)")
        objects, root, external = load_gt_objects(data.path, split), Path(data.path), False
    else:
        readers = {"partimagenet": loaders.partimagenet, "pascal_part": loaders.pascal_part,
                   "cityscapes_parts": loaders.cityscapes_panoptic_parts}
        if source not in readers:
            raise ValueError(f"evaluate.gt.source must be 'data' or one of {sorted(readers)}, got {source!r}")
        if not gt.get("root"):
            raise ValueError(f"evaluate.gt.source={source!r} needs evaluate.gt.root (the data set's folder)")
        root = Path(gt["root"]).expanduser()
        objects, external = list(readers[source](root, split)), True
    if not objects:
        raise ValueError(f"evaluate: no object with part labels in split {split!r} ({source}, {root})")
    return objects, root, external


def one_stage_maps(features: Any, instances: Sequence[Mapping[str, Any]], split: str, k: int, metric: str,
                   seed: int) -> dict[int, np.ndarray]:
    """The paper's one-stage baseline without its self-training: per object class, K-means (k
    clusters) over the teacher feature cells of all its training instances, then every pixel of
    the ``split``'s instances goes to the nearest centroid. Ids are class-consistent:
    class_id × k + cluster. Returns instance_id → int32 (H, W) label map (-1 outside)."""
    import torch

    from partdistill.models.kmeans import assign, kmeans
    from partdistill.models.part_mining import ObjectFeatures, cell_features, pixel_features
    from partdistill.stages.features import FeatureReader, instance_mask, object_features

    reader = FeatureReader(features)

    def obj(row: Mapping[str, Any]) -> ObjectFeatures | None:
        try:
            grid, meta = reader.get(row["instance_id"])
        except KeyError:
            return None
        mask = instance_mask(row)
        return object_features(grid, meta, mask) if mask.any() else None

    by_class: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for r in instances:
        by_class[int(r["class_id"])].append(r)
    out: dict[int, np.ndarray] = {}
    for c, rows in sorted(by_class.items()):
        train = [o for o in (obj(r) for r in rows if r["split"] != split) if o is not None]
        if not train:
            continue
        cells = torch.cat([cell_features(o) for o in train])
        centroids = torch.as_tensor(np.asarray(kmeans([cells], k=k, metric=metric, seed=seed)[0].centroids),
                                    dtype=torch.float32)
        for r in rows:
            if r["split"] != split:
                continue
            o = obj(r)
            if o is None:
                continue
            yx, feats = pixel_features(o)
            lm = np.full(o.mask.shape, -1, np.int32)
            lm[yx[:, 0], yx[:, 1]] = c * k + np.asarray(assign(feats, centroids, metric)).astype(np.int32)
            out[int(r["instance_id"])] = lm
    return out


def ranked_predictions(labeled: Sequence[Mapping[str, Any]], objects: Sequence[Any], matches: Mapping[int, int],
                       split: str) -> list[Any]:
    """The "proposals + ranking" predictions: per GT object, the labelled parts (rows of the
    ranking's ``labeled_parts.parquet``) of its matched instance, best score first and painted
    over the lower ones in the label map; an unmatched object predicts nothing."""
    from partdistill.evaluation.parts_eval import ObjectPrediction
    from partdistill.storage import rle_to_mask

    by_inst: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for r in labeled:
        if r["split"] == split:
            by_inst[r["instance_id"]].append(r)
    ranked = []
    for i, o in enumerate(objects):
        if i not in matches:
            ranked.append(ObjectPrediction(None))
            continue
        lm = np.full(o.mask.shape, -1, np.int32)
        rows = sorted(by_inst.get(matches[i], []), key=lambda r: -r["score"])
        masks = [rle_to_mask({"size": [r["height"], r["width"]], "counts": r["rle"]}) for r in rows]
        for r, m in zip(rows[::-1], masks[::-1], strict=True):
            lm[m] = r["label"]
        ranked.append(ObjectPrediction(lm, masks, [r["score"] for r in rows]))
    return ranked


def _r(v: float) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), 4)


def _finite(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _finite(v) for k, v in node.items()}
    if isinstance(node, float) and math.isnan(node):
        return None
    return node


def metrics_table(metrics: Mapping[str, Any]) -> str:
    """The markdown tables (×100), one per setting, with the paper's Table 3 numbers beside."""
    lines = []
    for setting, title in SETTINGS.items():
        rows = metrics.get(setting, {})
        if not rows:
            continue
        lines += [f"**{metrics['split']} split, with {title}** ({metrics['objects']} objects"
                  + (f", {metrics['matched_objects']} matched" if setting == "pipeline" else "") + ")", "",
                  "| method | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
        for method, vals in rows.items():
            cells = []
            for c in COLUMNS:
                cells.append(_pct(vals.get(c)))
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        paper = PAPER[setting]
        lines.append("| *paper, PartImageNet: PartDistillation / one-stage* | – | – | "
                     f"{100 * paper['PartDistillation']['AR@200']:.1f} / {100 * paper['one-stage']['AR@200']:.1f} | "
                     f"{100 * paper['PartDistillation']['mIoU']:.1f} / {100 * paper['one-stage']['mIoU']:.1f} | "
                     + " | ".join("–" for _ in COLUMNS[4:]) + " |")
        lines.append("")
    per_class = metrics.get("per_class") or {}
    if per_class:
        methods = [m for m in next(iter(per_class.values())) if m != "objects"]
        lines += ["**Per object class, with ground-truth object masks: AR@10 / within-object NMI**", "",
                  "| class | objects | " + " | ".join(methods) + " |", "|---" * (len(methods) + 2) + "|"]
        for cls, row in per_class.items():
            cells = [f"{_pct(row[m]['AR@10'])} / {_pct(row[m]['NMI (within object)'])}" for m in methods]
            lines.append(f"| {cls} | {row['objects']} | " + " | ".join(cells) + " |")
        lines.append("")
    size = metrics.get("size_filter")
    if size:
        lines.append(f"The pipeline's objects: {size['dropped']} of {size['found']} found on the {metrics['split']} "
                     f"split were dropped as under {100 * size['min_object_fraction']:g}% of the image "
                     "(`instances.min_object_fraction`, the reference's filter).")
        lines.append("")
    lines.append("AR and mIoU in %; NMI/ARI ×100. \"–\": not defined for the method (ids that mean nothing across "
                 "objects have no class-level mIoU or FG-NMI/ARI) or not available in that setting.")
    return "\n".join(lines) + "\n"


def _pct(v: float | None) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _pictures(out: Path, objects, preds: Mapping[str, Sequence[Any]], image, distill,
              data_dir: Path, max_pixels: int) -> dict[str, list[str]]:
    """Per-class overlays (GT parts | each method) and the purity grids; returns the file names."""
    import pyarrow.parquet as pq

    from partdistill.data.images import load_rgb
    from partdistill.evaluation.overlays import grid, parts_overlay, save_png
    from partdistill.storage import rle_to_mask

    (out / "overlays").mkdir(exist_ok=True)
    (out / "purity").mkdir(exist_ok=True)
    files: dict[str, list[str]] = {"overlays": [], "purity": []}
    methods = [m for m in ("RGB K-means (floor)", "proposals", "PartDistillation") if m in preds]
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, o in enumerate(objects):
        by_class[o.class_name].append(i)
    for cls, idx in sorted(by_class.items()):
        rows = []
        for i in idx[:4]:
            o = objects[i]
            crop = _crop_box(o.mask)
            row = [parts_overlay(image(o.file_name), [np.where(o.mask, o.part_labels, -1)])[crop]]
            for m in methods:
                lm = preds[m][i].label_map
                lm = np.full(o.mask.shape, -1) if lm is None else np.where(o.mask, lm, -1)
                row.append(parts_overlay(image(o.file_name), [lm])[crop])
            rows.append([_fit(t, 96) for t in row])
        name = f"overlays/{_safe(cls)}.png"
        save_png(out / name, grid(rows, titles=["GT parts", *methods]))
        files["overlays"].append(name)

    # purity grids: the final model's clusters over the objects it labelled (all splits)
    rname = next((n for n in distill.files if n.startswith("labeled_parts_r")), None)
    if rname is None:
        return files
    table = pq.read_table(distill.file(rname)).to_pylist()
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in sorted(table, key=lambda r: (-r["score"], r["instance_id"])):
        groups[(r["class_name"], r["cluster"])].append(r)
    images_of = _image_names(data_dir)
    for (cls, cluster), rows in sorted(groups.items()):
        tiles = []
        for r in rows[:9]:
            img = load_rgb(data_dir / images_of[r["image_id"]], max_pixels)
            m = rle_to_mask({"size": [r["height"], r["width"]], "counts": r["rle"]})
            tiles.append(_fit(_highlight(img, m), 80))
        while len(tiles) < 9:
            tiles.append(np.full_like(tiles[0], 255))
        name = f"purity/{_safe(cls)}_c{cluster}.png"
        save_png(out / name, grid([tiles[0:3], tiles[3:6], tiles[6:9]]))
        files["purity"].append(name)
    return files


def _image_names(data_dir: Path) -> dict[int, str]:
    names = {}
    for f in sorted(data_dir.glob("instances_*.json")):
        for im in json.loads(f.read_text())["images"]:
            names[im["id"]] = im["file_name"]
    return names


def _highlight(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The part lit in red, the rest dimmed, cropped around the part with context."""
    out = (img.astype(np.float32) * 0.35)
    out[mask] = 0.4 * img[mask] + 0.6 * np.array([255, 40, 40])
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return out.astype(np.uint8)
    h, w = mask.shape
    pad = max(ys.max() - ys.min(), xs.max() - xs.min()) // 2 + 8
    return out[max(0, ys.min() - pad):min(h, ys.max() + pad + 1), max(0, xs.min() - pad):min(w, xs.max() + pad + 1)
               ].clip(0, 255).astype(np.uint8)


def _crop_box(mask: np.ndarray) -> tuple[slice, slice]:
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return slice(None), slice(None)
    return slice(max(0, ys.min() - 4), ys.max() + 5), slice(max(0, xs.min() - 4), xs.max() + 5)


def _fit(tile: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize into a size × size tile (letterboxed), so grids line up."""
    h, w = tile.shape[:2]
    s = size / max(h, w, 1)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    ys = (np.arange(nh) / s).astype(int).clip(0, h - 1)
    xs = (np.arange(nw) / s).astype(int).clip(0, w - 1)
    out = np.full((size, size, 3), 255, np.uint8)
    out[:nh, :nw] = tile[ys][:, xs]
    return out


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


def _report(path: Path, metrics: Mapping[str, Any], table: str, pictures: Mapping[str, list[str]]) -> None:
    """A self-contained HTML report: tables, overlays and purity grids inlined."""

    def img(name: str) -> str:
        data = base64.b64encode((path.parent / name).read_bytes()).decode()
        return f'<figure><img src="data:image/png;base64,{data}"><figcaption>{html.escape(name)}</figcaption></figure>'

    def md_table(block: list[str]) -> str:
        rows = [r.strip("|").split("|") for r in block if r.startswith("|") and not r.startswith("|---")]
        head, body = rows[0], rows[1:]
        return ("<table><tr>" + "".join(f"<th>{html.escape(c.strip())}</th>" for c in head) + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in r) + "</tr>" for r in body)
                + "</table>")

    parts, block = [], []
    for line in table.splitlines() + [""]:
        if line.startswith("|"):
            block.append(line)
            continue
        if block:
            parts.append(md_table(block))
            block = []
        if line.strip():
            parts.append(f"<p>{html.escape(line.strip('*'))}</p>")
    body = "\n".join(parts)
    body += "<h2>Per-class overlays</h2>" + "".join(img(n) for n in pictures["overlays"])
    body += ("<h2>Purity grids (paper Fig. 5): nine objects per part cluster, the cluster's part in red</h2>"
             + "".join(img(n) for n in pictures["purity"]))
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}figure{display:inline-block;margin:6px}"
             "img{image-rendering:pixelated}")
    path.write_text(f"<!doctype html><meta charset=utf-8><title>partdistill evaluation</title><style>{style}</style>"
                    f"<h1>Part quality, {html.escape(str(metrics['split']))} split</h1>{body}")


def _upstream(section: dict[str, Any], cfg: Mapping[str, Any]) -> tuple[str, ...]:
    # the one-stage baseline reads the stored features; fused mining stores none
    base = ("data", "teacher", "instances", "mining", "proposals", "ranking", "distill")
    return base if cfg["mining"]["fused"] else (*base, "features")


STAGE = Stage("evaluate", ("data", "teacher", "instances", "features", "mining", "proposals", "ranking", "distill"),
              "2", run, reads_evaluation_only=True, summary="metrics and report", upstream_for=_upstream)
