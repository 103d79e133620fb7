import json
from pathlib import Path

import numpy as np
import pytest
import torch

from partdistill.models.teacher import CheckpointError, Teacher, load_state_dict
from partdistill.stages.teacher import load_teacher

REPO = Path(__file__).resolve().parents[2]
DEMO_TEACHER = REPO / "configs" / "teachers" / "demo_mask2former_effnet-lite0_partsworld.py"


def test_teacher_artifact(tiny_run):
    cfg, store, outcomes = tiny_run
    art = store.open("teacher", outcomes["teacher"].version)
    record = json.loads(art.file("teacher.json").read_text())
    assert record["source"] == "train" and len(record["class_names"]) == 8
    ckpt = torch.load(art.file("checkpoint.pth"), weights_only=True)  # no pickled objects inside
    assert ckpt["meta"]["iters"] == 3
    metrics = json.loads(art.file("metrics.json").read_text())
    assert {"mask_AP", "mask_AP50", "mask_AP75"} <= set(metrics) and 0.0 <= metrics["mask_AP50"] <= 1.0
    assert art.file("loss.png").stat().st_size > 1000
    assert len(json.loads(art.file("losses.json").read_text())) == 3
    assert not any(name.startswith("work/") for name in art.files)  # the Runner's scratch is not kept

    teacher = load_teacher(art)
    img = np.random.default_rng(0).integers(0, 255, (90, 130, 3), dtype=np.uint8)
    [out] = teacher.predict([img], layers=["res3", "res4", "pixel_decoder", "mask_features"])
    assert out.masks.shape[1:] == (90, 130) and out.masks.dtype == bool
    assert len(out.scores) == len(out.labels) == len(out.masks)
    assert out.features["res3"].shape == (40, 12, 17)        # ceil(90/8), ceil(130/8)
    assert out.features["res4"].shape == (112, 6, 9)
    assert out.features["pixel_decoder"].shape == (128, 12, 17)
    assert out.features["mask_features"].shape == (128, 23, 33)


def test_checkpoint_errors_name_file_and_keys(tmp_path, tiny_run):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.pth"):
        Teacher.from_config(DEMO_TEACHER, tmp_path / "nope.pth")
    cfg, store, outcomes = tiny_run
    state = load_state_dict(store.open("teacher", outcomes["teacher"].version).file("checkpoint.pth"))
    state.pop("panoptic_head.cls_embed.weight")
    state["panoptic_head.extra.weight"] = torch.zeros(1)
    state["panoptic_head.query_feat.weight"] = torch.zeros(3, 3)
    bad = tmp_path / "bad.pth"
    torch.save({"state_dict": state}, bad)
    with pytest.raises(CheckpointError) as err:
        Teacher.from_config(DEMO_TEACHER, bad)
    msg = str(err.value)
    assert str(bad) in msg and "1 missing (first: panoptic_head.cls_embed.weight)" in msg
    assert "panoptic_head.extra.weight" in msg and "query_feat.weight (3, 3) vs (20, 128)" in msg
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*garbage.pth"):
        Teacher.from_config(DEMO_TEACHER, garbage)


def test_refuses_configs_that_would_download(tmp_path):
    with pytest.raises(CheckpointError, match="cannot be fetched here"):
        Teacher.from_config(DEMO_TEACHER, None, cfg_options={
            "model.backbone.pretrained": False,
            "model.backbone.init_cfg": {"type": "Pretrained", "checkpoint": "https://example.invalid/w.pth"}})


@pytest.mark.parametrize("name", ["mask2former_r50_coco-instance.py", "mask2former_r101_coco-instance.py",
                                  "mask2former_swin-t_coco-instance.py", "mask2former_swin-s_coco-instance.py",
                                  "mask2former_swin-l_coco-instance.py", "mask2former_swin-l_coco-panoptic.py"])
def test_teacher_configs_build(name):
    """Each shipped teacher config builds (random init) and runs on a small image."""
    small = {"model.panoptic_head.num_queries": 10,
             "model.panoptic_head.pixel_decoder.encoder.num_layers": 1,
             "model.panoptic_head.transformer_decoder.num_layers": 1}
    teacher = Teacher.from_config(REPO / "configs" / "teachers" / name, None, cfg_options=small)
    assert len(teacher.class_names) == 80
    [out] = teacher.predict([np.zeros((64, 96, 3), np.uint8)], layers=["res3", "res4"])
    assert out.features["res3"].shape[1:] == (8, 12) and out.features["res4"].shape[1:] == (4, 6)
    assert out.masks.shape[1:] == (64, 96)


def test_building_after_training_in_the_same_process(tiny_run):
    """A finished Runner leaves its logger current; building (init_weights) afterwards must work."""
    teacher = Teacher.from_config(DEMO_TEACHER, None, cfg_options={"model.backbone.pretrained": False})
    assert teacher.model is not None
