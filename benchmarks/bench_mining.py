"""Instance-level K-means for part mining: the sklearn reference, faiss loops and the batched torch
backend on the same instances; and (``--scale``) the mining stage's peak memory against data size.

    python benchmarks/bench_mining.py --store /tmp/ablation-store   # Parts World val features
    python benchmarks/bench_mining.py --synthetic                   # 256 problems of 2000 x 256-d
    python benchmarks/bench_mining.py --scale --store /tmp/ablation-store

Default mode: the problems are what the `mining` stage clusters, the stride-8 feature cells inside
each ground-truth object of Parts World val (``instances.source='gt'``, the config's `features`;
the demo trains its teacher once into the store). Methods, in one run on identical inputs:

1. reference: a loop of ``sklearn.cluster.KMeans(n_clusters=k, random_state=0, n_init=1)``;
2. ``kmeans(backend="faiss")``, a per-instance faiss loop, with faiss' default subsampling
   (at most 256 points per centroid) and with all points;
3. ``kmeans(backend="torch")``, the batched default the stage uses.

For ``metric='cosine'`` every method clusters L2-normalised features (sklearn then runs Euclidean
K-means on the unit sphere, which is the reference's approximation of spherical K-means). The
objective is recomputed here for every method from its returned labels and centroids, in float64:
cosine ``sum_i (1 - cos(x_i, c_{l_i}))``, l2 ``sum_i ||x_i - c_{l_i}||^2``; lower is better.

``--scale``: peak RSS of the `mining` stage, run alone (``partdistill run --only mining``) in a
child process, read from ``os.wait4``, at 1x, 4x and 16x the demo's image count. Inputs come from
ground-truth objects and ImageNet EfficientNet-Lite0 features, so no teacher is trained. Mining
works shard by shard (``mining.shard_instances``), so its peak should not grow with the data.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from partdistill.config import load_config, parse_options
from partdistill.models.kmeans import kmeans
from partdistill.pipeline import plan, run_pipeline, store_for

REPO = Path(__file__).resolve().parents[1]
SPLIT = "val"
GT_OBJECTS = {"instances.source": "gt", "instances.splits": [SPLIT], "instances.min_object_fraction": 0.0}
# --scale: no teacher at all (GT objects, an ImageNet backbone's features), every split
NO_TEACHER = {"instances.source": "gt", "features.extractor": "efficientnet_lite0",
              "features.layers": ["res2", "res3", "res4"], "features.normalize": True}

# (labels (n,), centroids (k, d)) per instance
Solver = Callable[[list[np.ndarray]], list[tuple[np.ndarray, np.ndarray]]]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    parts = [f"{cpu}, {os.cpu_count()} logical cores", f"python {platform.python_version()}",
             f"numpy {np.__version__}", f"torch {torch.__version__} ({torch.get_num_threads()} threads)"]
    try:
        import sklearn

        parts.append(f"scikit-learn {sklearn.__version__}")
    except ImportError:
        pass
    try:
        import faiss

        parts.append(f"faiss {faiss.__version__} ({faiss.omp_get_max_threads()} OpenMP threads)")
    except ImportError:
        pass
    return "; ".join(parts)


def header(args_line: str) -> None:
    print(f"`{args_line}` — {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(f"machine: {machine()}")
    print()


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], Path.cwd())] + sys.argv[1:])


def load_cfg(config: str, store: str | None, options: dict) -> dict:
    cfg = load_config(config, options)
    if store:
        cfg["runtime"]["store"] = store
    return cfg


# --- problems ---------------------------------------------------------------------------------


def synthetic_problems(n: int, points: int, dim: int, seed: int = 0) -> list[np.ndarray]:
    """Each problem: 2-6 overlapping Gaussian "parts" (centres ~ N(0, 0.5^2 I), unit noise), so
    the number of true groups rarely equals k, as with real objects."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        t = int(rng.integers(2, 7))
        centres = rng.standard_normal((t, dim)) * 0.5
        out.append((centres[rng.integers(0, t, points)] + rng.standard_normal((points, dim))).astype(np.float32))
    return out


def partsworld_problems(cfg: dict) -> tuple[list[np.ndarray], str]:
    """The in-mask stride-8 cells of every val instance, as the mining stage clusters them."""
    from partdistill.models.part_mining import ObjectFeatures, cell_features
    from partdistill.stages.features import FeatureReader, instance_mask
    from partdistill.stages.instances import read_instances

    out = {o.stage: o for o in run_pipeline(cfg, store_for(cfg), until="features")}
    store = store_for(cfg)
    reader = FeatureReader(store.open("features", out["features"].version))
    rows = [r for r in read_instances(store.open("instances", out["instances"].version)).to_pylist()
            if r["split"] == SPLIT]
    xs = []
    for r in sorted(rows, key=lambda r: r["instance_id"]):
        mask = instance_mask(r)
        if not mask.any() or r["instance_id"] not in reader.index:
            continue
        grid, meta = reader.get(r["instance_id"])
        obj = ObjectFeatures(grid, mask, int(meta["grid_y0"]), int(meta["grid_x0"]), float(meta["stride"]),
                             (float(meta["scale_y"]), float(meta["scale_x"])))
        xs.append(cell_features(obj).numpy())
    what = (f"Parts World {SPLIT}: in-mask stride-8 cells of {len(xs)} GT objects, features "
            f"`{cfg['features']['extractor']}` {'+'.join(cfg['features']['layers'])}"
            + (f" (teacher {out['teacher'].version})" if "teacher" in out else ""))
    return xs, what


