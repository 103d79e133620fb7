"""Stages `ranking`, `distill` and `evaluate` on the tiny run: their artifacts and what they promise."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from partdistill.models.ranking import fit_prototypes
from partdistill.pipeline import run_pipeline
from partdistill.stages import distill, ranking
from partdistill.storage import rle_to_mask
from tests.stages.test_proposals import _cfg

MORE = {"proposals.rounds": 1, "ranking.score_threshold": 0.0, "ranking.k": 3, "distill.num_queries": 8,
        "distill.num_points": 256, "distill.max_iters": 4, "distill.batch_size": 2, "distill.image_size": [96, 128],
        "distill.checkpoint_interval": 2, "distill.label.score_threshold": 0.0, "distill.label.mask_threshold": 0.2,
        "distill.label.shard_images": 4}


@pytest.fixture(scope="module")
def full_run(tiny_run):
    cfg, store, _ = tiny_run
    cfg = _cfg(cfg, **MORE)
    outcomes = {o.stage: o for o in run_pipeline(cfg, store)}
    return cfg, store, outcomes


def test_ranking_labels_every_candidate_by_class(full_run):
    cfg, store, outcomes = full_run
    art = store.open("ranking", outcomes["ranking"].version)
    protos = pq.read_table(art.file("prototypes.parquet"))
    labeled = pq.read_table(art.file("labeled_parts.parquet"))
    assert protos.schema == ranking.PROTOTYPE_SCHEMA and labeled.schema == ranking.LABELED_SCHEMA
    classes = json.loads(art.file("classes.json").read_text())
    assert classes["k"] == 3 and classes["classes"]
    for row in protos.to_pylist():
        assert 0 <= row["cluster"] < row["k_eff"] <= 3 and len(row["prototype"]) == 128
    rows = labeled.to_pylist()
    assert rows, "every candidate gets a cluster"
    seen = set()
    for r in rows:
        assert r["label"] == r["class_id"] * 3 + r["cluster"] and 0 <= r["cluster"] < 3
        assert (r["instance_id"], r["cluster"]) not in seen, "same-cluster segments of an object are merged"
        seen.add((r["instance_id"], r["cluster"]))
    # a class the candidates never reached is recorded, not filled with random centroids
    for rec in classes["classes"].values():
        full = rec["k_eff"] == 3 and rec["fit_candidates"] >= 3
        assert rec["k_eff"] <= 3 and (rec["few_proposals"] is None) == full


def test_ranking_clusters_pooled_teacher_features(full_run):
    """part_features='teacher': a part's feature is the mean of its object's normalised teacher
    pixel features under its mask; the stage reads `features`, and the paper's default keeps the
    version a config without the key has."""
    import copy

    import torch

    from partdistill.models.part_mining import ObjectFeatures, pixel_features
    from partdistill.pipeline import plan
    from partdistill.progress import NullProgress
    from partdistill.stages.features import FeatureReader, instance_mask

    cfg, store, outcomes = full_run
    old = copy.deepcopy(cfg)
    del old["ranking"]["part_features"]
    assert {p.name: p.version for p in plan(old)}["ranking"] == outcomes["ranking"].version
    assert "features" not in store.open("ranking", outcomes["ranking"].version).manifest["inputs"]

    tcfg = _cfg(cfg, **{"ranking.part_features": "teacher"})
    done = {o.stage: o for o in run_pipeline(tcfg, store, until="ranking")}
    art = store.open("ranking", done["ranking"].version)
    assert done["ranking"].version != outcomes["ranking"].version
    assert art.manifest["inputs"]["features"] == outcomes["features"].version
    feats_art = store.open("features", outcomes["features"].version)
    reader = FeatureReader(feats_art)
    grid, meta = reader.get(next(iter(reader.index)))
    for row in pq.read_table(art.file("prototypes.parquet")).to_pylist():
        assert len(row["prototype"]) == grid.shape[-1]

    # one candidate's pooled feature, by hand
    proposals = store.open("proposals_r1", outcomes["proposals_r1"].version)
    parts = pq.read_table(proposals.file(ranking.pseudo_parts_file(proposals))).to_pylist()
    instances = store.open("instances", outcomes["instances"].version)
    part = parts[0]
    got = ranking.pooled_teacher_features(feats_art, instances, [dict(part)], NullProgress())[0]
    inst = {r["instance_id"]: r for r in pq.read_table(instances.path / "instances").to_pylist()}[part["instance_id"]]
    grid, meta = reader.get(part["instance_id"])
    mask = instance_mask(inst)
    yx, f = pixel_features(ObjectFeatures(grid, mask, int(meta["grid_y0"]), int(meta["grid_x0"]),
                                          float(meta["stride"]), (float(meta["scale_y"]), float(meta["scale_x"]))))
    f = torch.nn.functional.normalize(f, dim=1).numpy()
    pm = rle_to_mask({"size": [part["height"], part["width"]], "counts": part["rle"]})
    want = f[pm[yx[:, 0], yx[:, 1]]].mean(0)
    np.testing.assert_allclose(got, want / np.linalg.norm(want), atol=1e-5)

    with pytest.raises(ValueError, match="part_features"):
        run_pipeline(_cfg(cfg, **{"ranking.part_features": "pixels"}), store, until="ranking")


def test_distill_trains_the_class_conditioned_model(full_run):
    cfg, store, outcomes = full_run
    out = outcomes["distill_r1"]
    art = store.open("distill_r1", out.version)
    model = json.loads(art.file("model.json").read_text())
    n_classes = out.summary["object_classes"]
    assert model["num_classes"] == 3 * n_classes and model["parts_per_class"] == 3
    assert art.manifest["inputs"]["ranking"] == outcomes["ranking"].version
    table = pq.read_table(art.file("labeled_parts_r1.parquet"))
    assert table.schema == ranking.LABELED_SCHEMA
    instances = {r["instance_id"]: r for r in pq.read_table(
        store.open("instances", outcomes["instances"].version).path / "instances").to_pylist()}
    for r in table.to_pylist():
        inst = instances[r["instance_id"]]
        assert r["class_id"] == inst["class_id"], "a part's cluster belongs to its object's class"
        obj = rle_to_mask({"size": [inst["height"], inst["width"]], "counts": inst["rle"]})
        assert not (rle_to_mask({"size": [r["height"], r["width"]], "counts": r["rle"]}) & ~obj).any()


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def test_prototype_head_starts_where_the_ranking_is():
    rng = np.random.default_rng(0)
    dim, k, n_bar = 16, 3, 4.0
    part_w, part_b = rng.normal(size=(2, dim)), np.array([0.5, -0.2])
    # class 0: three prototypes fitted on normalised features; class 1: two (k_eff < k); class 2: none
    protos = {0: fit_prototypes(rng.normal(size=(40, dim)), k=3).prototypes,
              1: fit_prototypes(rng.normal(size=(40, dim)), k=2).prototypes}
    feats = {c: n_bar * _unit(rng.normal(size=(60, dim))) for c in (0, 1)}
    weight, bias, stats = distill.prototype_head(part_w, part_b, protos, k, 3, feats, temperature=10.0)
    assert weight.shape == (3 * k + 1, dim) and bias.shape == (3 * k + 1,)
    np.testing.assert_allclose(weight[-1], part_w[1])
    assert bias[-1] == pytest.approx(part_b[1])
    assert stats["feature_norm"] == pytest.approx(n_bar)
    assert stats["nearest_prototype_agreement"] == 1.0  # every feature has the norm n̄
    for c in (0, 1):
        x = feats[c]
        logits = x @ weight.T + bias
        mu = protos[c]
        nearest = np.linalg.norm(_unit(x)[:, None] - mu[None], axis=2).argmin(1)
        assert (logits[:, c * k:c * k + len(mu)].argmax(1) == nearest).all()
        # the clusters' summed probability is the proposals' P(part), on average over the class's features
        allowed = np.r_[c * k:(c + 1) * k, 3 * k]
        p_class = _softmax(logits[:, allowed])[:, :-1].sum(1)
        p_part = _softmax(x @ part_w.T + part_b)[:, 0]
        assert abs(np.log(p_class / (1 - p_class)).mean() - np.log(p_part / (1 - p_part)).mean()) < 1e-6
    assert (bias[k + 2] < bias[k:k + 2] - 10).all(), "a cluster class 1 lacks is never chosen"
    np.testing.assert_allclose(weight[2 * k:3 * k], np.repeat(part_w[:1], k, 0))
    np.testing.assert_allclose(bias[2 * k:3 * k], part_b[0] - np.log(k))
    with pytest.raises(ValueError, match="2-way head"):
        distill.prototype_head(part_w[:1], part_b, protos, k, 3, feats, 10.0)


def test_distill_head_from_prototypes(full_run):
    cfg, store, outcomes = full_run
    cfg = _cfg(cfg, **{"distill.head_init.mode": "prototypes", "distill.max_iters": 1})
    out = {o.stage: o for o in run_pipeline(cfg, store)}["distill_r1"]
    assert out.version != outcomes["distill_r1"].version
    art = store.open("distill_r1", out.version)
    head = json.loads(art.file("head_init.json").read_text())
    assert head["mode"] == "prototypes" and head["feature_norm"] > 0
    assert 0.5 <= head["nearest_prototype_agreement"] <= 1.0
    assert out.summary["head_init"] == head
    assert not (art.path / "work").exists()
    with pytest.raises(ValueError, match="head_init.mode"):
        run_pipeline(_cfg(cfg, **{"distill.head_init.mode": "bogus"}), store)


def test_object_parts_slices_by_class_and_merges():
    h, w = 8, 8
    obj = np.zeros((h, w), bool)
    obj[:, :6] = True
    masks = np.zeros((3, h, w), np.float32)
    masks[0][:, :3] = 0.9
    masks[1][:, 3:6] = 0.9
    masks[2][:4] = 0.9
    k = 2
    class_scores = np.zeros((3, 2 * k + 1), np.float32)
    class_scores[0] = [0.0, 0.0, 0.8, 0.1, 0.1]   # class 1, cluster 0
    class_scores[1] = [0.9, 0.0, 0.7, 0.0, 0.1]   # class 0 would say cluster 0; class 1: cluster 0 again
    class_scores[2] = [0.0, 0.0, 0.0, 0.2, 0.8]   # mostly no-object
    found = distill.object_parts(masks, class_scores, [obj], [1], k, score_threshold=0.3, score="cluster")
    assert len(found[0]) == 1
    part = found[0][0]
    assert part["cluster"] == 0 and set(part["queries"]) == {0, 1} and part["score"] == pytest.approx(0.8)
    assert part["mask"].sum() == obj.sum()
    # 'class' (the default): a query's score is P(a part of class 1), the sum over the class's k logits
    part = distill.object_parts(masks, class_scores, [obj], [1], k, score_threshold=0.3)[0][0]
    assert part["cluster"] == 0 and part["score"] == pytest.approx(0.9)


def test_object_parts_class_score_keeps_parts_split_over_clusters():
    """Two confident part queries whose mass is shared by two clusters: no single cluster passes
    0.5, their class does; and an object with no query over the threshold keeps all of them."""
    h, w = 6, 6
    obj = np.ones((h, w), bool)
    masks = np.zeros((2, h, w), np.float32)
    masks[0][:, :3] = 0.9
    masks[1][:, 3:] = 0.9
    k = 2
    class_scores = np.array([[0.45, 0.4, 0.15], [0.35, 0.45, 0.2]], np.float32)
    assert distill.object_parts(masks, class_scores, [obj], [0], k, 0.5, score="cluster")[0] != []  # fallback
    by_cluster = distill.object_parts(masks, class_scores, [obj], [0], k, 0.5, score="class")[0]
    assert [p["cluster"] for p in by_cluster] == [0, 1]
    assert [p["score"] for p in by_cluster] == pytest.approx([0.85, 0.8])
    assert all(p["mask"].sum() == 18 for p in by_cluster)
    with pytest.raises(ValueError, match="score"):
        distill.object_parts(masks, class_scores, [obj], [0], k, 0.5, score="best")


def test_evaluate_scores_every_method_and_writes_the_report(full_run):
    cfg, store, outcomes = full_run
    art = store.open("evaluate", outcomes["evaluate"].version)
    metrics = json.loads(art.file("metrics.json").read_text())
    assert metrics["split"] == "val" and metrics["objects"] > 0
    for setting in ("gt", "pipeline"):
        rows = metrics[setting]
        assert {"RGB K-means (floor)", "proposals", "PartDistillation"} <= set(rows)
        final = rows["PartDistillation"]
        for key in ("AR@1", "AR@10", "AR@200", "C-mIoU", "FG-NMI", "NMI (within object)"):
            assert final[key] is None or 0.0 <= final[key] <= 1.0
        assert rows["RGB K-means (floor)"]["C-mIoU"] is None, "per-object ids have no class-level mIoU"
    assert "mined parts" in metrics["pipeline"] and "proposals + ranking" in metrics["pipeline"]
    one_stage = metrics["pipeline"]["one-stage K-means (no self-training)"]
    assert one_stage["C-mIoU"] is None or 0.0 <= one_stage["C-mIoU"] <= 1.0
    assert metrics["gt"]["RGB K-means (floor)"]["AR@10"] > 0
    report = art.file("report.html").read_text()
    assert "<table>" in report and "data:image/png;base64" in report and "paper" in report
    assert any(n.startswith("purity/") for n in art.files) and any(n.startswith("overlays/") for n in art.files)
    assert "| PartDistillation |" in art.file("table.md").read_text()


def test_evaluate_on_an_external_part_data_set(full_run):
    """A part data set read by its loader (here PartImageNet's reader on the Parts World folder):
    GT objects only, the pipeline-only rows left out."""
    cfg, store, outcomes = full_run
    data_dir = store.open("data", outcomes["data"].version).path
    ext = _cfg(cfg, **MORE, **{"evaluate.gt": {"source": "partimagenet", "root": str(data_dir)}})
    out = {o.stage: o for o in run_pipeline(ext, store, only="evaluate")}["evaluate"]
    assert out.version != outcomes["evaluate"].version
    metrics = json.loads(store.open("evaluate", out.version).file("metrics.json").read_text())
    assert metrics["gt_source"] == "partimagenet" and "pipeline" not in metrics
    assert {"RGB K-means (floor)", "proposals", "PartDistillation"} == set(metrics["gt"])

    bad = _cfg(cfg, **MORE, **{"evaluate.gt": {"source": "partimagenet", "root": None}})
    with pytest.raises(ValueError, match="needs evaluate.gt.root"):
        run_pipeline(bad, store, only="evaluate")


@pytest.mark.slow
def test_notebooks_run_against_the_store(full_run, monkeypatch):
    """Both notebooks execute top to bottom (nbclient) on the tiny run's store."""
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    from tests.conftest import REPO

    _, store, _ = full_run
    monkeypatch.setenv("PARTDISTILL_STORE", str(store.root))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend shows the figures
    for name in ("inspect_mined_parts.ipynb", "compare_rounds.ipynb"):
        nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
        nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                  if o.get("output_type") == "error"]
        assert not errors, f"{name}: {errors}"
        assert any(o.get("output_type") == "display_data" for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", [])), f"{name} drew no figure"
