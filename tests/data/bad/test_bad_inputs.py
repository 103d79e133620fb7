"""Every bad input of the corpus gives a named error or a recorded skip, and loses nothing.

One test per case of :data:`tests.data.bad.corpus.CASES`, fed to the code that meets it in the
pipeline; stage-level cases run against a store that already holds complete artifacts.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.data.bad import corpus
from tests.data.bad.corpus import CASES, Bench


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return corpus.generate(tmp_path_factory.mktemp("bad-inputs"))


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return Bench(tmp_path_factory.mktemp("bad-bench"))


def test_corpus_is_generated_not_committed(inputs):
    folder = next(iter(inputs.values())).parent.parent
    assert sorted(inputs) == sorted(c.name for c in CASES) and len(CASES) == len({c.name for c in CASES})
    for name, path in inputs.items():
        assert path.parent == folder / name  # each input in its own folder (a missing one need not exist)
    committed = [p.name for p in corpus.REPO.joinpath("tests", "data", "bad").iterdir() if p.is_file()]
    assert all(name.endswith(".py") for name in committed), committed


def test_the_base_store_is_complete(bench):
    assert [o.stage for o in bench.base.values()] == ["data", "instances", "features", "mining"]
    assert bench.store.verify() == []
    assert bench.base["mining"].summary["parts"] > 0


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case, inputs, bench):
    path = inputs[case.name]
    outcome = case.feed(bench, path)
    kind, start = case.expect
    assert (outcome.kind, outcome.detail[:len(start)]) == (kind, start), f"{outcome}: {outcome.message}"
    for name in corpus.expected_names(case, path):
        assert name in outcome.message, f"the error does not name {name!r}: {outcome.message}"
    if case.stage:
        assert outcome.lost == [], outcome.lost
    else:
        assert outcome.lost is None


# What each legitimate image must load as, computed without load_rgb.
REFERENCE = {
    "one_by_one": lambda p: np.asarray(Image.open(p).convert("RGB")),
    "grayscale": lambda p: np.repeat(np.asarray(Image.open(p))[:, :, None], 3, axis=2),
    "cmyk_jpeg": lambda p: np.asarray(Image.open(p).convert("RGB")),  # Pillow's naive CMYK conversion
    "png_16bit": lambda p: np.repeat((np.asarray(Image.open(p)).astype(np.uint32) >> 8)[:, :, None], 3,
                                     axis=2).astype(np.uint8),
    "animated_gif": lambda p: np.asarray(Image.open(p).convert("RGB")),  # the first frame
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_legitimate_images_load_by_the_convention(name, inputs):
    """uint8 (H, W, 3), C-contiguous: grey replicated, 16-bit scaled by v >> 8, a GIF's first frame."""
    from partdistill.data.images import load_rgb

    path = inputs[name]
    assert next(c for c in CASES if c.name == name).expect[0] == "ok"
    img = load_rgb(path)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and img.flags.c_contiguous
    np.testing.assert_array_equal(img, REFERENCE[name](path))
    if name == "png_16bit":
        assert (np.asarray(Image.open(path)) & 0xFF).any()  # the low byte is there, and dropped
    if name == "animated_gif":
        with Image.open(path) as im:
            assert im.n_frames == 2


def test_lost_notices_changed_and_missing_artifacts(bench):
    """The "nothing lost" check is not vacuous: a changed or vanished artifact is reported."""
    before = bench.snapshot()
    (stage, version), files = next(iter(before.items()))
    assert bench.lost(before) == []
    changed = {**before, (stage, version): {**files, "manifest.json": "0" * 64}}
    assert bench.lost(changed) == [f"{stage}/{version}: files changed"]
    assert bench.lost({**before, ("mining", "gone"): {}}) == ["mining/gone: artifact gone"]


def test_max_pixels_setting_and_versions(bench, tmp_path):
    """data.max_pixels is a setting of the config; at its default it leaves every version as it
    was, another value gives `instances` (and what follows) a new version but keeps `data`."""
    from partdistill.config import load_config
    from partdistill.data.images import DEFAULT_MAX_PIXELS
    from partdistill.pipeline import plan

    assert load_config(corpus.DEMO_CONFIG)["data"]["max_pixels"] == DEFAULT_MAX_PIXELS
    default = {p.name: p.version for p in plan(bench.config(bench.good_json))}
    limited = {p.name: p.version for p in plan(bench.config(bench.good_json, **{"data.max_pixels": 1000}))}
    assert all(default[stage] == o.version for stage, o in bench.base.items())
    assert limited["data"] == default["data"]
    assert limited["instances"] != default["instances"] and limited["mining"] != default["mining"]


@pytest.mark.parametrize("backend", ["torch", "faiss"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_mining_skips_non_finite_features(backend, bad):
    """Unhandled, torch K-means put the whole object in one part and faiss raised from C++."""
    from partdistill.stages.mining import mine_instances
    from partdistill.storage import mask_to_rle

    mask = np.zeros((32, 32), bool)
    mask[4:28, 4:28] = True
    row = {"instance_id": 7, "image_id": 1, "split": "val", "file_name": "x.png", "rle": mask_to_rle(mask)["counts"],
           "height": 32, "width": 32}
    grid = np.random.default_rng(0).normal(size=(4, 4, 8)).astype(np.float32)
    grid[1, 2, 3] = bad
    meta = {"grid_y0": 0, "grid_x0": 0, "stride": 8, "scale_y": 1.0, "scale_x": 1.0}
    cfg = {"k": 4, "metric": "cosine", "iters": 5, "seed": 0, "backend": backend, "min_part_area": 16,
           "crf": {"enabled": False}}
    out = mine_instances([row], lambda _: (grid, meta), None, cfg)
    assert out.rows == [] and out.skipped == [{"instance_id": 7, "image_id": 1, "reason": "features hold NaN or Inf"}]


def test_cli_predict_with_a_foreign_teacher_checkpoint_exits_2(bench, inputs, tmp_path):
    from typer.testing import CliRunner

    from partdistill.cli import app

    ckpt = inputs["predict_foreign_teacher"]
    model = corpus.model_with_teacher(bench, ckpt)
    image = corpus.make_picture(tmp_path)
    result = CliRunner(env={"COLUMNS": "200"}).invoke(
        app, ["predict", str(image), "--out", str(tmp_path / "out"), "--store", str(bench.store.root),
              "--model", str(model)])
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert str(ckpt) in text and "does not fit the model" in text
    assert not (tmp_path / "out").exists()