# --- methods ----------------------------------------------------------------------------------


def normalized(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def objective(x: np.ndarray, labels: np.ndarray, centroids: np.ndarray, metric: str) -> float:
    """From the returned labels and centroids, float64: cosine sum(1 - cos), l2 sum of squares."""
    xd = x.astype(np.float64)
    cd = np.asarray(centroids, np.float64)[np.asarray(labels, np.int64)]
    if metric == "cosine":
        return float((1.0 - (normalized(xd) * normalized(cd)).sum(1)).sum())
    return float(((xd - cd) ** 2).sum())


def methods(k: int, metric: str, iters: int, seed: int) -> dict[str, Solver]:
    from sklearn.cluster import KMeans

    def reference(xs: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        for x in xs:
            # spherical K-means as the reference approximates it: Euclidean K-means on unit vectors
            km = KMeans(n_clusters=k, random_state=0, n_init=1).fit(normalized(x) if metric == "cosine" else x)
            out.append((km.labels_, km.cluster_centers_))
        return out

    def ours(backend: str, **kw) -> Solver:
        def solve(xs: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
            res = kmeans(xs, k=k, metric=metric, iters=iters, seed=seed, backend=backend, **kw)
            return [(np.asarray(r.labels), np.asarray(r.centroids)) for r in res]
        return solve

    return {
        f"reference: sklearn KMeans(n_clusters={k}, random_state=0, n_init=1) loop": reference,
        "faiss loop, faiss' subsampling (256 points / centroid)": ours("faiss", max_points_per_centroid=256),
        "faiss loop, all points (backend='faiss')": ours("faiss"),
        "torch batched (backend='torch', the stage's)": ours("torch"),
    }


def bench(xs: list[np.ndarray], k: int, metric: str, iters: int, seed: int, repeats: int
          ) -> list[tuple[str, float, float]]:
    rows = []
    for name, solve in methods(k, metric, iters, seed).items():
        try:
            solve(xs[: min(4, len(xs))])  # warm-up: imports, thread pools, the allocator
        except ImportError as err:
            print(f"skipped {name}: {err}", file=sys.stderr)
            continue
        best, res = math.inf, []
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            res = solve(xs)
            best = min(best, time.perf_counter() - start)
        obj = float(np.mean([objective(x, lab, c, metric) for x, (lab, c) in zip(xs, res, strict=True)]))
        rows.append((name, len(xs) / best, obj))
        print(f"  {name}: {best:.2f} s", file=sys.stderr, flush=True)
    return rows


def set_threads(n: int) -> None:
    """One thread count for torch, faiss and sklearn (OpenMP / BLAS): on a small shared machine a
    library's spinning OpenMP workers can cost more than its parallelism gains, so the comparison
    is only fair at an equal, stated count."""
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(n)
    threadpool_limits(limits=n)
    try:
        import faiss

        faiss.omp_set_num_threads(n)
    except ImportError:
        pass


def kmeans_mode(args: argparse.Namespace) -> None:
    if args.threads:
        set_threads(args.threads)
    cfg = load_cfg(args.config, args.store, {**GT_OBJECTS, **parse_options(args.cfg_options)})
    mcfg = cfg["mining"]
    metric = args.metric or mcfg["metric"]
    if args.synthetic:
        xs = synthetic_problems(args.problems, args.points, args.dim, args.seed)
        what = f"synthetic: {len(xs)} problems of {args.points} points x {args.dim}-d (2-6 overlapping blobs each)"
    else:
        xs, what = partsworld_problems(cfg)
    small = sum(len(x) < args.k for x in xs)
    # sklearn refuses n < k; those instances are trivial (one cluster per point) for every method
    xs = [x for x in xs if len(x) >= args.k]
    sizes = np.array([len(x) for x in xs])
    # Parts World val is ~100 small problems: best of 3 damps the noise of a shared machine
    repeats = args.repeats or (1 if args.synthetic else 3)
    rows = bench(xs, args.k, metric, int(mcfg["iters"]), int(mcfg["seed"]), repeats)
    header(command_line())
    print(f"{what}; {len(xs)} problems (points per problem: median {int(np.median(sizes))}, max {sizes.max()}, "
          f"{xs[0].shape[1]}-d{f'; {small} with fewer than k points left out' if small else ''}); k={args.k}, "
          f"metric={metric}, at most {mcfg['iters']} iterations for ours (sklearn: its defaults, 300 / tol 1e-4); "
          f"best of {repeats} timing{'s' if repeats > 1 else ''}")
    print()
    ref_rate, ref_obj = rows[0][1], rows[0][2]
    print("| method | instances/s | speed-up vs reference | mean objective | objective / reference's |")
    print("|---|---:|---:|---:|---:|")
    for name, rate, obj in rows:
        print(f"| {name} | {rate:.1f} | {rate / ref_rate:.1f}x | {obj:.4g} | {obj / ref_obj:.4f} |")


# --- --scale ----------------------------------------------------------------------------------


def scale_mode(args: argparse.Namespace) -> None:
    user = parse_options(args.cfg_options)
    base = load_cfg(args.config, args.store, {**NO_TEACHER, **user})
    demo_images = int(base["data"]["partsworld"]["images"])
    rows = []
    for factor in args.factors:
        images = demo_images * factor
        options = {**NO_TEACHER, **user, "data.partsworld.images": images}
        cfg = load_cfg(args.config, args.store, options)
        store = store_for(cfg)
        start = time.perf_counter()
        run_pipeline(cfg, store, until="features")
        print(f"  {images} images: inputs ready in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        planned = {p.name: p for p in plan(cfg)}
        # a scratch store with the inputs linked in, so that mining is computed, never reused
        scratch = Path(tempfile.mkdtemp(prefix="bench-mining-"))
        try:
            for up in planned["mining"].inputs:
                (scratch / up).mkdir(parents=True)
                os.symlink(store.path(up, planned[up].version), scratch / up / planned[up].version)
            cmd = [sys.executable, "-m", "partdistill", "run", args.config, "--only", "mining", "--engine", "local",
                   "--store", str(scratch)] + [x for key, value in options.items()
                                                for x in ("-o", f"{key}={value!r}")]
            start = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            # stderr is drained only after the child ends: keep the rich progress bar out of the pipe
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - start
            manifest_path = scratch / "mining" / planned["mining"].version / "manifest.json"
            if status != 0 or not manifest_path.exists():
                sys.exit(f"mining at {images} images failed (wait status {status}):\n"
                         f"{proc.stderr.read().decode()[-3000:]}")
            manifest = json.loads(manifest_path.read_text())
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        s = manifest["summary"]
        shards = -(-s["instances"] // int(cfg["mining"]["shard_instances"]))
        rows.append((factor, images, s, shards, wall, usage.ru_maxrss / 1024))
        print(f"  {images} images: mining {wall:.0f} s, peak RSS {usage.ru_maxrss / 1024:.0f} MiB", file=sys.stderr,
              flush=True)
    # the fixed part of any mining process: the interpreter with what the stage imports
    probe = subprocess.Popen([sys.executable, "-c", "import partdistill.cli, partdistill.stages.mining, "
                              "partdistill.models.crf, partdistill.storage, torch, pyarrow.parquet, zarr"])
    _, _, usage = os.wait4(probe.pid, 0)
    imports_mib = usage.ru_maxrss / 1024

    header(command_line())
    crf = base["mining"]["crf"]["enabled"]
    print(f"`mining` alone in a child process (`partdistill run CONFIG --only mining --engine local`), peak RSS "
          f"from os.wait4 (the largest process of its tree: the stage and its {base['runtime']['num_workers']} CRF "
          f"workers); Parts World, train+val, GT objects, EfficientNet-Lite0 res2+res3+res4 features (normalised); "
          f"k={base['mining']['k']}, CRF {'on' if crf else 'off'}, shards of {base['mining']['shard_instances']} "
          f"instances. Interpreter + the stage's imports alone: {imports_mib:.0f} MiB.")
    print()
    print("| data | images | instances | parts | shards | mining wall s | instances/s | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for factor, images, s, shards, wall, rss in rows:
        print(f"| {factor}x | {images} | {s['instances']} | {s['parts']} | {shards} | {wall:.1f} | "
              f"{s['instances'] / wall:.1f} | {rss:.0f} |")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "demo_partsworld.py"))
    ap.add_argument("--store", default=None, help="artifact store root (default: the config's runtime.store)")
    ap.add_argument("--synthetic", action="store_true", help="synthetic problems instead of Parts World features")
    ap.add_argument("--problems", type=int, default=256)
    ap.add_argument("--points", type=int, default=2000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--metric", default=None, help="default: the config's mining.metric")
    ap.add_argument("--repeats", type=int, default=None,
                    help="time each method this many times, keep the best (default: 3, --synthetic: 1)")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for torch, faiss and sklearn alike (default: each library's own default)")
    ap.add_argument("--scale", action="store_true", help="peak RSS of the mining stage at growing data sizes")
    ap.add_argument("--factors", type=int, nargs="+", default=[1, 4, 16], help="--scale: multiples of the demo")
    ap.add_argument("-o", "--cfg-options", action="append", default=[], help="key=value config override")
    args = ap.parse_args(argv)
    (scale_mode if args.scale else kmeans_mode)(args)


if __name__ == "__main__":
    main()
