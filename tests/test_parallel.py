"""Scale-out (partdistill.parallel, partdistill.flows.runners): sharded stages on a cluster write
the same bytes as in this process, and the runtime settings that choose it change no version."""

import copy
import os

import pytest

from partdistill.config import load_config
from partdistill.parallel import LocalMapper, ShardDone, check_runtime, job_artifact, open_mapper, process_cached
from partdistill.pipeline import PipelineError, plan, run_pipeline
from tests.conftest import DEMO_CONFIG, TINY
from tests.stages.test_mining import _linked_store

# Ground-truth objects (the tiny run's 3-iteration teacher finds 4), mined with the CRF in 3 shards;
# labelling in proposals_r1: a decoder that trains 4 iterations, loose thresholds (as test_proposals)
PROPOSALS = {"instances.source": "gt", "mining.shard_instances": 5, "proposals.rounds": 1,
             "proposals.num_queries": 8, "proposals.num_points": 256, "proposals.max_iters": 4,
             "proposals.batch_size": 2, "proposals.checkpoint_interval": 2,
             "proposals.image_size": [96, 128], "proposals.label.score_threshold": 0.0,
             "proposals.label.mask_threshold": 0.2, "proposals.label.shard_images": 4,
             "proposals.label.max_fraction": 1.0, "proposals.optimizer.lr": 1e-4}


def test_runtime_scale_out_settings_change_no_version():
    before = [p.version for p in plan(load_config(DEMO_CONFIG))]
    after = [p.version for p in plan(load_config(DEMO_CONFIG, {
        "runtime.task_runner": "dask", "runtime.workers": 64, "runtime.cluster_address": "tcp://10.0.0.1:8786",
        "runtime.cluster_kwargs": {"memory_limit": "8GiB"}, "runtime.shard_threads": 4, "runtime.train_threads": 3,
        "runtime.shard_retries": 5,
        "runtime.shard_retry_delay_seconds": [1, 2, 3]}))]
    assert before == after


def test_local_mapper_runs_in_order_with_the_thread_setting():
    import torch

    before = torch.get_num_threads()
    seen = []

    def fn(job):
        seen.append(torch.get_num_threads())
        return job * 10

    with open_mapper({"task_runner": "local", "shard_threads": 1}) as mapper:
        assert isinstance(mapper, LocalMapper) and mapper.in_process
        assert list(mapper.map(fn, [1, 2, 3])) == [(0, 10), (1, 20), (2, 30)]
    assert seen == [1, 1, 1] and torch.get_num_threads() == before


def test_bad_runtime_settings_fail_before_any_work():
    with pytest.raises(ValueError, match="task_runner must be one of"):
        check_runtime({"task_runner": "spark"})
    with pytest.raises(ValueError, match="workers must be an int >= 1"):
        check_runtime({"task_runner": "dask", "workers": 0})
    with pytest.raises(ValueError, match="runtime.train_threads must be an int >= 0"):
        check_runtime({"train_threads": -1})
    with pytest.raises(PipelineError, match="task_runner must be one of"):  # the CLI's config error
        plan(load_config(DEMO_CONFIG, {"runtime.task_runner": "spark"}))


def test_ray_without_prefect_ray_says_how_to_install_it(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "prefect_ray" else real(name, *a))
    with pytest.raises(ValueError, match="pip install prefect-ray"):
        open_mapper({"task_runner": "ray"})
    with pytest.raises(PipelineError, match="pip install prefect-ray"):
        plan(load_config(DEMO_CONFIG, {"runtime.task_runner": "ray"}))


def test_process_cache_builds_once_per_key():
    calls = []
    for _ in range(3):
        assert process_cached(("test-parallel", 1), lambda: calls.append(1) or "model") == "model"
    assert calls == [1]


def test_job_artifact_keeps_what_a_shard_reads(tiny_run):
    _, store, outcomes = tiny_run
    data = store.open("data", outcomes["data"].version)
    light = job_artifact(data.restricted({"parts_train.json"}))
    assert light.path == data.path and light.version == data.version and light.hidden == {"parts_train.json"}
    assert "images.parquet" in light.files and not any("/" in f for f in light.files)
    assert light.file("images.parquet") == data.file("images.parquet")


