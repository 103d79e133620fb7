import json
import os
import signal
import subprocess
import sys
import time

from pycocotools.coco import COCO

from partdistill.pipeline import run_pipeline, store_for
from partdistill.storage import ArtifactStore, EvaluationOnlyFile, read_parquet
from tests.conftest import DEMO_CONFIG


def test_data_stage_writes_parts_world(tiny_cfg):
    [outcome] = run_pipeline(tiny_cfg, until="data")
    store = store_for(tiny_cfg)
    art = store.open("data", outcome.version)
    assert outcome.summary["images"] == 12
    assert outcome.summary["train_images"] + outcome.summary["val_images"] == 12
    names = set(art.files)
    assert {"images.parquet", "instances_train.json", "instances_val.json", "parts_train.json",
            "parts_val.json", "splits.json", "preview.png"} <= names
    assert sum(n.startswith("images/") for n in names) == 12
    table = read_parquet(art.file("images.parquet"))
    assert table.num_rows == 12 and set(table.column("split").to_pylist()) <= {"train", "val"}
    assert art.manifest["evaluation_only"] == ["parts_train.json", "parts_val.json", "parts_test.json"]
    assert art.manifest["config"] == tiny_cfg["data"]
    assert art.manifest["code"]["package"]
    for split in ("train", "val"):
        COCO(str(art.file(f"instances_{split}.json")))
        COCO(str(art.file(f"parts_{split}.json")))
    assert store.verify() == []
    # a second run is a no-op
    assert run_pipeline(tiny_cfg, until="data")[0].state == "skipped"


def test_training_stages_cannot_open_part_ground_truth(tiny_cfg):
    from partdistill.pipeline import plan, run_stage
    from partdistill.stages import STAGES, Stage

    seen = {}

    def peek(ctx):
        data = ctx.inputs["data"]
        seen["instances"] = data.file("instances_train.json").exists()
        try:
            data.file("parts_train.json")
        except EvaluationOnlyFile as err:
            seen["refused"] = str(err)
        raise NotImplementedError("peek only")

    run_pipeline(tiny_cfg, until="data")
    teacher = next(p for p in plan(tiny_cfg) if p.name == "teacher")
    real = STAGES["teacher"]
    STAGES["teacher"] = Stage("teacher", real.upstream, real.code_version, peek)
    try:
        try:
            run_stage(store_for(tiny_cfg), teacher, tiny_cfg)
        except NotImplementedError:
            pass
    finally:
        STAGES["teacher"] = real
    assert seen["instances"] and "evaluation-only" in seen["refused"]


def _cli(store, *extra):
    opts = ["-o", "data.partsworld.images=64", "-o", "data.partsworld.shard_size=4"]
    return [sys.executable, "-m", "partdistill", "run", str(DEMO_CONFIG), "--until", "data", "--engine", "local",
            "--store", str(store), *opts, *extra]


def test_sigkill_mid_stage_leaves_nothing_visible_and_resumes_to_identical_bytes(tmp_path):
    killed = ArtifactStore(tmp_path / "killed")
    proc = subprocess.Popen(_cli(killed.root), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    markers = []
    while time.monotonic() < deadline and len(markers) < 3:
        markers = list((killed.root / "data").glob(".partial-*/_shards/*.json"))
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(markers) >= 3, "the stage never got going"
    assert killed.versions("data") == []  # no visible artifact
    [version] = killed.partial_versions("data")
    done_before = len(list(killed.partial_path("data", version).glob("_shards/*.json")))
    assert 3 <= done_before < 16, "killed mid-stage"

    subprocess.run(_cli(killed.root), check=True, capture_output=True)
    clean = ArtifactStore(tmp_path / "clean")
    subprocess.run(_cli(clean.root), check=True, capture_output=True)
    assert killed.open("data", version).files == clean.open("data", version).files
    assert killed.verify() == [] and killed.partial_versions("data") == []


def test_same_seed_same_annotation_bytes_across_stores(tmp_path, tiny_options):
    from partdistill.config import load_config

    files = []
    for name in ("a", "b"):
        cfg = load_config(DEMO_CONFIG, tiny_options)
        cfg["runtime"]["store"] = str(tmp_path / name)
        [o] = run_pipeline(cfg, until="data")
        files.append(json.loads((tmp_path / name / "data" / o.version / "manifest.json").read_text())["files"])
    assert files[0] == files[1]
