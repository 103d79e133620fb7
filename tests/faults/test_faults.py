"""The fast subset of the fault-injection sweep (the full one: ``python -m tests.faults.sweep``).

One kill point of each kind, each in a stage where it lands mid-work: a file half written,
a shard written but not marked, a manifest written but not committed, a training checkpoint
half saved, and a random moment in self-training. After each kill no partial artifact was ever
visible, and the rerun's files are byte-identical to an uninterrupted run's.
"""

import pytest

from tests.faults.harness import build_base, kill_once

CASES = [
    ("data", "atomic-write:2"),
    ("features", "shard-marker:2"),
    ("mining", "commit:1"),
    ("proposals_r1", "checkpoint-save:2"),
    ("distill_r1", "time:2.5"),
]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults") / "base"
    cfg, reference, _ = build_base(root, until="distill_r1")
    return root, cfg, reference


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "point"), CASES, ids=[f"{s}-{p}" for s, p in CASES])
def test_kill_then_rerun_gives_identical_bytes(base, tmp_path, stage, point):
    root, cfg, reference = base
    result = kill_once(root, tmp_path / "work", cfg, reference, stage, point)
    assert result.killed, f"{point} was never reached in {stage}: {result.as_dict()}"
    assert result.visible_problems == []
    assert result.differing == [], f"files that differ from the uninterrupted run: {result.differing}"
    assert result.outcome == "passed"
