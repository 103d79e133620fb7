"""Stage `distill`: the final self-training with the part-cluster ids as labels (paper §4.3).

The model is the proposals' PartModel with a class-conditioned head
(:class:`~partdistill.models.part_decoder.ConditionedMask2FormerHead`): k part logits per object
class plus no-object, limited per image to the classes of its objects. Round 1 trains on the
`ranking` stage's labelled parts (label = class × k + cluster) and starts from the last
`proposals` round's weights (everything but the class head, which starts random, or with
``head_init.mode='prototypes'`` as the ranking's nearest-prototype rule: :func:`prototype_head`);
round n > 1 trains on round n − 1's labelled parts, starting from its weights. Training data,
augmentation and filters are the proposals' (:mod:`partdistill.stages.proposals`); each round is
its own artifact ``distill_r{n}``.

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
from partdistill.storage import write_json_atomic


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


def prototype_head(part_weight: np.ndarray, part_bias: np.ndarray, prototypes: Mapping[int, np.ndarray],
                   k: int, n_classes: int, features: Mapping[int, np.ndarray],
                   temperature: float) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """The class-conditioned head's start from the ranking's prototypes, so that the distilled
    model begins where "proposals + ranking" is and its training refines that.

    part_weight / part_bias: the proposals' head, (2, D) / (2,), rows [part, no-object].
    prototypes: per object class, float (k_eff, D) prototypes (fitted on L2-normalised query
    features, :func:`~partdistill.models.ranking.fit_prototypes`). features: per class, float
    (n, D) query features of the ranking's input parts (the proposals' pseudo-parts), used for the
    typical feature norm and for calibration. The ranking gives a part the prototype nearest to
    its normalised feature f̂, the argmax of ``f̂·μ_j − |μ_j|²/2``; with ``f̂ ≈ x / n̄`` (n̄: the
    mean norm of the decoder's post-norm query features) that is linear in the query feature x,
    so cluster j of class c gets the row ``W_part + τ μ_j / n̄`` and the bias
    ``b_part − τ |μ_j|²/2 − a_c``, where ``a_c``, the mean over the class's features of
    ``logsumexp_j τ (x·μ_j / n̄ − |μ_j|²/2)``, keeps P(a part of class c) near the proposals'
    P(part). The no-object row is the proposals'. Rows of clusters a class lacks (k_eff < k) get
    the part row with a bias 20 below, and classes without prototypes the part row less log k.
    Returns (weight (k·C + 1, D), bias (k·C + 1,), stats: n̄ and the fraction of the features
    whose argmax row is their nearest prototype)."""
    part_weight = np.asarray(part_weight, np.float64)
    part_bias = np.asarray(part_bias, np.float64)
    if part_weight.ndim != 2 or part_weight.shape[0] != 2 or part_bias.shape != (2,):
        raise ValueError(f"expected the proposals' 2-way head, got weight {part_weight.shape}, bias {part_bias.shape}")
    dim = part_weight.shape[1]
    every = [np.asarray(f, np.float64).reshape(-1, dim) for f in features.values() if len(f)]
    norms = np.linalg.norm(np.concatenate(every), axis=1) if every else np.zeros(0)
    n_bar = float(norms.mean()) if len(norms) else 1.0
    weight = np.repeat(part_weight[:1], k * n_classes + 1, axis=0)
    bias = np.full(k * n_classes + 1, part_bias[0] - np.log(k))
    weight[-1], bias[-1] = part_weight[1], part_bias[1]
    agree, total = 0, 0
    for c in range(n_classes):
        mu = np.asarray(prototypes.get(c, np.zeros((0, dim))), np.float64).reshape(-1, dim)
        if len(mu) == 0:
            continue
        if len(mu) > k:
            raise ValueError(f"class {c} has {len(mu)} prototypes, more than k={k}")
        half = (mu * mu).sum(1) / 2
        x = np.asarray(features.get(c, np.zeros((0, dim))), np.float64).reshape(-1, dim)
        logits = temperature * (x @ mu.T / n_bar - half)
        if len(x):
            top = logits.max(1, keepdims=True)
            offset = float((top[:, 0] + np.log(np.exp(logits - top).sum(1))).mean())
            xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
            nearest = np.linalg.norm(xn[:, None] - mu[None], axis=2).argmin(1)
            agree += int((logits.argmax(1) == nearest).sum())
            total += len(x)
        else:
            offset = float(np.log(len(mu)))
        rows = slice(c * k, c * k + len(mu))
        weight[rows] = part_weight[0] + temperature * mu / n_bar
        bias[rows] = part_bias[0] - temperature * half - offset
        bias[c * k + len(mu):(c + 1) * k] = part_bias[0] - 20.0
    return weight, bias, {"feature_norm": round(n_bar, 4),
                          "nearest_prototype_agreement": round(agree / total, 4) if total else None}


def prototype_init_checkpoint(ctx: StageContext, k: int, n_classes: int, path: Any) -> dict[str, Any]:
    """Write ``path``: the last proposals round's weights with the class head from
    :func:`prototype_head` (``distill.head_init``); returns its stats."""
    import pyarrow.parquet as pq
    import torch

    from partdistill.models.teacher import load_state_dict
    from partdistill.models.train_teacher import save_checkpoint
    from partdistill.stages.instances import read_instances
    from partdistill.stages.ranking import pseudo_parts_file

    proposals = ctx.inputs["proposals"]
    state = load_state_dict(proposals.file("checkpoint.pth"))
    wkey, bkey = "decoder.head.cls_embed.weight", "decoder.head.cls_embed.bias"
    if wkey not in state or bkey not in state:
        raise ValueError(f"{proposals.file('checkpoint.pth')} has no {wkey}: not a proposals checkpoint")
    protos: dict[int, list[tuple[int, list[float]]]] = defaultdict(list)
    for row in pq.read_table(ctx.inputs["ranking"].file("prototypes.parquet"),
                             columns=["class_id", "cluster", "prototype"]).to_pylist():
        protos[int(row["class_id"])].append((int(row["cluster"]), row["prototype"]))
    prototypes = {c: np.asarray([p for _, p in sorted(rows)], np.float64) for c, rows in protos.items()}
    class_of = dict(zip(*[read_instances(ctx.inputs["instances"]).column(n).to_pylist()
                          for n in ("instance_id", "class_id")], strict=True))
    feats: dict[int, list[list[float]]] = defaultdict(list)
    parts = pq.read_table(proposals.file(pseudo_parts_file(proposals)), columns=["instance_id", "split", "feature"])
    fit_splits = set(ctx.full_config["ranking"]["fit_splits"])
    for iid, split, f in zip(*[parts.column(n).to_pylist() for n in ("instance_id", "split", "feature")], strict=True):
        if split in fit_splits and iid in class_of:
            feats[int(class_of[iid])].append(f)
    weight, bias, stats = prototype_head(state[wkey].numpy(), state[bkey].numpy(), prototypes, k, n_classes,
                                         {c: np.asarray(v, np.float64) for c, v in feats.items()},
                                         float(ctx.config["head_init"]["temperature"]))
    state[wkey] = torch.from_numpy(weight).to(state[wkey].dtype)
    state[bkey] = torch.from_numpy(bias).to(state[bkey].dtype)
    save_checkpoint(path, state, {"head_init": "prototypes", **stats})
    return stats


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
    head_stats: dict[str, Any] = {}
    k = int(read_classes(ctx.inputs["ranking"])["k"])
    n_classes = num_object_classes(ctx.inputs)
    if r == 1:
        parts = pq.read_table(ctx.inputs["ranking"].file("labeled_parts.parquet"))
        init = ctx.inputs["proposals"].file("checkpoint.pth")
        mode = ctx.config.get("head_init", {}).get("mode", "random")
        if mode == "prototypes":
            # under work/, which the round deletes once trained; head_init.json stays with the artifact
            init = ctx.writer.path / "work" / "init_from_prototypes.pth"
            if not ctx.writer.shard_done("train"):
                init.parent.mkdir(parents=True, exist_ok=True)
                write_json_atomic(ctx.writer.path / "head_init.json",
                                  {"mode": mode, **prototype_init_checkpoint(ctx, k, n_classes, init)})
            head_stats = json.loads((ctx.writer.path / "head_init.json").read_text())
        elif mode != "random":
            raise ValueError(f"distill.head_init.mode must be 'random' or 'prototypes', got {mode!r}")
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
    return {**summary, "k": k, "object_classes": n_classes, **({"head_init": head_stats} if head_stats else {}),
            "clusters_used_per_class": round(float(np.mean([len(v) for v in used.values()])), 2) if used else 0.0}


def _relevant(section: dict[str, Any], cfg: Any) -> dict[str, Any]:
    # a random class head is the default: a store made before head_init existed keeps its version
    head = section.get("head_init") or {}
    return {k: v for k, v in section.items() if not (k == "head_init" and head.get("mode", "random") == "random")}


STAGE = Stage("distill", ("data", "teacher", "instances", "proposals", "ranking"), "2", run,
              summary="final part model", rounds=lambda section: section["rounds"], round_keys=("rounds",),
              relevant=_relevant)
