"""`partdistill finetune`: few-shot fine-tuning on labelled parts (paper Table 4)."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from partdistill.cli import app
from partdistill.config import load_config
from partdistill.finetune import (
    CLASS_HEAD,
    FinetuneError,
    build_model,
    few_shot_images,
    find_sources,
    finetune,
    identity_miou,
    init_checkpoint,
    initial_state,
    model_spec,
    object_label_map,
    part_categories,
)
from partdistill.models.teacher import load_state_dict
from partdistill.pipeline import run_pipeline
from partdistill.stages.teacher import teacher_checkpoint
from tests.conftest import DEMO_CONFIG, TINY_DISTILL

runner = CliRunner(env={"COLUMNS": "200"})

OPTIONS = TINY_DISTILL
TRANSFORMER = "decoder.head.transformer_decoder.layers.0.cross_attn.attn.in_proj_weight"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A tiny store with data → … → distill_r1."""
    cfg = load_config(DEMO_CONFIG, OPTIONS)
    root = tmp_path_factory.mktemp("finetune-store")
    cfg["runtime"]["store"] = str(root)
    outcomes = run_pipeline(cfg, until="distill")
    assert outcomes[-1].stage == "distill_r1"
    return root


@pytest.fixture(scope="module")
def runs(store, tmp_path_factory):
    """4 iterations at fraction 0.5: from the distilled model (the API), from the teacher (the CLI)."""
    out = tmp_path_factory.mktemp("finetune-runs")
    distill = finetune(store, 0.5, "distill", iters=4, seed=0, out=out / "distill")
    result = runner.invoke(app, ["finetune", "--store", str(store), "--fraction", "0.5", "--init", "teacher",
                                 "--iters", "4", "--out", str(out / "teacher")])
    assert result.exit_code == 0, result.output
    assert "teacher init, " in result.output and "AR@200" in result.output
    return {"distill": distill.out, "teacher": out / "teacher"}


def labelled_ids(store) -> list[int]:
    data = find_sources(store, "distill").data.path
    return [im["id"] for im in json.loads((data / "parts_train.json").read_text())["images"]]


# ---------------------------------------------------------------------------------------- pure parts
def test_few_shot_images_size_and_seed():
    ids = list(range(100, 172))   # 72 labelled images, as the demo's train split
    assert len(few_shot_images(ids, 0.01, 0)) == 1     # ceil(0.72)
    assert len(few_shot_images(ids, 0.1, 0)) == 8      # ceil(7.2)
    assert len(few_shot_images(list(range(70)), 0.1, 0)) == 7   # 0.1 × 70 is 7, not 7.000000000000001
    assert few_shot_images(ids, 1.0, 3) == ids
    assert few_shot_images(ids, 0.1, 0) == few_shot_images(list(reversed(ids)), 0.1, 0)
    assert few_shot_images(ids, 0.1, 0) != few_shot_images(ids, 0.1, 1)
    chosen = few_shot_images(ids, 0.1, 0)
    assert chosen == sorted(set(chosen)) and set(chosen) <= set(ids)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, math.nan])
def test_fraction_outside_range(fraction, tmp_path):
    with pytest.raises(FinetuneError, match=r"fraction must be in \(0, 1\]"):
        finetune(tmp_path, fraction, "distill")
    with pytest.raises(FinetuneError, match="fraction"):
        few_shot_images([1, 2, 3], fraction, 0)


def test_cli_fraction_outside_range_exit_2(tmp_path):
    result = runner.invoke(app, ["finetune", "--store", str(tmp_path), "--fraction", "1.5", "--init", "teacher"])
    assert result.exit_code == 2
    assert "fraction must be in (0, 1]" in result.output


def test_identity_miou_numbers():
    gt = [np.array([0, 0, 1, 1, -1]), np.array([2, 2])]
    pred = [np.array([0, 1, 1, 1, 3]), np.array([2, -1])]
    m = identity_miou(gt, pred, 4)
    # class 0: 1 / 2; class 1: 2 / 3; class 2: 1 / 2; class 3 absent from gt (its pixel is unlabelled)
    assert m["per_class"] == [0.5, pytest.approx(2 / 3), 0.5, None]
    assert m["mIoU"] == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)


def test_object_label_map_takes_most_confident_query():
    masks = np.zeros((2, 2, 3), np.float32)
    masks[0] = 0.9
    masks[1, :, 2] = 1.0
    # query 0: class 1 at 0.5; query 1: class 0 at 0.6 (last column: no-object)
    class_scores = np.array([[0.1, 0.5, 0.4], [0.6, 0.1, 0.3]], np.float32)
    obj = np.array([[True, True, True], [False, True, True]])
    lm = object_label_map(masks, class_scores, obj)
    # 0.9 × 0.5 = 0.45 beats 0.0 × 0.6 on columns 0-1; 1.0 × 0.6 beats 0.45 on column 2
    assert lm.tolist() == [[1, 1, 0], [-1, 1, 0]]


