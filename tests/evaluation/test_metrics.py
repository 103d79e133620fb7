"""Tests for partdistill.evaluation.metrics (hand-computed expectations)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from partdistill.evaluation.metrics import (
    adjusted_rand_index,
    average_recall,
    contingency_table,
    mask_iou,
    miou,
    normalized_mutual_info,
    per_object_nmi_ari,
)

H = W = 20


def box(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


# --------------------------------------------------------------------------
# IoU / AR
# --------------------------------------------------------------------------


def test_mask_iou_matches_direct_computation():
    rng = np.random.default_rng(0)
    gt = [rng.random((H, W)) > 0.5 for _ in range(3)]
    pred = [rng.random((H, W)) > 0.5 for _ in range(5)] + [np.zeros((H, W), bool)]
    iou = mask_iou(gt, pred)
    assert iou.shape == (3, 6)
    for g in range(3):
        for p in range(6):
            inter = np.logical_and(gt[g], pred[p]).sum()
            union = np.logical_or(gt[g], pred[p]).sum()
            assert iou[g, p] == pytest.approx(inter / union if union else 0.0)


def test_ar_iou_exactly_06_counts_at_three_thresholds():
    gt = box(0, 10, 0, 10)  # 100 px
    pred = box(0, 6, 0, 10)  # 60 px inside -> IoU = 0.6 exactly
    assert mask_iou([gt], [pred])[0, 0] == pytest.approx(0.6)
    ar = average_recall([[gt]], [[pred]], max_dets=(1, 10))
    # thresholds 0.50, 0.55, 0.60 pass out of 10
    assert ar["AR@1"] == pytest.approx(3 / 10)
    assert ar["AR@10"] == pytest.approx(3 / 10)


def test_ar_perfect_and_empty():
    gts = [[box(0, 5, 0, 5), box(10, 15, 10, 15)], [box(2, 9, 2, 9)]]
    perfect = [[g.copy() for g in gts[0]], [gts[1][0].copy()]]
    ar = average_recall(gts, perfect, max_dets=(1, 10))
    assert ar["AR@10"] == pytest.approx(1.0)
    # top-1 only sees one of the two parts of image 0: 2 of 3 GT matched
    assert ar["AR@1"] == pytest.approx(2 / 3)
    assert average_recall(gts, [[], []])["AR@10"] == 0.0
    assert math.isnan(average_recall([[]], [[box(0, 2, 0, 2)]])["AR@1"])


def test_ar_one_to_one_matching():
    a = box(0, 10, 0, 10)
    b = box(0, 10, 0, 10)  # two identical GT parts, one prediction
    ar = average_recall([[a, b]], [[a.copy()]], max_dets=(10,))
    assert ar["AR@10"] == pytest.approx(0.5)


def test_ar_greedy_highest_iou_first():
    g1 = box(0, 10, 0, 10)  # 100 px
    g2 = box(0, 10, 10, 20)  # 100 px, right of g1
    p1 = box(0, 10, 2, 12)  # IoU(g1) = 80/120, IoU(g2) = 20/180
    p2 = box(0, 10, 0, 9)  # IoU(g1) = 90/100, IoU(g2) = 0
    # Highest IoU first: (g1, p2) = 0.9 is taken, then g2 can only take p1.
    ar = average_recall([[g1, g2]], [[p1, p2]], max_dets=(2,), iou_thresholds=[0.1, 0.5, 0.85])
    # t=0.1: g1-p2 (0.9) and g2-p1 (0.111) -> 2/2; t=0.5: 1/2; t=0.85: 1/2
    assert ar["AR@2"] == pytest.approx((1.0 + 0.5 + 0.5) / 3)


def test_ar_scores_reorder_and_object_clipping():
    gt = box(0, 10, 0, 10)
    obj = box(0, 10, 0, 10)
    good = box(0, 10, 0, 15)  # spills outside the object: IoU 100/150 unclipped
    bad = box(15, 20, 15, 20)
    # Given in the wrong order, scores put `good` first.
    ar = average_recall([[gt]], [[bad, good]], max_dets=(1,), pred_scores=[[0.1, 0.9]])
    assert ar["AR@1"] == pytest.approx(4 / 10)  # IoU 2/3 passes 0.50, 0.55, 0.60, 0.65
    ar = average_recall([[gt]], [[bad, good]], max_dets=(1,), pred_scores=[[0.1, 0.9]], object_masks=[obj])
    assert ar["AR@1"] == pytest.approx(1.0)  # clipped to the object -> exact
    ar = average_recall([[gt]], [[bad, good]], max_dets=(1,))
    assert ar["AR@1"] == 0.0  # no scores: input order, top-1 is `bad`


def test_ar_pools_over_images():
    g = box(0, 10, 0, 10)
    # image 0: one part found perfectly; image 1: three parts, none found
    gts = [[g], [box(0, 3, 0, 3), box(5, 8, 5, 8), box(10, 13, 10, 13)]]
    preds = [[g.copy()], [box(17, 20, 17, 20)]]
    assert average_recall(gts, preds, max_dets=(10,))["AR@10"] == pytest.approx(1 / 4)


# --------------------------------------------------------------------------
# NMI / ARI
# --------------------------------------------------------------------------


def test_contingency_table():
    c = contingency_table(np.array([5, 5, 7, 7, 7]), np.array([1, 2, 2, 2, 2]))
    np.testing.assert_array_equal(c, [[1, 1], [0, 3]])


def test_nmi_ari_identical_and_permuted():
    a = np.array([0, 0, 1, 1, 2, 2, 2])
    assert normalized_mutual_info(a, a) == pytest.approx(1.0)
    assert adjusted_rand_index(a, a) == pytest.approx(1.0)
    perm = np.array([7, 7, 3, 3, 9, 9, 9])
    assert normalized_mutual_info(a, perm) == pytest.approx(1.0)
    assert adjusted_rand_index(a, perm) == pytest.approx(1.0)
    b = np.array([0, 1, 1, 0, 2, 2, 0])
    b_perm = np.array([2, 0, 0, 2, 1, 1, 2])
    assert normalized_mutual_info(a, b) == pytest.approx(normalized_mutual_info(a, b_perm))
    assert adjusted_rand_index(a, b) == pytest.approx(adjusted_rand_index(a, b_perm))


def test_nmi_ari_hand_worked():
    t = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0, 0, 1, 1, 2, 2])
    # sum C(n_ij,2)=2, sum C(a,2)=6, sum C(b,2)=3, C(6,2)=15:
    # expected = 6*3/15 = 1.2, max = 4.5 -> ARI = 0.8/3.3 = 8/33
    assert adjusted_rand_index(t, p) == pytest.approx(8 / 33)
    assert adjusted_rand_index(p, t) == pytest.approx(8 / 33)
    # [0,0,1,2] vs [0,0,1,1]: pred is a function of true, MI = H(pred) = ln 2,
    # H(true) = 1.5 ln 2 -> NMI = ln2 / (1.25 ln 2) = 0.8 (sklearn: ARI 4/7)
    assert normalized_mutual_info([0, 0, 1, 2], [0, 0, 1, 1]) == pytest.approx(0.8)
    assert adjusted_rand_index([0, 0, 1, 2], [0, 0, 1, 1]) == pytest.approx(4 / 7)


def test_nmi_ari_degenerate_cases():
    assert normalized_mutual_info([1, 1, 1], [4, 4, 4]) == 1.0
    assert adjusted_rand_index([1, 1, 1], [4, 4, 4]) == 1.0
    assert normalized_mutual_info([0, 0, 1, 1], [0, 0, 0, 0]) == 0.0
    assert adjusted_rand_index([0, 0, 1, 1], [0, 0, 0, 0]) == pytest.approx(0.0)
    assert adjusted_rand_index([3], [5]) == 1.0


def test_nmi_ari_independent_is_near_zero():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 4, 20000)
    b = rng.integers(0, 5, 20000)
    assert abs(adjusted_rand_index(a, b)) < 0.01
    assert normalized_mutual_info(a, b) < 0.01


def test_per_object_nmi_ari_ignores_and_pools():
    g1 = np.array([[0, 0, 1], [1, -1, -1]])
    p1 = np.array([[5, 5, 6], [6, 0, 1]])  # perfect on valid pixels
    g2 = np.array([0, 0, 1, 1])
    p2 = np.array([0, 1, 0, 1])  # independent: ARI = -0.5 here
    out = per_object_nmi_ari([g1, g2], [p1, p2])
    assert out["ARI"] == pytest.approx((1.0 + adjusted_rand_index(g2, p2)) / 2)
    assert out["NMI"] == pytest.approx((1.0 + 0.0) / 2)
    pooled = adjusted_rand_index(np.r_[0, 0, 1, 1, g2], np.r_[5, 5, 6, 6, p2])
    assert out["ARI_pooled"] == pytest.approx(pooled)
    assert math.isnan(per_object_nmi_ari([np.array([-1, -1])], [np.array([0, 1])])["NMI"])


# --------------------------------------------------------------------------
# mIoU
# --------------------------------------------------------------------------


def test_miou_perfect_and_permuted_ids():
    g = [np.array([0, 0, 1, 1, 2, -1]), np.array([2, 2, 0, 1])]
    out = miou(g, [x.copy() for x in g], [3, 3])
    assert out["C-mIoU"] == out["A-mIoU"] == pytest.approx(1.0)
    assert out["C-mIoU_hungarian"] == out["A-mIoU_hungarian"] == pytest.approx(1.0)
    perm = {0: 2, 1: 0, 2: 1, -1: 1}
    p = [np.array([perm[v] for v in x]) for x in g]
    out = miou(g, p, [3, 3])
    assert out["C-mIoU"] == pytest.approx(1.0)
    assert out["C-mIoU_hungarian"] == pytest.approx(1.0)


def test_miou_known_case():
    # class 0: conf = [[3, 1], [0, 4]]; both mappings: pred0->part0, pred1->part1
    # part0: inter 3, union 4 -> 0.75; part1: inter 4, union 5 -> 0.8
    out = miou([np.array([0, 0, 0, 0, 1, 1, 1, 1])], [np.array([0, 0, 0, 1, 1, 1, 1, 1])], [0])
    assert out["C-mIoU"] == pytest.approx(0.775)
    assert out["C-mIoU_hungarian"] == pytest.approx(0.775)


def test_miou_majority_vs_hungarian_and_class_averaging():
    # class 0: GT part 0 is split over pred ids 0 and 1.
    #   majority: 0->0, 1->0, 2->1 -> IoUs (1, 1)
    #   hungarian: one of {0, 1} -> part 0 (IoU 0.5), 2 -> part 1 (1.0)
    # class 1: one part, predicted perfectly -> IoU 1
    g = [np.array([0, 0, 0, 0, 1, 1]), np.array([0, 0, 0])]
    p = [np.array([0, 0, 1, 1, 2, 2]), np.array([0, 0, 0])]
    out = miou(g, p, [0, 1])
    assert out["C-mIoU"] == pytest.approx(1.0)
    assert out["A-mIoU"] == pytest.approx(1.0)
    assert out["C-mIoU_hungarian"] == pytest.approx((0.75 + 1.0) / 2)
    assert out["A-mIoU_hungarian"] == pytest.approx((0.5 + 1.0 + 1.0) / 3)


def test_miou_unpredicted_pixels_and_absent_parts():
    # pred -1 = "no part": counts against the GT area only.  Part 2 never
    # occurs in the GT of this class and is not scored.
    out = miou([np.array([0, 0, 1, 1])], [np.array([0, -1, 1, 1])], [0], num_parts={0: 3}, num_pred={0: 3})
    assert out["C-mIoU"] == pytest.approx((0.5 + 1.0) / 2)
    with pytest.raises(ValueError):
        miou([np.array([0, 3])], [np.array([0, 0])], [0], num_parts={0: 2})
