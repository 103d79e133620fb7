"""Training a :class:`~partdistill.models.part_model.PartModel` with mmengine's Runner.

``training_config`` turns a PartModel config, a parts JSON and a schedule into an mmengine
Config; :func:`partdistill.models.train_teacher.train` runs it (in process), or
``python -m partdistill.models.train_parts CONFIG --launcher pytorch`` under ``torchrun`` runs it
data-parallel. Checkpoints go to ``work_dir``; a killed run resumes from the last of them, and a
fresh run starts from ``init_checkpoint`` (the teacher's weights, or the previous round's).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def has_checkpoint(work_dir: str | Path) -> bool:
    """Whether ``work_dir`` holds a checkpoint a run can resume from (after repairing the pointer a
    kill can leave empty)."""
    from partdistill.models.train_teacher import repair_resume_pointer

    repair_resume_pointer(work_dir)  # leaves the pointer valid or removes it
    return (Path(work_dir) / "last_checkpoint").is_file()


def training_config(
    model: Mapping[str, Any],
    ann_file: str | Path,
    work_dir: str | Path,
    init_checkpoint: str | Path | None,
    image_size: Sequence[int],
    max_iters: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 0.05,
    clip_grad: float | None = 0.01,
    accumulate: int = 1,
    scale_range: Sequence[float] = (0.5, 1.5),
    flip: bool = True,
    min_part_fraction: float = 0.05,
    seed: int = 0,
    checkpoint_interval: int = 100,
    num_workers: int = 0,
    shuffle: bool = True,
    amp: bool = False,
    launcher: str = "none",
    warmup_iters: int = 50,
    milestones: Sequence[float] = (0.8, 0.9),
):
    """An mmengine Config training ``model`` (a PartModel config dict) on the parts JSON.

    Augmentation: horizontal flip and large-scale jitter (resize by a factor drawn from
    ``scale_range``, then a crop of ``image_size`` = (height, width)), then the part-area filter.
    ``accumulate`` > 1 accumulates gradients over that many batches (an effective batch of
    ``batch_size × accumulate × processes``). ``shuffle=False`` with ``flip=False`` and
    ``scale_range=(1, 1)`` gives a deterministic order (used to compare 1 and 2 processes)."""
    from mmengine.config import Config

    from partdistill.models.train_teacher import runner_settings

    h, w = (int(v) for v in image_size)
    pipeline: list[dict[str, Any]] = [
        dict(type="LoadImageFromFile", to_float32=True),
        dict(type="LoadAnnotations", with_bbox=True, with_mask=True, poly2mask=True),
    ]
    if flip:
        pipeline.append(dict(type="RandomFlip", prob=0.5))
    lo, hi = (float(v) for v in scale_range)
    if (lo, hi) != (1.0, 1.0):
        pipeline += [dict(type="RandomResize", scale=(w, h), ratio_range=(lo, hi), keep_ratio=True),
                     dict(type="RandomCrop", crop_size=(h, w), crop_type="absolute", recompute_bbox=True,
                          allow_negative_crop=True)]
    pipeline += [dict(type="FilterAnnotations", min_gt_bbox_wh=(1e-5, 1e-5), by_mask=True, keep_empty=True),
                 dict(type="FilterSmallParts", min_fraction=_check_fraction(min_part_fraction)),
                 # object_classes: the classes of the image's objects, which a class-conditioned head uses
                 dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape",
                                                       "scale_factor", "flip", "flip_direction", "object_classes"))]
    embed = dict(lr_mult=1.0, decay_mult=0.0)
    resume = has_checkpoint(work_dir)
    optim_wrapper: dict[str, Any] = dict(
        type="AmpOptimWrapper" if amp else "OptimWrapper",
        optimizer=dict(type="AdamW", lr=lr, weight_decay=weight_decay, eps=1e-8, betas=(0.9, 0.999)),
        accumulative_counts=int(accumulate),
        paramwise_cfg=dict(custom_keys={"query_embed": embed, "query_feat": embed, "level_embed": embed},
                           norm_decay_mult=0.0))
    if clip_grad:
        optim_wrapper["clip_grad"] = dict(max_norm=float(clip_grad), norm_type=2)
    sampler = (dict(type="InfiniteSampler", shuffle=True, seed=seed) if shuffle
               else dict(type="InfiniteSampler", shuffle=False))
    cfg = Config(dict(
        default_scope="mmdet",
        custom_imports=dict(imports=["partdistill.models.part_model"], allow_failed_imports=False),
        model=dict(model),
        work_dir=str(work_dir),
        train_dataloader=dict(
            batch_size=batch_size, num_workers=num_workers, persistent_workers=num_workers > 0,
            sampler=sampler, collate_fn=dict(type="pseudo_collate"),
            dataset=dict(type="PartsDataset", ann_file=str(ann_file), data_prefix=dict(img=""),
                         filter_cfg=None, pipeline=pipeline, serialize_data=False)),
        train_cfg=dict(type="IterBasedTrainLoop", max_iters=max_iters, val_interval=max_iters + 1),
        optim_wrapper=optim_wrapper,
        **runner_settings(max_iters, checkpoint_interval, seed, milestones=tuple(milestones),
                          backend="nccl" if _cuda() else "gloo", warmup_iters=warmup_iters),
        launcher=launcher,
        # a fresh run starts from init_checkpoint; a killed one resumes from work_dir's last checkpoint
        resume=resume,
        load_from=None if resume or init_checkpoint is None else str(init_checkpoint),
    ))
    return cfg


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _check_fraction(fraction: float) -> float:
    if not 0.0 <= float(fraction) < 1.0:
        raise ValueError(f"min_part_fraction must be in [0, 1), got {fraction}")
    return float(fraction)


def _register_cpu_ddp() -> None:
    from mmengine.model import MMDistributedDataParallel
    from mmengine.registry import MODEL_WRAPPERS

    if "CPUDistributedDataParallel" in MODEL_WRAPPERS.module_dict:
        return

    @MODEL_WRAPPERS.register_module()
    class CPUDistributedDataParallel(MMDistributedDataParallel):
        """mmengine's DDP wrapper for CPU processes (gloo): no device_ids."""

        def __init__(self, module, device_ids=None, **kwargs):
            super().__init__(module=module, device_ids=None, **kwargs)


