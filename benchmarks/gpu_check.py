"""The GPU-hot pure-torch paths on CUDA, as one short script for a lent GPU machine.

    PYTHONPATH=. python benchmarks/gpu_check.py [--problems 2048]

Needs only torch and numpy (the lent machine has no mmcv): it imports nothing from the package
that needs mmdet, faiss or pydensecrf. It checks that the batched K-means backend gives the same
partitions on CUDA as on CPU, and times both, then times full-resolution assignment. It prints
a markdown table to paste into BENCHMARKS.md, with the card's name.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from partdistill.models.kmeans import assign, kmeans


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    """ARI from the contingency table (numpy only: the lent machine may lack scipy)."""
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    table = np.zeros((ia.max() + 1, ib.max() + 1))
    np.add.at(table, (ia, ib), 1)

    def pairs(x):
        return (x * (x - 1) / 2).sum()

    index, rows, cols, total = pairs(table), pairs(table.sum(1)), pairs(table.sum(0)), pairs(np.array([len(a)]))
    expected = rows * cols / total
    return float((index - expected) / (0.5 * (rows + cols) - expected))


def problems(n: int, points: int, dim: int, seed: int) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        centres = rng.normal(size=(4, dim)) * 3
        labels = rng.integers(0, 4, points)
        out.append(torch.from_numpy((centres[labels] + rng.normal(size=(points, dim))).astype(np.float32)))
    return out


def timed(fn, device: str) -> tuple[object, float]:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=2048)
    ap.add_argument("--points", type=int, default=2000)
    ap.add_argument("--dim", type=int, default=256)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check is for a GPU machine")
    data = problems(args.problems, args.points, args.dim, seed=0)
    cpu_subset = data[: min(256, len(data))]
    kmeans(cpu_subset[:8], k=4, device="cuda")  # warm-up: CUDA context and kernels
    gpu, t_gpu = timed(lambda: kmeans(data, k=4, metric="cosine", device="cuda"), "cuda")
    cpu, t_cpu = timed(lambda: kmeans(cpu_subset, k=4, metric="cosine", device="cpu"), "cpu")
    agree = [adjusted_rand_index(np.asarray(c.labels.cpu()), np.asarray(g.labels.cpu()))
             for c, g in zip(cpu, gpu, strict=False)]
    pixels = torch.randn(4_000_000, args.dim, device="cuda")
    centroids = torch.randn(4, args.dim, device="cuda")
    _, t_assign = timed(lambda: assign(pixels, centroids, "cosine"), "cuda")
    name = torch.cuda.get_device_name(0)
    print(f"device: {name}; torch {torch.__version__}; "
          f"{args.problems} problems of {args.points} x {args.dim}, k=4, cosine")
    print("| path | problems/s | note |")
    print("|---|---|---|")
    print(f"| torch batched K-means, CUDA | {len(data) / t_gpu:,.0f} | |")
    print(f"| torch batched K-means, CPU ({torch.get_num_threads()} threads) | {len(cpu_subset) / t_cpu:,.0f} | |")
    print(f"| CPU vs CUDA partitions | ARI min {min(agree):.4f}, mean {np.mean(agree):.4f} "
          f"| same seed, first {len(agree)} |")
    print(f"| full-resolution assignment, 4 M pixels, CUDA | {4e6 / t_assign / 1e6:,.1f} M pixels/s | |")
    # object-centric crops: pasting a crop's mask probabilities back is the same on CUDA as on the CPU
    from partdistill.models.object_crops import CropBox, paste_probs

    probs = torch.rand(20, 128, 128)
    box = CropBox(-10, 30, 150, 128)
    cpu_paste = paste_probs(probs, box, (480, 640))
    gpu_paste, t_paste = timed(lambda: paste_probs(probs.cuda(), box, (480, 640)), "cuda")
    diff = float((gpu_paste.cpu() - cpu_paste).abs().max())
    print(f"| crop paste-back, 20 queries into 640x480, CUDA | {1 / t_paste:,.0f} objects/s "
          f"| max |CPU - CUDA| {diff:.1e} |")


if __name__ == "__main__":
    main()
