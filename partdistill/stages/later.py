"""Stages that later issues build. Each fails with NotImplementedError naming what is missing;
none writes output, fake or otherwise. A stage moves to its own module when it is built."""

from partdistill.stages.base import Stage, not_built

STAGES = [
    Stage("teacher", ("data",), "0", not_built(
        "teacher", "needs the demo Mask2Former teacher trained on the Parts World instance JSON with "
        "mmengine's Runner, and loaders for mmdet / detectron2 checkpoints (issue #3)"),
        summary="instance-segmentation teacher"),
    Stage("instances", ("data", "teacher"), "0", not_built(
        "instances", "needs teacher inference writing instances.parquet with RLE masks (issue #3)"),
        summary="object masks"),
    Stage("features", ("data", "teacher", "instances"), "0", not_built(
        "features", "needs res3+res4 pixel features per instance into sharded Zarr (issue #3)"),
        summary="pixel features"),
    Stage("mining", ("data", "instances", "features"), "0", not_built(
        "mining", "needs instance-level K-means and the dense CRF writing mined_parts.parquet (issue #4)"),
        summary="K-means part proposals"),
    Stage("proposals", ("data", "teacher", "instances", "mining"), "0", not_built(
        "proposals", "needs the class-agnostic part decoder and its self-training rounds (issue #5)"),
        summary="part decoder"),
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
