"""Stages that later issues build. Each fails with NotImplementedError naming what is missing;
none writes output, fake or otherwise. A stage moves to its own module when it is built."""

from partdistill.stages.base import Stage, not_built

STAGES = [
    Stage("ranking", ("data", "instances", "proposals"), "0", not_built(
        "ranking", "needs per-class prototype clustering and the Eq. 2 density score (issue #6)"),
        summary="class-specific part clusters"),
    Stage("distill", ("data", "teacher", "instances", "proposals", "ranking"), "0", not_built(
        "distill", "needs the class-conditioned part head trained on the cluster labels (issue #6)"),
        summary="final part model"),
    Stage("evaluate", ("data", "teacher", "instances", "distill"), "0", not_built(
        "evaluate", "needs AR@k, mIoU and NMI/ARI against the part ground truth (issues #4, #6)"),
        reads_evaluation_only=True, summary="metrics and report"),
]
