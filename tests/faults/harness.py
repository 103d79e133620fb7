"""Kill a stage with SIGKILL, rerun it, and compare its files with an uninterrupted run's.

A *kill point* is either a named point in the store's write path (see :mod:`partdistill.faults`:
``atomic-write:N``, ``shard-marker:N``, ``commit:1``, ``checkpoint-save:N``) or a random moment
(``time:SECONDS`` after the child process finished importing). For each one:

1. the stage's inputs are hard-linked from a base store into a fresh store;
2. a child process runs the stage there and is killed at the point, while a reader thread
   polls the store and records any stage folder that is visible but not a whole, verified
   artifact;
3. the store must verify clean right after the kill;
4. the stage is rerun to completion (resuming what the killed run finished), and every file of
   the artifact must have the sha256 the uninterrupted run's manifest lists.

The manifest itself is not compared: it records when and by what run the artifact was made.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from partdistill.config import load_config
from partdistill.pipeline import plan, run_pipeline
from partdistill.storage import ArtifactStore
from tests.conftest import DEMO_CONFIG, TINY_DISTILL

REPO = Path(__file__).resolve().parents[2]

# The tiny run the suite kills: every stage, the CRF on, checkpoints every 2 iterations.
OPTIONS = {**TINY_DISTILL, "mining.crf.enabled": True, "proposals.checkpoint_interval": 2,
           "proposals.max_iters": 6, "distill.checkpoint_interval": 2, "distill.max_iters": 6,
           "evaluate.max_objects": 20, "instances.shard_images": 4, "features.shard_images": 4,
           "mining.shard_instances": 16, "proposals.label.shard_images": 4, "distill.label.shard_images": 4}
TRAINING = ("teacher", "proposals_r1", "distill_r1")


def config(store: Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    cfg = load_config(DEMO_CONFIG, {**OPTIONS, **(overrides or {})})
    cfg["runtime"]["store"] = str(store)
    return cfg


def stage_names(cfg: dict[str, Any]) -> list[str]:
    return [p.name for p in plan(cfg)]


def build_base(root: Path, until: str | None = None, overrides: dict[str, Any] | None = None
               ) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, float]]:
    """The uninterrupted run: every stage (up to ``until``) once, in this process. Returns the
    config, each stage's manifest ``files`` (path → sha256, bytes) and its seconds."""
    cfg = config(root, overrides)
    store = ArtifactStore(root)
    outcomes = run_pipeline(cfg, store, until=until)
    return (cfg, {o.stage: store.open(o.stage, o.version).manifest["files"] for o in outcomes},
            {o.stage: o.seconds for o in outcomes})


