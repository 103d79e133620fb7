"""The evaluate stage's scorer on hand-made objects with known answers."""

import numpy as np

from partdistill.evaluation.parts_eval import ObjectPrediction, from_label_map, query_proposals, score_method
from partdistill.evaluation.premise import GTObject


def _object(image_id, cls, split_at, h=12, w=12):
    mask = np.zeros((h, w), bool)
    mask[2:10, 2:10] = True
    labels = np.full((h, w), -1, np.int16)
    labels[2:split_at, 2:10] = 0
    labels[split_at:10, 2:10] = 1
    return GTObject(image_id, f"{image_id}.png", cls, mask, labels, [labels == 0, labels == 1])


def test_perfect_prediction_scores_one_and_permuted_ids_keep_nmi():
    objects = [_object(1, "car", 5), _object(2, "car", 7), _object(3, "tree", 6)]
    perfect = [from_label_map(o.part_labels.astype(np.int32)) for o in objects]
    m = score_method(objects, perfect, class_consistent=True, class_ids={"car": 0, "tree": 1})
    for key in ("AR@1", "AR@10", "AR@200"):
        assert m[key] == (0.5 if key == "AR@1" else 1.0)   # one proposal of two parts at k=1
    for key in ("C-mIoU", "A-mIoU", "C-mIoU (Hungarian)", "FG-NMI", "FG-ARI", "NMI (within object)"):
        assert np.isclose(m[key], 1.0), key
    # ids swapped consistently within every class: the same scores
    swapped = [from_label_map(np.where(o.part_labels >= 0, 1 - o.part_labels, -1).astype(np.int32)) for o in objects]
    s = score_method(objects, swapped, class_consistent=True, class_ids={"car": 0, "tree": 1})
    assert np.isclose(s["FG-NMI"], 1.0) and np.isclose(s["C-mIoU"], 1.0) and s["AR@10"] == 1.0
    # ids swapped in one car only: within-object NMI stays 1, class-level agreement drops
    mixed = [swapped[0], perfect[1], perfect[2]]
    x = score_method(objects, mixed, class_consistent=True, class_ids={"car": 0, "tree": 1})
    assert np.isclose(x["NMI (within object)"], 1.0) and x["FG-NMI"] < 0.9 and x["C-mIoU (Hungarian)"] < 0.9


def test_no_prediction_scores_zero_and_per_object_ids_have_no_class_metrics():
    objects = [_object(1, "car", 5)]
    m = score_method(objects, [ObjectPrediction(None)], class_consistent=False, class_ids={"car": 0})
    assert m["AR@10"] == 0.0 and m["predicted"] == 0 and np.isnan(m["C-mIoU"]) and np.isnan(m["FG-NMI"])


def test_query_proposals_rank_by_score_and_clip_to_the_object():
    obj = np.zeros((6, 6), bool)
    obj[1:5, 1:5] = True
    masks = np.zeros((3, 6, 6), np.float32)
    masks[0][:, :3] = 0.9        # half inside the object
    masks[1][:, 3:] = 0.8
    masks[2][5:, :] = 0.9        # outside the object only: dropped
    pred = query_proposals(masks, np.array([0.2, 0.9, 0.99], np.float32), obj)
    assert len(pred.proposals) == 2 and pred.scores == [np.float32(0.9), np.float32(0.2)]
    assert all(not (p & ~obj).any() for p in pred.proposals)
    assert set(np.unique(pred.label_map[obj])) == {0, 1} and (pred.label_map[~obj] == -1).all()
