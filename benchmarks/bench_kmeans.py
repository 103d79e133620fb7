"""Benchmark instance-level K-means backends on the same synthetic problems.

Compares, in one run and on identical inputs:

1. ``numpy-lloyd``: a reference per-instance loop mimicking sklearn
   ``KMeans(n_init=1)`` (greedy k-means++ seeding, Lloyd with sklearn's
   centre-shift ``tol=1e-4``), since sklearn is not a dependency;
2. ``faiss-loop (default)``: per-instance ``faiss.Kmeans`` with faiss'
   defaults (random seeding, trains on at most 256 points per centroid);
3. ``faiss-loop (backend)``: ``kmeans(backend="faiss")`` -- all points,
   k-means++ seeding;
4. ``torch-batched``: ``kmeans(backend="torch")``, the batched default.

Every method's objective is recomputed the same way (float64 sum of squared
distances of each point to its nearest returned centroid), so the mean
objectives are directly comparable.  Prints machine info and a markdown table.

    python benchmarks/bench_kmeans.py --problems 256 --points 2000 --dim 256 --k 4 --iters 20
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from partdistill.models.kmeans import kmeans  # noqa: E402


def make_problems(n_problems: int, n_points: int, dim: int, sep: float, seed: int) -> list[np.ndarray]:
    """Each problem: 2-6 Gaussian "parts" with centres ~ N(0, sep^2 I) plus
    unit noise, i.e. overlapping blobs whose number differs from k."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_problems):
        t = int(rng.integers(2, 7))
        centres = rng.standard_normal((t, dim)) * sep
        z = rng.integers(0, t, n_points)
        out.append((centres[z] + rng.standard_normal((n_points, dim))).astype(np.float32))
    return out


def sse(x: np.ndarray, c: np.ndarray) -> float:
    """Sum of squared distances to the nearest centroid (float64)."""
    xd = x.astype(np.float64)
    cd = c.astype(np.float64)
    d2 = (xd * xd).sum(1)[:, None] - 2 * xd @ cd.T + (cd * cd).sum(1)[None, :]
    lab = d2.argmin(1)
    return float(((xd - cd[lab]) ** 2).sum())


def numpy_lloyd(x: np.ndarray, k: int, iters: int, seed: int, tol: float = 1e-4) -> np.ndarray:
    """sklearn-like KMeans(n_init=1, init="k-means++", algorithm="lloyd")."""
    rng = np.random.default_rng(seed)
    mean = x.mean(0)
    x = x - mean  # sklearn centres the data for precision
    n = len(x)
    x2 = (x * x).sum(1)
    n_trials = 2 + int(math.log(k))
    c = np.empty((k, x.shape[1]), np.float32)
    c[0] = x[rng.integers(n)]
    closest = np.maximum(x2 - 2 * x @ c[0] + c[0] @ c[0], 0)
    for j in range(1, k):
        cand = np.searchsorted(np.cumsum(closest, dtype=np.float64), rng.random(n_trials) * closest.sum())
        cand = np.minimum(cand, n - 1)
        d = np.maximum(x2[None, :] - 2 * x[cand] @ x.T + (x[cand] ** 2).sum(1)[:, None], 0)
        pot = np.minimum(closest[None, :], d)
        best = int(pot.sum(1).argmin())
        closest = pot[best]
        c[j] = x[cand[best]]
    tol_abs = tol * x.var(0).mean()
    lab = None
    for _ in range(iters):
        new = (2 * x @ c.T - (c * c).sum(1)[None, :]).argmax(1)
        if lab is not None and np.array_equal(new, lab):
            break
        lab = new
        new_c = c.copy()
        for j in range(k):
            members = lab == j
            if members.any():
                new_c[j] = x[members].mean(0)
        shift = float(((new_c - c) ** 2).sum())
        c = new_c
        if shift <= tol_abs:
            break
    return c + mean


def faiss_default_loop(xs: list[np.ndarray], k: int, iters: int, seed: int) -> list[np.ndarray]:
    import faiss  # noqa: PLC0415 -- optional dependency

    out = []
    for x in xs:
        km = faiss.Kmeans(x.shape[1], k, niter=iters, seed=seed, verbose=False)
        km.train(x)
        out.append(km.centroids)
    return out


def machine_info() -> list[str]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = [
        f"- CPU: {cpu} ({os.cpu_count()} logical cores)",
        f"- python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}"
        f" (intra-op threads: {torch.get_num_threads()})",
    ]
    try:
        import faiss  # noqa: PLC0415

        info.append(f"- faiss {faiss.__version__} (OpenMP threads: {faiss.omp_get_max_threads()})")
    except ImportError:
        info.append("- faiss: not installed")
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=256)
    ap.add_argument("--points", type=int, default=2000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--sep", type=float, default=0.5, help="std of the planted part centres (noise std is 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1, help="time each method this many times, keep the best")
    ap.add_argument("--skip", nargs="*", default=[], help="method names to skip (e.g. numpy-lloyd)")
    ap.add_argument(
        "--threads", type=int, default=None, help="set torch and faiss thread counts (default: library defaults)"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        try:
            import faiss  # noqa: PLC0415

            faiss.omp_set_num_threads(args.threads)
        except ImportError:
            pass

    xs = make_problems(args.problems, args.points, args.dim, args.sep, args.seed)
    k, iters, seed = args.k, args.iters, args.seed

    methods: dict[str, Callable[[list[np.ndarray]], list[np.ndarray]]] = {
        "numpy-lloyd (sklearn-like)": lambda p: [numpy_lloyd(x, k, iters, seed) for x in p],
        "faiss-loop (faiss defaults)": lambda p: faiss_default_loop(p, k, iters, seed),
        "faiss-loop (backend='faiss')": lambda p: [
            r.centroids for r in kmeans(p, k=k, metric="l2", iters=iters, seed=seed, backend="faiss")
        ],
        "torch-batched (backend='torch')": lambda p: [
            r.centroids for r in kmeans(p, k=k, metric="l2", iters=iters, seed=seed, backend="torch")
        ],
    }

    print("## K-means benchmark\n")
    print(*machine_info(), sep="\n")
    print(
        f"- problems: {args.problems} x ({args.points} points x {args.dim}-d), k={k}, "
        f"max iters={iters}, metric=l2, sep={args.sep}, seed={seed}\n"
    )

    rows = []
    for name, fn in methods.items():
        if any(s in name for s in args.skip):
            continue
        try:
            fn(xs[: min(4, len(xs))])  # warm-up: imports, thread pools, allocator
        except ImportError as e:
            print(f"- skipped {name}: {e}")
            continue
        best = math.inf
        cents: list[np.ndarray] = []
        for _ in range(max(1, args.repeats)):
            t0 = time.perf_counter()
            cents = fn(xs)
            best = min(best, time.perf_counter() - t0)
        obj = float(np.mean([sse(x, c) for x, c in zip(xs, cents, strict=True)]))
        rows.append((name, len(xs) / best, 1e3 * best / len(xs), obj))

    ref_obj = rows[0][3] if rows else math.nan
    faiss_rate = next((r[1] for r in rows if r[0].startswith("faiss-loop (faiss")), math.nan)
    print("| method | instances/s | ms/instance | mean objective | objective vs first row | speed vs faiss defaults |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, rate, ms, obj in rows:
        print(f"| {name} | {rate:,.1f} | {ms:.3f} | {obj:,.2f} | {obj / ref_obj - 1:+.3%} | {rate / faiss_rate:.2f}x |")


if __name__ == "__main__":
    main()
