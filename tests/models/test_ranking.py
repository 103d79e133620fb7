"""Tests for partdistill.models.ranking (paper §4.3, Eq. 1-2)."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from partdistill.evaluation.metrics import adjusted_rand_index
from partdistill.models import ranking
from partdistill.models.ranking import (
    FEWER_CANDIDATES,
    FEWER_DISTINCT,
    NO_CANDIDATES,
    ClassRanking,
    LabelledPart,
    associate,
    candidates,
    density_scores,
    fit_prototypes,
    label_parts,
    ranked_scores,
)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def planted_class(rng: np.random.Generator, k: int = 8, d: int = 32, noise: float = 0.03):
    """``k`` clusters of noisy unit vectors around random unit centres, with random lengths
    (the fit must normalise) and unequal cluster sizes; returns features, planted labels."""
    centres = unit(rng.standard_normal((k, d)))
    sizes = rng.integers(10, 40, k)
    z = rng.permutation(np.repeat(np.arange(k), sizes))
    x = unit(centres[z] + noise * rng.standard_normal((len(z), d)))
    return (x * rng.uniform(0.5, 3.0, (len(z), 1))).astype(np.float32), z


# --------------------------------------------------------------------------
# (a) prototypes recover planted clusters; weights matter
# --------------------------------------------------------------------------


def test_fit_prototypes_recovers_planted_clusters_per_class():
    rng = np.random.default_rng(0)
    for _ in range(3):  # three object classes, each with its own planted parts
        x, z = planted_class(rng)
        w = rng.uniform(0.3, 1.0, len(z))
        fit = fit_prototypes(x, w, k=8, seed=0)

        assert fit.k_eff == 8 and fit.few_proposals is None and fit.n_candidates == len(z)
        assert fit.prototypes.shape == (8, 32) and fit.prototypes.dtype == np.float32
        assert adjusted_rand_index(z, fit.labels) == pytest.approx(1.0)
        # Eq. 2's argmax is the fitted cluster, hence the planted one up to permutation
        r = density_scores(x, fit.prototypes)
        np.testing.assert_array_equal(r.argmax(1), fit.labels)
        assert adjusted_rand_index(z, r.argmax(1)) == pytest.approx(1.0)
        # each prototype is the weighted mean of its members' normalised features
        xn = unit(x.astype(np.float64))
        for j in range(8):
            sel = fit.labels == j
            np.testing.assert_allclose(fit.prototypes[j], (w[sel, None] * xn[sel]).sum(0) / w[sel].sum(), atol=1e-6)
            assert fit.cluster_size[j] == sel.sum()
            assert fit.cluster_weight[j] == pytest.approx(w[sel].sum())
        # clusters ordered by decreasing weight
        assert np.all(np.diff(fit.cluster_weight) <= 0)
        assert fit.cluster_weight.sum() == pytest.approx(w.sum())


def test_weights_pull_the_prototype_toward_a_heavy_member():
    # k = 1: the prototype is exactly the weighted mean (Snell et al.'s prototype)
    x = unit(np.array([[1.0, 0, 0], [0.6, 0.8, 0], [0.6, 0, 0.8]]))
    w = np.array([10.0, 1.0, 1.0])
    weighted = fit_prototypes(x, w, k=1).prototypes[0]
    plain = fit_prototypes(x, None, k=1).prototypes[0]
    np.testing.assert_allclose(weighted, (w[:, None] * x).sum(0) / w.sum(), atol=1e-6)
    np.testing.assert_allclose(plain, x.mean(0), atol=1e-6)
    assert np.linalg.norm(weighted - x[0]) < 0.5 * np.linalg.norm(plain - x[0])

    # k = 2, two planted clusters: a heavy member moves its cluster's prototype, not the other
    rng = np.random.default_rng(1)
    a, b = unit(rng.standard_normal((2, 16)))
    xa = unit(a + 0.2 * rng.standard_normal((10, 16)))
    xb = unit(b + 0.2 * rng.standard_normal((10, 16)))
    feats = np.concatenate([xa, xb])
    w = np.ones(20)
    w[0] = 50.0
    fw = fit_prototypes(feats, w, k=2, seed=0)
    fu = fit_prototypes(feats, np.ones(20), k=2, seed=0)
    ja_w, ja_u = fw.labels[0], fu.labels[0]
    assert adjusted_rand_index(np.repeat([0, 1], 10), fw.labels) == pytest.approx(1.0)
    assert np.linalg.norm(fw.prototypes[ja_w] - feats[0]) < 0.5 * np.linalg.norm(fu.prototypes[ja_u] - feats[0])
    np.testing.assert_allclose(fw.prototypes[1 - ja_w], fu.prototypes[1 - ja_u], atol=1e-6)
    assert ja_w == 0  # the heavy cluster carries the most weight, so it comes first


def test_fit_prototypes_rejects_bad_weights():
    x = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError):
        fit_prototypes(x, [1.0, 0.0, 1.0], k=2)
    with pytest.raises(ValueError):
        fit_prototypes(x, [1.0, 1.0], k=2)


def test_fill_empty_moves_worst_served_point():
    x = np.array([[0.0, 0.0], [0.1, 0.0], [5.0, 0.0]])
    c = np.array([[0.0, 0.0], [9.0, 9.0]])
    labels = ranking._fill_empty(x, np.ones(3), c, np.zeros(3, np.int64), 2)
    np.testing.assert_array_equal(labels, [0, 0, 1])


# --------------------------------------------------------------------------
# (b) Eq. 2
# --------------------------------------------------------------------------


def test_density_scores_eq2_properties():
    rng = np.random.default_rng(2)
    f = rng.standard_normal((20, 16)).astype(np.float32)
    mu = 0.7 * unit(rng.standard_normal((5, 16)))
    r = density_scores(f, mu)
    assert r.shape == (20, 5) and r.dtype == np.float32
    np.testing.assert_allclose(r.sum(1), 1.0, atol=1e-6)
    dist = np.linalg.norm(unit(f)[:, None] - mu[None], axis=-1)
    np.testing.assert_array_equal(r.argmax(1), dist.argmin(1))
    for perm in ([4, 3, 2, 1, 0], [1, 0, 3, 4, 2]):
        np.testing.assert_allclose(density_scores(f, mu[perm]), r[:, perm], atol=1e-7)
    np.testing.assert_allclose(density_scores(3.0 * f, mu), r, atol=1e-7)  # features are normalised
    np.testing.assert_allclose(density_scores(torch.from_numpy(f), torch.from_numpy(mu)), r, atol=1e-7)


def test_density_scores_values_and_reference_form():
    f = np.array([[1.0, 0.0]])
    mu = np.eye(2)
    # distances 0 and sqrt(2)
    assert density_scores(f, mu)[0, 0] == pytest.approx(1 / (1 + math.exp(-math.sqrt(2))), abs=1e-6)
    # reference logits f.mu - |f|^2 - |mu|^2 = -1 and -2
    assert density_scores(f, mu, form="reference")[0, 0] == pytest.approx(1 / (1 + math.exp(-1)), abs=1e-6)
    with pytest.raises(ValueError):
        density_scores(f, mu, form="squared")

    cluster, density, ranked = ranked_scores(np.array([[1.0, 0.0], [0.1, 1.0]]), [0.5, 0.8], mu)
    np.testing.assert_array_equal(cluster, [0, 1])
    r = density_scores(np.array([[1.0, 0.0], [0.1, 1.0]]), mu)
    np.testing.assert_allclose(density, r.max(1))
    np.testing.assert_allclose(ranked, np.array([0.5, 0.8]) * r.max(1), rtol=1e-6)


# --------------------------------------------------------------------------
# (c) candidates of one object
# --------------------------------------------------------------------------


def candidate_scene():
    """8x10 image, object rows 2-5 x cols 2-7 (24 px), six queries (see the assertions)."""
    h, w = 8, 10
    obj = np.zeros((h, w), bool)
    obj[2:6, 2:8] = True
    m = np.zeros((6, h, w), np.float32)
    s = np.array([0.8, 0.5, 0.9, 0.2, 0.9, 0.99], np.float32)
    m[0, :, 2:5] = 0.9          # q0: 0.72 on cols 2-4
    m[1] = 0.8                  # q1: 0.40 everywhere (outside the object too) ...
    m[1, :, 7] = 0.0            # ... but not col 7
    m[1, 3, 6] = 0.3            # ... and not (3, 6): that pixel stays unassigned
    m[2, 2, 5] = 0.95           # q2: 0.855 on one pixel only: 1/24 < 5 %
    m[3, :, 7] = 1.0            # q3: wins col 7 (4 px) but its score 0.2 is too low
    m[4, 4:6, 5:7] = 0.6        # q4: lower mask than q1 but 0.54 > 0.40: wins 4 px
    m[5] = 0.5                  # q5: not above the mask threshold inside the object ...
    m[5, 0] = 0.95              # ... high outside it: never a candidate
    return m, s, obj


def test_candidates_pixel_winners_and_thresholds():
    m, s, obj = candidate_scene()
    c = candidates(m, s, obj)
    expected = np.full(obj.shape, -1)
    expected[2:6, 2:5] = 0
    expected[[2, 3], [6, 5]] = 1
    expected[4:6, 5:7] = 4
    np.testing.assert_array_equal(c.label_map, expected)
    np.testing.assert_array_equal(c.queries, [0, 1, 4])
    np.testing.assert_array_equal(c.areas, [12, 2, 4])
    np.testing.assert_allclose(c.fractions, np.array([12, 2, 4]) / 24)
    np.testing.assert_allclose(c.scores, [0.8, 0.5, 0.9])
    assert len(c) == 3 and c.segments.shape == (3, 8, 10) and c.segments.dtype == bool
    assert c.segments.sum(0).max() == 1                  # disjoint
    assert not (c.segments & ~obj).any()                 # inside the object
    for q, seg in zip(c.queries, c.segments, strict=True):
        np.testing.assert_array_equal(seg, c.label_map == q)

    # the area threshold: q1's 2 px (8.3 %) fail 10 %
    np.testing.assert_array_equal(candidates(m, s, obj, min_fraction=0.1).queries, [0, 4])
    # the score threshold: q0 (0.8) and q1 (0.5) fail 0.85, q4 (0.9) passes
    np.testing.assert_array_equal(candidates(m, s, obj, score_threshold=0.85).queries, [4])
    # no area threshold: q2's single pixel counts; q3 still fails the score, q5 has no pixel
    np.testing.assert_array_equal(candidates(m, s, obj, min_fraction=0.0).queries, [0, 1, 2, 4])
    # lowering the score threshold lets q3 in
    np.testing.assert_array_equal(candidates(m, s, obj, score_threshold=0.1).queries, [0, 1, 3, 4])
    # the paper's self-training guard: q0's 12 px are half the object, so 0.5 keeps it and 0.4 drops it,
    # and its pixels go to nobody
    np.testing.assert_array_equal(candidates(m, s, obj, max_fraction=0.5).queries, [0, 1, 4])
    dropped = candidates(m, s, obj, max_fraction=0.4)
    np.testing.assert_array_equal(dropped.queries, [1, 4])
    assert (dropped.label_map[2:6, 2:5] == -1).all()


def test_candidates_mask_pixel_rule():
    """'mask': among the queries scoring above the threshold, the surest mask takes the pixel,
    however confident the other query is that it is a part."""
    obj = np.zeros((4, 6), bool)
    obj[:, :] = True
    m = np.zeros((3, 4, 6), np.float32)
    m[0] = 0.6                       # q0: the whole object, unsure everywhere, high score
    m[1, :, :3] = 0.9                # q1: the left half, sure, lower score
    m[2, 0, :] = 0.95                # q2: the top row, surest, but scores under the threshold
    s = np.array([0.9, 0.5, 0.2], np.float32)
    paper = candidates(m, s, obj, score_threshold=0.3, min_fraction=0.0)
    assert (paper.label_map == 0).all(), "M·s: 0.54 beats 0.45 and 0.19, so q0 takes the object"
    by_mask = candidates(m, s, obj, score_threshold=0.3, min_fraction=0.0, pixel_rule="mask")
    expected = np.zeros(obj.shape, int)
    expected[:, :3] = 1
    np.testing.assert_array_equal(by_mask.label_map, expected)  # q2 (score 0.2) takes no pixel
    np.testing.assert_array_equal(by_mask.queries, [0, 1])
    # a pixel only an unscored query covers stays unassigned under both rules
    m2 = m.copy()
    m2[:2, 3, 5] = 0.0
    m2[2, 3, 5] = 0.9
    assert candidates(m2, s, obj, score_threshold=0.3, min_fraction=0.0, pixel_rule="mask").label_map[3, 5] == -1
    with pytest.raises(ValueError, match="pixel_rule"):
        candidates(m, s, obj, pixel_rule="score")


def test_candidates_chunked_torch_and_empty(monkeypatch):
    m, s, obj = candidate_scene()
    ref = candidates(m, s, obj)
    monkeypatch.setattr(ranking, "_CHUNK_ELEMS", 7)  # one row of the box at a time
    c = candidates(torch.from_numpy(m), torch.from_numpy(s), torch.from_numpy(obj))
    np.testing.assert_array_equal(c.label_map, ref.label_map)
    np.testing.assert_array_equal(c.queries, ref.queries)

    empty = candidates(m, s, np.zeros_like(obj))
    assert len(empty) == 0 and empty.segments.shape == (0, 8, 10) and (empty.label_map == -1).all()
    assert len(candidates(m[:0], s[:0], obj)) == 0


# --------------------------------------------------------------------------
# (d) Eq. 1: association by IoU
# --------------------------------------------------------------------------


def test_associate_by_iou():
    objs = np.zeros((2, 10, 10), bool)
    objs[0, 0:5, 0:5] = True    # A: 25 px
    objs[1, 7:10, 7:10] = True  # B: 9 px
    parts = np.zeros((5, 10, 10), np.float32)
    parts[0, 0:2, 0:5] = 0.9                    # inside A
    parts[1, 7:10, 7:10] = 0.9                  # B exactly ...
    parts[1, 0:5, 0:2] = 0.9                    # ... plus 10 px of A: 10 > 9 px overlap, but
    #                                             IoU A = 10/34 < IoU B = 9/19
    parts[2, 0:3, 7:10] = 0.9                   # touches no object
    parts[3, 0:5, 0:5] = 0.4                    # on A, but below the mask threshold: empty
    parts[4] = 0.7                              # whole image: IoU A = 0.25 > IoU B = 0.09
    np.testing.assert_array_equal(associate(parts, objs), [0, 1, -1, -1, 0])
    np.testing.assert_array_equal(associate(parts, objs, mask_threshold=0.3)[3], 0)
    np.testing.assert_array_equal(associate(torch.from_numpy(parts), torch.from_numpy(objs)), [0, 1, -1, -1, 0])

    # a tie goes to the lower object index
    tie = np.zeros((2, 10, 10), bool)
    tie[0, :5] = True
    tie[1, 5:] = True
    np.testing.assert_array_equal(associate(np.ones((1, 10, 10)), tie), [0])
    np.testing.assert_array_equal(associate(parts, objs[:0]), [-1] * 5)


# --------------------------------------------------------------------------
# (e) labelling an object's parts
# --------------------------------------------------------------------------


def test_label_parts_merges_same_cluster_and_keeps_max_score():
    mu = np.eye(4)[:3]
    seg = np.zeros((3, 4, 4), bool)
    seg[0, 0, :] = True
    seg[1, 1, :] = True
    seg[2, 2:, :] = True
    feats = np.array([[1.0, 0.1, 0, 0], [0, 1.0, 0, 0.1], [1.0, 0, 0.2, 0]])
    scores = np.array([0.5, 0.7, 0.9])
    parts = label_parts(seg, feats, scores, mu)
    _, _, ranked = ranked_scores(feats, scores, mu)

    assert [p.cluster_id for p in parts] == [0, 1]
    assert all(isinstance(p, LabelledPart) for p in parts)
    cid, mask, score = parts[0]
    np.testing.assert_array_equal(mask, seg[0] | seg[2])
    assert score == pytest.approx(max(ranked[0], ranked[2]))
    np.testing.assert_array_equal(parts[1].mask, seg[1])
    assert parts[1].score == pytest.approx(ranked[1])
    assert [p.score for p in label_parts(seg, feats, scores, mu, score="proposal")] == pytest.approx([0.9, 0.7])

    assert label_parts(seg[:0], feats[:0], scores[:0], mu) == []
    assert label_parts(seg, feats, scores, mu[:0]) == []


# --------------------------------------------------------------------------
# (f) few proposals
# --------------------------------------------------------------------------


def test_few_proposal_classes():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 8)).astype(np.float32)
    w = np.array([0.5, 0.9, 0.7])
    fit = fit_prototypes(x, w, k=8)
    assert (fit.k_eff, fit.n_candidates, fit.few_proposals) == (3, 3, FEWER_CANDIDATES)
    np.testing.assert_allclose(fit.prototypes[fit.labels], unit(x), atol=1e-6)  # one prototype per candidate
    np.testing.assert_array_equal(fit.labels, [2, 0, 1])                        # ordered by weight
    np.testing.assert_array_equal(density_scores(x, fit.prototypes).argmax(1), fit.labels)

    one = fit_prototypes(x[:1], w[:1], k=8)
    assert (one.k_eff, one.few_proposals) == (1, FEWER_CANDIDATES)
    np.testing.assert_allclose(density_scores(x, one.prototypes), 1.0)

    dup = fit_prototypes(np.repeat(x[:2], 5, axis=0), np.ones(10), k=8)
    assert (dup.k_eff, dup.n_candidates, dup.n_distinct, dup.few_proposals) == (2, 10, 2, FEWER_DISTINCT)
    np.testing.assert_array_equal(dup.cluster_size, [5, 5])

    exact = fit_prototypes(rng.standard_normal((8, 8)), k=8)
    assert (exact.k_eff, exact.few_proposals) == (8, None)

    none = fit_prototypes(np.zeros((0, 8), np.float32), np.zeros(0), k=8)
    assert (none.k_eff, none.n_candidates, none.few_proposals) == (0, 0, NO_CANDIDATES)
    assert none.prototypes.shape == (0, 8) and none.labels.shape == (0,)
    assert density_scores(x, none.prototypes).shape == (3, 0)
    assert label_parts(np.ones((3, 2, 2), bool), x, w, none.prototypes) == []

    rows = ClassRanking.from_fit(7, fit).rows()
    assert [r["cluster"] for r in rows] == [0, 1, 2]
    assert all(r["class_id"] == 7 and r["k_eff"] == 3 and r["few_proposals"] == FEWER_CANDIDATES for r in rows)
    table = pa.Table.from_pylist(rows)
    assert table.num_rows == 3 and len(table["prototype"][0].as_py()) == 8
    empty = ClassRanking.from_fit(9, none)
    assert empty.rows() == [] and empty.few_proposals == NO_CANDIDATES


# --------------------------------------------------------------------------
# (g) determinism
# --------------------------------------------------------------------------


def test_fit_prototypes_is_deterministic_for_a_seed():
    rng = np.random.default_rng(4)
    # overlapping clusters, so the result actually depends on the seeding
    x = rng.standard_normal((300, 16)).astype(np.float32)
    w = rng.uniform(0.3, 1.0, 300)
    fits = [fit_prototypes(x, w, k=8, seed=s) for s in (0, 0, 5)]
    np.testing.assert_array_equal(fits[0].prototypes, fits[1].prototypes)
    np.testing.assert_array_equal(fits[0].labels, fits[1].labels)
    assert fits[0].inertia == fits[1].inertia
    assert fits[2].k_eff == 8  # another seed is a valid fit too
    np.testing.assert_array_equal(fit_prototypes(torch.from_numpy(x), torch.from_numpy(w), seed=0).prototypes,
                                  fits[0].prototypes)