def main(argv: Sequence[str] | None = None) -> None:
    """``torchrun --nproc_per_node N -m partdistill.models.train_parts CONFIG --launcher pytorch``:
    train a dumped training config data-parallel; rank 0 writes ``work_dir/result.pth`` (the state
    dict) and ``work_dir/losses.json`` (rank 0's per-iteration losses)."""
    import json

    import torch
    from mmengine.config import Config
    from mmengine.dist import get_rank

    from partdistill.models.train_teacher import train

    parser = argparse.ArgumentParser(prog="python -m partdistill.models.train_parts")
    parser.add_argument("config")
    parser.add_argument("--launcher", default="none", choices=["none", "pytorch"])
    args = parser.parse_args(argv)
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.launcher == "pytorch" and not torch.cuda.is_available():
        _register_cpu_ddp()
        # mmengine's launcher pins each process to a CUDA device unconditionally; on a CPU-only
        # torch there is none, and gloo needs no pinning
        torch.cuda.set_device = lambda device: None
        # ...and its DDP wrapper passes device_ids, which a CPU module must not get
        cfg.model_wrapper_cfg = dict(type="CPUDistributedDataParallel", broadcast_buffers=False)
    result = train(cfg, device="cuda" if torch.cuda.is_available() else "cpu")
    if get_rank() == 0:
        work = Path(cfg.work_dir)
        torch.save({"state_dict": result["state_dict"], "meta": {"iters": result["iters"]}}, work / "result.pth")
        (work / "losses.json").write_text(json.dumps(result["losses"]))


if __name__ == "__main__":
    main()
