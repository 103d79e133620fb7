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

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo_partsworld.py"


@pytest.fixture
def tiny_options() -> dict:
    """Overrides that make the demo config's Parts World tiny (12 images in 3 shards)."""
    return {"data.partsworld.images": 12, "data.partsworld.width": 128, "data.partsworld.height": 96,
            "data.partsworld.shard_size": 4}


@pytest.fixture
def tiny_cfg(tiny_options, tmp_path):
    from partdistill.config import load_config

    cfg = load_config(DEMO_CONFIG, tiny_options)
    cfg["runtime"]["store"] = str(tmp_path / "store")
    return cfg
