"""A store on a full or read-only file system: a clear error, nothing lost, a clean resume.

These mount a small tmpfs (root only); elsewhere they are skipped, saying why.
"""

import subprocess
from pathlib import Path

import pytest

from partdistill.config import load_config
from partdistill.pipeline import StoreWriteFailed, plan, run_pipeline
from partdistill.storage import ArtifactStore
from tests.conftest import DEMO_CONFIG

SMALL = {"data.partsworld.images": 4, "data.partsworld.width": 96, "data.partsworld.height": 64,
         "data.partsworld.shard_size": 2}
BIG = {**SMALL, "data.partsworld.images": 48, "data.partsworld.width": 256, "data.partsworld.height": 192,
       "data.partsworld.seed": 5}


@pytest.fixture
def tmpfs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()

    def mount(*options: str) -> None:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(mnt)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")

    def remount(*options: str) -> None:
        subprocess.run(["mount", "-o", ",".join(("remount", *options)), str(mnt)], check=True)

    yield mnt, mount, remount
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _cfg(root: Path, options: dict) -> dict:
    cfg = load_config(DEMO_CONFIG, options)
    cfg["runtime"]["store"] = str(root)
    return cfg


def _files(store: ArtifactStore, stage: str, version: str) -> dict:
    return {k: v["sha256"] for k, v in store.open(stage, version).manifest["files"].items()}


def test_disk_full_fails_clearly_keeps_everything_and_resumes(tmpfs, tmp_path):
    mnt, mount, remount = tmpfs
    mount("size=1m")
    store = ArtifactStore(mnt / "store")
    [small] = run_pipeline(_cfg(store.root, SMALL), store, until="data")
    before = _files(store, "data", small.version)

    big_cfg = _cfg(store.root, BIG)
    version = next(p.version for p in plan(big_cfg) if p.name == "data")
    with pytest.raises(StoreWriteFailed) as err:
        run_pipeline(big_cfg, store, until="data")
    message = str(err.value)
    assert "the disk is full" in message and "No space left on device" in message
    assert str(store.root) in message and "MiB free" in message and "rerun" in message
    # what was there is whole; what failed is invisible; no temporary file is left behind
    assert store.verify() == [] and _files(store, "data", small.version) == before
    assert store.versions("data") == [small.version] and not store.is_complete("data", version)
    partial = store.partial_path("data", version)
    assert not list(partial.rglob(".*.tmp")) if partial.exists() else True

    remount("size=64m")  # space freed: the rerun resumes and makes what an undisturbed run makes
    run_pipeline(big_cfg, store, until="data")
    reference = ArtifactStore(tmp_path / "reference")
    run_pipeline(_cfg(reference.root, BIG), reference, until="data")
    assert _files(store, "data", version) == _files(reference, "data", version)
    assert store.verify() == []


def test_read_only_store_reads_and_refuses_writes_clearly(tmpfs):
    mnt, mount, remount = tmpfs
    mount("size=8m")
    store = ArtifactStore(mnt / "store")
    cfg = _cfg(store.root, SMALL)
    [made] = run_pipeline(cfg, store, until="data")
    remount("ro")
    [again] = run_pipeline(cfg, store, until="data")  # complete: read, not written
    assert again.state == "skipped" and again.version == made.version
    with pytest.raises(StoreWriteFailed, match="the store is read-only"):
        run_pipeline(_cfg(store.root, {**SMALL, "data.partsworld.seed": 9}), store, until="data")
    assert store.verify() == [] and store.versions("data") == [made.version]


def test_cli_reports_a_full_disk_with_exit_1(tmpfs):
    from typer.testing import CliRunner

    from partdistill.cli import app

    mnt, mount, _ = tmpfs
    mount("size=256k")
    args = ["run", str(DEMO_CONFIG), "--engine", "local", "--until", "data", "--store", str(mnt / "store")]
    for key, value in BIG.items():
        args += ["-o", f"{key}={value!r}"]
    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "the disk is full" in " ".join(result.output.split())
