"""What a stage task shows in the Prefect UI: keyed table, markdown, link and progress artifacts."""

import contextlib

import pytest

from partdistill.progress import TeeProgress
from tests.conftest import DEMO_CONFIG


def _artifacts(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


def test_stage_task_publishes_keyed_artifacts_and_progress(tiny_options, tmp_path):
    from partdistill.flows.pipeline import pipeline_flow

    state = pipeline_flow(config=str(DEMO_CONFIG), until="data", store=str(tmp_path / "store"),
                          cfg_options=[f"{k}={v!r}" for k, v in tiny_options.items()], return_state=True)
    assert state.is_completed()
    [outcome] = state.result()
    artifacts = _artifacts(state.state_details.flow_run_id)
    by_key = {}
    for a in artifacts:
        by_key.setdefault(a.key, []).append(a)
    assert {"data-summary", "data-metrics", "data-preview", "data-progress"} <= set(by_key), sorted(by_key)
    assert all(a.task_run_id is not None for a in artifacts)  # attached to the stage's task run

    [summary] = by_key["data-summary"]
    assert summary.type == "markdown"
    assert outcome["version"] in summary.data and outcome["path"] in summary.data

    [metrics] = by_key["data-metrics"]
    assert metrics.type == "table"
    assert '"metric": "images"' in metrics.data and '"value": 12' in metrics.data

    [preview] = by_key["data-preview"]
    assert preview.type == "markdown"  # Prefect stores a link artifact as a markdown link
    assert f"]({outcome['path']}/preview.png)".replace("](/", "](file:///") in preview.data

    [progress] = by_key["data-progress"]
    assert progress.type == "progress"
    assert float(progress.data) == 100.0
    assert "rendering Parts World" in progress.description

    # a second run skips the complete stage and publishes nothing new under its keys
    again = pipeline_flow(config=str(DEMO_CONFIG), until="data", store=str(tmp_path / "store"),
                          cfg_options=[f"{k}={v!r}" for k, v in tiny_options.items()], return_state=True)
    assert again.result()[0]["state"] == "skipped"
    assert _artifacts(again.state_details.flow_run_id) == []


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def recorded(monkeypatch):
    """Stand-ins for Prefect's progress-artifact calls, recording (kind, progress, description)."""
    import prefect.artifacts

    calls = []
    monkeypatch.setattr(prefect.artifacts, "create_progress_artifact",
                        lambda progress, key, description: calls.append(("create", progress, description)) or "id-1")
    monkeypatch.setattr(prefect.artifacts, "update_progress_artifact",
                        lambda artifact_id, progress, description: calls.append(("update", progress, description)))
    return calls


def test_prefect_progress_is_rate_limited_and_ends_at_100(recorded):
    from partdistill.flows.progress import PrefectProgress

    clock = _Clock()
    sink = PrefectProgress("teacher-progress", min_interval=1.0, min_step=5.0, clock=clock)
    with sink.task("teacher: training", total=200) as bar:
        for _ in range(150):  # 150 steps within one second: no update
            bar.advance()
        clock.now = 2.0
        bar.advance()         # a second later and 75.5 %: one update
        for _ in range(3):
            bar.advance()     # too soon
        clock.now = 2.5
        bar.advance(10)
    assert [c[:2] for c in recorded] == [("create", 0.0), ("update", 75.5), ("update", 100.0)]
    assert recorded[-1][2] == "teacher: training: done (164 of 200)"
    assert sink.updates == 3


def test_prefect_progress_reaching_total_is_sent_at_once_and_errors_report_where_it_stopped(recorded):
    from partdistill.flows.progress import PrefectProgress

    clock = _Clock()
    sink = PrefectProgress("x-progress", clock=clock)
    with sink.task("x", total=4) as bar:
        bar.advance(4)
    assert [c[:2] for c in recorded] == [("create", 0.0), ("update", 100.0)]
    recorded.clear()
    with pytest.raises(ValueError), sink.task("y", total=10) as bar:
        bar.advance(3)
        raise ValueError("stage failed")
    assert [c[:2] for c in recorded] == [("create", 0.0), ("update", 30.0)]


def test_prefect_progress_never_fails_a_stage(monkeypatch):
    import logging

    import prefect.artifacts

    from partdistill.flows.progress import PrefectProgress

    def down(**kwargs):
        raise ConnectionError("API down")

    monkeypatch.setattr(prefect.artifacts, "create_progress_artifact", down)
    sink = PrefectProgress("x-progress", logger=logging.getLogger("test"))
    with sink.task("x", total=3) as bar:
        bar.advance(3)
    assert sink.updates == 0


def test_tee_progress_advances_every_sink_and_passes_errors_through():
    seen = []

    class Sink:
        def __init__(self, name):
            self.name = name

        @contextlib.contextmanager
        def task(self, description, total):
            seen.append((self.name, "start", description, total))

            class Bar:
                def advance(_self, n=1):
                    seen.append((self.name, "advance", n))
            try:
                yield Bar()
            except ValueError:
                seen.append((self.name, "error"))
                raise

    tee = TeeProgress(Sink("a"), None, Sink("b"))
    with tee.task("t", 2) as bar:
        bar.advance(2)
    assert seen == [("a", "start", "t", 2), ("b", "start", "t", 2), ("a", "advance", 2), ("b", "advance", 2)]
    seen.clear()
    with pytest.raises(ValueError), tee.task("t", None):
        raise ValueError
    assert ("a", "error") in seen and ("b", "error") in seen


def test_summary_table_rows():
    from partdistill.flows.pipeline import summary_table

    assert summary_table({"images": 12, "AR@200": 0.5, "per_class": {"car": 1}, "none": None}) == [
        {"metric": "images", "value": 12}, {"metric": "AR@200", "value": 0.5},
        {"metric": "per_class", "value": '{"car": 1}'}, {"metric": "none", "value": None}]
