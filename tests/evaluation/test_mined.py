"""evaluate_mined: matching instances to GT objects and scoring mined parts, on hand-made masks
whose numbers are known, and once end to end on the tiny run."""

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from partdistill.evaluation import mined
from partdistill.evaluation.mined import evaluate_label_maps, evaluate_mined, rgb_label_maps
from partdistill.stages import instances as instances_stage
from partdistill.stages import mining as mining_stage
from partdistill.storage import mask_to_rle, write_parquet

H, W = 24, 32


def _box(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


# Object A (image 1): two parts of different size, top 2/3 and bottom 1/3.
A_PARTS = [_box(2, 10, 2, 14), _box(10, 14, 2, 14)]
# Object B (image 2): three vertical stripes of 4, 6 and 8 columns.
B_PARTS = [_box(6, 18, 10, 14), _box(6, 18, 14, 20), _box(6, 18, 20, 28)]
A, B = np.logical_or.reduce(A_PARTS), np.logical_or.reduce(B_PARTS)


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """instances_val.json + parts_val.json (COCO RLE) for A and B."""
    rle = lambda m: mask_to_rle(m)  # noqa: E731
    inst = {"images": [{"id": 1, "file_name": "a.png", "height": H, "width": W},
                       {"id": 2, "file_name": "b.png", "height": H, "width": W}],
            "categories": [{"id": 1, "name": "thing"}],
            "annotations": [{"id": 101, "image_id": 1, "category_id": 1, "segmentation": rle(A)},
                            {"id": 201, "image_id": 2, "category_id": 1, "segmentation": rle(B)}]}
    parts = {"annotations": [{"id": 101 * 100 + j, "object_id": 101, "category_id": j + 1, "segmentation": rle(m)}
                             for j, m in enumerate(A_PARTS)]
             + [{"id": 201 * 100 + j, "object_id": 201, "category_id": 10 + j, "segmentation": rle(m)}
                for j, m in enumerate(B_PARTS)]}
    (tmp_path / "instances_val.json").write_text(json.dumps(inst))
    (tmp_path / "parts_val.json").write_text(json.dumps(parts))
    return tmp_path


def _artifacts(tmp_path: Path, instances: list[tuple[int, np.ndarray, list[np.ndarray]]]):
    """Fake `instances` and `mining` artifacts: (instance_id, mask, its parts in cluster order)."""
    inst_dir, mine_dir = tmp_path / "inst", tmp_path / "mine"
    (inst_dir / "instances").mkdir(parents=True)
    (mine_dir / "mined_parts").mkdir(parents=True)
    rows, parts = [], []
    for iid, mask, pmasks in instances:
        image_id = iid // 1000
        ys, xs = np.nonzero(mask)
        rows.append({"image_id": image_id, "instance_id": iid, "split": "val", "file_name": f"{image_id}.png",
                     "class_id": 0, "class_name": "thing", "score": 1.0,
                     "bbox": [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)],
                     "rle": mask_to_rle(mask)["counts"], "area": int(mask.sum()), "height": H, "width": W})
        for j, p in enumerate(pmasks):
            parts.append({"instance_id": iid, "image_id": image_id, "split": "val", "part": j,
                          "rle": mask_to_rle(p)["counts"], "area": int(p.sum()), "height": H, "width": W,
                          "crf": False})
    write_parquet(inst_dir / "instances" / "part-00000.parquet",
                  {c: [r[c] for r in rows] for c in instances_stage.SCHEMA.names}, instances_stage.SCHEMA)
    write_parquet(mine_dir / "mined_parts" / "part-00000.parquet",
                  {c: [r[c] for r in parts] for c in mining_stage.SCHEMA.names}, mining_stage.SCHEMA)
    return SimpleNamespace(path=inst_dir), SimpleNamespace(path=mine_dir)


def _score(tmp_path, data_dir, instances):
    return evaluate_mined(data_dir, *_artifacts(tmp_path, instances), split="val")


def test_perfect_mining(tmp_path, data_dir):
    m = _score(tmp_path, data_dir, [(1000, A, A_PARTS), (2000, B, B_PARTS)])
    assert m["objects"] == 2 and m["matched"] == 2
    assert m["AR@10"] == pytest.approx(1.0) and m["NMI"] == pytest.approx(1.0) and m["ARI"] == pytest.approx(1.0)
    # one proposal per object: the largest part, which is exactly a GT part → 2 of the 5 GT parts
    assert m["AR@1"] == pytest.approx(2 / 5)


def test_part_order_and_ids_do_not_matter(tmp_path, data_dir):
    """Parts are ranked by area, not by cluster id: reversed ids give the same numbers."""
    base = _score(tmp_path / "a", data_dir, [(1000, A, A_PARTS), (2000, B, B_PARTS)])
    swapped = _score(tmp_path / "b", data_dir, [(1000, A, A_PARTS[::-1]), (2000, B, B_PARTS[::-1])])
    assert swapped == pytest.approx(base)


