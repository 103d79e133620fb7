"""`partdistill score`: any COCO part-results file, scored with the evaluate stage's metrics."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from partdistill.cli import app
from partdistill.data.images import DatasetError
from partdistill.evaluation.parts_eval import ObjectPrediction, from_label_map, score_method
from partdistill.evaluation.premise import load_coco_objects
from partdistill.evaluation.score import score_file, write_results
from partdistill.storage import mask_to_rle

H, W = 16, 24
# (image id, object id, class, box (y0, y1, x0, x1), split row): the top part is rows y0..split
OBJECTS = [(1, 11, "lamp", (2, 12, 2, 10), 6), (1, 12, "car", (4, 14, 12, 22), 9), (2, 21, "car", (1, 15, 3, 21), 7)]
# non-alphabetical categories, ids not 1..n
CLASSES = {"lamp": 7, "car": 3}
PART_IDS = {"lamp": (70, 71), "car": (30, 31)}  # (top, bottom)


def _masks(box, split):
    y0, y1, x0, x1 = box
    obj = np.zeros((H, W), bool)
    obj[y0:y1, x0:x1] = True
    top = obj.copy()
    top[split:] = False
    return obj, top, obj & ~top


@pytest.fixture
def gt(tmp_path):
    images = [{"id": i, "file_name": f"img{i}.png", "width": W, "height": H} for i in (1, 2)]
    objects, parts = [], []
    for image_id, oid, cls, box, split in OBJECTS:
        obj, top, bottom = _masks(box, split)
        objects.append({"id": oid, "image_id": image_id, "category_id": CLASSES[cls], "iscrowd": 0,
                        "segmentation": mask_to_rle(obj), "area": int(obj.sum())})
        for j, m in enumerate((top, bottom)):
            parts.append({"id": oid * 10 + j, "image_id": image_id, "category_id": PART_IDS[cls][j], "iscrowd": 0,
                          "object_id": oid, "segmentation": mask_to_rle(m), "area": int(m.sum())})
    inst = {"images": images, "annotations": objects,
            "categories": [{"id": c, "name": n} for n, c in CLASSES.items()]}
    prt = {"images": images, "annotations": parts,
           "categories": [{"id": pid, "name": f"{n} {w}", "supercategory": n} for n, ids in PART_IDS.items()
                          for pid, w in zip(ids, ("top", "bottom"), strict=True)]}
    (tmp_path / "instances_val.json").write_text(json.dumps(inst))
    (tmp_path / "parts_val.json").write_text(json.dumps(prt))
    return tmp_path / "instances_val.json", tmp_path / "parts_val.json", inst, prt


def _results(path, entries):
    path.write_text(json.dumps(entries))
    return path


def _part_results(swap_object=None, score=0.9):
    """The GT parts as a plain COCO results list (no object ids), ids per class consistent."""
    out = []
    for _, oid, cls, box, split in OBJECTS:
        obj, top, bottom = _masks(box, split)
        for j, m in enumerate((top, bottom)):
            label = PART_IDS[cls][1 - j if oid == swap_object else j]
            out.append({"image_id": OBJECTS[[o[1] for o in OBJECTS].index(oid)][0], "category_id": label,
                        "segmentation": mask_to_rle(m), "score": score - 0.1 * j})
    return out


def test_perfect_results_score_one(gt, tmp_path):
    inst, parts, *_ = gt
    m = score_file(_results(tmp_path / "r.json", _part_results()), parts, inst)
    assert m["objects"] == 3 and m["predicted"] == 3 and m["unmatched_results"] == 0
    assert m["AR@1"] == 0.5 and m["AR@10"] == 1.0 and m["AR@200"] == 1.0
    for key in ("C-mIoU", "A-mIoU", "C-mIoU (Hungarian)", "FG-NMI", "FG-ARI", "NMI (within object)",
                "ARI (within object)"):
        assert np.isclose(m[key], 1.0), key


def test_ids_swapped_in_one_object_keep_within_object_nmi_only(gt, tmp_path):
    inst, parts, *_ = gt
    m = score_file(_results(tmp_path / "r.json", _part_results(swap_object=12)), parts, inst)
    assert np.isclose(m["NMI (within object)"], 1.0) and m["AR@10"] == 1.0
    assert m["FG-NMI"] < 0.9 and m["C-mIoU (Hungarian)"] < 0.9


def test_nothing_predicted_and_results_elsewhere(gt, tmp_path):
    inst, parts, *_ = gt
    m = score_file(_results(tmp_path / "r.json", []), parts, inst)
    assert m["AR@10"] == 0.0 and m["predicted"] == 0
    # a part on an image the ground truth lacks, and one on background: scored on no object
    stray = np.zeros((H, W), bool)
    stray[0, 23] = True
    entries = _part_results() + [{"image_id": 99, "category_id": 30, "segmentation": mask_to_rle(stray), "score": 1},
                                 {"image_id": 1, "category_id": 30, "segmentation": mask_to_rle(stray), "score": 1}]
    m = score_file(_results(tmp_path / "r2.json", entries), parts, inst)
    assert m["unmatched_results"] == 2 and np.isclose(m["C-mIoU"], 1.0)


def test_a_part_goes_to_the_object_it_overlaps_most_and_the_best_score_wins_a_pixel(gt, tmp_path):
    inst, parts, *_ = gt
    objects = load_coco_objects(inst, parts)
    obj, top, bottom = _masks(OBJECTS[0][3], OBJECTS[0][4])
    whole = obj.copy()
    whole[2:5, 10:14] = True  # spills onto the car (object 12) in the same image, but overlaps the lamp more
    entries = [{"image_id": 1, "category_id": 70, "segmentation": mask_to_rle(top), "score": 0.9},
               {"image_id": 1, "category_id": 71, "segmentation": mask_to_rle(whole), "score": 0.5}]
    m = score_file(_results(tmp_path / "r.json", entries), parts, inst)
    lm = np.where(top, 70, np.where(obj, 71, -1)).astype(np.int32)
    expected = [from_label_map(None)] * 3
    expected[0] = ObjectPrediction(lm, [top, whole & obj], [0.9, 0.5])
    ref = score_method(objects, expected, True, {"car": 0, "lamp": 1})
    assert m["predicted"] == 1
    assert {k: v for k, v in m.items() if k != "unmatched_results"} == pytest.approx(ref, nan_ok=True)


def test_written_results_score_to_the_numbers_of_the_predictions_they_hold(gt, tmp_path):
    """What the evaluate stage does: write its predictions (with all proposals) and get, from
    `score`, exactly the numbers it computed on them."""
    inst, parts, *_ = gt
    objects = load_coco_objects(inst, parts)
    rng = np.random.default_rng(0)
    class_ids = {"lamp": 0, "car": 1}  # the run's numbering, not sorted
    k = 4
    preds = []
    for i, o in enumerate(objects):
        if i == 1:
            preds.append(ObjectPrediction(None))  # a class the model lacks: no prediction
            continue
        c = class_ids[o.class_name]
        lm = np.where(o.mask, c * k + rng.integers(0, k, o.mask.shape), -1).astype(np.int32)
        proposals = [o.mask & (rng.random(o.mask.shape) < 0.5) for _ in range(5)]
        scores = sorted(rng.random(5).astype(np.float32).tolist(), reverse=True)
        preds.append(ObjectPrediction(lm, proposals, [float(np.float32(s)) for s in scores]))
    expected = score_method(objects, preds, True, class_ids)
    written = write_results(tmp_path / "predictions.json", objects, preds, class_ids, k)
    assert written == sum(len(np.unique(p.label_map[p.label_map >= 0])) for p in preds if p.label_map is not None)
    m = score_file(tmp_path / "predictions.json", parts, inst)
    assert {k_: v for k_, v in m.items() if k_ != "unmatched_results"} == pytest.approx(expected, rel=0, abs=0,
                                                                                          nan_ok=True)


def test_errors_name_the_file_and_the_id(gt, tmp_path):
    inst_path, parts_path, inst, prt = gt
    bad = json.loads(json.dumps(prt))
    bad["annotations"][2]["object_id"] = 999
    (tmp_path / "bad_parts.json").write_text(json.dumps(bad))
    with pytest.raises(DatasetError, match=r"bad_parts.json: annotations\[2\] \(id 120\): object_id 999 names no "
                                           r"object of .*instances_val.json"):
        score_file(_results(tmp_path / "r.json", []), tmp_path / "bad_parts.json", inst_path)
    bad = json.loads(json.dumps(prt))
    bad["categories"][0]["supercategory"] = "chair"
    (tmp_path / "bad_parts.json").write_text(json.dumps(bad))
    with pytest.raises(DatasetError, match=r"bad_parts.json: part category id 70 \('lamp top'\) has object class "
                                           r"'chair', which is not a category of .*instances_val.json"):
        score_file(_results(tmp_path / "r.json", []), tmp_path / "bad_parts.json", inst_path)
    with pytest.raises(DatasetError, match=r"r.json: annotations\[0\]: missing field 'score'"):
        score_file(_results(tmp_path / "r.json", [{"image_id": 1, "category_id": 30, "segmentation": []}]),
                   parts_path, inst_path)


def test_cli(gt, tmp_path):
    inst, parts, *_ = gt
    results = _results(tmp_path / "r.json", _part_results())
    out = tmp_path / "m" / "metrics.json"
    run = CliRunner().invoke(app, ["score", str(results), "--parts", str(parts), "--instances", str(inst),
                                   "--out", str(out)])
    assert run.exit_code == 0, run.output
    assert "| r.json | 50.0 | 100.0 | 100.0 | 100.0 |" in run.output
    assert json.loads(out.read_text())["C-mIoU"] == 1.0
    run = CliRunner().invoke(app, ["score", str(tmp_path / "nope.json"), "--parts", str(parts), "--instances",
                                   str(inst)])
    assert run.exit_code == 1 and "nope.json does not exist" in " ".join(run.output.split())
