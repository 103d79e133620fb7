import pytest

from partdistill.config import load_config
from partdistill.pipeline import run_pipeline, store_for
from tests.conftest import DEMO_CONFIG

TINY = {"data.partsworld.images": 12, "data.partsworld.width": 128, "data.partsworld.height": 96,
        "data.partsworld.shard_size": 4, "teacher.train.max_iters": 3, "teacher.train.batch_size": 2,
        "teacher.train.image_size": [96, 128], "teacher.train.checkpoint_interval": 2,
        # a 3-iteration teacher is unsure of everything: keep whatever it finds
        "instances.score_threshold": 0.0, "instances.shard_images": 4, "features.shard_images": 4}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """data → teacher → instances → features once on a tiny Parts World, shared by the stage tests."""
    cfg = load_config(DEMO_CONFIG, TINY)
    cfg["runtime"]["store"] = str(tmp_path_factory.mktemp("tiny-store"))
    outcomes = {o.stage: o for o in run_pipeline(cfg, until="features")}
    return cfg, store_for(cfg), outcomes
