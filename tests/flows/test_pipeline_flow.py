"""The Prefect flow against the ephemeral API (no server started)."""

import shutil

from partdistill.storage import ArtifactStore
from tests.conftest import DEMO_CONFIG


def _options(tiny_options):
    return [f"{k}={v!r}" for k, v in tiny_options.items()]


def _task_states(flow_state):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id])))
    return {r.name: r.state.name for r in runs}


def test_flow_skips_complete_stage_and_reruns_incomplete(tiny_options, tmp_path):
    from partdistill.flows.pipeline import pipeline_flow

    store = ArtifactStore(tmp_path / "store")
    args = dict(config=str(DEMO_CONFIG), until="data", store=str(store.root), cfg_options=_options(tiny_options))

    first = pipeline_flow(**args, return_state=True)
    assert first.is_completed()
    [outcome] = first.result()
    assert outcome["stage"] == "data" and outcome["state"] == "computed"
    assert outcome["summary"]["images"] == 12
    version = outcome["version"]
    made = store.open("data", version).manifest["created"]
    assert _task_states(first) == {"data": "Completed"}

    second = pipeline_flow(**args, return_state=True)
    assert second.result()[0]["state"] == "skipped"
    assert _task_states(second) == {"data": "Cached"}
    assert store.open("data", version).manifest["created"] == made  # untouched

    shutil.rmtree(store.path("data", version))  # now incomplete: the next run must rebuild it
    third = pipeline_flow(**args, return_state=True)
    assert third.result()[0]["state"] == "computed"
    assert store.verify() == []


def test_flow_fails_on_unbuilt_stage_after_keeping_finished_ones(tiny_options, tmp_path, unbuilt_teacher):
    from partdistill.flows.pipeline import pipeline_flow

    store = ArtifactStore(tmp_path / "store")
    state = pipeline_flow(config=str(DEMO_CONFIG), until="teacher", store=str(store.root),
                          cfg_options=_options(tiny_options), return_state=True)
    assert state.is_failed()
    assert "stage 'teacher' is not built yet" in state.message or "teacher" in str(state.message)
    assert len(store.versions("data")) == 1 and store.versions("teacher") == []
    assert _task_states(state) == {"data": "Completed", "teacher": "Failed"}


def test_artifact_keys_are_valid_for_round_stages():
    from prefect.artifacts import MarkdownArtifact

    from partdistill.flows.pipeline import artifact_key

    assert artifact_key("proposals_r1", "summary") == "proposals-r1-summary"
    MarkdownArtifact(key=artifact_key("distill_r12", "summary"), markdown="x")  # validates the key
