"""`partdistill predict` and `partdistill.Predictor`: a distill model on images it never saw."""

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from partdistill.cli import app
from partdistill.config import load_config
from partdistill.pipeline import run_pipeline
from partdistill.storage import ArtifactStore, rle_to_mask
from tests.conftest import DEMO_CONFIG, TINY_DISTILL

runner = CliRunner(env={"COLUMNS": "200"})

OPTIONS = TINY_DISTILL
# A 4-iteration model's part masks rarely pass 0.2 over 5% of an object: looser, so parts appear.
LOOSE = {"mask_threshold": 0.05, "min_fraction": 0.0}
BACKGROUND = (200, 200, 200)
COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200)]  # object class id = index


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A tiny store with data → … → distill_r1; returns (root, the distill_r1 version)."""
    cfg = load_config(DEMO_CONFIG, OPTIONS)
    root = tmp_path_factory.mktemp("predict-store")
    cfg["runtime"]["store"] = str(root)
    outcomes = run_pipeline(cfg, until="distill")
    assert outcomes[-1].stage == "distill_r1"
    return root, outcomes[-1].version


@pytest.fixture(scope="module")
def unseen(tmp_path_factory):
    """Images the pipeline never saw: other sizes, formats and a nested folder, one corrupt file
    and a text file. Returns (folder, {relative name: [(class id, box (y0, y1, x0, x1))]})."""
    root = tmp_path_factory.mktemp("unseen")
    (root / "sub").mkdir()
    layout = {
        "a.png": ((96, 128), [(3, (10, 60, 10, 70)), (1, (50, 90, 80, 124))]),
        "b.PNG": ((120, 160), [(0, (20, 100, 30, 130))]),
        "sub/a.png": ((72, 90), [(2, (8, 60, 5, 60))]),
        "sub/c.bmp": ((64, 80), [(3, (10, 54, 10, 70))]),
        "sub/d.webp": ((80, 100), [(1, (0, 80, 20, 80))]),
    }
    for name, ((h, w), objects) in layout.items():
        img = np.full((h, w, 3), BACKGROUND, np.uint8)
        for c, (y0, y1, x0, x1) in objects:
            img[y0:y1, x0:x1] = COLOURS[c]
        Image.fromarray(img).save(root / name, **({"lossless": True} if name.endswith(".webp") else {}))
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"not a jpeg" * 10)
    (root / "notes.txt").write_text("not an image")
    return root, {name: objects for name, (_, objects) in layout.items()}


class BoxTeacher:
    """Stands in for the 3-iteration teacher, which finds no object: each COLOURS region is an
    object of that class, and a 2×2 speck scoring highest must fall to min_object_fraction."""

    def __init__(self, class_names):
        self.class_names = class_names

    def predict(self, images, layers=()):
        from partdistill.models.teacher import TeacherOutput

        outputs = []
        for img in images:
            speck = np.zeros(img.shape[:2], bool)
            speck[:2, :2] = True
            masks, scores, labels = [speck], [0.99], [0]
            for c, colour in enumerate(COLOURS):
                m = (img == colour).all(-1)
                if m.any():
                    masks.append(m)
                    scores.append(0.9 - 0.1 * c)
                    labels.append(c)
            outputs.append(TeacherOutput(np.stack(masks), np.asarray(scores, np.float32), np.asarray(labels),
                                         {}, img.shape[:2]))
        return outputs


@pytest.fixture
def box_teacher(monkeypatch):
    """Load the stored teacher (so its loading is tested) and detect with BoxTeacher."""
    import partdistill.stages.teacher as teacher_stage

    real = teacher_stage.load_teacher
    monkeypatch.setattr(teacher_stage, "load_teacher", lambda *a, **kw: BoxTeacher(real(*a, **kw).class_names))


def _cli(*args):
    return runner.invoke(app, ["predict", *map(str, args)])


def test_cli_predicts_unseen_folder(store, unseen, box_teacher, tmp_path):
    from pycocotools.coco import COCO

    root, version = store
    folder, layout = unseen
    out = tmp_path / "out"
    result = _cli(folder, "--store", root, "--out", out, "--mask-threshold", LOOSE["mask_threshold"],
                  "--min-fraction", LOOSE["min_fraction"])
    output = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert f"distill_r1/{version}" in output and "newest" in output
    assert "broken.jpg" in output and "truncated or corrupt" in output
    assert "5 image(s)" in output and "1 failed" in output

    pred = json.loads((out / "predictions.json").read_text())
    assert pred["model"] == f"distill_r1/{version}"
    assert pred["failed"] == [{"file_name": str(folder / "broken.jpg"), "error": pred["failed"][0]["error"]}]
    # ids are positions in the sorted file list, the corrupt file's (3) included
    by_name = {im["file_name"]: im for im in pred["images"]}
    assert {n: by_name[str(folder / n)]["id"] for n in layout} == {
        "a.png": 1, "b.PNG": 2, "sub/a.png": 4, "sub/c.bmp": 5, "sub/d.webp": 6}
    assert sorted(im["overlay"] for im in pred["images"]) == [
        "overlays/a-4.png", "overlays/a.png", "overlays/b.png", "overlays/c.png", "overlays/d.png"]
    for im in pred["images"]:
        with Image.open(out / im["overlay"]) as overlay:
            assert overlay.size == (im["width"], im["height"])

    # objects: the coloured boxes, by descending score; the speck is gone
    objects = {(o["image_id"], o["object_id"]): o for o in pred["objects"]}
    for name, boxes in layout.items():
        im = by_name[str(folder / name)]
        mine = sorted((o for o in pred["objects"] if o["image_id"] == im["id"]), key=lambda o: o["object_id"])
        assert [o["class_id"] for o in mine] == sorted(c for c, _ in boxes)
        for o, (c, (y0, y1, x0, x1)) in zip(mine, sorted(boxes), strict=True):
            assert o["area"] == (y1 - y0) * (x1 - x0) and o["bbox"] == [x0, y0, x1 - x0, y1 - y0]
            assert o["score"] == pytest.approx(0.9 - 0.1 * c) and o["class_name"]

    # parts: a valid COCO results list whose every mask lies inside its object
    k = len(pred["categories"]) // 8
    assert k == 8 and {c["id"] for c in pred["categories"]} == set(range(64))
    assert len(pred["annotations"]) > 0
    for a in pred["annotations"]:
        assert a["category_id"] == a["object_class"] * k + a["part_cluster"] and 0 <= a["part_cluster"] < k
        assert isinstance(a["segmentation"]["counts"], str) and 0.0 <= a["score"] <= 1.0
        obj = objects[(a["image_id"], a["object_id"])]
        assert a["object_class"] == obj["class_id"]
        part, whole = rle_to_mask(a["segmentation"]), rle_to_mask(obj["segmentation"])
        assert part.shape == whole.shape and part.sum() == a["area"] > 0
        assert not (part & ~whole).any()
    (tmp_path / "gt.json").write_text(json.dumps(pred))
    coco = COCO(str(tmp_path / "gt.json"))
    results = [{key: v for key, v in a.items() if key != "id"} for a in pred["annotations"]]
    assert len(coco.loadRes(copy.deepcopy(results)).getAnnIds()) == len(results)  # loadRes edits its input

    # the in-memory Predictor finds exactly what the command wrote, in another order and other
    # batches: an image's prediction does not depend on the images it is batched with
    from partdistill import Predictor

    predictor = Predictor.from_store(root, f"distill_r1/{version}", **LOOSE)
    predictor.batch_size = 2
    paths = [folder / n for n in ("a.png", "b.PNG", "broken.jpg", "sub/a.png", "sub/c.bmp", "sub/d.webp")]
    found = {p.path: p for p in predictor.predict_paths(reversed(paths))}
    assert found[folder / "broken.jpg"].parts is None and "truncated" in found[folder / "broken.jpg"].error
    mine = [a for i, path in enumerate(paths, start=1) if found[path].parts is not None
            for a in predictor.to_coco([found[path].parts], [i])]
    assert mine == results


def test_real_teacher_and_default_thresholds(store, unseen):
    """Without stand-ins: the stored teacher's objects, filtered as the instances stage does."""
    from partdistill import Predictor

    root, version = store
    folder, _ = unseen
    predictor = Predictor.from_store(root)
    manifest = ArtifactStore(root).open("distill_r1", version).manifest
    assert predictor.label == manifest["config"]["label"]
    assert predictor.instances == manifest["merged_config"]["instances"]
    assert (predictor.k, predictor.object_classes) == (8, 8)
    images = [np.asarray(Image.open(folder / n).convert("RGB")) for n in ("b.PNG", "sub/c.bmp")]
    results = predictor.predict(images)
    assert [(r.height, r.width) for r in results] == [(120, 160), (64, 80)]
    for r in results:
        assert len(r.objects) <= predictor.instances["topk_per_image"]
        for o in r.objects:
            assert o.mask.sum() >= predictor.instances["min_object_fraction"] * r.height * r.width
            assert all(not (p.mask & ~o.mask).any() for p in o.parts)
    with pytest.raises(ValueError, match="RGB uint8"):
        predictor.predict([np.zeros((8, 8), np.uint8)])


