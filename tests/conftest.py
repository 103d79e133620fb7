import os
import tempfile

# Prefect reads these when first imported: an isolated home (its SQLite database) per test
# session, no analytics, and a start-up timeout that survives a busy 2-core machine.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="partdistill-prefect-"))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.pop("PREFECT_API_URL", None)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from partdistill.config import load_config as _load_config  # noqa: E402
from partdistill.pipeline import run_pipeline as _run_pipeline  # noqa: E402
from partdistill.pipeline import store_for as _store_for  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo_partsworld.py"


@pytest.fixture
def tiny_options() -> dict:
    """Overrides that make the demo config's Parts World tiny (12 images in 3 shards)."""
    return {"data.partsworld.images": 12, "data.partsworld.width": 128, "data.partsworld.height": 96,
            "data.partsworld.shard_size": 4,
            "teacher.source": "train",
            # a teacher that trains for a few iterations only: the tests check plumbing, not quality
            "teacher.train.max_iters": 3, "teacher.train.batch_size": 2, "teacher.train.image_size": [96, 128],
            "teacher.train.checkpoint_interval": 2}


@pytest.fixture
def tiny_cfg(tiny_options, tmp_path):
    from partdistill.config import load_config

    cfg = load_config(DEMO_CONFIG, tiny_options)
    cfg["runtime"]["store"] = str(tmp_path / "store")
    return cfg


@pytest.fixture
def unbuilt_teacher(monkeypatch):
    """Make `teacher` behave as a stage that is not built yet, so the tests of that behaviour
    don't depend on which stages happen to be built."""
    from partdistill.stages import STAGES, Stage, not_built

    real = STAGES["teacher"]
    monkeypatch.setitem(STAGES, "teacher", Stage("teacher", real.upstream, real.code_version,
                                                 not_built("teacher", "needs a test double")))
    return STAGES["teacher"]


TINY = {"data.partsworld.images": 12, "data.partsworld.width": 128, "data.partsworld.height": 96,
        "data.partsworld.shard_size": 4, "teacher.source": "train", "teacher.train.max_iters": 3,
        "teacher.train.batch_size": 2,
        "teacher.train.image_size": [96, 128], "teacher.train.checkpoint_interval": 2,
        # a 3-iteration teacher is unsure of everything: keep whatever it finds
        "instances.score_threshold": 0.0, "instances.shard_images": 4, "features.shard_images": 4}


# A tiny run through `distill` (ground-truth objects, no CRF, a few iterations per model, loose
# label thresholds so that a barely trained model still labels something).
TINY_DISTILL = {
    "data.partsworld.images": 12, "data.partsworld.width": 128, "data.partsworld.height": 96,
    "data.partsworld.shard_size": 4, "teacher.source": "train", "teacher.train.max_iters": 3,
    "teacher.train.batch_size": 2, "teacher.train.image_size": [96, 128], "teacher.train.checkpoint_interval": 2,
    "instances.score_threshold": 0.0, "instances.source": "gt", "mining.crf.enabled": False,
    "proposals.rounds": 1, "proposals.num_queries": 8, "proposals.num_points": 256, "proposals.max_iters": 4,
    "proposals.batch_size": 2, "proposals.image_size": [96, 128], "proposals.label.score_threshold": 0.0,
    "proposals.label.mask_threshold": 0.2, "proposals.label.max_fraction": 1.0, "ranking.score_threshold": 0.0,
    # a few iterations at the demo's lr 1e-3 push every mask under the thresholds; the old rate keeps
    # the teacher-like masks these plumbing tests label
    "proposals.optimizer.lr": 1e-4, "distill.optimizer.lr": 1e-4,
    "distill.num_queries": 8,
    "distill.num_points": 256, "distill.max_iters": 4, "distill.batch_size": 2, "distill.image_size": [96, 128],
    "distill.label.score_threshold": 0.0, "distill.label.mask_threshold": 0.2,
}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """data → teacher → instances → features once on a tiny Parts World, shared by the stage tests."""
    cfg = _load_config(DEMO_CONFIG, TINY)
    cfg["runtime"]["store"] = str(tmp_path_factory.mktemp("tiny-store"))
    outcomes = {o.stage: o for o in _run_pipeline(cfg, until="features")}
    return cfg, _store_for(cfg), outcomes
