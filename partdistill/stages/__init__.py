"""The pipeline's stages, in the order they run. Each module holds one stage, as in the paper."""

from __future__ import annotations

from partdistill.stages.base import Stage, StageContext, not_built

STAGES: dict[str, Stage] = {}


def _register(stage: Stage) -> None:
    for up in stage.upstream:
        if up not in STAGES:
            raise ValueError(f"stage {stage.name!r} names upstream {up!r} before it is registered")
    STAGES[stage.name] = stage


def _load() -> None:
    from partdistill.stages import data, distill, evaluate, features, instances, mining, proposals, ranking, teacher

    _register(data.STAGE)
    _register(teacher.STAGE)
    _register(instances.STAGE)
    _register(features.STAGE)
    _register(mining.STAGE)
    _register(proposals.STAGE)
    _register(ranking.STAGE)
    _register(distill.STAGE)
    _register(evaluate.STAGE)


_load()

__all__ = ["STAGES", "Stage", "StageContext", "not_built"]