def differing_files(files: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """The files whose sha256 differs between two manifests' ``files`` (or that only one has)."""
    return sorted(n for n in set(files) | set(want)
                  if (files.get(n) or {}).get("sha256") != (want.get(n) or {}).get("sha256"))


def linked_inputs(base: Path, dest: Path, stage: str) -> None:
    """A new store holding every base artifact but ``stage``'s, as hard links (read-only use)."""
    for d in sorted(p for p in base.iterdir() if p.is_dir() and p.name != stage):
        shutil.copytree(d, dest / d.name, copy_function=os.link,
                        ignore=shutil.ignore_patterns(".locks", ".partial-*"))


@dataclass
class KillResult:
    stage: str
    point: str
    outcome: str = ""                 # "passed" | "failed" | "not reached"
    killed: bool = False
    partial_after_kill: str = ""      # what the killed run left: nothing / N shards / committed
    visible_problems: list[str] = field(default_factory=list)
    differing: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _Reader(threading.Thread):
    """Polls the stage's folder: any visible (non-dot) version must be complete and verify."""

    def __init__(self, store: ArtifactStore, stage: str):
        super().__init__(daemon=True)
        self.store, self.stage, self.problems, self.seen = store, stage, [], 0
        self.stop = threading.Event()

    def run(self) -> None:
        d = self.store.root / self.stage
        while not self.stop.is_set():
            if d.exists():
                for v in [p.name for p in d.iterdir() if not p.name.startswith(".")]:
                    self.seen += 1
                    if not self.store.is_complete(self.stage, v):
                        self.problems.append(f"{self.stage}/{v} visible without a complete manifest")
                    else:
                        self.problems += [str(p) for p in self.store.verify(self.stage, v)]
            time.sleep(0.01)


def kill_once(base: Path, work: Path, cfg: dict[str, Any], reference: dict[str, dict[str, Any]],
              stage: str, point: str) -> KillResult:
    """One kill point: kill, check what a reader saw, rerun, compare. ``work`` is emptied first."""
    result = KillResult(stage, point)
    start = time.monotonic()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    root = work / "store"
    linked_inputs(base, root, stage)
    store = ArtifactStore(root)
    run_cfg = {**cfg, "runtime": {**cfg["runtime"], "store": str(root)}}
    cfg_file = work / "cfg.json"
    cfg_file.write_text(json.dumps(run_cfg))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PARTDISTILL_KILL_AT", None)
    if not point.startswith("time:"):
        env["PARTDISTILL_KILL_AT"] = point
    out_file, err_file = work / "child.out", work / "child.err"
    with open(out_file, "w") as out, open(err_file, "w") as errs:
        child = subprocess.Popen([sys.executable, "-m", "tests.faults.child", str(cfg_file), str(root), stage],
                                 env=env, cwd=REPO, stdout=out, stderr=errs, start_new_session=True)
    reader = _Reader(store, stage)
    reader.start()
    try:
        if point.startswith("time:"):
            while "ready" not in out_file.read_text() and child.poll() is None:
                time.sleep(0.01)  # "ready": imports are done, the stage starts now
            deadline = time.monotonic() + float(point.split(":")[1])
            while child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=900)
    finally:
        # the child's whole process group: a pool worker it forked must not outlive it (and
        # would hold its output pipes open)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    err = err_file.read_text()
    result.killed = child.returncode == -signal.SIGKILL
    if not result.killed and child.returncode != 0:
        result.outcome = "failed"
        result.visible_problems.append(f"child exited {child.returncode}: {err[-1500:]}")
        reader.stop.set()
        return result
    after = [str(p) for p in store.verify()]
    reader.stop.set()
    reader.join()
    result.visible_problems = sorted(set(reader.problems)) + after
    version = next(p.version for p in plan(run_cfg) if p.name == stage)
    if store.is_complete(stage, version):
        result.partial_after_kill = "committed"
    elif version in store.partial_versions(stage):
        done, total = store.partial_progress(stage, version)
        result.partial_after_kill = f"{done}/{total or '?'} shard(s) done"
    else:
        result.partial_after_kill = "nothing"

    run_pipeline(run_cfg, store, only=stage)  # the rerun: resumes what the killed run left
    result.differing = differing_files(store.open(stage, version).manifest["files"], reference[stage])
    result.visible_problems += [str(p) for p in store.verify(stage)]
    if not result.killed:
        result.outcome = "not reached"
    else:
        result.outcome = "passed" if not result.differing and not result.visible_problems else "failed"
    result.seconds = round(time.monotonic() - start, 1)
    return result


def kill_points(stage: str, seconds: float, seeds: int, rng: random.Random, full: bool) -> list[str]:
    """The points tried for a stage whose uninterrupted run took ``seconds``."""
    points = ["commit:1"]
    points += [f"atomic-write:{n}" for n in ((1, 2, 3, 5, 8, 13) if full else (2,))]
    points += [f"shard-marker:{n}" for n in ((1, 2, 3) if full else (1,))]
    if stage in TRAINING:
        points += [f"checkpoint-save:{n}" for n in ((1, 2) if full else (2,))]
    points += [f"time:{rng.uniform(0.05, 0.9) * seconds:.2f}" for _ in range(seeds)]
    return points
