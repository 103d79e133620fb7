"""Stage `teacher`: the instance-segmentation model whose object masks and pixel features the
pipeline mines for parts (paper §4.1).

Reads: `data` (``instances_train.json`` — objects only — and ``images.parquet``).
Writes:

- ``teacher.json``        {source, mmdet_config (file in this artifact), checkpoint (path), class_names: the
                          classes the teacher's labels index, in label order (for a checkpoint: its config's)}
- ``mmdet_config.py``     the teacher's mmdet config as used
- ``checkpoint.pth``      {state_dict, meta}: tensors and built-ins only, loadable with weights_only
                          (source 'train' and 'random'; 'checkpoint' refers to the user's file instead)
- ``metrics.json``        mask AP / AP50 / AP75 on the data's val split (pycocotools COCOeval), for any source
                          whose classes the val objects share (by name)
- ``loss.png``, ``losses.json``   the training curve (source 'train')

Sources: 'train' trains the config on the data's object JSON with mmengine's Runner (the demo
teacher); 'checkpoint' uses a given mmdet checkpoint; 'detectron2' converts the paper's
detectron2 Mask2Former checkpoint; 'random' keeps the initial weights (a control for the
premise check: do trained features group parts better than untrained ones?).
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

from partdistill.config import CONFIG_ROOT
from partdistill.progress import NullProgress
from partdistill.stages.base import Stage, StageContext
from partdistill.storage import Artifact, write_json_atomic

SOURCES = ("train", "checkpoint", "detectron2", "random")


def run(ctx: StageContext) -> dict[str, Any]:
    from partdistill.models.teacher import CheckpointError, Teacher, register_mmdet
    from partdistill.models.train_teacher import save_checkpoint, train, training_config

    cfg = ctx.config
    source = cfg["source"]
    if source not in SOURCES:
        raise ValueError(f"teacher.source must be one of {SOURCES}, got {source!r}")
    out = ctx.writer.path
    mmdet_config = resolve_path(cfg["mmdet_config"])
    data = ctx.inputs["data"]
    has_objects = "instances_train.json" in data.files
    if source in ("train", "random") and not has_objects:
        raise ValueError(f"teacher.source={source!r} needs an object JSON (instances_train.json) in the data "
                         "artifact; an image folder without annotations needs a pretrained teacher "
                         "(teacher.source='checkpoint' or 'detectron2')")
    class_names = ([c["name"] for c in json.loads(data.file("instances_train.json").read_text())["categories"]]
                   if has_objects else [])
    register_mmdet()
    device = ctx.runtime.get("device", "cpu")
    summary: dict[str, Any] = {"source": source}
    record: dict[str, Any] = {"source": source, "class_names": class_names, "mmdet_config": "mmdet_config.py"}

    if source == "train":
        t = cfg["train"]
        tcfg = training_config(mmdet_config, data.path, "instances_train.json", class_names, out / "work",
                               max_iters=t["max_iters"], batch_size=t["batch_size"], lr=t["lr"], seed=t["seed"],
                               image_size=tuple(t["image_size"]), checkpoint_interval=t["checkpoint_interval"])
        # The recorded config names the data artifact by version and the work folder relatively:
        # the same inputs give the same bytes wherever the store lives.
        recorded = copy.deepcopy(tcfg)
        recorded.work_dir = "work"
        recorded.train_dataloader.dataset.data_root = f"<data artifact {data.version}>"
        recorded.dump(str(out / "mmdet_config.py"))
        start = time.monotonic()
        with ctx.progress.task("teacher: training", total=t["max_iters"]) as bar, ctx.training_threads():
            result = train(tcfg, on_iter=lambda i, loss: bar.advance(1), device=device)
        summary.update(train_seconds=round(time.monotonic() - start, 1), iters=result["iters"],
                       final_loss=round(_tail_mean(result["losses"]), 3))
        save_checkpoint(out / "checkpoint.pth", result["state_dict"],
                        {"class_names": class_names, "iters": result["iters"]})
        write_json_atomic(out / "losses.json", result["losses"])
        _plot_losses(result["losses"], out / "loss.png")
        shutil.rmtree(out / "work", ignore_errors=True)
        record["checkpoint"] = "checkpoint.pth"
    else:
        from mmengine.config import Config

        mcfg = Config.fromfile(str(mmdet_config))
        mcfg.class_names = tuple(class_names) if source == "random" else mcfg.get("class_names", None)
        mcfg.dump(str(out / "mmdet_config.py"))
        if source == "random":
            teacher = Teacher.from_config(mcfg, None, cfg_options={"model.backbone.pretrained": False}
                                          if mcfg.model.backbone.get("pretrained") is not None else None)
            save_checkpoint(out / "checkpoint.pth", teacher.model.state_dict(), {"class_names": class_names})
            record["checkpoint"] = "checkpoint.pth"
        else:
            if not cfg["checkpoint"]:
                raise ValueError(f"teacher.source={source!r} needs teacher.checkpoint (a file path)")
            try:
                ckpt = resolve_path(cfg["checkpoint"])
            except FileNotFoundError as err:
                raise CheckpointError(f"teacher.checkpoint: {err}") from None
            check_sha256(ckpt, cfg.get("checkpoint_sha256"))
            if source == "detectron2":
                from partdistill.models.convert import convert_checkpoint

                convert_checkpoint(ckpt, out / "checkpoint.pth")
                record["checkpoint"] = "checkpoint.pth"
            else:
                record["checkpoint"] = str(ckpt)
                record["checkpoint_bytes"] = ckpt.stat().st_size
            # build it as the later stages will: an unreadable checkpoint, or one of another model, fails
            # now, naming the file and keys, not after hours of inference and not as a committed artifact.
            # Its labels index the classes of its own config, in that config's order: record them, so that
            # every later stage numbers classes by this one list (never, say, by sorted names).
            record["class_names"] = None  # the checkpoint's own classes, from its config
            loaded = load_teacher_from(out, record, "cpu", None)
            record["class_names"] = list(loaded.class_names)
            summary["classes"] = len(record["class_names"])
            del loaded

    write_json_atomic(out / "teacher.json", record)
    # a loaded teacher is scored too, on the data's classes it knows (by name), so a user sees whether
    # it is any good on their data before hours of inference
    if _has_val(data) and _shares_classes(record["class_names"], data):
        teacher = load_teacher_from(out, record, device, cfg.get("resize_long_side"))
        metrics = evaluate_masks(teacher, data, "val", ctx)
        write_json_atomic(out / "metrics.json", metrics)
        summary.update({f"val_{k}": v for k, v in metrics.items() if k.startswith("mask_")})
    return summary


def fingerprint(section: dict[str, Any]) -> dict[str, Any]:
    """What the version must also cover: the mmdet config's text and the checkpoint's identity."""
    out: dict[str, Any] = {}
    cfg_path = resolve_path(section["mmdet_config"], must_exist=False)
    if cfg_path.is_file():
        out["mmdet_config_sha256"] = hashlib.sha256(cfg_path.read_bytes()).hexdigest()
    if section.get("checkpoint"):
        ckpt = resolve_path(section["checkpoint"], must_exist=False)
        if section.get("checkpoint_sha256"):
            # a checkpoint named by its content (the shipped demo teacher): the same version in every clone
            out["checkpoint"] = {"sha256": section["checkpoint_sha256"]}
        elif ckpt.is_file():
            st = ckpt.stat()
            out["checkpoint"] = {"path": str(ckpt), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    return out


def check_sha256(path: Path, expected: str | None) -> None:
    """Raise CheckpointError naming the file when its sha256 is not ``expected`` (None: no check)."""
    if not expected:
        return
    from partdistill.models.teacher import CheckpointError

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != expected:
        raise CheckpointError(f"teacher.checkpoint {path}: sha256 {h.hexdigest()} is not the expected "
                              f"teacher.checkpoint_sha256 {expected} (a corrupt or different file; for another "
                              "checkpoint, set teacher.checkpoint_sha256 to its sha256, or to None)")


def teacher_class_names(artifact: Artifact) -> list[str]:
    """The classes a `teacher` artifact's labels index, in label order. Artifacts made before
    ``teacher.json`` recorded them for a checkpoint (``class_names: null``) get them from their
    stored mmdet config, as the teacher is built (:func:`~partdistill.models.teacher.config_class_names`)."""
    record = json.loads(artifact.file("teacher.json").read_text())
    if record.get("class_names"):
        return list(record["class_names"])
    from mmengine.config import Config

    from partdistill.models.teacher import config_class_names, register_mmdet

    register_mmdet()
    return config_class_names(Config.fromfile(str(artifact.file(record["mmdet_config"]))))


def resolve_path(path: str | Path, must_exist: bool = True) -> Path:
    """A path as given, or relative to the repository (configs/teachers/... works from anywhere)."""
    p = Path(path)
    for candidate in (p, CONFIG_ROOT.parent / p):
        if candidate.exists():
            return candidate.resolve()
    if must_exist:
        raise FileNotFoundError(f"{path}: no such file (also looked under {CONFIG_ROOT.parent})")
    return p


def load_teacher(artifact: Artifact, device: str = "cpu", resize_long_side: int | None = None):
    """The Teacher stored in a `teacher` artifact."""
    record = json.loads(artifact.file("teacher.json").read_text())
    return load_teacher_from(artifact.path, record, device, resize_long_side)


def teacher_checkpoint(artifact: Artifact) -> Path:
    """The checkpoint file a `teacher` artifact uses (its own, or the user's file it refers to)."""
    return _checkpoint_path(artifact.path, json.loads(artifact.file("teacher.json").read_text()))


def _checkpoint_path(root: Path, record: dict[str, Any]) -> Path:
    ckpt = Path(record["checkpoint"])
    return ckpt if ckpt.is_absolute() else root / ckpt


def load_teacher_from(root: Path, record: dict[str, Any], device: str, resize_long_side: int | None):
    from partdistill.models.teacher import Teacher

    return Teacher.from_config(root / record["mmdet_config"], _checkpoint_path(root, record), device=device,
                               resize_long_side=resize_long_side, class_names=record.get("class_names"))


def evaluate_masks(teacher, data: Artifact, split: str, ctx: StageContext | None = None,
                   batch_size: int = 4) -> dict[str, float]:
    """Mask AP of the teacher on a split's object JSON (pycocotools COCOeval, segm)."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from partdistill.data.images import DEFAULT_MAX_PIXELS, load_rgb
    from partdistill.storage import mask_to_rle

    limit = ctx.max_pixels if ctx is not None else DEFAULT_MAX_PIXELS
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(data.file(f"instances_{split}.json")))
    image_ids = sorted(gt.getImgIds())
    # a label indexes the teacher's classes; its category is the JSON's one of that name (a class the
    # JSON lacks has none, and its detections are not scored)
    by_name = {c["name"]: c["id"] for c in gt.loadCats(gt.getCatIds())}
    label_cat = [by_name.get(name) for name in teacher.class_names]
    results = []
    progress = ctx.progress if ctx is not None else NullProgress()
    with progress.task(f"teacher: mask AP on {split}", total=len(image_ids)) as bar:
        for i in range(0, len(image_ids), batch_size):
            ids = image_ids[i:i + batch_size]
            imgs = [load_rgb(data.path / gt.imgs[j]["file_name"], limit) for j in ids]
            for image_id, pred in zip(ids, teacher.predict(imgs, layers=()), strict=True):
                for mask, score, label in zip(pred.masks, pred.scores, pred.labels, strict=True):
                    if int(label) >= len(label_cat) or label_cat[int(label)] is None:
                        continue
                    results.append({"image_id": image_id, "category_id": label_cat[int(label)],
                                    "segmentation": mask_to_rle(mask), "score": float(score)})
            bar.advance(len(ids))
    if not results:
        return {"mask_AP": 0.0, "mask_AP50": 0.0, "mask_AP75": 0.0, "detections": 0}
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"mask_AP": round(float(ev.stats[0]), 4), "mask_AP50": round(float(ev.stats[1]), 4),
            "mask_AP75": round(float(ev.stats[2]), 4), "detections": len(results), "images": len(image_ids)}


def _has_val(data: Artifact) -> bool:
    return "instances_val.json" in data.files


def _shares_classes(class_names: list[str] | None, data: Artifact) -> bool:
    """Whether the data's val objects have a class the teacher predicts (by name)."""
    categories = json.loads(data.file("instances_val.json").read_text()).get("categories", [])
    return bool(set(class_names or ()) & {c["name"] for c in categories})


def _tail_mean(values: list[float], n: int = 25) -> float:
    tail = values[-n:]
    return sum(tail) / max(len(tail), 1)


def _plot_losses(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    ax.plot(losses, lw=0.6, alpha=0.5, label="loss")
    if len(losses) >= 25:
        import numpy as np

        smooth = np.convolve(losses, np.ones(25) / 25, mode="valid")
        ax.plot(range(24, len(losses)), smooth, lw=1.5, label="mean of 25")
    ax.set_xlabel("iteration")
    ax.set_ylabel("total loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def _relevant(section: dict[str, Any], cfg: Any) -> dict[str, Any]:
    # A checkpoint's teacher.json records its class names since this key: a new version for those
    # sources only, so the teachers trained here keep theirs (their record always had the names).
    if section["source"] in ("checkpoint", "detectron2"):
        return {**section, "_class_names": "recorded"}
    return section


STAGE = Stage("teacher", ("data",), "2", run, fingerprint=fingerprint, summary="instance-segmentation teacher",
              relevant=_relevant)
