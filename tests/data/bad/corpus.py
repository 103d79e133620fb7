"""Bad inputs, generated into a folder, and the code path each one meets in the pipeline.

Every case of issue 8's list is a :class:`Case`. ``make(folder)`` writes the bad input (an image,
a COCO JSON, a config, a checkpoint) and returns its path; nothing binary is committed.
``feed(bench, path)`` hands it to the code that would meet it and returns an :class:`Outcome`:

* ``error <ExceptionClass>``: a named error, whose message names the file or the config key;
* ``skip <reason>``: a skip recorded with its reason (``skipped.parquet`` of `instances` or `mining`);
* ``ok <what>``: a legitimate input (a 1×1 or a 16-bit image, say) that loads as the documented
  ``uint8 (H, W, 3)`` and goes through.

Stage-level cases run against a :class:`Bench`: a store that already holds complete artifacts
(`data` → `instances` → `features` → `mining` on three tiny images with ground-truth objects and
EfficientNet-Lite0 features: no training). Each case gets its own COCO JSON, so its stages get
their own versions. Afterwards ``Outcome.lost`` lists what the case lost: ``verify()`` problems
and every earlier artifact whose files changed or vanished ([] = nothing lost).

``tests/data/bad/test_bad_inputs.py`` is parametrized from :data:`CASES`, and
``benchmarks/bad_inputs.py`` prints :func:`table` of :func:`run_all`.
"""

from __future__ import annotations

import contextlib
import fractions
import hashlib
import io
import json
import pickle
import struct
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[3]
DEMO_CONFIG = REPO / "configs" / "demo_partsworld.py"
DEMO_TEACHER = REPO / "configs" / "teachers" / "demo_mask2former_effnet-lite0_partsworld.py"

H, W = 48, 64            # the bench's good images
CASE_IMAGE_ID = 100      # the case's own image in a bench COCO JSON
CASE_INSTANCE_ID = CASE_IMAGE_ID * 1000  # its first object (instances: image_id * 1000 + rank)
NAN_SHAPE = (40, 56)     # the image whose features the NaN teacher poisons

# Ground-truth objects (no teacher to train), ImageNet EfficientNet-Lite0 features, one CRF process.
BASE_OPTIONS: dict[str, Any] = {
    "data.source": "coco", "instances.source": "gt", "instances.splits": ["val"],
    "instances.min_object_fraction": 0.0, "features.extractor": "efficientnet_lite0",
    "runtime.num_workers": 1,
}


@dataclass(frozen=True)
class Outcome:
    kind: str                      # "error" | "skip" | "ok"
    detail: str                    # the exception class, the recorded reason, or what loaded
    message: str = ""              # the error's message, or where the skip is recorded
    lost: list[str] | None = None  # stage runs: what was lost afterwards ([] = nothing); None: no store

    def __str__(self) -> str:
        return f"{self.kind} {self.detail}"


@dataclass(frozen=True)
class Case:
    name: str
    issue: str                     # issue 8's wording of the case
    where: str                     # the code path it is fed to
    expect: tuple[str, str]        # (kind, how the detail starts)
    names: tuple[str, ...]         # what the error message must name; "{input}" is the generated file
    make: Callable[[Path], Path]
    feed: Callable[[Bench, Path], Outcome]
    stage: bool = True             # runs pipeline stages on the bench's store


# --- generators: images ---------------------------------------------------------------------


