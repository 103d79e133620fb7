"""Tests for partdistill.models.kmeans (torch and faiss backends)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from partdistill.evaluation.metrics import adjusted_rand_index
from partdistill.models.kmeans import KMeansResult, assign, kmeans

needs_faiss = pytest.mark.skipif(importlib.util.find_spec("faiss") is None, reason="faiss not installed")
BACKENDS = ["torch", pytest.param("faiss", marks=needs_faiss)]


def planted(n: int, d: int = 32, k: int = 4, seed: int = 0, spread: float = 8.0) -> tuple[np.ndarray, np.ndarray]:
    """``k`` well separated Gaussian blobs; returns features and true labels."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, d)) * spread
    z = rng.integers(0, k, n)
    z[: min(k, n)] = np.arange(min(k, n))  # every blob present
    return (centers[z] + rng.standard_normal((n, d))).astype(np.float32), z


def l2_objective(x: np.ndarray, c: np.ndarray, lab: np.ndarray) -> float:
    return float(((x.astype(np.float64) - c.astype(np.float64)[lab]) ** 2).sum())


def lloyd_reference(x: np.ndarray, c: np.ndarray, iters: int) -> tuple[np.ndarray, np.ndarray]:
    """Plain float64 Lloyd from given centroids, stopping at the fixed point."""
    x = x.astype(np.float64)
    c = c.astype(np.float64).copy()
    lab = None
    for _ in range(iters):
        new = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
        if lab is not None and np.array_equal(new, lab):
            break
        lab = new
        for j in range(len(c)):
            if (lab == j).any():
                c[j] = x[lab == j].mean(0)
    lab = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
    return c, lab


@needs_faiss
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_both_backends_recover_planted_partition(metric: str):
    # Sizes exercise the coarse-to-fine path (> 512 points) and plain seeding.
    data = [planted(n, seed=s) for s, n in enumerate([1500, 300, 800, 120])]
    feats = [x for x, _ in data]
    res_t = kmeans(feats, k=4, metric=metric, backend="torch")
    res_f = kmeans(feats, k=4, metric=metric, backend="faiss")
    for (_, z), rt, rf in zip(data, res_t, res_f, strict=True):
        assert adjusted_rand_index(z, rt.labels) >= 0.99
        assert adjusted_rand_index(z, rf.labels) >= 0.99
        assert rt.objective == pytest.approx(rf.objective, rel=0.01)


def test_objective_definitions_match_direct_computation():
    x, _ = planted(600, seed=3)
    for metric in ("l2", "cosine", "dot"):
        r = kmeans([x], k=4, metric=metric)[0]
        xd = x.astype(np.float64)
        cd = r.centroids.astype(np.float64)[r.labels]
        if metric == "l2":
            direct = l2_objective(x, r.centroids, r.labels)
        elif metric == "cosine":
            xn = xd / np.linalg.norm(xd, axis=1, keepdims=True)
            direct = float((1 - (xn * cd).sum(1)).sum())
            np.testing.assert_allclose(np.linalg.norm(r.centroids, axis=1), 1.0, rtol=1e-5)
        else:
            direct = -float((xd * cd).sum())
        assert r.objective == pytest.approx(direct, rel=1e-4, abs=1e-3)


def test_torch_backend_is_exact_lloyd():
    # Same seeding as the implementation's "farthest" init, then a plain
    # float64 Lloyd: bounds, incremental sums and early stopping must not
    # change a single label.
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((400, 8)) + rng.integers(0, 3, (400, 1)) * 1.5).astype(np.float32)
    seed, k = 5, 4
    r = kmeans([x], k=k, metric="l2", seed=seed, init="farthest", coarse_points=None, tol=0.0, iters=50)[0]
    gen = torch.Generator().manual_seed(seed)
    first = int(torch.rand(1, generator=gen, dtype=torch.float64).item() * len(x))
    xd = x.astype(np.float64)
    c = [xd[first]]
    closest = ((xd - c[0]) ** 2).sum(1)
    for _ in range(1, k):
        c.append(xd[closest.argmax()])
        closest = np.minimum(closest, ((xd - c[-1]) ** 2).sum(1))
    c_ref, lab_ref = lloyd_reference(x, np.stack(c), 50)
    np.testing.assert_array_equal(r.labels, lab_ref)
    np.testing.assert_allclose(r.centroids, c_ref, atol=1e-4)


