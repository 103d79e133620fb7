"""Stage `ranking`: class-specific part clusters (paper §4.3, Eq. 1–2).

The last `proposals` round's pseudo-parts are already the paper's candidates in shape: each one
is a query that an object won by IoU (Eq. 1), with the object's pixels given to their most
confident query (argmax of mask × score). Here a candidate must also score above
``score_threshold`` and cover at least ``min_part_fraction`` of its object. Per object class, a
weighted k-means (k clusters, weights = scores, over the L2-normalised query features) of the
``fit_splits`` candidates gives the class's part prototypes; every candidate of every split then
gets its cluster by the Eq. 2 density score, and the segments of one object that fall into the
same cluster are merged (union of masks, the highest score).

What a part is clustered by (``part_features``):

- ``'query'`` (the paper): the part decoder's decoded query feature of the candidate;
- ``'teacher'``: the mean of the teacher's L2-normalised pixel features (the `features`
  artifact, upsampled to pixels as mining does) under the candidate's mask: the signal that
  the mining and the one-stage baseline cluster, pooled over a part. The query feature is
  trained only to say "a part here, this shape" (the decoder is class-agnostic), not which part;
- ``'both'``: the two, each L2-normalised, concatenated.

A class with fewer distinct candidates than k gets one prototype per candidate, and a class
without candidates none; both are recorded (``few_proposals``), never filled with random centroids.

Reads: `instances` (object classes), the last `proposals` round, and `features` for
``part_features`` 'teacher' or 'both'. Writes:

- ``prototypes.parquet``  class_id:int, class_name:str, cluster:int, prototype:list<float>,
  weight:float (summed scores), size:int, k_eff:int, n_candidates:int, few_proposals:str|null
- ``labeled_parts.parquet``  one row per (object, cluster): instance_id, image_id, split, class_id,
  class_name, cluster:int16, label:int32 (class_id × k + cluster, the distill stage's class),
  score:float32 (max over merged members of score × max_k r_k), density:float32, members:int16,
  rle, area, height, width
- ``classes.json``  per class: candidates, k_eff, few_proposals, labelled parts
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa

from partdistill.stages.base import Stage, StageContext
from partdistill.storage import write_json_atomic, write_parquet

PROTOTYPE_SCHEMA = pa.schema([
    ("class_id", pa.int32()), ("class_name", pa.string()), ("cluster", pa.int32()),
    ("prototype", pa.list_(pa.float32())), ("weight", pa.float64()), ("size", pa.int64()), ("k_eff", pa.int32()),
    ("n_candidates", pa.int64()), ("few_proposals", pa.string()),
])
LABELED_SCHEMA = pa.schema([
    ("instance_id", pa.int64()), ("image_id", pa.int64()), ("split", pa.string()), ("class_id", pa.int32()),
    ("class_name", pa.string()), ("cluster", pa.int16()), ("label", pa.int32()), ("score", pa.float32()),
    ("density", pa.float32()), ("members", pa.int16()), ("rle", pa.string()), ("area", pa.int64()),
    ("height", pa.int32()), ("width", pa.int32()),
])


def pseudo_parts_file(artifact: Any) -> str:
    """The ``pseudo_parts_r{n}.parquet`` of a `proposals` round artifact."""
    names = sorted(n for n in artifact.files if n.startswith("pseudo_parts_r") and n.endswith(".parquet"))
    if len(names) != 1:
        raise ValueError(f"{artifact.path}: expected one pseudo_parts_r*.parquet, found {names}")
    return names[0]


def rank_parts(cfg: dict[str, Any], parts: list[dict[str, Any]], instances_art: Any, features: Any,
               progress: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any], list[Any]]:
    """The stage's algorithm on a round's pseudo-parts (rows of ``pseudo_parts_r{n}.parquet``):
    (prototype rows, labelled-part rows, per-class record, candidates). ``features``: the
    `features` artifact, needed for ``part_features`` other than 'query'."""
    from partdistill.models.ranking import ClassRanking, fit_prototypes, ranked_scores
    from partdistill.stages.instances import read_instances
    from partdistill.storage import mask_to_rle, rle_to_mask

    k = int(cfg["k"])
    instances = {r["instance_id"]: r for r in read_instances(instances_art).select(
        ["instance_id", "class_id", "class_name", "area"]).to_pylist()}
    candidates = [dict(p) for p in parts if p["score"] > cfg["score_threshold"]
                  and p["area"] >= cfg["min_part_fraction"] * instances[p["instance_id"]]["area"]]
    by_class: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for p in candidates:
        by_class[int(instances[p["instance_id"]]["class_id"])].append(p)
    names = {int(r["class_id"]): r["class_name"] for r in instances.values()}
    mode = cfg.get("part_features", "query")
    if mode not in PART_FEATURES:
        raise ValueError(f"ranking.part_features must be one of {PART_FEATURES}, got {mode!r}")
    if mode != "query":
        pooled = pooled_teacher_features(features, instances_art, candidates, progress)
        for p, f in zip(candidates, pooled, strict=True):
            q = np.asarray(p["feature"], np.float32)
            p["feature"] = f if mode == "teacher" else np.concatenate([q / max(np.linalg.norm(q), 1e-12), f])
    dim = len(candidates[0]["feature"]) if candidates else (len(parts[0]["feature"]) if parts else 0)

    prototype_rows, labeled, classes = [], [], {}
    with progress.task("ranking: classes", total=len(names)) as bar:
        for class_id in sorted(names):
            members = by_class.get(class_id, [])
            fit_on = [p for p in members if p["split"] in cfg["fit_splits"]]
            feats = (np.asarray([p["feature"] for p in fit_on], np.float32) if fit_on
                     else np.zeros((0, dim), np.float32))
            weights = np.asarray([p["score"] for p in fit_on], np.float64)
            fit = fit_prototypes(feats, weights if len(fit_on) else None, k=k, seed=int(cfg["seed"]))
            ranking = ClassRanking.from_fit(class_id, fit)
            prototype_rows += [{**row, "class_name": names[class_id]} for row in ranking.rows()]
            record = {"class_name": names[class_id], "candidates": len(members), "fit_candidates": len(fit_on),
                      "k_eff": ranking.k_eff, "few_proposals": ranking.few_proposals, "labelled_parts": 0}
            if ranking.k_eff and members:
                cluster, density, score = ranked_scores(
                    np.asarray([p["feature"] for p in members], np.float32),
                    np.asarray([p["score"] for p in members], np.float32), ranking.prototypes)
                groups: dict[tuple[int, int], list[int]] = defaultdict(list)
                for i, p in enumerate(members):
                    groups[(p["instance_id"], int(cluster[i]))].append(i)
                for (instance_id, c), idx in sorted(groups.items()):
                    first = members[idx[0]]
                    shape = [first["height"], first["width"]]
                    mask = np.zeros(shape, bool)
                    for i in idx:
                        mask |= rle_to_mask({"size": shape, "counts": members[i]["rle"]})
                    best = max(idx, key=lambda i: score[i])
                    labeled.append({
                        "instance_id": instance_id, "image_id": first["image_id"], "split": first["split"],
                        "class_id": class_id, "class_name": names[class_id], "cluster": c, "label": class_id * k + c,
                        "score": float(score[best]), "density": float(density[best]), "members": len(idx),
                        "rle": mask_to_rle(mask)["counts"], "area": int(mask.sum()),
                        "height": shape[0], "width": shape[1]})
                record["labelled_parts"] = len(groups)
            classes[str(class_id)] = record
            bar.advance(1)

    return prototype_rows, labeled, classes, candidates


def run(ctx: StageContext) -> dict[str, Any]:
    import pyarrow.parquet as pq

    cfg = ctx.config
    k = int(cfg["k"])
    out = ctx.writer.path
    proposals = ctx.inputs["proposals"]
    parts = pq.read_table(proposals.file(pseudo_parts_file(proposals))).to_pylist()
    prototype_rows, labeled, classes, candidates = rank_parts(
        cfg, parts, ctx.inputs["instances"], ctx.inputs.get("features"), ctx.progress)
    write_parquet(out / "prototypes.parquet", {c: [r.get(c) for r in prototype_rows] for c in PROTOTYPE_SCHEMA.names},
                  PROTOTYPE_SCHEMA)
    write_parquet(out / "labeled_parts.parquet", {c: [r[c] for r in labeled] for c in LABELED_SCHEMA.names},
                  LABELED_SCHEMA)
    write_json_atomic(out / "classes.json", {"k": k, "classes": classes})
    few = {v["class_name"]: v["few_proposals"] for v in classes.values() if v["few_proposals"]}
    return {"classes": len(classes), "k": k, "candidates": len(candidates), "pseudo_parts": len(parts),
            "prototypes": len(prototype_rows), "labelled_parts": len(labeled),
            "objects_labelled": len({r["instance_id"] for r in labeled}), "few_proposal_classes": few}


def pooled_teacher_features(features: Any, instances: Any, parts: list[dict[str, Any]],
                            progress: Any) -> list[np.ndarray]:
    """Per part, float32 (C,): the mean of its object's L2-normalised teacher pixel features under
    its mask (upsampled from the stride-8 cells as mining does), L2-normalised. A part whose
    instance has no features (or no pixel inside the instance) raises, naming the instance."""
    import torch

    from partdistill.models.part_mining import pixel_features
    from partdistill.stages.features import FeatureReader, instance_mask, object_features
    from partdistill.stages.instances import read_instances
    from partdistill.storage import rle_to_mask

    reader = FeatureReader(features)
    by_instance: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(parts):
        by_instance[int(p["instance_id"])].append(i)
    rows = {r["instance_id"]: r for r in read_instances(instances).to_pylist() if r["instance_id"] in by_instance}
    out: list[np.ndarray | None] = [None] * len(parts)
    with progress.task("ranking: pooling teacher features", total=len(by_instance)) as bar:
        for iid, idx in by_instance.items():
            try:
                grid, meta = reader.get(iid)
            except KeyError:
                raise ValueError(f"ranking.part_features: instance {iid} has parts but no features in "
                                 f"{features.path}") from None
            mask = instance_mask(rows[iid])
            obj = object_features(grid, meta, mask)
            yx, feats = pixel_features(obj)
            feats = torch.nn.functional.normalize(feats, dim=1).numpy()
            where = np.full(mask.shape, -1, np.int64)
            where[yx[:, 0], yx[:, 1]] = np.arange(len(yx))
            for i in idx:
                p = parts[i]
                part = rle_to_mask({"size": [p["height"], p["width"]], "counts": p["rle"]})
                sel = where[part & mask]
                if len(sel) == 0:
                    raise ValueError(f"ranking.part_features: a part of instance {iid} lies outside its mask")
                f = feats[sel].mean(0)
                out[i] = (f / max(float(np.linalg.norm(f)), 1e-12)).astype(np.float32)
            bar.advance(1)
    return out  # type: ignore[return-value]


def read_classes(artifact: Any) -> dict[str, Any]:
    return json.loads(artifact.file("classes.json").read_text())


PART_FEATURES = ("query", "teacher", "both")


def _upstream(section: dict[str, Any], cfg: Any) -> tuple[str, ...]:
    return ("instances", "proposals") if section.get("part_features", "query") == "query" else \
        ("instances", "features", "proposals")


def _relevant(section: dict[str, Any], cfg: Any) -> dict[str, Any]:
    # the paper's query features are the default: a store made before the key existed keeps its version
    return {k: v for k, v in section.items() if not (k == "part_features" and v == "query")}


STAGE = Stage("ranking", ("instances", "features", "proposals"), "1", run, summary="class-specific part clusters",
              upstream_for=_upstream, relevant=_relevant)