def _with(cfg, options):
    """A copy of ``cfg`` with dotted-key ``options`` set."""
    cfg = copy.deepcopy(cfg)
    for key, value in options.items():
        section, *rest = key.split(".")
        node = cfg[section]
        for part in rest[:-1]:
            node = node[part]
        node[rest[-1]] = value
    return cfg


def _same_files(name, version, store, other):
    ours = store.open(name, version).manifest["files"]
    theirs = other.open(name, version).manifest["files"]
    assert theirs == ours, f"{name}: files differ: " + ", ".join(
        sorted(f for f in set(ours) | set(theirs) if ours.get(f) != theirs.get(f))[:5])


@pytest.mark.slow
def test_dask_workers_write_the_same_artifacts(tiny_run, tmp_path):
    """instances, features, mining (with its CRF) and the labelling of proposals_r1, in this process
    and as Prefect tasks on a local Dask cluster of 2 worker processes (the driver marks the shards
    done): every file of every artifact has the same sha256. The cluster runs once through the
    Prefect flow, once through the plain loop (``--engine local``)."""
    pytest.importorskip("prefect_dask")
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterName

    from partdistill.flows.pipeline import pipeline_flow

    cfg, store, _ = tiny_run
    cfg = _with(cfg, PROPOSALS)
    local = {o.stage: o for o in run_pipeline(cfg, store, until="mining")}

    # the same config on the cluster, in a store that shares only data and the teacher
    other = _linked_store(tmp_path, store, ("data", "teacher"))
    options = {**TINY, **PROPOSALS, "runtime.task_runner": "dask", "runtime.workers": 2,
               "runtime.cluster_kwargs": {"threads_per_worker": 1, "processes": True}}
    state = pipeline_flow(config=str(DEMO_CONFIG), until="mining", store=str(other.root),
                          cfg_options=[f"{k}={v!r}" for k, v in options.items()], return_state=True)
    cluster = {o["stage"]: o for o in state.result()}
    for name in ("instances", "features", "mining"):
        assert cluster[name]["state"] == "computed", name
        assert cluster[name]["version"] == local[name].version, f"{name}: runtime settings changed the version"
        _same_files(name, local[name].version, store, other)

    # every shard was a task run of the flow, not run by the driver
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    shard_runs = {r.name: r.state.name for r in runs if r.name not in cluster}
    assert set(shard_runs.values()) == {"Completed"}
    assert {n for n in shard_runs if n.startswith("instances-")} == {f"instances-part-{i:05d}" for i in range(3)}
    assert {n for n in shard_runs if n.startswith("features-")} == {f"features-shard-{i:05d}" for i in range(3)}
    mining_shards = -(-local["mining"].summary["instances"] // PROPOSALS["mining.shard_instances"])
    assert mining_shards > 1
    assert {n for n in shard_runs if n.startswith("mining-")} == {f"mining-part-{i:05d}" for i in range(mining_shards)}

    # proposals_r1: training in the driver, labelling on the cluster. The driver's random state
    # differs between the two runs (as it does when shards run here or elsewhere): no byte may
    import torch

    torch.manual_seed(1)
    [mine] = run_pipeline(cfg, store, only="proposals_r1")
    cluster_cfg = _with(cfg, {"runtime.task_runner": "dask", "runtime.workers": 2})
    torch.manual_seed(2)
    [theirs] = run_pipeline(cluster_cfg, other, only="proposals_r1")
    assert mine.state == theirs.state == "computed" and mine.version == theirs.version
    _same_files("proposals_r1", mine.version, store, other)
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(
            name=TaskRunFilterName(like_="proposals-r1-pseudo-")))
    assert len({r.name for r in runs}) == -(-12 // PROPOSALS["proposals.label.shard_images"])
    assert {r.state.name for r in runs} == {"Completed"}


@pytest.mark.slow
def test_ray_workers_write_the_same_artifacts(tiny_run, tmp_path):
    """instances, features and mining (with its CRF) as Prefect tasks on a local Ray cluster of 2
    worker processes, through the plain loop: every file has the same sha256 as in this process."""
    pytest.importorskip("prefect_ray", reason="runtime.task_runner='ray' needs prefect-ray (pip install -e '.[ray]')")
    from datetime import UTC, datetime

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterStartTime

    cfg, store, _ = tiny_run
    cfg = _with(cfg, {"instances.source": "gt", "mining.shard_instances": PROPOSALS["mining.shard_instances"]})
    local = {o.stage: o for o in run_pipeline(cfg, store, until="mining")}

    other = _linked_store(tmp_path, store, ("data", "teacher"))
    ray_cfg = _with(cfg, {"runtime.task_runner": "ray", "runtime.workers": 2})
    started = datetime.now(UTC)
    theirs = {o.stage: o for o in run_pipeline(ray_cfg, other, until="mining")}
    for name in ("instances", "features", "mining"):
        assert theirs[name].state == "computed", name
        assert theirs[name].version == local[name].version, f"{name}: runtime settings changed the version"
        _same_files(name, local[name].version, store, other)

    # every shard was a Prefect task run on a Ray worker process, not run by this process
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(start_time=TaskRunFilterStartTime(after_=started)))
    names = {r.name for r in runs if r.state.name == "Completed"}
    mining_shards = -(-local["mining"].summary["instances"] // PROPOSALS["mining.shard_instances"])
    assert mining_shards > 1
    assert {f"features-shard-{i:05d}" for i in range(3)} <= names
    assert {f"mining-part-{i:05d}" for i in range(mining_shards)} <= names


def test_shard_done_is_picklable():
    import pickle

    done = ShardDone("part-00000", ["a/b.parquet"], {"rows": 3})
    assert pickle.loads(pickle.dumps(done)) == done


def _flaky(job):
    """Fails the first attempt of job 1 (an attempt leaves a file), succeeds otherwise."""
    from pathlib import Path

    folder, index = Path(job["folder"]), job["index"]
    attempt = len(list(folder.glob(f"{index}-*"))) + 1
    (folder / f"{index}-{attempt}").touch()
    if index == 1 and attempt == 1:
        raise OSError("worker lost its disk")
    if index == 2:
        raise ValueError("bad shard 2")
    return index * 10


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dask", "ray"])
def test_cluster_shards_retry_then_fail_with_the_shards_error(tmp_path, kind):
    """On a Dask or Ray cluster: a failing shard is retried (runtime.shard_retries) and then its
    error reaches the stage; results come back as (index, result) pairs."""
    pytest.importorskip(f"prefect_{kind}", reason=f"runtime.task_runner={kind!r} needs prefect-{kind}")
    jobs = [{"folder": str(tmp_path), "index": i} for i in range(3)]
    runtime = {"task_runner": kind, "workers": 1, "shard_retries": 1, "shard_retry_delay_seconds": [0]}
    environ = dict(os.environ)
    with open_mapper(runtime) as mapper:
        assert not mapper.in_process
        done = dict(mapper.map(_flaky, jobs[:2], ["flaky-0", "flaky-1"]))
        # the cluster's start left this process's environment (OMP_NUM_THREADS, ...) as it was
        assert {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")} == {
            k: environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        assert done == {0: 0, 1: 10}
        with pytest.raises(ValueError, match="bad shard 2"):
            list(mapper.map(_flaky, jobs[2:], ["flaky-2"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0-1", "1-1", "1-2", "2-1", "2-2"]


def test_training_threads_pins_torch_threads_and_restores_them():
    import torch

    from partdistill.stages.base import StageContext

    before = torch.get_num_threads()
    pinned = 1 if before != 1 else 2
    ctx = StageContext("proposals", "v", {}, {"runtime": {"train_threads": pinned}}, {}, writer=None)
    with ctx.training_threads():
        assert torch.get_num_threads() == pinned
    assert torch.get_num_threads() == before
    with StageContext("proposals", "v", {}, {"runtime": {}}, {}, writer=None).training_threads():
        assert torch.get_num_threads() == before  # 0 / unset: torch's own count
