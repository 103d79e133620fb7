import copy

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from partdistill.pipeline import run_pipeline
from partdistill.stages import STAGES, mining
from partdistill.stages.features import instance_mask
from partdistill.stages.instances import read_instances
from partdistill.storage import ArtifactStore, mask_to_rle, rle_to_mask

UPSTREAM = ("data", "teacher", "instances", "features")


def _mining(cfg, store=None, **options):
    """Run the pipeline up to `mining` (complete earlier stages are skipped) with options given as
    ``section__key=value``; returns (cfg, outcome, artifact)."""
    cfg = copy.deepcopy(cfg)
    for key, value in options.items():
        *path, leaf = key.split("__")
        node = cfg
        for p in path:
            node = node[p]
        node[leaf] = value
    out = {o.stage: o for o in run_pipeline(cfg, store, until="mining")}["mining"]
    store = store or ArtifactStore(cfg["runtime"]["store"])
    return cfg, out, store.open("mining", out.version)


def _linked_store(tmp_path, store: ArtifactStore, upstream=UPSTREAM) -> ArtifactStore:
    """A second store that shares the ``upstream`` artifacts (symlinks) and nothing else."""
    other = ArtifactStore(tmp_path / "store2")
    other.root.mkdir()
    for name in upstream:
        if (store.root / name).exists():
            (other.root / name).symlink_to(store.root / name)
    return other


def _check_artifact(art, instances_art, k: int, crf: bool) -> pa.Table:
    parts = pq.read_table(art.path / "mined_parts")
    assert parts.schema == mining.SCHEMA
    skipped = pq.read_table(art.file("skipped.parquet"))
    assert skipped.schema == mining.SKIPPED_SCHEMA
    instances = {r["instance_id"]: r for r in read_instances(instances_art).to_pylist()}
    rows = parts.to_pylist()
    by_instance: dict[int, list[dict]] = {}
    for r in rows:
        by_instance.setdefault(r["instance_id"], []).append(r)
    # every instance is either mined or skipped, never both
    assert set(by_instance) | set(skipped.column("instance_id").to_pylist()) == set(instances)
    assert not set(by_instance) & set(skipped.column("instance_id").to_pylist())
    for iid, prs in by_instance.items():
        inst = instances[iid]
        obj = instance_mask(inst)
        assert len(prs) <= k and [p["part"] for p in prs] == list(range(len(prs)))
        union = np.zeros_like(obj)
        for p in prs:
            m = rle_to_mask({"size": [p["height"], p["width"]], "counts": p["rle"]})
            assert m.shape == obj.shape and (p["height"], p["width"]) == (inst["height"], inst["width"])
            assert not (m & ~obj).any(), f"part {p['part']} of instance {iid} leaves its object"
            assert not (m & union).any(), "parts of one instance overlap"
            assert int(m.sum()) == p["area"] >= 16
            assert p["image_id"] == inst["image_id"] and p["split"] == inst["split"] and p["crf"] is crf
            union |= m
    return parts


@pytest.fixture(scope="module")
def mined(tiny_run):
    """`mining` on the tiny run's own config and store, with the CRF (default) and without."""
    cfg, store, outcomes = tiny_run
    _, with_crf, art_crf = _mining(cfg)
    _, without, art_plain = _mining(cfg, mining__crf__enabled=False)
    return cfg, store, outcomes, (with_crf, art_crf), (without, art_plain)


def test_mining_on_the_tiny_run(mined):
    cfg, store, outcomes, (with_crf, art_crf), (without, art_plain) = mined
    assert "mining" in STAGES and STAGES["mining"].run is mining.run
    k = cfg["mining"]["k"]
    instances_art = store.open("instances", outcomes["instances"].version)
    n = len(read_instances(instances_art))
    _check_artifact(art_crf, instances_art, k, crf=True)
    plain = _check_artifact(art_plain, instances_art, k, crf=False)
    # the CRF switch is part of the version, and of what is written
    assert with_crf.version != without.version and art_crf.files != art_plain.files
    assert len(plain) > 0, "K-means alone must give parts on the tiny run"
    for s in (with_crf.summary, without.summary):
        assert s["instances"] == n == s["mined_instances"] + s["skipped"]
        assert s["seconds"]["kmeans"] > 0 and s["parts_per_instance"] <= k
    assert with_crf.summary["crf"] and with_crf.summary["seconds"]["crf"] > 0
    assert not without.summary["crf"] and without.summary["seconds"]["crf"] == 0


