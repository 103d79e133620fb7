"""Training an mmdet teacher on a COCO instance JSON with mmengine's Runner.

Used for the demo teacher (a small Mask2Former on Parts World objects). The Runner writes its
checkpoints into ``work_dir``; a run killed mid-training resumes from the last of them.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from partdistill.models.teacher import register_mmdet


def runner_settings(max_iters: int, checkpoint_interval: int, seed: int, milestones: Sequence[float],
                    backend: str, warmup_iters: int = 50) -> dict[str, Any]:
    """The Runner settings every training here shares: warm-up then step decay at the
    ``milestones`` (fractions of ``max_iters``), iteration-based logging, one kept checkpoint
    every ``checkpoint_interval`` iterations (what a killed run resumes from), the seed."""
    return dict(
        param_scheduler=[dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0,
                              end=max(1, min(int(warmup_iters), max_iters))),
                         dict(type="MultiStepLR", begin=0, end=max_iters, by_epoch=False,
                              milestones=[int(max_iters * m) for m in milestones], gamma=0.1)],
        default_hooks=dict(
            timer=dict(type="IterTimerHook"),
            logger=dict(type="LoggerHook", interval=25, log_metric_by_epoch=False),
            param_scheduler=dict(type="ParamSchedulerHook"),
            checkpoint=dict(type="CheckpointHook", interval=checkpoint_interval, by_epoch=False,
                            max_keep_ckpts=2, save_last=True),
            sampler_seed=dict(type="DistSamplerSeedHook")),
        log_processor=dict(type="LogProcessor", window_size=25, by_epoch=False),
        env_cfg=dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
                     dist_cfg=dict(backend=backend)),
        randomness=dict(seed=seed, deterministic=False),
        log_level="ERROR",
    )


def training_config(
    mmdet_config: str | Path,
    data_root: str | Path,
    ann_file: str,
    class_names: Sequence[str],
    work_dir: str | Path,
    max_iters: int,
    batch_size: int,
    lr: float,
    seed: int,
    image_size: tuple[int, int],
    checkpoint_interval: int = 100,
    num_workers: int = 0,
):
    """The teacher's model config plus data, schedule and runtime settings → an mmengine Config.

    image_size is (height, width): training crops to it after a large-scale jitter, as the
    reference's LSJ augmentation does, but at the data set's own scale instead of 1024²."""
    from mmengine.config import Config

    cfg = Config.fromfile(str(mmdet_config))
    h, w = image_size
    train_pipeline = [
        dict(type="LoadImageFromFile", to_float32=True),
        dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
        dict(type="RandomFlip", prob=0.5),
        dict(type="RandomResize", scale=(w, h), ratio_range=(0.6, 1.5), keep_ratio=True),
        dict(type="RandomCrop", crop_size=(h, w), crop_type="absolute", recompute_bbox=True,
             allow_negative_crop=True),
        dict(type="FilterAnnotations", min_gt_bbox_wh=(1e-5, 1e-5), by_mask=True),
        dict(type="PackDetInputs"),
    ]
    n_cls = len(class_names)
    cfg.model.panoptic_head.num_things_classes = n_cls
    cfg.model.panoptic_head.loss_cls.class_weight = [1.0] * n_cls + [0.1]
    cfg.model.panoptic_fusion_head.num_things_classes = n_cls
    embed = dict(lr_mult=1.0, decay_mult=0.0)
    cfg.merge_from_dict(dict(
        class_names=tuple(class_names),
        work_dir=str(work_dir),
        train_dataloader=dict(
            batch_size=batch_size, num_workers=num_workers, persistent_workers=num_workers > 0,
            sampler=dict(type="InfiniteSampler", shuffle=True, seed=seed),
            dataset=dict(type="CocoDataset", data_root=str(data_root), ann_file=ann_file,
                         data_prefix=dict(img=""), metainfo=dict(classes=tuple(class_names)),
                         filter_cfg=dict(filter_empty_gt=True, min_size=1), pipeline=train_pipeline)),
        train_cfg=dict(type="IterBasedTrainLoop", max_iters=max_iters, val_interval=max_iters + 1),
        optim_wrapper=dict(
            type="OptimWrapper",
            optimizer=dict(type="AdamW", lr=lr, weight_decay=0.05, eps=1e-8, betas=(0.9, 0.999)),
            clip_grad=dict(max_norm=0.01, norm_type=2),
            paramwise_cfg=dict(custom_keys={"backbone": dict(lr_mult=0.1, decay_mult=1.0),
                                            "query_embed": embed, "query_feat": embed, "level_embed": embed},
                               norm_decay_mult=0.0)),
        **runner_settings(max_iters, checkpoint_interval, seed, milestones=(0.8,), backend="gloo"),
        launcher="none",
        resume=True,
        load_from=None,
    ))
    for key in ("val_dataloader", "val_cfg", "val_evaluator", "test_dataloader", "test_cfg", "test_evaluator"):
        cfg.pop(key, None)
    return cfg


def train(cfg, on_iter: Callable[[int, float], None] | None = None, device: str = "cpu") -> dict[str, Any]:
    """Run the training loop; resumes from ``work_dir``'s last checkpoint. Returns the trained
    model's state dict (CPU tensors) and the loss history."""
    import os

    from mmengine.hooks import Hook
    from mmengine.runner import Runner

    register_mmdet()
    # Losses go to a file as they come, so that a resumed run still returns the whole curve:
    # the lines up to the checkpoint it resumes from are kept, later ones are redone.
    work = Path(cfg.work_dir)
    log = work / "losses.txt"
    writes_log = int(os.environ.get("RANK", "0")) == 0
    if writes_log:
        work.mkdir(parents=True, exist_ok=True)
        kept = log.read_text().splitlines(keepends=True)[:resume_iter(work)] if log.exists() else []
        log.write_text("".join(kept))

    class _Report(Hook):
        priority = "VERY_LOW"

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            if outputs and "loss" in outputs:
                from mmengine.dist import all_reduce

                value = outputs["loss"].detach().clone().float()
                all_reduce(value, op="mean")  # data-parallel: the mean over processes (a no-op in one)
                loss = float(value)
            else:
                loss = float("nan")
            if writes_log:
                with log.open("a") as f:
                    f.write(f"{loss!r}\n")
            if on_iter is not None:
                on_iter(runner.iter + 1, loss)

    class _IterSeed(Hook):
        """Seeds torch's global RNG from (seed, iteration) before every iteration, so that a
        resumed run draws what an uninterrupted one would (mmengine restores weights, optimizer
        and schedule, not the RNG; the data loader's own draws differ across a resume)."""

        priority = "VERY_HIGH"

        def before_train_iter(self, runner, batch_idx, data_batch=None):
            torch.manual_seed((int(runner.seed) * 1_000_003 + runner.iter) % (2**63))

    from partdistill.faults import install_checkpoint_fault

    install_checkpoint_fault()
    repair_resume_pointer(Path(cfg.work_dir))
    cfg = copy.deepcopy(cfg)
    if device == "cuda":
        cfg.optim_wrapper.type = "AmpOptimWrapper"
    runner = Runner.from_cfg(cfg)
    runner.register_hook(_Report())
    runner.register_hook(_IterSeed())
    try:
        with _trusted_checkpoints(Path(cfg.work_dir)):
            runner.train()
    finally:
        # The Runner's logger stays mmengine's "current" logger after training, and its file
        # handler points into work_dir, which the stage deletes: a later init_weights in this
        # process would write to the closed file.
        import logging

        for handler in list(runner.logger.handlers):
            if isinstance(handler, logging.FileHandler):
                handler.close()
                runner.logger.removeHandler(handler)
    model = runner.model.module if hasattr(runner.model, "module") else runner.model
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    losses = [float(v) for v in log.read_text().split()] if writes_log else []
    return {"state_dict": state, "losses": losses, "iters": runner.iter}