def test_imperfect_mining_agrees_with_sklearn(tmp_path, data_dir):
    """B's two smaller stripes merged into one part: known AR, and NMI / ARI (unchanged when part
    ids are swapped) equal to sklearn's on B's pixels."""
    sk = pytest.importorskip("sklearn.metrics")
    merged = [B_PARTS[0] | B_PARTS[1], B_PARTS[2]]
    m = _score(tmp_path / "a", data_dir, [(1000, A, A_PARTS), (2000, B, merged)])
    m2 = _score(tmp_path / "b", data_dir, [(1000, A, A_PARTS), (2000, B, merged[::-1])])
    gt_b = np.select(B_PARTS, [10, 11, 12], -1)[B]
    pred_b = np.select(merged, [0, 1], -1)[B]
    # AR@10: A finds both parts at every threshold, B its wide stripe (IoU 1) and the merged one (0.6)
    assert m["AR@10"] == pytest.approx((2 * 10 + 10 + 3) / 10 / 5)
    # B's IoUs are 1.0 (the wide stripe) and 72/120 = 0.6 (the merged part vs its wider half): AR@1 of B
    # finds its largest-first proposal (the merged part, 120 px > 96 px) at the 0.50–0.60 thresholds only
    assert m["AR@1"] == pytest.approx((10 + 3) / 10 / 5)
    assert m["NMI"] == pytest.approx((1 + sk.normalized_mutual_info_score(gt_b, pred_b)) / 2)
    assert m["ARI"] == pytest.approx((1 + sk.adjusted_rand_score(gt_b, pred_b)) / 2)
    assert m2 == pytest.approx(m)


def test_missing_instance_lowers_ar_by_its_parts(tmp_path, data_dir):
    """No instance for B: its 3 parts stay in the denominator (AR@10 = 2/5), it counts as NMI = ARI = 0."""
    m = _score(tmp_path, data_dir, [(1000, A, A_PARTS)])
    assert m["objects"] == 2 and m["matched"] == 1
    assert m["AR@10"] == pytest.approx(2 / 5) and m["AR@1"] == pytest.approx(1 / 5)
    assert m["NMI"] == pytest.approx(0.5) and m["ARI"] == pytest.approx(0.5)


def test_matching_threshold_duplicates_and_clipping(tmp_path, data_dir):
    # An instance on B covering under half of it (IoU 4/18 < 0.5) matches nothing.
    m = _score(tmp_path / "a", data_dir, [(1000, A, A_PARTS), (2000, B_PARTS[0], [B_PARTS[0]])])
    assert m["matched"] == 1 and m["AR@10"] == pytest.approx(2 / 5)
    # Two instances on A: the exact one (IoU 1) wins over a sloppy duplicate (IoU 0.5..1) listed first.
    sloppy = _box(2, 14, 2, 10)
    m = _score(tmp_path / "b", data_dir, [(1000, sloppy, [sloppy]), (1001, A, A_PARTS), (2000, B, B_PARTS)])
    assert m["matched"] == 2 and m["AR@10"] == pytest.approx(1.0)
    # An instance larger than its GT object (IoU >= 0.5): its parts are clipped to the object.
    big = A | _box(14, 16, 2, 14)
    m = _score(tmp_path / "c", data_dir, [(1000, big, [A_PARTS[0], A_PARTS[1] | _box(14, 16, 2, 14)]),
                                          (2000, B, B_PARTS)])
    assert m["matched"] == 2 and m["AR@10"] == pytest.approx(1.0) and m["NMI"] == pytest.approx(1.0)


def test_instance_without_parts_predicts_nothing(tmp_path, data_dir):
    m = _score(tmp_path, data_dir, [(1000, A, A_PARTS), (2000, B, [])])
    assert m["matched"] == 2 and m["AR@10"] == pytest.approx(2 / 5) and m["NMI"] == pytest.approx(0.5)


def test_end_to_end_on_the_tiny_run(tiny_run, monkeypatch):
    """`mining` on ground-truth objects of the tiny run (no CRF, for time); the stage's output and
    the raw-RGB floor go through the same scoring function."""
    from partdistill.pipeline import run_pipeline

    cfg, store, _ = tiny_run
    cfg = copy.deepcopy(cfg)
    cfg["instances"].update(source="gt", min_object_fraction=0.0)
    cfg["mining"]["crf"]["enabled"] = False
    out = {o.stage: o for o in run_pipeline(cfg, store, until="mining")}
    data, inst, mine = (store.open(s, out[s].version) for s in ("data", "instances", "mining"))

    calls = []
    real = mined.score_label_maps
    monkeypatch.setattr(mined, "score_label_maps", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    stage = evaluate_mined(data.path, inst, mine, "val")
    rgb = evaluate_label_maps(data.path, inst, rgb_label_maps(data.path, inst, "val", k=4), "val")
    assert len(calls) == 2, "the RGB floor and the stage output must be scored by the same function"
    for m in (stage, rgb):
        assert m["objects"] > 0 and m["matched"] == m["objects"], "GT instances match their GT objects"
        for key in ("AR@1", "AR@10"):
            assert 0.0 <= m[key] <= 1.0
        assert m["AR@1"] <= m["AR@10"] and -1.0 <= m["ARI"] <= 1.0 and 0.0 <= m["NMI"] <= 1.0
