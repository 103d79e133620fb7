"""The shipped demo teacher: its sha256 is what the demo config says, it is checked, and it loads strictly."""

import hashlib
import shutil

import numpy as np
import pytest

pytest.importorskip("mmdet")

from partdistill.config import load_config  # noqa: E402
from partdistill.models.teacher import CheckpointError, Teacher  # noqa: E402
from partdistill.stages.teacher import check_sha256, resolve_path  # noqa: E402
from tests.conftest import DEMO_CONFIG  # noqa: E402


def _shipped():
    section = load_config(DEMO_CONFIG)["teacher"]
    assert section["source"] == "checkpoint"
    return section, resolve_path(section["checkpoint"]), resolve_path(section["mmdet_config"])


def test_sha256_matches_the_config_and_a_changed_file_is_refused(tmp_path):
    section, ckpt, _ = _shipped()
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == section["checkpoint_sha256"]
    assert ckpt.stat().st_size <= 20 * 2**20
    check_sha256(ckpt, section["checkpoint_sha256"])      # passes
    bad = tmp_path / "teacher.pth"
    shutil.copy(ckpt, bad)
    with open(bad, "r+b") as f:                            # one flipped byte
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CheckpointError, match=r"teacher\.pth.*sha256"):
        check_sha256(bad, section["checkpoint_sha256"])


def test_loads_strictly_and_finds_objects():
    from partdistill.data.partsworld import PartsWorldConfig, render_image

    _, ckpt, mmdet_config = _shipped()
    teacher = Teacher.from_config(mmdet_config, ckpt)   # strict: any missing or extra key raises
    assert list(teacher.class_names) == ["robot", "car", "bird", "fish", "chair", "house", "lamp", "tree"]
    world = PartsWorldConfig(images=8, seed=11)
    best = []
    for index in range(8):
        rendered = render_image(world, index)
        pred = teacher.predict([rendered.image], layers=())[0]
        for inst in rendered.instances:
            if inst.mask.sum() > 0.05 * inst.mask.size:
                best.append(max(((m & inst.mask).sum() / max((m | inst.mask).sum(), 1)
                                 for m, s in zip(pred.masks, pred.scores, strict=True) if s > 0.5), default=0.0))
    assert len(best) >= 5
    # a trained teacher (val mask AP50 0.71): most sizeable objects are found by a confident mask
    assert np.mean(np.asarray(best) > 0.5) >= 0.7, np.round(best, 2)