def repair_resume_pointer(work_dir: str | Path) -> None:
    """A run killed between mmengine's checkpoint steps can leave ``last_checkpoint`` empty (the
    file is created before it is written) or naming a file that is gone; point it at the newest
    complete checkpoint that is there, or remove it. Called before anything decides whether to
    resume, so that such a kill costs one checkpoint interval, not the whole run."""
    import re
    import zipfile

    work_dir = Path(work_dir)
    last = work_dir / "last_checkpoint"
    if not last.is_file() or Path(last.read_text().strip()).is_file():
        return
    found = sorted(work_dir.glob("iter_*.pth"), key=lambda p: int(re.search(r"(\d+)", p.name).group(1)))
    for candidate in reversed(found):
        try:  # torch.save writes a zip whose directory comes last: a cut-off file has none
            with zipfile.ZipFile(candidate):
                pass
        except (zipfile.BadZipFile, OSError):
            continue
        last.write_text(str(candidate))
        return
    last.unlink()


def resume_iter(work_dir: str | Path) -> int:
    """The iteration of the checkpoint a run in ``work_dir`` would resume from (0: none)."""
    import re

    repair_resume_pointer(work_dir)  # leaves the pointer valid or removes it
    last = Path(work_dir) / "last_checkpoint"
    if not last.is_file():
        return 0
    match = re.search(r"iter_(\d+)\.pth$", last.read_text().strip())
    return int(match.group(1)) if match else 0


@contextlib.contextmanager
def _trusted_checkpoints(work_dir: Path):
    """Let mmengine resume from the checkpoints this training wrote into ``work_dir``.

    torch >= 2.6 loads with ``weights_only=True``, which refuses the Runner's own resume state
    (message hub, optimizer and scheduler state). Those files are ours, so inside ``work_dir``
    they are loaded in full; any other file keeps torch's safe default."""
    import mmengine.runner.checkpoint as ckpt

    real = ckpt.torch.load
    root = work_dir.resolve()

    def load(f, *args, **kwargs):
        if isinstance(f, str | Path) and Path(f).resolve().is_relative_to(root):
            kwargs.setdefault("weights_only", False)
        return real(f, *args, **kwargs)

    ckpt.torch.load = load
    try:
        yield
    finally:
        ckpt.torch.load = real


def save_checkpoint(path: Path, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """A plain {state_dict, meta} file of tensors and built-in types: loadable with weights_only.
    Written atomically: a reader (or a resumed run) never sees half of it."""
    import io

    from partdistill.storage.atomic import write_bytes_atomic

    # to memory first: torch names the archive's inner folder after the file it writes, and the
    # temporary name differs per process, so the same weights would give different bytes
    buf = io.BytesIO()
    torch.save({"state_dict": state_dict, "meta": meta}, buf)
    write_bytes_atomic(path, buf.getvalue())
