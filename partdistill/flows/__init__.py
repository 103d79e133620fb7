"""Prefect flows: orchestration only. Stage logic lives in partdistill.stages and partdistill.pipeline."""

from partdistill.flows.settings import apply_prefect_defaults

apply_prefect_defaults()