def test_deterministic_for_a_seed():
    feats = [planted(n, seed=s, spread=1.0)[0] for s, n in enumerate([900, 200, 60])]
    a = kmeans(feats, k=4, metric="cosine", seed=3)
    b = kmeans(feats, k=4, metric="cosine", seed=3)
    for ra, rb in zip(a, b, strict=True):
        np.testing.assert_array_equal(ra.labels, rb.labels)
        np.testing.assert_array_equal(ra.centroids, rb.centroids)
        assert ra.objective == rb.objective


@pytest.mark.parametrize("max_batch_elems", [1 << 23, 60_000])
def test_ragged_batch_equals_solving_each_alone(max_batch_elems: int):
    sizes = [1300, 7, 0, 450, 3, 90, 700]
    feats = [planted(n, seed=s, spread=1.5)[0] if n else np.zeros((0, 32), np.float32) for s, n in enumerate(sizes)]
    batch = kmeans(feats, k=4, metric="l2", seed=1, max_batch_elems=max_batch_elems)
    for f, rb in zip(feats, batch, strict=True):
        ra = kmeans([f], k=4, metric="l2", seed=1)[0]
        np.testing.assert_array_equal(rb.labels, ra.labels)
        np.testing.assert_allclose(rb.centroids, ra.centroids, rtol=1e-5, atol=1e-5)
        assert rb.objective == pytest.approx(ra.objective, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_few_and_zero_points(backend: str):
    rng = np.random.default_rng(0)
    feats = [np.zeros((0, 5), np.float32), rng.standard_normal((2, 5)).astype(np.float32), np.ones((6, 5), np.float32)]
    res = kmeans(feats, k=4, metric="l2", backend=backend)
    assert res[0].centroids.shape == (0, 5) and res[0].labels.shape == (0,) and res[0].objective == 0.0
    assert res[1].centroids.shape == (2, 5)
    assert sorted(res[1].labels.tolist()) == [0, 1]
    assert res[1].objective == pytest.approx(0.0)
    # 6 identical points, k=4: no crash, everything in one place, objective 0
    assert res[2].centroids.shape == (4, 5) and res[2].labels.shape == (6,)
    assert res[2].objective == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("metric", ["cosine", "l2", "dot"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_metrics_run_and_assign_agrees(metric: str, backend: str):
    feats = [planted(n, seed=s, spread=1.0)[0] for s, n in enumerate([700, 150])]
    res = kmeans(feats, k=4, metric=metric, backend=backend)
    for f, r in zip(feats, res, strict=True):
        assert isinstance(r, KMeansResult)
        assert r.centroids.dtype == np.float32 and r.centroids.shape == (4, 32)
        assert r.labels.dtype == np.int64 and r.labels.shape == (len(f),)
        np.testing.assert_array_equal(assign(f, r.centroids, metric), r.labels)


def test_tensor_in_tensor_out_and_iters_zero():
    x = torch.from_numpy(planted(300)[0])
    r = kmeans([x], k=3, metric="l2", iters=0)[0]
    assert isinstance(r.centroids, torch.Tensor) and isinstance(r.labels, torch.Tensor)
    assert r.n_iter == 0
    # labels are the assignment to the (seeded) centroids
    assert torch.equal(assign(x, r.centroids, "l2"), r.labels)
    assert r.objective == pytest.approx(l2_objective(x.numpy(), r.centroids.numpy(), r.labels.numpy()), rel=1e-4)


def test_assign_full_resolution_dot_and_cosine():
    c = np.array([[1.0, 0.0], [0.0, 10.0]], np.float32)
    x = np.array([[2.0, 1.0], [1.0, 0.05]], np.float32)
    # dot: [2, 10] and [1, 0.5]; cosine prefers the direction
    np.testing.assert_array_equal(assign(x, c, "dot"), [1, 0])
    np.testing.assert_array_equal(assign(x, c, "cosine"), [0, 0])
    np.testing.assert_array_equal(assign(x, c, "l2"), [0, 0])


def test_invalid_arguments():
    x = np.zeros((10, 3), np.float32)
    with pytest.raises(ValueError):
        kmeans([x], metric="manhattan")
    with pytest.raises(ValueError):
        kmeans([x], backend="sklearn")
    with pytest.raises(ValueError):
        kmeans([x, np.zeros((4, 2), np.float32)])
    assert kmeans([]) == []
