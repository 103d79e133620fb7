"""A kill can land between mmengine creating ``last_checkpoint`` and writing it; the next run must
still resume from the newest complete checkpoint (the CI failure of test_resume_after_a_kill)."""
from __future__ import annotations

import torch

from partdistill.models.train_parts import has_checkpoint
from partdistill.models.train_teacher import repair_resume_pointer, resume_iter


def _checkpoints(work, iters):
    work.mkdir(parents=True, exist_ok=True)
    for i in iters:
        torch.save({"meta": {"iter": i}}, work / f"iter_{i}.pth")


def test_an_empty_pointer_resumes_from_the_newest_checkpoint(tmp_path):
    _checkpoints(tmp_path, [2, 4, 10])
    (tmp_path / "last_checkpoint").write_text("")
    assert resume_iter(tmp_path) == 10
    assert has_checkpoint(tmp_path)
    assert (tmp_path / "last_checkpoint").read_text() == str(tmp_path / "iter_10.pth")


def test_a_cut_off_checkpoint_is_skipped(tmp_path):
    _checkpoints(tmp_path, [2, 4])
    whole = (tmp_path / "iter_4.pth").read_bytes()
    (tmp_path / "iter_6.pth").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "last_checkpoint").write_text(str(tmp_path / "iter_gone.pth"))
    assert resume_iter(tmp_path) == 4


def test_no_checkpoint_left_removes_the_pointer(tmp_path):
    (tmp_path / "last_checkpoint").write_text("")
    repair_resume_pointer(tmp_path)
    assert not (tmp_path / "last_checkpoint").exists()
    assert resume_iter(tmp_path) == 0 and not has_checkpoint(tmp_path)


def test_a_good_pointer_is_left_alone(tmp_path):
    _checkpoints(tmp_path, [2, 4])
    (tmp_path / "last_checkpoint").write_text(str(tmp_path / "iter_2.pth"))
    assert resume_iter(tmp_path) == 2