def _picture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """An object on a background: four coloured quadrants with a little noise (K-means finds parts)."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 200, np.uint8)
    y0, y1, x0, x1 = h // 6, h - h // 6, w // 8, w - w // 8
    colours = [(220, 40, 40), (40, 180, 60), (40, 60, 220), (230, 210, 30)]
    ym, xm = (y0 + y1) // 2, (x0 + x1) // 2
    for (ya, yb, xa, xb), c in zip([(y0, ym, x0, xm), (y0, ym, xm, x1), (ym, y1, x0, xm), (ym, y1, xm, x1)],
                                   colours, strict=True):
        img[ya:yb, xa:xb] = c
    noise = rng.integers(-12, 13, img.shape)
    return np.clip(img.astype(int) + noise, 0, 255).astype(np.uint8)


def _box(h: int, w: int) -> np.ndarray:
    mask = np.zeros((h, w), bool)
    mask[h // 6:h - h // 6, w // 8:w - w // 8] = True
    return mask


def _jpeg_bytes(img: np.ndarray, **kw: Any) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", **kw)
    return buf.getvalue()


def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A real 2x2 PNG whose header then claims ``width`` x ``height`` (CRC recomputed): a bomb's header."""
    Image.new("RGB", (2, 2), (1, 2, 3)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def make_truncated_jpeg(folder: Path) -> Path:
    data = _jpeg_bytes(_picture(32, 48))
    (path := folder / "truncated.jpg").write_bytes(data[:len(data) // 2])
    return path


def make_zero_byte(folder: Path) -> Path:
    (path := folder / "empty.jpg").write_bytes(b"")
    return path


def make_not_an_image(folder: Path) -> Path:
    (path := folder / "page.jpg").write_text("<html><body>404 Not Found</body></html>\n")
    return path


def make_bomb_header(folder: Path) -> Path:
    return _png_claiming(folder / "bomb.png", 10_000, 10_000)  # 100 M pixels: over the default limit


def make_pillow_bomb(folder: Path) -> Path:
    return _png_claiming(folder / "bomb-huge.png", 100_000, 100_000)  # over Pillow's own bomb limit too


def make_normal_png(folder: Path) -> Path:
    Image.fromarray(_picture(32, 48)).save(path := folder / "normal.png")
    return path


def make_one_by_one(folder: Path) -> Path:
    Image.fromarray(np.array([[[10, 120, 230]]], np.uint8)).save(path := folder / "one.png")
    return path


def make_grayscale(folder: Path) -> Path:
    Image.fromarray(_picture(32, 48)[:, :, 0], "L").save(path := folder / "gray.png")
    return path


def make_cmyk_jpeg(folder: Path) -> Path:
    Image.fromarray(_picture(32, 48)).convert("CMYK").save(path := folder / "cmyk.jpg", quality=95)
    return path


def make_png16(folder: Path) -> Path:
    values = (_picture(32, 48)[:, :, 1].astype(np.uint16) * 257) ^ 0x00FF  # low byte differs from high
    Image.fromarray(values).save(path := folder / "sixteen.png")
    return path


def make_animated_gif(folder: Path) -> Path:
    frames = [Image.fromarray(_picture(32, 48, seed=s)) for s in (1, 2)]
    frames[1] = Image.fromarray(255 - np.asarray(frames[1]))
    frames[0].save(path := folder / "anim.gif", save_all=True, append_images=frames[1:], duration=80, loop=0)
    return path


def make_picture(folder: Path, shape: tuple[int, int] = (H, W)) -> Path:
    Image.fromarray(_picture(*shape, seed=7)).save(path := folder / "picture.png")
    return path


def make_nan_picture(folder: Path) -> Path:
    Image.fromarray(_picture(*NAN_SHAPE, seed=8)).save(path := folder / "nan.png")
    return path


# --- generators: COCO JSONs -----------------------------------------------------------------


def _coco(folder: Path, n: int = 2) -> dict[str, Any]:
    """A valid COCO instance JSON over ``n`` generated images in ``folder`` (RLE objects)."""
    from partdistill.storage import mask_to_rle

    images, anns = [], []
    for i in range(1, n + 1):
        Image.fromarray(_picture(H, W, seed=i)).save(folder / f"{i}.png")
        mask = _box(H, W)
        images.append({"id": i, "file_name": f"{i}.png", "width": W, "height": H})
        anns.append({"id": 10 + i, "image_id": i, "category_id": 1, "segmentation": mask_to_rle(mask),
                     "area": int(mask.sum()), "bbox": [8.0, 8.0, 48.0, 32.0], "iscrowd": 0})
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}


def _write_coco(folder: Path, mutate: Callable[[dict[str, Any]], None]) -> Path:
    coco = _coco(folder)
    mutate(coco)
    (path := folder / "instances.json").write_text(json.dumps(coco))
    return path


def make_coco_missing_field(folder: Path) -> Path:
    return _write_coco(folder, lambda c: c["images"][1].pop("width"))


def make_coco_duplicate_image_id(folder: Path) -> Path:
    return _write_coco(folder, lambda c: c["images"][1].update(id=1))


def make_coco_duplicate_annotation_id(folder: Path) -> Path:
    return _write_coco(folder, lambda c: c["annotations"][1].update(id=11))


def make_coco_polygon_outside(folder: Path) -> Path:
    return _write_coco(folder, lambda c: c["annotations"][0].update(
        segmentation=[[10.0, 10.0, 200.0, 10.0, 200.0, 40.0, 10.0, 40.0]], bbox=[10.0, 10.0, 30.0, 30.0]))


def make_coco_rle_other_size(folder: Path) -> Path:
    from partdistill.storage import mask_to_rle

    return _write_coco(folder, lambda c: c["annotations"][0].update(segmentation=mask_to_rle(_box(2 * H, 2 * W))))


def make_coco_missing_segmentation(folder: Path) -> Path:
    return _write_coco(folder, lambda c: c["annotations"][1].pop("segmentation"))


def make_coco_size_disagrees(folder: Path) -> Path:
    """The JSON says 96x128 (and its masks are that size); the file is 48x64."""
    from partdistill.storage import mask_to_rle

    def mutate(c: dict[str, Any]) -> None:
        c["images"][1].update(width=2 * W, height=2 * H)
        c["annotations"][1].update(segmentation=mask_to_rle(_box(2 * H, 2 * W)), bbox=[16.0, 16.0, 96.0, 64.0])

    return _write_coco(folder, mutate)


# --- generators: configs and checkpoints ----------------------------------------------------


def _recipe(folder: Path, body: str) -> Path:
    (path := folder / "recipe.py").write_text(f"_base_ = [{str(DEMO_CONFIG)!r}]\n\n{body}\n")
    return path


def make_config_typo(folder: Path) -> Path:
    return _recipe(folder, "mining = dict(kk=6)")


def make_config_wrong_type(folder: Path) -> Path:
    return _recipe(folder, "mining = dict(k='four')")


def make_config_bad_max_pixels(folder: Path) -> Path:
    return _recipe(folder, "data = dict(max_pixels=0)")


def make_missing_checkpoint(folder: Path) -> Path:
    return folder / "never-downloaded.pth"


def make_empty_checkpoint(folder: Path) -> Path:
    (path := folder / "interrupted.pth").write_bytes(b"")
    return path


def make_foreign_checkpoint(folder: Path) -> Path:
    """A valid torch checkpoint of an unrelated model (a small CNN classifier)."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.LazyLinear(10))
    model(torch.zeros(1, 3, 8, 8))
    torch.save({"state_dict": model.state_dict(), "meta": {"epoch": 3}}, path := folder / "classifier.pth")
    return path


def make_pickle_not_checkpoint(folder: Path) -> Path:
    """A pickle, but of something else (an experiment's notes with a Fraction in them)."""
    with open(path := folder / "notes.pth", "wb") as f:
        pickle.dump({"lr": fractions.Fraction(1, 3), "comment": "not weights"}, f, protocol=2)
    return path


def make_nothing(folder: Path) -> Path:
    return folder / "no-such-model"


# --- the bench: a store with complete artifacts ---------------------------------------------


class Bench:
    """A store that already holds complete artifacts (`data` → `instances` → `features` →
    `mining` on three tiny images), and the stage runs of the cases against it."""

    def __init__(self, root: Path):
        from partdistill.pipeline import run_pipeline
        from partdistill.storage import ArtifactStore

        self.root = Path(root)
        (self.root / "good").mkdir(parents=True, exist_ok=True)
        self.store = ArtifactStore(self.root / "store")
        self.good = []
        for i in range(1, 4):
            Image.fromarray(_picture(H, W, seed=i)).save(path := self.root / "good" / f"{i}.png")
            self.good.append((i, path, _box(H, W)))
        self.good_json = self.coco_json(self.root / "good.json")
        self.base = {o.stage: o for o in run_pipeline(self.config(self.good_json), self.store, until="mining")}

    # -- configs and COCO JSONs
    def config(self, coco_json: Path, **options: Any) -> dict[str, Any]:
        from partdistill.config import load_config

        cfg = load_config(DEMO_CONFIG, {**BASE_OPTIONS, "data.coco.instances": str(coco_json), **options})
        cfg["runtime"]["store"] = str(self.store.root)
        return cfg

    def coco_json(self, path: Path, extra: list[tuple[Path, int, int, np.ndarray | None]] = ()) -> Path:
        """A COCO JSON of the good images and their objects, plus ``extra`` (image, height, width,
        object mask or None) as image ids 100, 101, ...; file names are absolute."""
        from partdistill.storage import mask_to_rle

        images, anns = [], []
        items = [(i, p, H, W, m) for i, p, m in self.good]
        items += [(CASE_IMAGE_ID + j, p, h, w, m) for j, (p, h, w, m) in enumerate(extra)]
        for image_id, p, h, w, mask in items:
            images.append({"id": image_id, "file_name": str(Path(p).resolve()), "width": w, "height": h})
            if mask is not None:
                ys, xs = np.nonzero(mask)
                bbox = ([float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                         float(ys.max() - ys.min() + 1)] if len(ys) else [0.0, 0.0, 0.0, 0.0])
                anns.append({"id": image_id, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                             "segmentation": mask_to_rle(mask), "area": int(mask.sum()), "bbox": bbox})
        path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}))
        return path

    # -- what is in the store, and what a case lost
    def snapshot(self) -> dict[tuple[str, str], dict[str, str]]:
        """Every complete artifact: its files (manifest included) and their sha256."""
        return {(s, v): {p.relative_to(self.store.path(s, v)).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                         for p in sorted(self.store.path(s, v).rglob("*")) if p.is_file()}
                for s in self.store.stages() for v in self.store.versions(s)}

    def lost(self, before: dict[tuple[str, str], dict[str, str]]) -> list[str]:
        after = self.snapshot()
        problems = [str(p) for p in self.store.verify()]
        for (s, v), files in before.items():
            if (s, v) not in after:
                problems.append(f"{s}/{v}: artifact gone")
            elif after[(s, v)] != files:
                problems.append(f"{s}/{v}: files changed")
        return problems

    def run(self, cfg: dict[str, Any], until: str) -> tuple[dict[str, Any], BaseException | None, list[str]]:
        """Run the pipeline up to ``until``; returns (outcomes by stage, the error or None, what was lost)."""
        from partdistill.pipeline import run_pipeline

        before, outcomes = self.snapshot(), {}
        try:
            for o in run_pipeline(cfg, self.store, until=until):
                outcomes[o.stage] = o
            error = None
        except Exception as err:  # the outcome we are after: which class, and what it says
            error = err
        return outcomes, error, self.lost(before)

    def handmade(self, stage: str, version: str, files: dict[str, bytes], config: dict[str, Any] | None = None,
                 inputs: dict[str, str] | None = None, full_config: dict[str, Any] | None = None) -> str:
        """Commit an artifact written by hand through the store API (as another tool would)."""
        with self.store.writer(stage, version, config or {}, inputs or {}, "handmade") as writer:
            if writer is not None:
                for name, data in files.items():
                    (writer.path / name).parent.mkdir(parents=True, exist_ok=True)
                    (writer.path / name).write_bytes(data)
                writer.commit(full_config)
        return version


