"""The pipeline as a Prefect 3 flow: one task per stage, run in order.

Prefect's default cache policy keys on task inputs and the run, so a retried or repeated flow
would recompute finished stages. Here the cache is the artifact store: each task asks the store
whether its stage version is complete and, if so, finishes as ``Cached`` without running.
"""

from __future__ import annotations

from typing import Any

from partdistill.flows.settings import apply_prefect_defaults

apply_prefect_defaults()

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.states import Completed  # noqa: E402

from partdistill.config import load_config  # noqa: E402
from partdistill.flows.progress import PrefectProgress  # noqa: E402
from partdistill.parallel import open_mapper, register_mapper, registered_mapper  # noqa: E402
from partdistill.pipeline import PlannedStage, plan, run_stage, select, store_for  # noqa: E402
from partdistill.progress import ProgressSink, TeeProgress  # noqa: E402

# Set by the CLI so stage progress bars show in the terminal too (the UI gets progress artifacts).
TERMINAL_PROGRESS: ProgressSink | None = None


def terminal_progress() -> ProgressSink | None:
    # Tasks and flows read module state through functions: a shard task submitted to a cluster
    # carries its flow and parent task in its context, and cloudpickle copies the module globals
    # their code names (a progress bar, the cluster's client) but not those of a function it can
    # import by name.
    return TERMINAL_PROGRESS


@task(cache_policy=NO_CACHE, task_run_name="{planned.name}")
def stage_task(planned: PlannedStage, cfg: dict[str, Any], store: str | None = None, shards: str | None = None):
    logger = get_run_logger()
    # progress bars on the terminal (when the CLI runs the flow) and in the UI, as progress artifacts
    progress = TeeProgress(terminal_progress(), PrefectProgress(artifact_key(planned.name, "progress"), logger=logger))
    outcome = run_stage(
        store_for(cfg, store), planned, cfg, progress,
        on_wait=lambda holder: logger.info("waiting for %s/%s: another run (pid %s) is writing it",
                                           planned.name, planned.version, holder),
        mapper=registered_mapper(shards) if shards else None,
    )
    result = outcome.as_dict()
    if outcome.state != "computed":
        logger.info("%s/%s is complete in the store: not recomputed", planned.name, planned.version)
        return Completed(data=result, name="Cached", message=f"artifact {planned.name}/{planned.version} exists")
    publish_artifacts(planned, result)
    return result


# Top-level files of an artifact folder that get a link artifact: its pictures and reports.
LINKED_SUFFIXES = (".png", ".jpg", ".jpeg", ".svg", ".html")


def publish_artifacts(planned: PlannedStage, result: dict[str, Any]) -> list[str]:
    """A computed stage's Prefect artifacts, keyed so that their history shows across runs:

    - ``{stage}-summary``: markdown with the version, the location and the summary;
    - ``{stage}-metrics``: the summary as a table (metric, value);
    - ``{stage}-results``: the stage's ``table.md``, where it writes one (evaluate);
    - ``{stage}-{file stem}``: a link to each picture or report at the top of its folder
      (``report.html``, ``loss.png``, ...).

    Returns the keys published.
    """
    from pathlib import Path

    from prefect.artifacts import create_link_artifact, create_table_artifact

    name, version = planned.name, planned.version
    description = f"{name} {version}"
    keys = [artifact_key(name, "summary")]
    create_markdown_artifact(key=keys[-1], markdown=_summary_markdown(result), description=description)
    if result["summary"]:
        keys.append(artifact_key(name, "metrics"))
        create_table_artifact(key=keys[-1], table=summary_table(result["summary"]),
                              description=f"metrics of {description}")
    path = Path(result["path"])
    table = path / "table.md"
    if table.exists():
        keys.append(artifact_key(name, "results"))
        create_markdown_artifact(key=keys[-1], markdown=table.read_text(), description=f"results of {description}")
    reserved = {artifact_key(name, what) for what in ("summary", "metrics", "results", "progress")}
    for file in sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in LINKED_SUFFIXES):
        key = artifact_key(name, file.stem)
        if key in reserved or key in keys:
            key = artifact_key(name, file.stem, file.suffix.lstrip("."))
        keys.append(key)
        create_link_artifact(key=key, link=file.resolve().as_uri(), link_text=f"{name}/{version}/{file.name}",
                             description=description)
    return keys


def summary_table(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """A stage summary as table rows; nested values (lists, dicts) are shown as JSON text."""
    import json

    def cell(value: Any) -> Any:
        if value is None or isinstance(value, bool | int | float | str):
            return value
        return json.dumps(value, default=str)

    return [{"metric": str(k), "value": cell(v)} for k, v in summary.items()]


@flow(name="partdistill")
def pipeline_flow(
    config: str = "configs/demo_partsworld.py",
    until: str | None = None,
    only: str | None = None,
    store: str | None = None,
    cfg_options: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Run the pipeline's stages in order; complete stage versions are skipped.

    Args:
        config: mmengine Python config, e.g. configs/demo_partsworld.py (relative to where the run starts).
        until: run this stage and the stages it reads, e.g. features or proposals_r1.
        only: run just this stage; its inputs must already be in the store. Not with until.
        store: artifact store root (default: the config's runtime.store).
        cfg_options: settings to override, each key=value, e.g. ["mining.k=6", "data.partsworld.images=200"].
    """
    cfg = load_config(config, cfg_options)
    selected = select(plan(cfg), until, only)
    # runtime.task_runner 'dask' / 'ray': sharded stages run their shards on that cluster, started
    # at the first such stage and kept for the next ones (partdistill.flows.runners)
    with open_mapper(cfg.get("runtime", {})) as mapper:
        # the stage tasks get the mapper's key: a task's parameters travel with every task it submits
        with register_mapper(mapper) as key:
            # return_state: a skipped stage's task returns a "Cached" state, which a plain call would
            # hand back unresolved; .result() also re-raises a failed stage's error, stopping the flow.
            return [stage_task(planned, cfg, store, key, return_state=True).result() for planned in selected]


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes only), e.g. proposals-r1-summary."""
    import re

    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def _summary_markdown(result: dict[str, Any]) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in result["summary"].items())
    return (f"### {result['stage']} `{result['version']}`\n\nlocation: `{result['path']}`, "
            f"{result['seconds']:.1f} s\n\n| metric | value |\n|---|---|\n{rows}\n")