def test_model_references(store, tmp_path):
    from partdistill.predict import ModelNotFound, resolve_model

    root, version = store
    newest, how = resolve_model(root)
    assert (newest.stage, newest.version) == ("distill_r1", version) and "newest" in how
    # a folder names its own store, whatever the store argument says
    assert resolve_model(tmp_path / "elsewhere", root / "distill_r1" / version)[0].path.resolve() == \
        newest.path.resolve()
    for ref in (f"distill_r1/{version}", "distill_r1", f"distill_r1/{version}/"):
        assert resolve_model(root, ref)[0].path == newest.path
    with pytest.raises(ModelNotFound, match="no complete distill_r"):
        resolve_model(tmp_path / "empty")
    teacher = ArtifactStore(root).versions("teacher")[-1]
    with pytest.raises(ModelNotFound, match="not a distill artifact"):
        resolve_model(root, root / "teacher" / teacher)


def test_cli_bad_model_exit_2(store, unseen, tmp_path):
    root, version = store
    folder, _ = unseen
    for ref, message in ((f"distill_r1/{'0' * 16}", f"distill artifacts there: distill_r1/{version}"),
                         ("teacher", "not an artifact folder"),
                         (tmp_path / "nowhere" / "distill_r1" / "x", "not an artifact folder")):
        result = _cli(folder / "a.png", "--store", root, "--out", tmp_path / "out", "--model", ref)
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()
    result = _cli(folder / "a.png", "--store", tmp_path / "empty", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "no complete distill_r* artifact" in result.output


def test_find_images(unseen, tmp_path):
    from partdistill.predict import find_images

    folder, layout = unseen
    files, missing = find_images([folder, folder / "a.png", tmp_path / "gone.png"])
    assert [f.relative_to(folder).as_posix() for f in files] == [
        "a.png", "b.PNG", "broken.jpg", "sub/a.png", "sub/c.bmp", "sub/d.webp"]
    assert missing == [(tmp_path / "gone.png", "no such file or folder")]


def test_import_stays_cheap():
    code = ("import sys, partdistill; assert 'torch' not in sys.modules and 'partdistill.predict' not in sys.modules; "
            "assert partdistill.Predictor.__name__ == 'Predictor'")
    subprocess.run([sys.executable, "-c", code], check=True)