def _error(err: BaseException, lost: list[str] | None = None) -> Outcome:
    return Outcome("error", type(err).__name__, str(err), lost)


def _no_error(where: str, lost: list[str] | None = None) -> Outcome:
    return Outcome("ok", f"no error from {where}", "", lost)


# --- feeds ----------------------------------------------------------------------------------


def _skip(bench: Bench, stage: str, version: str, key: str, value: int, lost: list[str]) -> Outcome | None:
    """The skip that a stage's ``skipped.parquet`` records for ``key == value``, if any."""
    import pyarrow.parquet as pq

    art = bench.store.open(stage, version)
    for s in pq.read_table(art.file("skipped.parquet")).to_pylist():
        if s[key] == value:
            return Outcome("skip", s["reason"], f"{stage}/{version}/skipped.parquet", lost)
    return None


def _stage_outcome(bench: Bench, cfg: dict[str, Any], stage: str, table: str, key: str, case_id: int,
                   describe: Callable[[list[dict]], str]) -> Outcome:
    """Run up to ``stage``: the error, else the case row's recorded skip, else ``describe`` of the
    case's rows in the artifact's ``table``."""
    import pyarrow.parquet as pq

    outcomes, error, lost = bench.run(cfg, stage)
    if error is not None:
        return _error(error, lost)
    art = bench.store.open(stage, outcomes[stage].version)
    skip = _skip(bench, stage, art.version, key, case_id, lost)
    if skip is not None:
        return skip
    rows = [r for r in pq.read_table(art.path / table).to_pylist() if r[key] == case_id]
    return Outcome("ok", describe(rows), "", lost)


