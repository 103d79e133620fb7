"""Stage `distill`: the final self-training with the part-cluster ids as labels (paper §4.3).

The model is the proposals' PartModel with a class-conditioned head
(:class:`~partdistill.models.part_decoder.ConditionedMask2FormerHead`): k part logits per object
class plus no-object, limited per image to the classes of its objects. Round 1 trains on the
`ranking` stage's labelled parts (label = class × k + cluster) and starts from the last
`proposals` round's weights (everything but the class head); round n > 1 trains on round
n − 1's labelled parts, starting from its weights. Training data, augmentation and filters are
the proposals' (:mod:`partdistill.stages.proposals`); each round is its own artifact
``distill_r{n}``.

Labelling (and prediction, :func:`object_parts`): for an object of class c, each query's score is
its best probability among class c's k part logits and its cluster that logit's index; queries
go to objects by IoU (Eq. 1), each object pixel to its most confident query, and the segments of
one cluster are merged, as in the ranking stage.

Reads: `data`, `teacher` (number of object classes), `instances`, the last `proposals` round,
`ranking`. Writes what a proposals round writes, with ``labeled_parts_r{n}.parquet`` (the
ranking stage's LABELED_SCHEMA) instead of pseudo-parts.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from partdistill.stages.base import Stage, StageContext
from partdistill.stages.ranking import read_classes


def labeled_parts_name(round_: int) -> str:
    return f"labeled_parts_r{round_}.parquet"


def object_parts(
    masks: np.ndarray,
    class_scores: np.ndarray,
    objects: Sequence[np.ndarray],
    classes: Sequence[int],
    k: int,
    score_threshold: float,
    mask_threshold: float = 0.5,
    min_fraction: float = 0.05,
    score: str = "class",
) -> list[list[dict[str, Any]]]:
    """Class-specific parts of one image's objects from a class-conditioned model.

    masks: float (Q, H, W) probabilities; class_scores: float (Q, k × C + 1) softmax over the
    part classes and no-object; objects: bool (H, W) masks; classes: their object class ids.
    A query's cluster is its most probable of class c's k part logits; its score is
    ``score='class'``: the summed probability of those k logits (P(a part of class c)), or
    ``'cluster'``: the cluster's own probability. With k clusters sharing the mass, a confident
    part query easily has no single cluster above a threshold. An object none of whose queries
    passes ``score_threshold`` keeps all of them (as the reference falls back to every part).
    Returns per object a list of {cluster, mask: bool (H, W), score, queries}, one per cluster
    (same-cluster segments merged, the highest score kept), sorted by cluster."""
    from partdistill.models.ranking import associate, candidates

    out: list[list[dict[str, Any]]] = [[] for _ in objects]
    if len(objects) == 0 or len(masks) == 0:
        return out
    owner = associate(masks, np.stack([np.asarray(o, bool) for o in objects]), mask_threshold)
    for o, (omask, c) in enumerate(zip(objects, classes, strict=True)):
        mine = np.nonzero(owner == o)[0]
        if len(mine) == 0 or (int(c) + 1) * k > class_scores.shape[1] - 1:
            continue
        part_probs = class_scores[mine, int(c) * k:(int(c) + 1) * k]
        if score not in ("class", "cluster"):
            raise ValueError(f"distill.label.score must be 'class' or 'cluster', got {score!r}")
        scores = part_probs.sum(1) if score == "class" else part_probs.max(1)
        clusters = part_probs.argmax(1)
        found = candidates(masks[mine], scores, omask, score_threshold=score_threshold,
                           min_fraction=min_fraction, mask_threshold=mask_threshold)
        if len(found) == 0:
            found = candidates(masks[mine], scores, omask, score_threshold=-1.0, min_fraction=min_fraction,
                               mask_threshold=mask_threshold)
        merged: dict[int, dict[str, Any]] = {}
        for q, seg in zip(found.queries, found.segments, strict=True):
            cluster = int(clusters[q])
            entry = merged.setdefault(cluster, {"cluster": cluster, "mask": np.zeros_like(seg), "score": 0.0,
                                                "queries": []})
            entry["mask"] |= seg
            entry["score"] = max(entry["score"], float(scores[q]))
            entry["queries"].append(int(mine[q]))
        out[o] = [merged[c_] for c_ in sorted(merged)]
    return out


def distill_labeller(cfg: Mapping[str, Any], k: int) -> Callable:
    """(prediction, image item, object masks) → LABELED_SCHEMA rows."""
    from partdistill.storage import mask_to_rle

    lab = cfg["label"]

    def label(pred: Mapping[str, Any], item: Mapping[str, Any], objects: list[np.ndarray]) -> list[dict[str, Any]]:
        insts = item["instances"]
        found = object_parts(pred["masks"].cpu().numpy(), pred["class_scores"].cpu().numpy(), objects,
                             [int(i["class_id"]) for i in insts], k, lab["score_threshold"], lab["mask_threshold"],
                             lab["min_fraction"], lab.get("score", "class"))
        rows = []
        for inst, parts in zip(insts, found, strict=True):
            for p in parts:
                rows.append({"instance_id": int(inst["instance_id"]), "image_id": int(item["image_id"]),
                             "split": item["split"], "class_id": int(inst["class_id"]),
                             "class_name": inst["class_name"], "cluster": p["cluster"],
                             "label": int(inst["class_id"]) * k + p["cluster"], "score": p["score"],
                             "density": p["score"], "members": len(p["queries"]),
                             "rle": mask_to_rle(p["mask"])["counts"], "area": int(p["mask"].sum()),
                             "height": p["mask"].shape[0], "width": p["mask"].shape[1]})
        return rows

    return label


def num_object_classes(ctx_inputs: Mapping[str, Any]) -> int:
    """C: the teacher's class count, or (a teacher without names) one more than the largest
    class id the ranking saw."""
    teacher = json.loads(ctx_inputs["teacher"].file("teacher.json").read_text())
    names = teacher.get("class_names") or []
    seen = [int(c) for c in read_classes(ctx_inputs["ranking"])["classes"]]
    return max(len(names), max(seen, default=-1) + 1)


def run(ctx: StageContext) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from partdistill.stages.proposals import RoundSpec, run_round
    from partdistill.stages.ranking import LABELED_SCHEMA

    r = ctx.round or 1
    k = int(read_classes(ctx.inputs["ranking"])["k"])
    n_classes = num_object_classes(ctx.inputs)
    if r == 1:
        parts = pq.read_table(ctx.inputs["ranking"].file("labeled_parts.parquet"))
        init = ctx.inputs["proposals"].file("checkpoint.pth")
    else:
        parts = pq.read_table(ctx.inputs["distill"].file(labeled_parts_name(r - 1)))
        init = (ctx.inputs["proposals"] if ctx.config["round_init"] == "proposals"
                else ctx.inputs["distill"]).file("checkpoint.pth")
    rows = parts.select(["instance_id", "rle", "area", "height", "width", "label"]).to_pylist()
    summary = run_round(ctx, RoundSpec(
        rows, {"num_classes": k * n_classes, "parts_per_class": k}, init, labeled_parts_name(r), LABELED_SCHEMA,
        distill_labeller(ctx.config, k), "the ranking stage's labelled parts (ranking.score_threshold)"))
    table = pq.read_table(ctx.writer.path / labeled_parts_name(r), columns=["class_id", "cluster"])
    used: dict[int, set[int]] = defaultdict(set)
    for c, cl in zip(table.column("class_id").to_pylist(), table.column("cluster").to_pylist(), strict=True):
        used[c].add(cl)
    return {**summary, "k": k, "object_classes": n_classes,
            "clusters_used_per_class": round(float(np.mean([len(v) for v in used.values()])), 2) if used else 0.0}


STAGE = Stage("distill", ("data", "teacher", "instances", "proposals", "ranking"), "2", run,
              summary="final part model", rounds=lambda section: section["rounds"], round_keys=("rounds",))