# ---------------------------------------------------------------------------------------- on a store
def test_finetune_writes_metrics_and_checkpoints(store, runs):
    ids = labelled_ids(store)
    categories = part_categories(find_sources(store, "distill").data.path)
    p = len(categories)
    assert p == 34   # Parts World's part categories
    subsets = {}
    for init, out in runs.items():
        m = json.loads((out / "metrics.json").read_text())
        assert m["init"] == init and m["fraction"] == 0.5 and m["iters"] == 4 and m["seed"] == 0
        assert m["labelled_images"] == len(ids)
        assert m["images"] == math.ceil(0.5 * len(ids)) == len(m["image_ids"])
        assert m["image_ids"] == few_shot_images(ids, 0.5, 0)
        assert m["parts"] > 0 and m["seconds"] > 0
        for key in ("AR@200", "mIoU", "C-mIoU"):
            assert 0.0 <= m[key] <= 1.0
        assert m["val"]["objects"] > 0 and m["val"]["AR@200"] == m["AR@200"]
        assert [c["name"] for c in m["part_categories"]] == [c["name"] for c in categories]
        assert len(json.loads((out / "losses.json").read_text())) == 4
        # the class head: P part categories + no-object
        state = load_state_dict(out / "checkpoint.pth")
        assert state["decoder.head.cls_embed.weight"].shape[0] == p + 1
        assert state["decoder.head.cls_embed.bias"].shape == (p + 1,)
        assert json.loads((out / "model.json").read_text())["num_classes"] == p
        subsets[init] = m["image_ids"]
    assert subsets["distill"] == subsets["teacher"]   # the same seed, the same labelled images

    distill_m = json.loads((runs["distill"] / "metrics.json").read_text())
    assert sorted(distill_m["fresh_keys"]) == ["decoder.head.cls_embed.bias", "decoder.head.cls_embed.weight"]
    assert distill_m["sources"]["distill"].startswith("distill_r1/")
    # the frozen backbone came through the fine-tuning untouched
    tuned = load_state_dict(runs["distill"] / "checkpoint.pth")
    source = load_state_dict(init_checkpoint(find_sources(store, "distill"), "distill"))
    frozen = next(k for k in source if k.startswith("backbone.") and source[k].is_floating_point())
    assert torch.equal(tuned[frozen], source[frozen])


def test_same_seed_same_training(store, runs, tmp_path):
    again = finetune(store, 0.5, "distill", iters=1, seed=0, out=tmp_path / "again")
    first = json.loads((runs["distill"] / "losses.json").read_text())[0]
    assert json.loads((again.out / "losses.json").read_text()) == [first]
    assert again.metrics["image_ids"] == json.loads((runs["distill"] / "metrics.json").read_text())["image_ids"]


def test_distill_init_copies_the_decoder(store):
    sources = find_sources(store, "distill")
    p = len(part_categories(sources.data.path))
    spec = model_spec(sources, p)
    distill = load_state_dict(sources.distill.file("checkpoint.pth"))
    teacher = load_state_dict(teacher_checkpoint(sources.teacher))
    state, fresh = initial_state(build_model(spec), init_checkpoint(sources, "distill"))
    assert torch.equal(state[TRANSFORMER], distill[TRANSFORMER])
    # ...which the distillation moved away from the teacher's: the copy is the distilled one
    assert not torch.equal(distill[TRANSFORMER], teacher["panoptic_head." + TRANSFORMER.removeprefix("decoder.head.")])
    assert torch.equal(state["decoder.head.query_embed.weight"], distill["decoder.head.query_embed.weight"])
    assert sorted(fresh) == ["decoder.head.cls_embed.bias", "decoder.head.cls_embed.weight"]
    assert state["decoder.head.cls_embed.weight"].shape[0] == p + 1

    state, fresh = initial_state(build_model(spec), init_checkpoint(sources, "teacher"))
    assert torch.equal(state[TRANSFORMER], teacher["panoptic_head." + TRANSFORMER.removeprefix("decoder.head.")])
    assert all(k.startswith(CLASS_HEAD) or "query" in k for k in fresh)   # the teacher's query count differs


def test_store_without_distill(store, tmp_path):
    with pytest.raises(FinetuneError, match=r"no artifact store .*partdistill run CONFIG --until distill"):
        find_sources(tmp_path / "nowhere", "distill")
    partial = tmp_path / "store"
    for stage in ("data", "teacher"):
        shutil.copytree(store / stage, partial / stage)
    with pytest.raises(FinetuneError, match=r"`distill`.*`partdistill run CONFIG --until distill`"):
        find_sources(partial, "distill")
    with pytest.raises(FinetuneError, match="distill_r1/0000"):
        find_sources(store, "distill", "distill_r1/0000")
    with pytest.raises(FinetuneError, match="init must be one of"):
        find_sources(store, "student")
    # the teacher baseline needs no distill artifact: the newest teacher and its data
    sources = find_sources(partial, "teacher")
    assert sources.distill is None and sources.settings["num_queries"] == 8
    shutil.rmtree(partial / "teacher")
    with pytest.raises(FinetuneError, match=r"no complete `teacher` artifact.*--until distill"):
        find_sources(partial, "teacher")
    result = runner.invoke(app, ["finetune", "--store", str(partial), "--fraction", "0.1", "--init", "distill"])
    assert result.exit_code == 2 and "--until distill" in result.output


def test_data_without_part_labels(store, tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    (data,) = [p for p in (copy / "data").iterdir() if not p.name.startswith(".")]
    (data / "parts_train.json").unlink()
    manifest = json.loads((data / "manifest.json").read_text())
    del manifest["files"]["parts_train.json"]
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FinetuneError, match="no part labels parts_train.json"):
        finetune(copy, 0.5, "teacher", iters=1, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
