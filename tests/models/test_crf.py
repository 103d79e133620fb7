import numpy as np
import pytest

from partdistill.models.crf import CRFItem, CRFParams, crf_box, dense_crf, make_pool, refine, refine_many


def _scene(h: int, w: int, seed: int = 0, flip: float = 0.3):
    """A two-colour object (red left half = part 0, blue right half = part 1) on grey, with a
    strip of the same red just outside the mask on the left (where a CRF would grow part 0),
    and a label map with ``flip`` of the object's labels swapped."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    obj = (yy >= 8) & (yy < h - 8) & (xx >= 10) & (xx < w - 10)
    left = obj & (xx < w // 2)
    img = np.full((h, w, 3), 128, np.int64)
    img[left] = (220, 40, 40)
    img[obj & ~left] = (40, 40, 220)
    img[8:h - 8, :10] = (220, 40, 40)
    img = np.clip(img + rng.integers(-10, 11, img.shape), 0, 255).astype(np.uint8)
    truth = np.full((h, w), -1, np.int16)
    truth[left], truth[obj & ~left] = 0, 1
    noisy = truth.copy()
    swap = obj & (rng.random((h, w)) < flip)
    noisy[swap] = 1 - noisy[swap]
    return img, obj, truth, noisy


@pytest.mark.parametrize("shape", [(50, 80), (80, 50)])
def test_crf_cleans_labels_on_non_square_images(shape):
    img, obj, truth, noisy = _scene(*shape)
    out = refine(img, noisy, obj, n_parts=2)
    assert out.shape == shape and out.dtype == np.int16
    before, after = (noisy[obj] == truth[obj]).mean(), (out[obj] == truth[obj]).mean()
    assert before < 0.75 and after > 0.95, (before, after)
    # the bare CRF grows part 0 into the red strip outside the object: the clamp is what stops it
    assert (dense_crf(img, noisy, 2)[~obj] >= 0).sum() > 0
    assert not (out[~obj] >= 0).any()
    assert set(np.unique(out).tolist()) <= {-1, 0, 1}


def test_crf_runs_on_a_crop_around_the_object():
    img, obj, truth, noisy = _scene(50, 80)
    assert crf_box(obj, 16) == (0, 50, 0, 80) and crf_box(obj, 2) == (6, 44, 8, 72)
    assert crf_box(np.zeros((5, 7), bool), 16) is None
    # the same object in a much larger image: same result on the object, nothing elsewhere
    big = np.zeros((300, 400, 3), np.uint8)
    big[100:150, 200:280] = img
    bmask = np.zeros((300, 400), bool)
    bmask[100:150, 200:280] = obj
    blabels = np.full((300, 400), -1, np.int16)
    blabels[100:150, 200:280] = noisy
    out = refine(big, blabels, bmask, 2)
    assert not (out[~bmask] >= 0).any()
    assert (out[bmask] == truth[obj]).mean() > 0.95


def test_crf_edge_cases():
    img, obj, truth, noisy = _scene(50, 80)
    empty = np.zeros_like(obj)
    assert (refine(img, np.full(obj.shape, -1, np.int16), empty, 2) == -1).all()
    with pytest.raises(TypeError, match="uint8"):
        refine(img.astype(np.float32) / 255, noisy, obj, 2)
    with pytest.raises(ValueError, match="image must be"):
        refine(img[:, :40], noisy, obj, 2)
    with pytest.raises(ValueError, match="labels must lie"):
        refine(img, noisy + 3, obj, 2)
    with pytest.raises(ValueError, match="gt_prob"):
        CRFParams(gt_prob=1.0)
    p = CRFParams.from_config({"gt_prob": 0.6, "gaussian": {"sxy": 2}, "bilateral": {"srgb": 5}, "iterations": 3})
    assert (p.gt_prob, p.gaussian_sxy, p.gaussian_compat, p.bilateral_srgb, p.bilateral_sxy, p.iterations) == (
        0.6, 2.0, 3.0, 5.0, 20.0, 3)


def test_refine_many_is_ordered_and_process_independent():
    items = []
    for i, shape in enumerate([(50, 80), (80, 50), (40, 60), (64, 64), (50, 80), (90, 45)]):
        img, obj, _, noisy = _scene(*shape, seed=i)
        items.append(CRFItem(img, noisy, obj, 2))
    items.insert(2, CRFItem(items[0].image, np.full((50, 80), -1, np.int16), np.zeros((50, 80), bool), 2))
    one = refine_many(items, processes=1)
    two = refine_many(items, processes=2)
    assert len(one) == len(two) == len(items)
    for item, a, b in zip(items, one, two, strict=True):
        assert a.shape == item.labels.shape
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, refine(item.image, item.labels, item.mask, item.n_parts))
    pool = make_pool(2)
    try:  # a reused pool gives the same again
        for a, b in zip(one, refine_many(items, executor=pool), strict=True):
            np.testing.assert_array_equal(a, b)
    finally:
        pool.shutdown()
    assert make_pool(1) is None


def test_pool_workers_die_with_a_killed_parent():
    """A mining run killed with SIGKILL must not leave its CRF workers waiting forever."""
    import subprocess
    import sys
    import time

    code = ("import os, sys; from partdistill.models.crf import make_pool\n"
            "pool = make_pool(2); list(pool.map(abs, range(4)))\n"
            "print(*[p.pid for p in pool._processes.values()], flush=True)\n"
            "os.kill(os.getpid(), 9)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9
    pids = [int(p) for p in proc.stdout.split()]
    assert len(pids) == 2

    def alive(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split()[2] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids), "pool workers outlived their killed parent"