def _instances_outcome(bench: Bench, cfg: dict[str, Any], path: Path) -> Outcome:
    """Run up to `instances`; the case image's skip there, else what it loaded as."""
    from partdistill.config import max_pixels
    from partdistill.data.images import load_rgb

    def loaded(rows: list[dict]) -> str:
        img = load_rgb(path, max_pixels(cfg))
        return f"loads as {img.dtype} {tuple(img.shape)}; {len(rows)} object(s) kept"

    return _stage_outcome(bench, cfg, "instances", "instances", "image_id", CASE_IMAGE_ID, loaded)


def feed_image(bench: Bench, path: Path, **options: Any) -> Outcome:
    """The image in a COCO set with the good ones, objects from its annotations: the `instances`
    stage reads it. Images that load get an object over their middle (the whole of a 1x1)."""
    from PIL import UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
        mask = _box(h, w) if min(h, w) >= 8 else np.ones((h, w), bool)
        if h * w > 1_000_000:
            mask = None  # a bomb's header: no mask of that size
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError):
        h, w, mask = H, W, None
    cfg = bench.config(bench.coco_json(path.parent / "coco.json", [(path, h, w, mask)]), **options)
    return _instances_outcome(bench, cfg, path)


def feed_image_limited(bench: Bench, path: Path) -> Outcome:
    """A normal image under a configured ``data.max_pixels`` of 1,000."""
    return feed_image(bench, path, **{"data.max_pixels": 1000})


