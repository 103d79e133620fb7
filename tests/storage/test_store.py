import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from partdistill.storage import (
    ArtifactNotFound,
    ArtifactStore,
    EvaluationOnlyFile,
    LockTimeout,
    content_version,
)


def _write(store, stage="s", config=None, files=None, inputs=None):
    config = config or {"k": 4}
    v = content_version(stage, config, inputs or {}, "1")
    with store.writer(stage, v, config, inputs or {}, "1") as w:
        for name, data in (files or {"a.txt": b"alpha", "sub/b.bin": b"\x00\x01"}).items():
            (w.path / name).parent.mkdir(parents=True, exist_ok=True)
            (w.path / name).write_bytes(data)
        return w.commit()


def test_version_is_a_content_hash():
    base = content_version("mining", {"k": 4, "metric": "cosine"}, {"features": "abc"}, "1")
    assert base == content_version("mining", {"metric": "cosine", "k": 4}, {"features": "abc"}, "1")
    assert len(base) == 16
    others = {
        content_version("mining", {"k": 5, "metric": "cosine"}, {"features": "abc"}, "1"),
        content_version("mining", {"k": 4, "metric": "cosine"}, {"features": "abd"}, "1"),
        content_version("mining", {"k": 4, "metric": "cosine"}, {"features": "abc"}, "2"),
        content_version("ranking", {"k": 4, "metric": "cosine"}, {"features": "abc"}, "1"),
    }
    assert base not in others and len(others) == 4


def test_manifest_lists_every_file_with_checksum(tmp_path):
    store = ArtifactStore(tmp_path)
    art = _write(store)
    m = json.loads((art.path / "manifest.json").read_text())
    assert m["status"] == "complete" and m["stage"] == "s" and m["config"] == {"k": 4}
    assert set(m["files"]) == {"a.txt", "sub/b.bin"}
    assert m["files"]["a.txt"]["bytes"] == 5
    assert m["files"]["a.txt"]["sha256"] == "8ed3f6ad685b959ead7022518e1af76cd816f8e8ec7ccdda1ed4018e8f2223f8"
    assert m["created"] and m["inputs"] == {}
    assert store.versions("s") == [art.version]


def test_nothing_is_visible_before_commit(tmp_path):
    store = ArtifactStore(tmp_path)
    v = content_version("s", {}, {}, "1")
    with store.writer("s", v, {}, {}, "1") as w:
        (w.path / "x").write_text("partial")
        assert not store.is_complete("s", v)
        assert store.versions("s") == []
        with pytest.raises(ArtifactNotFound, match="partial"):
            store.open("s", v)
    # left uncommitted: still invisible, but kept for resume
    assert store.versions("s") == [] and store.partial_versions("s") == [v]


def test_verify_finds_changed_missing_and_extra_files(tmp_path):
    store = ArtifactStore(tmp_path)
    art = _write(store)
    assert store.verify() == []
    data = bytearray((art.path / "a.txt").read_bytes())
    data[2] ^= 0x01  # one flipped bit, same size
    (art.path / "a.txt").write_bytes(bytes(data))
    (art.path / "sub" / "b.bin").unlink()
    (art.path / "stray.txt").write_text("?")
    found = {(p.kind, p.path) for p in store.verify()}
    assert found == {("changed", "a.txt"), ("missing", "sub/b.bin"), ("extra", "stray.txt")}


def test_shard_marker_rejects_a_changed_file(tmp_path):
    store = ArtifactStore(tmp_path)
    with store.writer("s", "v1", {}, {}, "1") as w:
        (w.path / "part-0").write_bytes(b"0123")
        w.complete_shard("part-0", ["part-0"], meta={"rows": 4})
        assert w.shard_done("part-0") and w.shard_meta("part-0") == {"rows": 4}
        assert not w.shard_done("part-1")
        (w.path / "part-0").write_bytes(b"0124")
        assert not w.shard_done("part-0")


def test_commit_drops_bookkeeping(tmp_path):
    store = ArtifactStore(tmp_path)
    with store.writer("s", "v1", {}, {}, "1") as w:
        (w.path / "f").write_text("x")
        w.complete_shard("f", ["f"])
        art = w.commit()
    assert set(art.files) == {"f"} and not (art.path / "_shards").exists()
    assert not store.partial_path("s", "v1").exists()


def test_evaluation_only_view(tmp_path):
    store = ArtifactStore(tmp_path)
    art = _write(store, files={"parts_val.json": b"{}", "instances_val.json": b"{}"})
    view = art.restricted(["parts_val.json"])
    assert view.file("instances_val.json").exists()
    with pytest.raises(EvaluationOnlyFile, match="parts_val.json"):
        view.file("parts_val.json")


def test_failed_stage_leaves_no_empty_partial(tmp_path):
    store = ArtifactStore(tmp_path)
    with pytest.raises(NotImplementedError), store.writer("s", "v1", {}, {}, "1"):
        raise NotImplementedError("not built")
    assert store.partial_versions("s") == []


_HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from partdistill.storage import ArtifactStore
    store = ArtifactStore(sys.argv[1])
    with store.writer("s", "v1", {}, {}, "1") as w:
        print("locked", flush=True)
        time.sleep(float(sys.argv[2]))
        (w.path / "f").write_text("made by the first run")
        w.commit()
""")


def test_lock_makes_the_second_run_wait_then_reuse(tmp_path):
    store = ArtifactStore(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(tmp_path), "2"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(LockTimeout, match="held by another run"), store.writer("s", "v1", {}, {}, "1",
                                                                               lock_timeout=0.3):
        pass
    waited = []
    with store.writer("s", "v1", {}, {}, "1", on_wait=waited.append) as w:
        assert w is None  # the first run completed it while we waited: reuse, don't rewrite
    assert holder.wait(timeout=30) == 0
    assert waited and waited[0] == str(holder.pid)
    assert (store.path("s", "v1") / "f").read_text() == "made by the first run"
    assert store.verify() == []


_SLOW_WRITER = textwrap.dedent("""
    import sys, time
    from partdistill.storage import ArtifactStore
    store = ArtifactStore(sys.argv[1])
    with store.writer("s", "v1", {}, {}, "1") as w:
        for i in range(6):
            if w.shard_done(f"shard-{i}"):
                print("skip", i, flush=True)
                continue
            (w.path / f"shard-{i}.bin").write_bytes(bytes([i]) * 100_000)
            w.complete_shard(f"shard-{i}", [f"shard-{i}.bin"])
            print("done", i, flush=True)
            time.sleep(float(sys.argv[2]))
        w.commit()
""")


def test_sigkill_mid_stage_then_resume(tmp_path):
    killed = ArtifactStore(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(killed.root), "5"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().split() == ["done", "0"]
    assert proc.stdout.readline().split() == ["done", "1"]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert killed.versions("s") == [] and not killed.is_complete("s", "v1")

    rerun = subprocess.run([sys.executable, "-c", _SLOW_WRITER, str(killed.root), "0"],
                           capture_output=True, text=True, check=True)
    assert rerun.stdout.split("\n")[:2] == ["skip 0", "skip 1"]  # resumed at the first unfinished shard

    clean = ArtifactStore(tmp_path / "clean")
    subprocess.run([sys.executable, "-c", _SLOW_WRITER, str(clean.root), "0"], check=True, capture_output=True)
    assert killed.open("s", "v1").files == clean.open("s", "v1").files
    assert killed.verify() == [] and clean.verify() == []


def test_lock_is_released_when_holder_is_killed(tmp_path):
    store = ArtifactStore(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(tmp_path), "60"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    t0 = time.monotonic()
    with store.writer("s", "v1", {}, {}, "1", lock_timeout=10) as w:
        assert w is not None
    assert time.monotonic() - t0 < 5
    assert Path(store.lock_path("s", "v1")).exists()


def _leave_partial(store, stage, version, shard="part-00000"):
    """What a killed run leaves: a partial folder with one finished shard."""
    with pytest.raises(RuntimeError), store.writer(stage, version, {}, {}, "1") as w:
        (w.path / "x.bin").write_bytes(b"shard output")
        w.complete_shard(shard, ["x.bin"])
        raise RuntimeError("killed")
    assert store.partial_versions(stage) == [version]


def test_gc_removes_stale_partials_only(tmp_path):
    from partdistill.storage.store import _FileLock

    store = ArtifactStore(tmp_path)
    kept = _write(store, "s")
    _leave_partial(store, "s", "dead")
    _leave_partial(store, "t", "busy")
    busy = _FileLock(store.lock_path("t", "busy"), timeout=0)
    busy.acquire()  # another run is writing t/busy
    try:
        dry = store.gc(dry_run=True)
        assert {(i.path.name, i.action) for i in dry} == {(".partial-dead", "would remove"), (".partial-busy", "kept")}
        assert store.partial_versions("s") == ["dead"]
        fresh = store.gc(older_than=3600)
        assert {i.action for i in fresh} == {"kept"} and store.partial_versions("s") == ["dead"]
        items = store.gc()
    finally:
        busy.release()
    removed = [i for i in items if i.action == "removed"]
    assert [i.path.name for i in removed] == [".partial-dead"] and removed[0].bytes > 0
    assert store.partial_versions("s") == [] and store.partial_versions("t") == ["busy"]
    assert store.versions("s") == [kept.version] and store.verify() == []


def test_gc_keep_removes_complete_versions_no_config_uses(tmp_path):
    store = ArtifactStore(tmp_path)
    a = _write(store, "s", config={"k": 1})
    b = _write(store, "s", config={"k": 2})
    items = store.gc(keep={("s", a.version)})
    assert [(i.path.name, i.action) for i in items] == [(b.version, "removed")]
    assert store.versions("s") == [a.version] and store.verify() == []
    assert not any(p.name.startswith(".gc-") for p in (tmp_path / "s").iterdir())
