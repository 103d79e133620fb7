"""The quality profile (configs/quality_partsworld.py), end to end at tiny sizes: every stage runs
with the profile's own settings (object crops, the shipped teacher's recipe, its schedule keys)
and the evaluation table carries the floor and the paper's numbers."""

import json

import pytest

from partdistill.config import CONFIG_ROOT, load_config
from partdistill.pipeline import run_pipeline, store_for
from tests.conftest import TINY_DISTILL

pytestmark = pytest.mark.slow

QUALITY = CONFIG_ROOT / "quality_partsworld.py"


def test_quality_profile_settings():
    cfg = load_config(QUALITY)
    assert cfg["data"]["partsworld"]["images"] > load_config(CONFIG_ROOT / "demo_partsworld.py")["data"][
        "partsworld"]["images"]
    assert cfg["proposals"]["crop"]["enabled"] and cfg["distill"]["crop"]["enabled"]
    assert cfg["proposals"]["max_iters"] >= 1000 and cfg["teacher"]["source"] == "checkpoint"


def test_quality_profile_tiny_end_to_end(tmp_path):
    cfg = load_config(QUALITY, {**TINY_DISTILL, "proposals.rounds": 2, "proposals.max_iters": 3,
                                "distill.max_iters": 3, "evaluate.max_objects": 12})
    cfg["runtime"]["store"] = str(tmp_path / "store")
    outcomes = {o.stage: o for o in run_pipeline(cfg)}
    assert {"proposals_r1", "proposals_r2", "ranking", "distill_r1", "evaluate"} <= set(outcomes)
    store = store_for(cfg)
    evaluate = store.open("evaluate", outcomes["evaluate"].version)
    metrics = json.loads(evaluate.file("metrics.json").read_text())
    assert {"RGB K-means (floor)", "proposals", "PartDistillation"} <= set(metrics["gt"])
    table = evaluate.file("table.md").read_text()
    assert "RGB K-means (floor)" in table and "paper, PartImageNet" in table
    for name in ("proposals_r1", "distill_r1"):
        inference = json.loads(store.open(name, outcomes[name].version).file("inference.json").read_text())
        assert inference["crop"]["size"] == cfg["proposals"]["crop"]["size"]
