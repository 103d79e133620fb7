"""A stage that fails mid-way, then the flow run again (and a Prefect flow retry): only the
failed stage and those after it run, the failed stage resumes at its first unfinished shard,
and finished artifacts are not touched."""

import dataclasses

import pytest

from partdistill.config import load_config
from partdistill.stages import STAGES
from partdistill.storage import ArtifactStore
from partdistill.storage.store import ArtifactWriter
from tests.conftest import DEMO_CONFIG, TINY
from tests.flows.test_pipeline_flow import _task_states

OPTIONS = [f"{k}={v!r}" for k, v in {**TINY, "instances.source": "gt", "mining.crf.enabled": False}.items()]


@pytest.fixture
def counted(monkeypatch):
    """How many times each stage's code ran in this process."""
    runs: dict[str, int] = {}
    for name, stage in list(STAGES.items()):
        def run(ctx, _real=stage.run, _name=name):
            runs[_name] = runs.get(_name, 0) + 1
            return _real(ctx)
        monkeypatch.setitem(STAGES, name, dataclasses.replace(stage, run=run))
    return runs


def _fail_features_shard(monkeypatch, at: int, times: int = 1):
    """Make the `features` stage die before marking its ``at``-th shard done, ``times`` times."""
    real = ArtifactWriter.complete_shard
    state = {"calls": 0, "failures": 0, "completed": []}

    def complete_shard(self, shard, files=(), meta=None):
        if self.stage == "features":
            state["calls"] += 1
            if state["calls"] == at and state["failures"] < times:
                state["failures"] += 1
                state["calls"] = 0
                raise RuntimeError(f"injected fault in features shard {shard}")
            state["completed"].append(shard)
        return real(self, shard, files, meta)

    monkeypatch.setattr(ArtifactWriter, "complete_shard", complete_shard)
    return state


def _created(store: ArtifactStore) -> dict[str, str]:
    return {s: store.open(s, v).manifest["created"] for s in store.stages() for v in store.versions(s)}


@pytest.mark.slow
@pytest.mark.parametrize("rerun", ["flow", "only"])
def test_failed_stage_then_rerun_runs_only_it_and_downstream(tmp_path, monkeypatch, counted, rerun):
    """The rerun is the whole flow again, or ``--only features`` and then the whole flow."""
    from partdistill.flows.pipeline import pipeline_flow
    from partdistill.pipeline import status

    store = ArtifactStore(tmp_path / "store")
    args = dict(config=str(DEMO_CONFIG), until="mining", store=str(store.root), cfg_options=OPTIONS)
    fault = _fail_features_shard(monkeypatch, at=2)

    first = pipeline_flow(**args, return_state=True)
    assert first.is_failed() and "injected fault" in str(first.message) + str(first.result(raise_on_failure=False))
    assert _task_states(first) == {"data": "Completed", "teacher": "Completed", "instances": "Completed",
                                   "features": "Failed"}
    [version] = store.partial_versions("features")
    shards = store.partial_path("features", version) / "_shards"
    assert sorted(p.stem for p in shards.glob("*.json")) == ["shard-00000"]
    before = _created(store)
    assert set(before) == {"data", "teacher", "instances"} and store.verify() == []
    cfg = load_config(DEMO_CONFIG, OPTIONS)
    states = {r["stage"]: r["state"] for r in status(cfg, store)}
    assert states["instances"] == "complete" and states["features"] == "partial (1/3 shards done)"
    assert states["mining"] == "missing"

    if rerun == "only":
        alone = pipeline_flow(**{**args, "until": None}, only="features", return_state=True)
        assert alone.is_completed() and _task_states(alone) == {"features": "Completed"}
        assert counted["features"] == 2 and "mining" not in counted
    second = pipeline_flow(**args, return_state=True)
    assert second.is_completed()
    assert _task_states(second) == {"data": "Cached", "teacher": "Cached", "instances": "Cached",
                                    "features": "Cached" if rerun == "only" else "Completed",
                                    "mining": "Completed"}
    after = _created(store)
    assert {s: after[s] for s in before} == before  # finished artifacts untouched
    assert counted == {"data": 1, "teacher": 1, "instances": 1, "features": 2, "mining": 1}
    # the resumed features run started at its first unfinished shard: no shard was done twice
    assert fault["completed"] == ["shard-00000", "shard-00001", "shard-00002"]
    outcome = {o["stage"]: o for o in second.result()}["features"]
    assert outcome["state"] == ("skipped" if rerun == "only" else "computed")
    assert store.is_complete("features", version)
    assert store.verify() == []


@pytest.mark.slow
def test_flow_retry_does_not_recompute_finished_stages(tmp_path, monkeypatch, counted):
    from partdistill.flows.pipeline import pipeline_flow

    store = ArtifactStore(tmp_path / "store")
    fault = _fail_features_shard(monkeypatch, at=2)
    retrying = pipeline_flow.with_options(retries=1, retry_delay_seconds=0)
    state = retrying(config=str(DEMO_CONFIG), until="features", store=str(store.root), cfg_options=OPTIONS,
                     return_state=True)
    assert state.is_completed()
    # the retry ran the flow again: the three finished stages came back from the store
    assert counted == {"data": 1, "teacher": 1, "instances": 1, "features": 2}
    assert [o["state"] for o in state.result()] == ["skipped", "skipped", "skipped", "computed"]
    assert fault["completed"] == ["shard-00000", "shard-00001", "shard-00002"]
    assert store.verify() == []
