"""A user's own COCO data set, one JSON per split, end to end: per-split input, image roots, one
class numbering everywhere (a teacher loaded from a checkpoint, categories in a non-alphabetical
order), the errors a real data set meets, and `score` against `evaluate`."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from partdistill.config import load_config
from partdistill.data.images import DatasetError
from partdistill.data.partsworld import PartsWorldConfig, write_partsworld
from partdistill.pipeline import plan, run_pipeline
from partdistill.storage import ArtifactStore
from tests.conftest import DEMO_CONFIG, TINY_DISTILL


@pytest.fixture(scope="module")
def own_data(tmp_path_factory):
    """Parts World written as a user's data set: images in ``data/``, the JSONs in ``ann/`` (so the
    image root is not the JSONs' folder), val's file names absolute and train's relative, and the
    object categories renumbered in reverse order (neither alphabetical nor the teacher config's)."""
    root = tmp_path_factory.mktemp("own")
    write_partsworld(root / "data", PartsWorldConfig(images=12, width=128, height=96, seed=3))
    (root / "ann").mkdir()
    order = json.loads((root / "data" / "instances_train.json").read_text())["categories"][::-1]
    new_id = {c["id"]: 100 - 10 * i for i, c in enumerate(order)}  # tree=100, lamp=90, ...
    for split in ("train", "val"):
        for kind in ("instances", "parts"):
            data = json.loads((root / "data" / f"{kind}_{split}.json").read_text())
            if kind == "instances":
                data["categories"] = [{**c, "id": new_id[c["id"]]} for c in order]
                for a in data["annotations"]:
                    a["category_id"] = new_id[a["category_id"]]
            if split == "val":
                for im in data["images"]:
                    im["file_name"] = str((root / "data" / im["file_name"]).resolve())
            (root / "ann" / f"{kind}_{split}.json").write_text(json.dumps(data))
    return root


def _coco_options(root: Path, **more) -> dict:
    ann = root / "ann"
    return {**TINY_DISTILL, "teacher.source": "train", "data.source": "coco",
            "data.coco.instances": {"train": str(ann / "instances_train.json"), "val": str(ann / "instances_val.json")},
            "data.coco.parts": {"val": str(ann / "parts_val.json")}, "data.coco.root": str(root / "data"), **more}


def _cfg(root: Path, store: Path, **more) -> dict:
    cfg = load_config(DEMO_CONFIG, _coco_options(root, **more))
    cfg["runtime"]["store"] = str(store)
    return cfg


def _names(root: Path) -> list[str]:
    return [c["name"] for c in json.loads((root / "ann" / "instances_train.json").read_text())["categories"]]


@pytest.fixture(scope="module")
def trained(own_data, tmp_path_factory):
    """The data and a teacher trained on it (3 iterations): the first of the issue's two stores."""
    store = tmp_path_factory.mktemp("own-store")
    cfg = _cfg(own_data, store)
    outcomes = {o.stage: o for o in run_pipeline(cfg, until="teacher")}
    return cfg, ArtifactStore(store), outcomes


def test_per_split_input_and_image_roots(own_data, trained):
    cfg, store, outcomes = trained
    data = store.open("data", outcomes["data"].version)
    train = json.loads(data.file("instances_train.json").read_text())
    val = json.loads(data.file("instances_val.json").read_text())
    source_train = json.loads((own_data / "ann" / "instances_train.json").read_text())
    assert [im["id"] for im in train["images"]] == [im["id"] for im in source_train["images"]]
    assert not {im["id"] for im in train["images"]} & {im["id"] for im in val["images"]}
    # relative names resolved against data.coco.root, absolute ones kept: every one is a file
    for im in train["images"] + val["images"]:
        assert Path(im["file_name"]).is_absolute() and Path(im["file_name"]).is_file()
    assert "parts_val.json" in data.files and "parts_train.json" not in data.files
    assert set(data.manifest["evaluation_only"]) >= {"parts_val.json"}
    assert outcomes["data"].summary["train_images"] == len(train["images"])
    # the teacher trained on train objects only (and found its images), and is scored on val
    teacher = store.open("teacher", outcomes["teacher"].version)
    record = json.loads(teacher.file("teacher.json").read_text())
    assert record["class_names"] == _names(own_data)
    assert "ann_file='instances_train.json'" in teacher.file("mmdet_config.py").read_text()
    assert json.loads(teacher.file("metrics.json").read_text())["images"] == len(val["images"])


def test_the_data_version_covers_every_file(own_data, tmp_path):
    cfg = load_config(DEMO_CONFIG, _coco_options(own_data))
    before = {p.name: p.version for p in plan(cfg)}
    copy = tmp_path / "ann"
    shutil.copytree(own_data / "ann", copy)
    moved = {"data.coco.parts": {"val": str(copy / "parts_val.json")}}
    other = load_config(DEMO_CONFIG, _coco_options(own_data, **moved))
    assert {p.name: p.version for p in plan(other)}["data"] != before["data"]
    parts = own_data / "ann" / "parts_val.json"
    text = parts.read_text()
    parts.write_text(text + " ")  # the part file changed: a new version
    try:
        assert {p.name: p.version for p in plan(cfg)}["data"] != before["data"]
    finally:
        parts.write_text(text)


def _broken(own_data, tmp_path, kind, split, mutate):
    ann = tmp_path / "ann"
    if not ann.exists():
        shutil.copytree(own_data / "ann", ann)
    path = ann / f"{kind}_{split}.json"
    data = json.loads(path.read_text())
    mutate(data)
    path.write_text(json.dumps(data))
    opts = _coco_options(own_data)
    opts["data.coco.instances"] = {s: str(ann / f"instances_{s}.json") for s in ("train", "val")}
    opts["data.coco.parts"] = {"val": str(ann / "parts_val.json")}
    cfg = load_config(DEMO_CONFIG, opts)
    cfg["runtime"]["store"] = str(tmp_path / "store")
    return cfg, path


@pytest.mark.parametrize("case", ["collision", "object_id", "part_class", "missing_image", "relative_root"])
def test_errors_name_file_and_id_and_leave_no_partial(own_data, tmp_path, case):
    val_ids = [im["id"] for im in json.loads((own_data / "ann" / "instances_val.json").read_text())["images"]]
    if case == "collision":  # a train image takes the id of a val image
        def mutate(d):
            old = d["images"][0]["id"]
            d["images"][0]["id"] = val_ids[0]
            for a in d["annotations"]:
                if a["image_id"] == old:
                    a["image_id"] = val_ids[0]
        cfg, path = _broken(own_data, tmp_path, "instances", "train", mutate)
        pattern = (rf"instances_val.json: image id {val_ids[0]} is also in .*instances_train.json \(split 'train'\)")
    elif case == "object_id":
        cfg, path = _broken(own_data, tmp_path, "parts", "val", lambda d: d["annotations"][3].update(object_id=7))
        part_id = json.loads(path.read_text())["annotations"][3]["id"]
        pattern = (rf"parts_val.json: annotations\[3\] \(id {part_id}\): object_id 7 names no object of "
                   r".*instances_val.json")
    elif case == "part_class":
        cfg, path = _broken(own_data, tmp_path, "parts", "val",
                            lambda d: d["categories"][0].update(supercategory="boat"))
        cat = json.loads(path.read_text())["categories"][0]
        pattern = (rf"parts_val.json: part category id {cat['id']} \('{cat['name']}'\) has object class 'boat', "
                   r"which is not a category of .*instances_val.json")
    elif case == "missing_image":
        cfg, path = _broken(own_data, tmp_path, "instances", "train",
                            lambda d: d["images"][1].update(file_name="images/nope.png"))
        pattern = r"instances_train.json: 1 of \d+ image files are missing \(id \d+: .*images/nope.png\)"
    else:  # no data.coco.root: relative names are read beside the JSON, where the images are not
        cfg, path = _broken(own_data, tmp_path, "instances", "train", lambda d: None)
        cfg["data"]["coco"]["root"] = None
        pattern = r"instances_train.json: \d+ of \d+ image files are missing .* set data.coco.root"
    with pytest.raises(DatasetError, match=pattern):
        run_pipeline(cfg, until="data")
    store = ArtifactStore(cfg["runtime"]["store"])
    assert store.partial_versions("data") == [] and store.versions("data") == []


def test_single_json_form_still_works(own_data, tmp_path):
    cfg = load_config(DEMO_CONFIG, {**TINY_DISTILL, "data.source": "coco",
                                    "data.coco.instances": str(own_data / "data" / "instances_val.json"),
                                    "data.coco.parts": str(own_data / "data" / "parts_val.json")})
    cfg["runtime"]["store"] = str(tmp_path / "store")
    [out] = run_pipeline(cfg, until="data")
    data = ArtifactStore(tmp_path / "store").open("data", out.version)
    assert {"instances_val.json", "parts_val.json"} <= set(data.files) and out.summary["val_images"] > 0


# --- a teacher loaded from a checkpoint: one class numbering in distill, evaluate and predict -------


@pytest.fixture(scope="module")
def from_checkpoint(own_data, trained, tmp_path_factory):
    """The issue's second store: the first store's teacher as teacher.source='checkpoint' (its config
    lists the classes in the demo's order), ground-truth objects, through `evaluate`; every call of
    `object_parts` (which conditions objects on their class) recorded."""
    import partdistill.stages.distill as distill

    _, store, outcomes = trained
    ckpt = store.open("teacher", outcomes["teacher"].version).file("checkpoint.pth")
    cfg = _cfg(own_data, tmp_path_factory.mktemp("own-store-2"), **{
        "teacher.source": "checkpoint", "teacher.checkpoint": str(ckpt), "teacher.checkpoint_sha256": None,
        "instances.source": "gt"})
    calls = []
    real = distill.object_parts
    monkey = pytest.MonkeyPatch()

    def spy(masks, class_scores, objects, classes, *args, **kwargs):
        calls.append((where[0], [np.asarray(o, bool) for o in objects], [int(c) for c in classes]))
        return real(masks, class_scores, objects, classes, *args, **kwargs)

    where = ["distill"]
    monkey.setattr(distill, "object_parts", spy)
    try:
        out = {o.stage: o for o in run_pipeline(cfg, until="distill")}
        where[0] = "evaluate"
        out.update({o.stage: o for o in run_pipeline(cfg)})
    finally:
        monkey.undo()
    return cfg, ArtifactStore(cfg["runtime"]["store"]), out, calls


def _expected_class(own_data):
    """GT object mask bytes → its class id in the data's category order."""
    names = _names(own_data)
    out = {}
    from partdistill.data.images import coco_instance_masks

    for split in ("train", "val"):
        path = own_data / "ann" / f"instances_{split}.json"
        for insts in coco_instance_masks(path).values():
            for g in insts:
                out[g.mask.tobytes()] = names.index(g.category_name)
    return out


def test_checkpoint_teacher_records_its_classes_and_every_stage_uses_one_numbering(own_data, from_checkpoint):
    cfg, store, outcomes, calls = from_checkpoint
    names = _names(own_data)
    assert names != sorted(names)
    teacher = json.loads(store.open("teacher", outcomes["teacher"].version).file("teacher.json").read_text())
    # the checkpoint's own classes (its config's order), recorded: never null
    assert teacher["source"] == "checkpoint" and teacher["class_names"][:2] == ["robot", "car"]
    assert teacher["class_names"] != names
    instances = store.open("instances", outcomes["instances"].version)
    assert json.loads(instances.file("classes.json").read_text())["class_names"] == names
    expected = _expected_class(own_data)
    checked = {"distill": 0, "evaluate": 0}
    for stage, masks, classes in calls:
        for m, c in zip(masks, classes, strict=True):
            if m.tobytes() in expected:
                assert c == expected[m.tobytes()], f"{stage}: an object conditioned on class {names[c]}"
                checked[stage] += 1
    assert checked["distill"] > 0 and checked["evaluate"] > 0


def test_predict_conditions_on_the_runs_numbering(own_data, from_checkpoint, monkeypatch):
    """The teacher's labels come in its own order; predict turns them into the run's ids by name."""
    from partdistill.models.teacher import TeacherOutput
    from partdistill.predict import Predictor

    cfg, store, outcomes, _ = from_checkpoint
    predictor = Predictor.from_store(store.root, f"distill_r1/{outcomes['distill_r1'].version}")
    names = _names(own_data)
    assert predictor.class_names == names
    teacher_names = predictor.teacher.class_names

    class Fixed:
        class_names = teacher_names

        def predict(self, images, layers=()):
            outs = []
            for img in images:
                masks = np.zeros((2, *img.shape[:2]), bool)
                masks[0, :40, :60] = True
                masks[1, 50:, 60:] = True
                outs.append(TeacherOutput(masks, np.array([0.9, 0.8], np.float32),
                                          np.array([teacher_names.index("lamp"), teacher_names.index("robot")]),
                                          {}, img.shape[:2]))
            return outs

    predictor.teacher = Fixed()
    [found] = predictor.detect([np.zeros((96, 128, 3), np.uint8)])
    assert [(d.class_name, d.class_id) for d in found] == [("lamp", names.index("lamp")),
                                                           ("robot", names.index("robot"))]
    assert predictor.categories()[0]["supercategory"] == names[0]


def test_score_equals_evaluate_on_its_predictions(own_data, from_checkpoint):
    from partdistill.evaluation.score import score_file

    cfg, store, outcomes, _ = from_checkpoint
    art = store.open("evaluate", outcomes["evaluate"].version)
    metrics = json.loads(art.file("metrics.json").read_text())
    ours = metrics["gt"]["PartDistillation"]
    scored = score_file(art.file("predictions.json"), own_data / "ann" / "parts_val.json",
                        own_data / "ann" / "instances_val.json")
    assert metrics["objects"] == scored["objects"] and ours["predicted"] == scored["predicted"]
    for key, value in ours.items():
        if value is None:
            assert np.isnan(scored[key]), key
        else:
            assert scored[key] == value, key
    assert "size_filter" in metrics and metrics["size_filter"]["dropped"] >= 0
    assert "instances.min_object_fraction" in art.file("table.md").read_text()


def test_predict_keeps_coco_image_ids_and_takes_given_objects(own_data, from_checkpoint, tmp_path, monkeypatch):
    """`predict --coco`: the JSON's images (relative names under --image-root, absolute ones as they
    are) keep their COCO ids; with --gt-objects the JSON's object masks are the objects, each
    conditioned on its own class and named by its annotation id, so `score` matches parts by it."""
    from typer.testing import CliRunner

    import partdistill.stages.distill as distill
    from partdistill.cli import app

    cfg, store, outcomes, _ = from_checkpoint
    model = f"distill_r1/{outcomes['distill_r1'].version}"
    runner = CliRunner(env={"COLUMNS": "200"})
    ann = own_data / "ann"
    # train's file names are relative to data/, val's absolute
    run = runner.invoke(app, ["predict", "--coco", str(ann / "instances_train.json"), "--image-root",
                              str(own_data / "data"), "--store", str(store.root), "--model", model,
                              "--out", str(tmp_path / "teacher")])
    assert run.exit_code == 0, run.output
    written = json.loads((tmp_path / "teacher" / "predictions.json").read_text())
    train = json.loads((ann / "instances_train.json").read_text())
    assert sorted(im["id"] for im in written["images"]) == sorted(im["id"] for im in train["images"])
    assert written["object_ids"] == "index"

    calls = []
    real = distill.object_parts

    def spy(masks, class_scores, objects, classes, *args, **kwargs):
        calls.append(([np.asarray(o, bool) for o in objects], [int(c) for c in classes]))
        return real(masks, class_scores, objects, classes, *args, **kwargs)

    monkeypatch.setattr(distill, "object_parts", spy)
    run = runner.invoke(app, ["predict", "--coco", str(ann / "instances_val.json"), "--gt-objects",
                              "--store", str(store.root), "--model", model, "--out", str(tmp_path / "gt"),
                              "--mask-threshold", "0.05", "--min-fraction", "0"])
    assert run.exit_code == 0, run.output
    written = json.loads((tmp_path / "gt" / "predictions.json").read_text())
    val = json.loads((ann / "instances_val.json").read_text())
    assert written["object_ids"] == "annotation"
    assert sorted(o["object_id"] for o in written["objects"]) == sorted(a["id"] for a in val["annotations"])
    assert {o["image_id"] for o in written["objects"]} <= {im["id"] for im in val["images"]}
    expected = _expected_class(own_data)
    conditioned = [(m, c) for masks, classes in calls for m, c in zip(masks, classes, strict=True)
                   if m.tobytes() in expected]
    assert conditioned and all(c == expected[m.tobytes()] for m, c in conditioned)
    names = _names(own_data)
    for o in written["objects"]:
        assert names[o["class_id"]] == o["class_name"]
    run = runner.invoke(app, ["score", str(tmp_path / "gt" / "predictions.json"), "--parts",
                              str(ann / "parts_val.json"), "--instances", str(ann / "instances_val.json")])
    assert run.exit_code == 0, run.output
    assert " 0 result(s) on no object" in " ".join(run.output.split())


def test_partimagenet_folder_is_a_data_source(own_data, tmp_path):
    """PartImageNet's layout ({split}.json of parts, images under {split}/) as one setting: objects
    are the unions of each image's parts of a class, exactly as the evaluation loader reads them."""
    from partdistill.evaluation.loaders import partimagenet
    from partdistill.evaluation.premise import load_gt_objects

    root = tmp_path / "PartImageNet"
    for split in ("train", "val"):
        parts = json.loads((own_data / "data" / f"parts_{split}.json").read_text())
        for a in parts["annotations"]:
            a.pop("object_id"), a.pop("object_category_id", None)
        (root / split / "images").mkdir(parents=True)
        for im in parts["images"]:
            name = Path(im["file_name"]).name
            shutil.copy(own_data / "data" / "images" / name, root / split / "images" / name)
            im["file_name"] = f"images/{name}"
        (root / f"{split}.json").write_text(json.dumps(parts))
    cfg = load_config(DEMO_CONFIG, {"data.source": "partimagenet", "data.partimagenet.root": str(root)})
    cfg["runtime"]["store"] = str(tmp_path / "store")
    [out] = run_pipeline(cfg, until="data")
    data = ArtifactStore(tmp_path / "store").open("data", out.version)
    assert {"instances_train.json", "instances_val.json", "parts_val.json", "parts_train.json"} <= set(data.files)
    assert set(data.manifest["evaluation_only"]) >= {"parts_train.json", "parts_val.json"}
    ours, theirs = load_gt_objects(data.path, "val"), partimagenet(root, "val")
    assert len(ours) == len(theirs) > 0
    for a, b in zip(ours, theirs, strict=True):
        assert a.image_id == b.image_id and a.class_name == b.class_name
        assert (a.mask == b.mask).all() and (a.part_labels == b.part_labels).all()
    classes = [c["name"] for c in json.loads(data.file("instances_train.json").read_text())["categories"]]
    part_categories = json.loads((root / "train.json").read_text())["categories"]
    assert classes == list(dict.fromkeys(c["supercategory"] for c in part_categories))