def _mining_outcome(bench: Bench, cfg: dict[str, Any]) -> Outcome:
    """Run up to `mining`; the case object's skip in `mining`, else its parts."""
    return _stage_outcome(bench, cfg, "mining", "mined_parts", "instance_id", CASE_INSTANCE_ID,
                          lambda rows: f"mined {len(rows)} part(s)")


def _feed_mask(bench: Bench, path: Path, mask: np.ndarray) -> Outcome:
    cfg = bench.config(bench.coco_json(path.parent / "coco.json", [(path, H, W, mask)]))
    return _mining_outcome(bench, cfg)


def feed_one_pixel_mask(bench: Bench, path: Path) -> Outcome:
    mask = np.zeros((H, W), bool)
    mask[H // 2, W // 2] = True
    return _feed_mask(bench, path, mask)


def feed_whole_image_mask(bench: Bench, path: Path) -> Outcome:
    return _feed_mask(bench, path, np.ones((H, W), bool))


def feed_empty_mask(bench: Bench, path: Path) -> Outcome:
    """An `instances` artifact from elsewhere (written by hand) with an object of 0 pixels: the
    `instances` stage itself never keeps one (its size filter needs a pixel)."""
    import pyarrow as pa

    from partdistill.pipeline import plan, run_pipeline
    from partdistill.stages.instances import SCHEMA, read_instances
    from partdistill.storage import mask_to_rle, write_parquet

    cfg = bench.config(bench.coco_json(path.parent / "coco.json", [(path, H, W, None)]))
    run_pipeline(cfg, bench.store, until="data")
    planned = {p.name: p for p in plan(cfg)}["instances"]
    rows = read_instances(bench.store.open("instances", bench.base["instances"].version)).to_pylist()
    rows.append({**rows[0], "image_id": CASE_IMAGE_ID, "instance_id": CASE_INSTANCE_ID,
                 "file_name": str(path.resolve()), "rle": mask_to_rle(np.zeros((H, W), bool))["counts"],
                 "area": 0, "bbox": [0.0, 0.0, 0.0, 0.0]})
    folder = path.parent / "instances-artifact"
    folder.mkdir(exist_ok=True)
    write_parquet(folder / "part.parquet", {k: [r[k] for r in rows] for k in SCHEMA.names}, SCHEMA)
    write_parquet(folder / "skipped.parquet", {"image_id": [], "file_name": [], "reason": []},
                  pa.schema([("image_id", pa.int64()), ("file_name", pa.string()), ("reason", pa.string())]))
    bench.handmade("instances", planned.version,
                   {"instances/part-00000.parquet": (folder / "part.parquet").read_bytes(),
                    "skipped.parquet": (folder / "skipped.parquet").read_bytes()},
                   planned.config, planned.inputs, cfg)
    return _mining_outcome(bench, cfg)


@contextlib.contextmanager
def nan_teacher() -> Iterator[None]:
    """Features come out NaN for images of ``NAN_SHAPE``: a teacher whose weights went bad."""
    from unittest import mock

    from partdistill.stages import features

    real = features.feature_extractor

    class Poisoned:
        def __init__(self, inner: Any):
            self.inner, self.class_names = inner, inner.class_names

        def predict(self, images, layers=("res3", "res4")):
            outs = self.inner.predict(images, layers=layers)
            for img, out in zip(images, outs, strict=True):
                if img.shape[:2] == NAN_SHAPE:
                    out.features = {k: v * float("nan") for k, v in out.features.items()}
            return outs

    with mock.patch.object(features, "feature_extractor", lambda *a, **k: Poisoned(real(*a, **k))):
        yield


def feed_nan_features(bench: Bench, path: Path) -> Outcome:
    """The `features` stage, with a teacher that gives NaN for the case image."""
    cfg = bench.config(bench.coco_json(path.parent / "coco.json", [(path, *NAN_SHAPE, _box(*NAN_SHAPE))]))
    with nan_teacher():
        outcomes, error, lost = bench.run(cfg, "features")
    return _error(error, lost) if error is not None else _no_error("features", lost)


def feed_nan_features_mining(bench: Bench, path: Path) -> Outcome:
    """`mining` reading the features of that teacher (``mining.fused``: computed on the fly, so no
    `features` stage checked them)."""
    cfg = bench.config(bench.coco_json(path.parent / "coco-fused.json", [(path, *NAN_SHAPE, _box(*NAN_SHAPE))]),
                       **{"mining.fused": True})
    with nan_teacher():
        return _mining_outcome(bench, cfg)


def feed_coco(bench: Bench, path: Path) -> Outcome:
    """The JSON as ``data.coco.instances``: the `data` stage lists and validates it."""
    outcomes, error, lost = bench.run(bench.config(path), "data")
    return _error(error, lost) if error is not None else _no_error("data", lost)


def feed_coco_gt_objects(bench: Bench, path: Path) -> Outcome:
    """The JSON as ``data.coco.instances`` with ground-truth objects: up to `instances`, which decodes
    its masks; image 2 is the one the generators spoil."""
    outcomes, error, lost = bench.run(bench.config(path), "instances")
    if error is not None:
        return _error(error, lost)
    skip = _skip(bench, "instances", outcomes["instances"].version, "image_id", 2, lost)
    return skip if skip is not None else _no_error("instances", lost)


def feed_config(bench: Bench | None, path: Path) -> Outcome:
    from partdistill.config import load_config

    try:
        load_config(path)
    except Exception as err:
        return _error(err)
    return _no_error("load_config")


def feed_cli(bench: Bench | None, path: Path) -> Outcome:
    """``partdistill run RECIPE --until data --engine local``: exit code 2 and the message."""
    from typer.testing import CliRunner

    from partdistill.cli import EXIT_CONFIG, app

    result = CliRunner(env={"COLUMNS": "200"}).invoke(
        app, ["run", str(path), "--until", "data", "--engine", "local", "--store", str(path.parent / "store")])
    text = " ".join(result.output.split())
    if result.exit_code == EXIT_CONFIG and "config error" in text:
        return Outcome("error", "ConfigError (exit 2)", text)
    return Outcome("ok", f"exit {result.exit_code}", text)


def feed_teacher_checkpoint(bench: Bench, path: Path) -> Outcome:
    """``teacher.source='checkpoint'`` with this file: the `teacher` stage."""
    cfg = bench.config(bench.good_json, **{"teacher.source": "checkpoint", "teacher.checkpoint": str(path),
                                          "teacher.checkpoint_sha256": None,
                                          "teacher.mmdet_config": str(DEMO_TEACHER)})
    outcomes, error, lost = bench.run(cfg, "teacher")
    return _error(error, lost) if error is not None else _no_error("teacher", lost)


def feed_predict_model(bench: Bench, path: Path) -> Outcome:
    """``Predictor.from_store(store, model=path)``: what ``partdistill predict --model`` does."""
    from partdistill.predict import Predictor

    before = bench.snapshot()
    try:
        Predictor.from_store(bench.store.root, str(path))
    except Exception as err:
        return _error(err, bench.lost(before))
    return _no_error("Predictor.from_store", bench.lost(before))


def model_with_teacher(bench: Bench, path: Path) -> Path:
    """A distill artifact whose teacher artifact refers to the checkpoint ``path`` (a user's
    ``teacher.checkpoint`` that was later overwritten); the three artifacts are written by hand.
    Returns the distill artifact's folder."""
    from mmengine.config import Config

    tag = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    mmdet = path.parent / "mmdet_config.py"
    Config.fromfile(str(DEMO_TEACHER)).dump(str(mmdet))
    record = {"source": "checkpoint", "mmdet_config": "mmdet_config.py", "checkpoint": str(path.resolve()),
              "class_names": None}
    teacher = bench.handmade("teacher", f"handmade-{tag}", {"teacher.json": json.dumps(record).encode(),
                                                            "mmdet_config.py": mmdet.read_bytes()})
    ranking = bench.handmade("ranking", f"handmade-{tag}", {"classes.json": b'{"k": 8, "classes": []}'})
    merged = bench.config(bench.good_json)
    bench.handmade("distill_r1", f"handmade-{tag}", {"model.json": b"{}"},
                   config={"label": merged["distill"]["label"]}, inputs={"teacher": teacher, "ranking": ranking},
                   full_config=merged)
    return bench.store.path("distill_r1", f"handmade-{tag}")


def feed_predict_teacher(bench: Bench, path: Path) -> Outcome:
    """``Predictor.from_store`` on a distill model whose teacher's checkpoint is this file."""
    return feed_predict_model(bench, model_with_teacher(bench, path))


# --- the cases ------------------------------------------------------------------------------

_IMG = "instances (gt objects)"
CASES: list[Case] = [
    # images
    Case("truncated_jpeg", "truncated JPEG", _IMG, ("skip", "truncated or corrupt"), (), make_truncated_jpeg,
         feed_image),
    Case("zero_byte_file", "zero-byte file", _IMG, ("skip", "empty file"), (), make_zero_byte, feed_image),
    Case("not_an_image", "non-image file with an image extension", _IMG, ("skip", "not an image"), (),
         make_not_an_image, feed_image),
    Case("bomb_header", "huge dimensions (100 M pixels, default data.max_pixels)", _IMG, ("skip", "too large"), (),
         make_bomb_header, feed_image),
    Case("bomb_over_pillow_limit", "huge dimensions (10^10 pixels, over Pillow's own limit)", _IMG,
         ("skip", "too large"), (), make_pillow_bomb, feed_image),
    Case("over_configured_max_pixels", "image over a configured data.max_pixels=1000", _IMG,
         ("skip", "too large: 48x32 = 1536 pixels exceeds the limit of 1000"), (), make_normal_png,
         feed_image_limited),
    Case("one_by_one", "1x1 image", _IMG, ("ok", "loads as uint8 (1, 1, 3); 1 object(s) kept"), (),
         make_one_by_one, feed_image),
    Case("grayscale", "grayscale image", _IMG, ("ok", "loads as uint8 (32, 48, 3)"), (), make_grayscale, feed_image),
    Case("cmyk_jpeg", "CMYK JPEG", _IMG, ("ok", "loads as uint8 (32, 48, 3)"), (), make_cmyk_jpeg, feed_image),
    Case("png_16bit", "16-bit PNG", _IMG, ("ok", "loads as uint8 (32, 48, 3)"), (), make_png16, feed_image),
    Case("animated_gif", "animated GIF", _IMG, ("ok", "loads as uint8 (32, 48, 3)"), (), make_animated_gif,
         feed_image),
    # instance masks
    Case("mask_empty", "instance mask of 0 pixels (hand-made instances artifact)", "features + mining",
         ("skip", "empty mask"), (), make_picture, feed_empty_mask),
    Case("mask_one_pixel", "instance mask of 1 pixel", "instances + features + mining",
         ("skip", "mask smaller than min_part_area (1 < 16 px)"), (), make_picture, feed_one_pixel_mask),
    Case("mask_whole_image", "instance covering the whole image", "instances + features + mining",
         ("ok", "mined 4 part(s)"), (), make_picture, feed_whole_image_mask),
    # features
    Case("nan_features", "NaN features (a teacher gone bad)", "features", ("error", "FloatingPointError"),
         ("{input}", "features.dtype"), make_nan_picture, feed_nan_features),
    Case("nan_features_mining", "NaN features read by mining (mining.fused)", "mining (fused)",
         ("skip", "features hold NaN or Inf"), (), make_nan_picture, feed_nan_features_mining),
    # COCO JSONs
    Case("coco_missing_field", "COCO JSON: image without 'width'", "data (coco)", ("error", "DatasetError"),
         ("{input}", "'width'"), make_coco_missing_field, feed_coco),
    Case("coco_duplicate_image_id", "COCO JSON: duplicate image id", "data (coco)", ("error", "DatasetError"),
         ("{input}", "duplicate image id 1"), make_coco_duplicate_image_id, feed_coco),
    Case("coco_duplicate_annotation_id", "COCO JSON: duplicate annotation id", "data (coco)",
         ("error", "DatasetError"), ("{input}", "duplicate annotation id 11"), make_coco_duplicate_annotation_id,
         feed_coco),
    Case("coco_polygon_outside", "COCO JSON: polygon outside the image", "data (coco)", ("error", "DatasetError"),
         ("{input}", "'segmentation'[0] has points outside the 64x48 image"), make_coco_polygon_outside, feed_coco),
    Case("coco_rle_other_size", "COCO JSON: RLE mask of another size", "data (coco)", ("error", "DatasetError"),
         ("{input}", "'segmentation.size'"), make_coco_rle_other_size, feed_coco),
    Case("coco_missing_segmentation", "COCO JSON: object without 'segmentation' (gt objects)",
         "data + instances (gt objects)", ("error", "DatasetError"), ("instances_val.json", "'segmentation'"),
         make_coco_missing_segmentation, feed_coco_gt_objects),
    Case("coco_size_disagrees", "COCO JSON: width/height disagree with the file", "data + instances (gt objects)",
         ("skip", "image is 48x64, its ground-truth masks are 96x128"), (), make_coco_size_disagrees,
         feed_coco_gt_objects),
    # configs
    Case("config_typo_key", "config with a typo'd key", "load_config", ("error", "ConfigError"),
         ("{input}", "'mining.kk'", "did you mean 'mining.k'"), make_config_typo, feed_config, stage=False),
    Case("config_wrong_type", "config with a wrong type", "load_config", ("error", "ConfigError"),
         ("{input}", "'mining.k' should be an int"), make_config_wrong_type, feed_config, stage=False),
    Case("config_bad_max_pixels", "config with data.max_pixels=0", "load_config", ("error", "ConfigError"),
         ("{input}", "data.max_pixels"), make_config_bad_max_pixels, feed_config, stage=False),
    Case("config_typo_cli", "config with a typo'd key, on the command line", "partdistill run",
         ("error", "ConfigError (exit 2)"), ("'mining.kk'",), make_config_typo, feed_cli, stage=False),
    # checkpoints
    Case("checkpoint_missing", "missing checkpoint", "teacher (checkpoint)", ("error", "CheckpointError"),
         ("{input}", "teacher.checkpoint"), make_missing_checkpoint, feed_teacher_checkpoint),
    Case("checkpoint_empty", "zero-byte checkpoint", "teacher (checkpoint)", ("error", "CheckpointError"),
         ("{input}",), make_empty_checkpoint, feed_teacher_checkpoint),
    Case("checkpoint_foreign", "foreign checkpoint (another model's weights)", "teacher (checkpoint)",
         ("error", "CheckpointError"), ("{input}", "does not fit the model"), make_foreign_checkpoint,
         feed_teacher_checkpoint),
    Case("checkpoint_not_a_checkpoint", "a pickle that is not a checkpoint", "teacher (checkpoint)",
         ("error", "CheckpointError"), ("{input}",), make_pickle_not_checkpoint, feed_teacher_checkpoint),
    Case("predict_missing_model", "predict: missing model", "Predictor.from_store", ("error", "ModelNotFound"),
         ("{input}",), make_nothing, feed_predict_model),
    Case("predict_foreign_teacher", "predict: the teacher's checkpoint replaced by a foreign one",
         "Predictor.from_store", ("error", "CheckpointError"), ("{input}", "does not fit the model"),
         make_foreign_checkpoint, feed_predict_teacher),
]


# --- running them ---------------------------------------------------------------------------


def generate(folder: Path) -> dict[str, Path]:
    """Write every case's bad input into ``folder/<case>/``; returns case name → its input."""
    folder, out = Path(folder).resolve(), {}
    for case in CASES:
        (folder / case.name).mkdir(parents=True, exist_ok=True)
        out[case.name] = case.make(folder / case.name)
    return out


def expected_names(case: Case, path: Path) -> list[str]:
    return [str(path) if n == "{input}" else n for n in case.names]


def run_all(root: Path, on_case: Callable[[Case, Outcome], None] | None = None) -> list[tuple[Case, Outcome]]:
    """Generate every input under ``root/inputs``, build the bench in ``root/bench``, feed each case."""
    inputs = generate(root / "inputs")
    bench = Bench(root / "bench")
    results = []
    for case in CASES:
        outcome = case.feed(bench, inputs[case.name])
        results.append((case, outcome))
        if on_case is not None:
            on_case(case, outcome)
    return results


def table(results: list[tuple[Case, Outcome]]) -> str:
    """A Markdown table: case, where it was fed, outcome, nothing lost; then the count."""
    def lost(o: Outcome) -> str:
        return "–" if o.lost is None else ("yes" if not o.lost else "NO: " + "; ".join(o.lost))

    def cell(text: str, n: int = 90) -> str:
        text = text.replace("|", "\\|").replace("\n", " ")
        return text if len(text) <= n else text[:n - 1] + "…"

    lines = ["| case | fed to | outcome | nothing lost |", "|---|---|---|---|"]
    lines += [f"| {c.issue} | {c.where} | {cell(str(o))} | {lost(o)} |" for c, o in results]
    errors = sum(o.kind == "error" for _, o in results)
    skips = sum(o.kind == "skip" for _, o in results)
    lines.append(f"\n{len(results)} cases tried: {errors} named errors, {skips} recorded skips, "
                 f"{len(results) - errors - skips} loaded as documented; "
                 f"{sum(o.lost is not None for _, o in results)} ran against a store, "
                 f"{sum(o.lost == [] for _, o in results)} of them lost nothing.")
    return "\n".join(lines)
