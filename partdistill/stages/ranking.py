"""Stage `ranking`: class-specific part clusters (paper §4.3, Eq. 1–2).

The last `proposals` round's pseudo-parts are already the paper's candidates in shape: each one
is a query that an object won by IoU (Eq. 1), with the object's pixels given to their most
confident query (argmax of mask × score). Here a candidate must also score above
``score_threshold`` and cover at least ``min_part_fraction`` of its object. Per object class, a
weighted k-means (k clusters, weights = scores, over the L2-normalised query features) of the
``fit_splits`` candidates gives the class's part prototypes; every candidate of every split then
gets its cluster by the Eq. 2 density score, and the segments of one object that fall into the
same cluster are merged (union of masks, the highest score).

A class with fewer distinct candidates than k gets one prototype per candidate, and a class
without candidates none; both are recorded (``few_proposals``), never filled with random centroids.

Reads: `instances` (object classes), the last `proposals` round. Writes:

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


def run(ctx: StageContext) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from partdistill.models.ranking import ClassRanking, fit_prototypes, ranked_scores
    from partdistill.stages.instances import read_instances
    from partdistill.storage import mask_to_rle, rle_to_mask

    cfg = ctx.config
    k = int(cfg["k"])
    out = ctx.writer.path
    instances = {r["instance_id"]: r for r in read_instances(ctx.inputs["instances"]).select(
        ["instance_id", "class_id", "class_name", "area"]).to_pylist()}
    proposals = ctx.inputs["proposals"]
    parts = pq.read_table(proposals.file(pseudo_parts_file(proposals))).to_pylist()
    candidates = [p for p in parts if p["score"] > cfg["score_threshold"]
                  and p["area"] >= cfg["min_part_fraction"] * instances[p["instance_id"]]["area"]]
    by_class: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for p in candidates:
        by_class[int(instances[p["instance_id"]]["class_id"])].append(p)
    names = {int(r["class_id"]): r["class_name"] for r in instances.values()}
    dim = len(parts[0]["feature"]) if parts else 0

    prototype_rows, labeled, classes = [], [], {}
    with ctx.progress.task("ranking: classes", total=len(names)) as bar:
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

    write_parquet(out / "prototypes.parquet", {c: [r.get(c) for r in prototype_rows] for c in PROTOTYPE_SCHEMA.names},
                  PROTOTYPE_SCHEMA)
    write_parquet(out / "labeled_parts.parquet", {c: [r[c] for r in labeled] for c in LABELED_SCHEMA.names},
                  LABELED_SCHEMA)
    write_json_atomic(out / "classes.json", {"k": k, "classes": classes})
    few = {v["class_name"]: v["few_proposals"] for v in classes.values() if v["few_proposals"]}
    return {"classes": len(classes), "k": k, "candidates": len(candidates), "pseudo_parts": len(parts),
            "prototypes": len(prototype_rows), "labelled_parts": len(labeled),
            "objects_labelled": len({r["instance_id"] for r in labeled}), "few_proposal_classes": few}


def read_classes(artifact: Any) -> dict[str, Any]:
    return json.loads(artifact.file("classes.json").read_text())


STAGE = Stage("ranking", ("instances", "proposals"), "1", run, summary="class-specific part clusters")