@pytest.fixture(scope="module")
def gt_mined(tiny_run):
    """`mining` on ground-truth object masks (compact objects, so CRF-refined parts survive), in
    shards of 4 instances and with 2 CRF processes."""
    cfg, store, _ = tiny_run
    cfg, out, art = _mining(cfg, instances__source="gt", mining__shard_instances=4, runtime__num_workers=2)
    return cfg, store, out, art


def test_mining_gt_objects_with_crf(gt_mined):
    cfg, store, out, art = gt_mined
    instances_art = store.open("instances", art.manifest["inputs"]["instances"])
    parts = _check_artifact(art, instances_art, cfg["mining"]["k"], crf=True)
    assert len(parts) > 0 and out.summary["mined_instances"] > 0
    assert len(list((art.path / "mined_parts").glob("*.parquet"))) == -(-out.summary["instances"] // 4)


def test_mining_is_deterministic_and_resumes(gt_mined, tmp_path, monkeypatch):
    """Same config into a second store, killed after its first shard and resumed, with the CRF
    in-process instead of 2 processes: the same version and byte-identical files."""
    cfg, store, out, art = gt_mined
    other = _linked_store(tmp_path, store)
    real, calls = mining.mine_instances, []

    def dies_on_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(mining, "mine_instances", dies_on_second_shard)
    with pytest.raises(RuntimeError, match="killed"):
        _mining(cfg, other, runtime__num_workers=1)
    assert other.partial_versions("mining") == [out.version]
    assert len(list((other.partial_path("mining", out.version) / "_shards").glob("*.json"))) == 1

    calls.clear()
    monkeypatch.setattr(mining, "mine_instances", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    _, again, art2 = _mining(cfg, other, runtime__num_workers=1)
    shards = -(-out.summary["instances"] // 4)
    assert len(calls) == shards - 1, "the finished shard must not be mined again"
    assert again.version == out.version and art2.files == art.files
    assert again.summary["parts"] == out.summary["parts"]


def _row(mask: np.ndarray, instance_id: int) -> dict:
    return {"instance_id": instance_id, "image_id": instance_id // 1000, "split": "train", "file_name": "x.png",
            "rle": mask_to_rle(mask)["counts"], "height": mask.shape[0], "width": mask.shape[1]}


def test_mine_instances_records_skips(monkeypatch):
    h, w, stride = 32, 40, 8
    rng = np.random.default_rng(0)
    grid = rng.normal(size=(h // stride, w // stride, 8)).astype(np.float32)
    meta = {"grid_y0": 0, "grid_x0": 0, "stride": stride, "scale_y": 1.0, "scale_x": 1.0}
    empty = np.zeros((h, w), bool)
    one = empty.copy()
    one[5, 7] = True
    big = empty.copy()
    big[4:28, 6:34] = True
    # two ~20-pixel blobs in far-apart cells, clear of every cell centre (so K-means gets exactly
    # those two cells): each becomes a part, each under min_part_area=30, their union is not
    blobs = empty.copy()
    blobs[0:4, 0:5] = True
    blobs[29:32, 33:40] = True
    rows = [_row(empty, 1000), _row(one, 1001), _row(big, 1002), _row(big, 1003), _row(blobs, 1004)]
    features = {1000: (grid, meta), 1001: (grid, meta), 1002: (grid, meta), 1004: (grid, meta)}  # 1003: none
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    cfg = {"k": 4, "metric": "cosine", "iters": 20, "seed": 0, "backend": "torch", "min_part_area": 16,
           "crf": {"enabled": False}}

    mined = mining.mine_instances(rows, features.__getitem__, None, cfg)
    reasons = {s["instance_id"]: s["reason"] for s in mined.skipped}
    assert reasons[1000] == "empty mask"
    assert reasons[1001].startswith("mask smaller than min_part_area (1 < 16")
    assert reasons[1003] == "no features"
    assert 1002 not in reasons and {r["instance_id"] for r in mined.rows} <= {1002, 1004}
    for r in mined.rows:
        m = rle_to_mask({"size": [h, w], "counts": r["rle"]})
        assert not (m & ~(big if r["instance_id"] == 1002 else blobs)).any() and r["crf"] is False
    pa.table(mined.table(), schema=mining.SCHEMA)  # the rows fit the schema

    mined = mining.mine_instances(rows[4:], features.__getitem__, None, {**cfg, "min_part_area": 30})
    assert [s["reason"] for s in mined.skipped] == ["no part of at least min_part_area (30 px)"]

    loaded = []
    mined = mining.mine_instances(rows[2:3], features.__getitem__, lambda name: loaded.append(name) or image,
                                  {**cfg, "crf": {"enabled": True}})
    assert loaded == ["x.png"] and mined.rows and all(r["crf"] for r in mined.rows)
    for r in mined.rows:
        assert not (rle_to_mask({"size": [h, w], "counts": r["rle"]}) & ~big).any()
    mined = mining.mine_instances(rows[2:3], features.__getitem__, lambda name: image[:, :20],
                                  {**cfg, "crf": {"enabled": True}})
    assert mined.skipped[0]["reason"].startswith("image is")


# --- colour-aware mining (mining.fusion, issue 14 §3) -------------------------------------------

def _two_colour_case():
    """One object whose teacher features are constant and whose colour has two halves."""
    h, w, stride = 32, 48, 8
    mask = np.zeros((h, w), bool)
    mask[4:28, 4:44] = True
    rng = np.random.default_rng(1)
    # random features elsewhere, so that the features-only K-means has something to split
    grid = rng.normal(size=(h // stride, w // stride, 8)).astype(np.float32)
    meta = {"grid_y0": 0, "grid_x0": 0, "stride": stride, "scale_y": 1.0, "scale_x": 1.0}
    image = np.zeros((h, w, 3), np.uint8)
    image[:16], image[16:] = (200, 30, 30), (30, 30, 200)
    cfg = {"k": 4, "metric": "cosine", "iters": 20, "seed": 0, "backend": "torch", "min_part_area": 16,
           "crf": {"enabled": False}}
    return [_row(mask, 7000)], {7000: (grid, meta)}, image, cfg


def test_fusion_weights_zero_is_todays_mining(monkeypatch):
    """Colour and position weight 0: the same rows as without `fusion`, whatever feature_weight,
    and neither the images nor the fused features are touched."""
    from partdistill.models import part_mining

    rows, features, image, cfg = _two_colour_case()
    today = mining.mine_instances(rows, features.__getitem__, None, cfg)
    assert today.rows

    def never(*args, **kwargs):
        raise AssertionError("nothing is fused at colour and position weight 0")

    monkeypatch.setattr(part_mining, "fused_features", never)
    for fusion in ({"feature_weight": 1.0, "color_weight": 0.0, "position_weight": 0.0},
                   {"feature_weight": 2.5, "color_weight": 0, "position_weight": 0.0}, {}):
        again = mining.mine_instances(rows, features.__getitem__, never, {**cfg, "fusion": fusion})
        assert again.rows == today.rows and again.skipped == today.skipped
    monkeypatch.undo()

    loaded = []
    coloured = mining.mine_instances(rows, features.__getitem__, lambda name: loaded.append(name) or image,
                                     {**cfg, "fusion": {"color_weight": 0.5}})
    assert loaded == ["x.png"] and coloured.rows and coloured.rows != today.rows
    with pytest.raises(ValueError, match="needs the images"):
        mining.mine_instances(rows, features.__getitem__, None, {**cfg, "fusion": {"position_weight": 1.0}})
    with pytest.raises(ValueError, match="unknown key"):
        mining.mine_instances(rows, features.__getitem__, None, {**cfg, "fusion": {"colour_weight": 1.0}})
    # an image of another size is a skip, as for the CRF
    small = mining.mine_instances(rows, features.__getitem__, lambda name: image[:, :20],
                                  {**cfg, "fusion": {"color_weight": 0.5}})
    assert small.skipped[0]["reason"].startswith("image is") and not small.rows


def test_colour_splits_constant_features_in_the_stage():
    rows, features, image, cfg = _two_colour_case()
    grid, meta = features[7000]
    constant = {7000: (np.ones_like(grid), meta)}
    plain = mining.mine_instances(rows, constant.__getitem__, None, {**cfg, "k": 2})
    assert len(plain.rows) == 1  # constant features: one part
    fused = mining.mine_instances(rows, constant.__getitem__, lambda name: image,
                                  {**cfg, "k": 2, "fusion": {"color_weight": 0.5}})
    masks = [rle_to_mask({"size": [32, 48], "counts": r["rle"]}) for r in fused.rows]
    assert len(masks) == 2 and {(m[4:16, 4:44].all(), m[16:28, 4:44].all()) for m in masks} == {(True, False),
                                                                                             (False, True)}


def test_fusion_version():
    """The version ignores `fusion` while nothing is fused (so it is the version mining had before
    `fusion` existed) and follows every weight once something is, in both feature paths. The demo
    config fuses `rgb_direction` colour, so each case starts from `lab` at colour and position
    weights 0."""
    from partdistill.config import load_config
    from partdistill.pipeline import plan
    from tests.conftest import DEMO_CONFIG

    def version(options, drop_fusion=False):
        cfg = load_config(DEMO_CONFIG, options)
        if drop_fusion:
            del cfg["mining"]["fusion"]
        return {p.name: p.version for p in plan(cfg)}["mining"]

    off = {"mining.fusion.color_weight": 0.0, "mining.fusion.position_weight": 0.0,
           "mining.fusion.color_space": "lab", "mining.fusion.feature_weight": 1.0}
    for base in (off, {**off, "mining.fused": True}):
        before = version(base, drop_fusion=True)
        assert version(base) == before == version({**base, "mining.fusion.feature_weight": 2.0})
        fused = {w: version({**base, "mining.fusion.color_weight": w}) for w in (0.25, 0.5, 1.0)}
        fused["position"] = version({**base, "mining.fusion.position_weight": 0.5})
        fused["features x2"] = version({**base, "mining.fusion.color_weight": 0.5,
                                        "mining.fusion.feature_weight": 2.0})
        fused["rgb_direction"] = version({**base, "mining.fusion.color_weight": 0.5,
                                          "mining.fusion.color_space": "rgb_direction"})
        assert version({**base, "mining.fusion.color_space": "rgb_direction"}) == before
        assert version({**base, "mining.fusion.color_weight": 1}) == fused[1.0]
        assert len(set(fused.values()) | {before}) == len(fused) + 1


def test_colour_mining_on_the_tiny_run(mined):
    """Through the pipeline: colour weight > 0 is a new artifact that keeps every guarantee; a
    feature weight alone is the plain mining, reused."""
    cfg, store, outcomes, _, (without, art_plain) = mined
    instances_art = store.open("instances", outcomes["instances"].version)
    off = dict(mining__crf__enabled=False, mining__fusion__color_weight=0.0,
               mining__fusion__position_weight=0.0)
    _, plain, _ = _mining(cfg, **off)
    _, same, _ = _mining(cfg, **off, mining__fusion__feature_weight=3.0)
    assert same.version == plain.version and same.state != "computed"
    _, coloured, art = _mining(cfg, mining__crf__enabled=False, mining__fusion__color_weight=0.5,
                               mining__fusion__position_weight=0.25)
    assert len({coloured.version, plain.version, without.version}) == 3
    parts = _check_artifact(art, instances_art, cfg["mining"]["k"], crf=False)
    assert len(parts) > 0 and coloured.summary["mined_instances"] > 0
