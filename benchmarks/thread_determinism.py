"""Which files change when a training stage runs with another torch thread count, and by how much.

    .venv/bin/python benchmarks/thread_determinism.py [--threads 1 2 3] [--work /tmp/thread-determinism]

Every stage is bit-reproducible when rerun on the same machine (the fault sweep checks it), and
sharded work runs with ``runtime.shard_threads`` (1) threads wherever it runs. Training stages
use torch's thread count, which on another machine is another number, and a float sum split over
another number of threads is added in another order. This measures what that changes.

1. The fault suite's tiny run (tests/faults/harness.py) is built once, in this process.
2. Each training stage (teacher, proposals_r1, distill_r1) is rerun from that run's inputs in a
   child process with N torch threads (``torch.set_num_threads``): first with the reference's own thread count (the
   control, which must give the same bytes), then with each other N.
3. Its files are compared with the reference by sha256. For a differing checkpoint, the largest
   absolute and relative difference over its float tensors; for a differing JSON file, the
   largest difference over its numbers; for a Parquet table, its rows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.faults.harness import TRAINING, build_base, differing_files, linked_inputs  # noqa: E402


def numbers(obj: Any, prefix: str = "") -> dict[str, float]:
    """Every number in a JSON value, by its path."""
    if isinstance(obj, bool):
        return {}
    if isinstance(obj, int | float):
        return {prefix: float(obj)}
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in numbers(val, f"{prefix}.{key}").items()}
    if isinstance(obj, list):
        return {k: v for i, val in enumerate(obj) for k, v in numbers(val, f"{prefix}[{i}]").items()}
    return {}


def tensors(obj: Any, prefix: str = "") -> dict[str, Any]:
    import torch

    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in tensors(val, f"{prefix}.{key}").items()}
    if isinstance(obj, list | tuple):
        return {k: v for i, val in enumerate(obj) for k, v in tensors(val, f"{prefix}[{i}]").items()}
    return {}


def describe(ours: Path, theirs: Path) -> str:
    """How two versions of one file differ."""
    if ours.suffix in (".pth", ".pt"):
        import torch

        a = tensors(torch.load(ours, map_location="cpu", weights_only=True))
        b = tensors(torch.load(theirs, map_location="cpu", weights_only=True))
        worst_abs, changed, total, diff_sq, ref_sq = 0.0, 0, 0, 0.0, 0.0
        for k in sorted(set(a) & set(b)):
            if not a[k].is_floating_point() or a[k].shape != b[k].shape or not a[k].numel():
                continue
            diff = (a[k].double() - b[k].double()).abs()
            total += diff.numel()
            changed += int((diff > 0).sum())
            worst_abs = max(worst_abs, float(diff.max()))
            diff_sq += float((diff ** 2).sum())
            ref_sq += float((b[k].double() ** 2).sum())
        return (f"{changed:,} of {total:,} float values differ; max abs. difference {worst_abs:.3g}; "
                f"‖Δ‖ / ‖w‖ = {(diff_sq / ref_sq) ** 0.5 if ref_sq else 0:.3g}")
    if ours.suffix == ".json":
        a, b = numbers(json.loads(ours.read_text())), numbers(json.loads(theirs.read_text()))
        diffs = {k: abs(a[k] - b[k]) for k in set(a) & set(b) if a[k] != b[k]}
        if not diffs:
            return "same numbers; other text"
        worst = max(diffs, key=diffs.get)
        return (f"{len(diffs)} of {len(a)} numbers differ; largest difference {diffs[worst]:.3g} "
                f"(at {worst.lstrip('.')}, value {b[worst]:.6g})")
    if ours.suffix == ".parquet":
        import pyarrow.parquet as pq

        ta, tb = pq.read_table(ours), pq.read_table(theirs)
        if ta.num_rows != tb.num_rows or ta.column_names != tb.column_names:
            return f"{ta.num_rows} vs {tb.num_rows} rows; columns {ta.column_names} vs {tb.column_names}"
        said = []
        for name in ta.column_names:
            x, y = ta.column(name).to_pylist(), tb.column(name).to_pylist()
            pairs = [(u, v) for u, v in zip(x, y, strict=True) if u != v]
            if not pairs:
                continue
            said.append(f"{name}: {len(pairs)} row(s){column_difference(name, pairs, ta)}")
        return f"{ta.num_rows} rows; differ in " + "; ".join(said) if said else f"{ta.num_rows} rows; equal values"
    return f"{ours.stat().st_size:,} vs {theirs.stat().st_size:,} bytes"


def column_difference(name: str, pairs: list[tuple[Any, Any]], table: Any) -> str:
    """The size of the differences in one column: numbers, vectors, or masks (pixels)."""
    if name == "rle":
        from pycocotools import mask as mask_utils

        h, w = table.column("height")[0].as_py(), table.column("width")[0].as_py()
        pixels = [int((mask_utils.decode({"size": [h, w], "counts": u.encode()})
                       != mask_utils.decode({"size": [h, w], "counts": v.encode()})).sum()) for u, v in pairs]
        return f", at most {max(pixels)} pixel(s) of a mask"
    flat = [(a, b) for u, v in pairs for a, b in (zip(u, v, strict=True) if isinstance(u, list) else [(u, v)])
            if isinstance(a, int | float) and isinstance(b, int | float)]
    if flat:
        return f", max abs. difference {max(abs(a - b) for a, b in flat):.3g}"
    return ""


def run_stage(base: Path, work: Path, cfg: dict[str, Any], stage: str, threads: int) -> tuple[Path, str, float]:
    """The stage rerun from the base's inputs in a child with ``threads`` torch threads: its
    artifact folder, the thread count torch used there, and its seconds."""
    shutil.rmtree(work, ignore_errors=True)
    root = work / "store"
    linked_inputs(base, root, stage)
    cfg_file = work / "cfg.json"
    cfg_file.write_text(json.dumps({**cfg, "runtime": {**cfg["runtime"], "store": str(root)}}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    env.pop("PARTDISTILL_KILL_AT", None)
    code = ("import json, sys, torch\n"
            "from partdistill.pipeline import run_pipeline\n"
            "from partdistill.storage import ArtifactStore\n"
            "torch.set_num_threads(int(sys.argv[4]))  # OMP_NUM_THREADS alone is capped at the core count\n"
            "print('threads', torch.get_num_threads(), flush=True)\n"
            "[o] = run_pipeline(json.load(open(sys.argv[1])), ArtifactStore(sys.argv[2]), only=sys.argv[3])\n"
            "print('version', o.version, flush=True)\n")
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code, str(cfg_file), str(root), stage, str(threads)], env=env, cwd=REPO,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{stage} with {threads} thread(s) failed:\n{out.stderr[-3000:]}")
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.startswith(("threads", "version")))
    return root / stage / lines["version"], lines["threads"], time.monotonic() - start


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides on top of the tiny run, e.g. proposals.max_iters=100")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="thread-determinism-"))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    start = time.monotonic()
    print(f"reference: the fault suite's tiny run, in this process with {torch.get_num_threads()} torch "
          f"thread(s) ({os.cpu_count()} cores)", flush=True)
    from partdistill.config import parse_options

    overrides = parse_options(args.set)
    if overrides:
        print(f"overrides: {overrides}", flush=True)
    cfg, reference, _ = build_base(work / "base", overrides=overrides)
    from partdistill.storage import ArtifactStore

    base_store = ArtifactStore(work / "base")
    rows = []
    ref_threads = torch.get_num_threads()
    # the control first: a child with the reference's thread count must give the same bytes
    runs = [(ref_threads, "control")] + [(n, "") for n in args.threads if n != ref_threads]
    for stage in TRAINING:
        version = base_store.versions(stage)[-1]
        ref_dir = base_store.open(stage, version).path
        for threads, note in runs:
            folder, used, seconds = run_stage(work / "base", work / "run", cfg, stage, threads)
            files = ArtifactStore(folder.parents[1]).open(stage, folder.name).manifest["files"]
            want = reference[stage]
            differing = differing_files(files, want)
            label = f"{threads}" + (" (control: the reference's count)" if note else "")
            if not differing:
                rows.append((stage, label, used, f"{seconds:.0f}", "none: byte-identical", ""))
            for name in differing:
                how = describe(folder / name, ref_dir / name) if name in files and name in want else "only in one"
                rows.append((stage, label, used, f"{seconds:.0f}", name, how))
            print(f"{stage} threads={threads}{' ' + note if note else ''}: {len(differing)} file(s) differ "
                  f"({seconds:.0f} s)", flush=True)
    print()
    print("| stage | process threads asked | torch threads of the process | s "
          "| file that differs from the reference | how |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\n({time.monotonic() - start:.0f} s; reference with {torch.get_num_threads()} thread(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
