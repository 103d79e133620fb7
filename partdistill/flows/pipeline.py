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
from partdistill.pipeline import PlannedStage, plan, run_stage, select, store_for  # noqa: E402
from partdistill.progress import NullProgress, ProgressSink  # noqa: E402

# Set by the CLI so stage progress bars show in the terminal as well as in Prefect's logs.
TERMINAL_PROGRESS: ProgressSink | None = None


@task(cache_policy=NO_CACHE, task_run_name="{planned.name}")
def stage_task(planned: PlannedStage, cfg: dict[str, Any], store: str | None = None):
    logger = get_run_logger()
    outcome = run_stage(
        store_for(cfg, store), planned, cfg, TERMINAL_PROGRESS or NullProgress(),
        on_wait=lambda holder: logger.info("waiting for %s/%s: another run (pid %s) is writing it",
                                           planned.name, planned.version, holder),
    )
    result = outcome.as_dict()
    if outcome.state != "computed":
        logger.info("%s/%s is complete in the store: not recomputed", planned.name, planned.version)
        return Completed(data=result, name="Cached", message=f"artifact {planned.name}/{planned.version} exists")
    create_markdown_artifact(
        key=artifact_key(planned.name, "summary"),
        markdown=_summary_markdown(result),
        description=f"{planned.name} {planned.version}",
    )
    _publish_results(planned, result)
    return result


def _publish_results(planned: PlannedStage, result: dict[str, Any]) -> None:
    """The evaluate stage's metric table as a Prefect artifact, and links to its report and
    pictures; keyed, so their history shows across runs."""
    from pathlib import Path

    from prefect.artifacts import create_link_artifact

    path = Path(result["path"])
    table = path / "table.md"
    if table.exists():
        create_markdown_artifact(key=artifact_key(planned.name, "metrics"), markdown=table.read_text(),
                                 description=f"metrics of {planned.name} {planned.version}")
    for name, what in (("report.html", "report"), ("pseudo_parts.png", "pseudo-parts"),
                       ("loss.png", "loss")):
        if (path / name).exists():
            create_link_artifact(key=artifact_key(planned.name, what), link=(path / name).resolve().as_uri(),
                                 link_text=f"{planned.name} {what}", description=f"{planned.name} {planned.version}")


@flow(name="partdistill")
def pipeline_flow(
    config: str = "configs/demo_partsworld.py",
    until: str | None = None,
    only: str | None = None,
    store: str | None = None,
    cfg_options: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Run the pipeline's stages in order; complete stage versions are skipped."""
    cfg = load_config(config, cfg_options)
    # return_state: a skipped stage's task returns a "Cached" state, which a plain call would
    # hand back unresolved; .result() also re-raises a failed stage's error, stopping the flow.
    return [stage_task(planned, cfg, store, return_state=True).result()
            for planned in select(plan(cfg), until, only)]


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes only), e.g. proposals-r1-summary."""
    import re

    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def _summary_markdown(result: dict[str, Any]) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in result["summary"].items())
    return (f"### {result['stage']} `{result['version']}`\n\nlocation: `{result['path']}`, "
            f"{result['seconds']:.1f} s\n\n| metric | value |\n|---|---|\n{rows}\n")
