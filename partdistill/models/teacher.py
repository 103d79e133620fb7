"""Teachers: mmdet instance-segmentation models whose object masks and pixel features the
pipeline mines for parts (paper §4.1–4.2).

A teacher is an mmdet detector built from an mmdet config plus a checkpoint. For a batch of
RGB images it returns instances (masks, scores, class ids) and the multi-scale pixel features
the paper clusters: backbone ``res2``…``res5`` (strides 4…32), the pixel decoder's finest
encoder output (``pixel_decoder``, stride 8) and the ``mask_features`` (stride 4).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

# layer name → (where it comes from, stride)
FEATURE_LAYERS: dict[str, tuple[str, int]] = {
    "res2": ("backbone", 4),
    "res3": ("backbone", 8),
    "res4": ("backbone", 16),
    "res5": ("backbone", 32),
    "pixel_decoder": ("pixel_decoder", 8),
    "mask_features": ("mask_features", 4),
}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not fit the model; names the file and keys."""


@dataclass
class TeacherOutput:
    masks: np.ndarray    # bool (N, H, W) at the input image's resolution
    scores: np.ndarray   # float32 (N,)
    labels: np.ndarray   # int64 (N,), indices into Teacher.class_names
    # layer name → float32 (C, ceil(h / stride), ceil(w / stride)) for the inference size (h, w)
    features: dict[str, torch.Tensor]
    inference_size: tuple[int, int]  # (h, w) the image was resized to before the model


def register_mmdet() -> None:
    """Register mmdet's modules and ours (the EfficientNet-Lite0 backbone) in mmengine's registries."""
    import logging

    from mmdet.utils import register_all_modules
    from mmengine.logging import MMLogger

    # mmengine logs every parameter's init at INFO (hundreds of lines); keep warnings only.
    if not MMLogger.check_instance_created("partdistill"):
        MMLogger.get_instance("partdistill", log_level="WARNING")
    logger = MMLogger.get_current_instance()
    logger.setLevel(logging.WARNING)
    # mmengine's handlers keep the sys.stdout of the moment they were made; when that was a
    # temporary capture (a test runner, a notebook cell), later writes would hit a closed stream.
    for handler in list(logger.handlers):
        if type(handler) is logging.StreamHandler:
            handler.setStream(_CurrentStdout())
        elif isinstance(handler, logging.FileHandler) and handler.stream is None:
            logger.removeHandler(handler)  # a finished Runner's log file
    register_all_modules(init_default_scope=True)
    import partdistill.models.backbones  # noqa: F401  (registers EfficientNetLite0)


class _CurrentStdout:
    """Writes to whatever sys.stdout is now."""

    def write(self, text: str) -> int:
        import sys

        return sys.stdout.write(text)

    def flush(self) -> None:
        import sys

        sys.stdout.flush()


def load_state_dict(path: Path | str, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a checkpoint's weights. ``weights_only`` loading unless ``allow_pickle``: a pickled
    checkpoint can run arbitrary code, so only trusted files may be loaded that way."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is an empty file (an interrupted download or copy?)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError...
        hint = ("" if allow_pickle else " (it may hold pickled objects: convert it, or load a trusted "
                "file with allow_pickle=True)")
        raise CheckpointError(f"cannot read checkpoint {path}: {err}{hint}") from err
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def check_and_load(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path | str) -> None:
    """Load strictly; on mismatch name the file and the first offending keys, before any work."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if keys:
                parts.append(f"{len(keys)} {label} (first: {', '.join(keys[:5])})")
        raise CheckpointError(f"checkpoint {path} does not fit the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


class Teacher:
    """An mmdet instance-segmentation detector (Mask2Former-style, with a pixel decoder)."""

    def __init__(self, model: torch.nn.Module, class_names: Sequence[str], device: str = "cpu",
                 resize_long_side: int | None = None):
        self.model = model.to(device).eval()
        self.class_names = list(class_names)
        self.device = device
        self.resize_long_side = resize_long_side

    @classmethod
    def from_config(
        cls,
        config: str | Path | Any,
        checkpoint: str | Path | None = None,
        device: str = "cpu",
        cfg_options: dict[str, Any] | None = None,
        resize_long_side: int | None = None,
        class_names: Sequence[str] | None = None,
        allow_pickle: bool = False,
    ) -> Teacher:
        """Build from an mmdet config (path or mmengine Config). With a checkpoint, its weights
        must fit the model exactly; the check runs before any image is touched."""
        from mmdet.registry import MODELS
        from mmengine.config import Config

        register_mmdet()
        cfg = config if isinstance(config, Config) else Config.fromfile(str(config))
        if cfg_options:
            cfg.merge_from_dict(cfg_options)
        state = load_state_dict(checkpoint, allow_pickle) if checkpoint is not None else None
        model = MODELS.build(cfg.model)
        if state is None:
            _refuse_downloads(cfg.model)
            model.init_weights()
        else:
            check_and_load(model, state, checkpoint)
        return cls(model, list(class_names) if class_names else config_class_names(cfg), device, resize_long_side)

    @torch.no_grad()
    def predict(self, images: Sequence[np.ndarray], layers: Sequence[str] = ("res3", "res4")) -> list[TeacherOutput]:
        """images: RGB uint8 (H, W, 3), any sizes. Returns one TeacherOutput per image."""
        from mmdet.structures import DetDataSample

        for name in layers:
            if name not in FEATURE_LAYERS:
                raise ValueError(f"unknown feature layer {name!r}; choose from {sorted(FEATURE_LAYERS)}")
        inputs, samples, sizes = [], [], []
        for img in images:
            h0, w0 = img.shape[:2]
            h, w = _resized(h0, w0, self.resize_long_side)
            x = torch.from_numpy(np.ascontiguousarray(img[:, :, ::-1])).permute(2, 0, 1).float()  # BGR, as mmcv loads
            if (h, w) != (h0, w0):
                x = F.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=False)[0]
            inputs.append(x)
            samples.append(DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h0, w0),
                                                       scale_factor=(w / w0, h / h0))))
            sizes.append((h, w))
        data = self.model.data_preprocessor({"inputs": inputs, "data_samples": samples}, False)

        captured: dict[str, Any] = {}
        hooks = [self.model.backbone.register_forward_hook(lambda m, i, o: captured.__setitem__("backbone", o))]
        head = getattr(self.model, "panoptic_head", None)
        if head is not None and hasattr(head, "pixel_decoder"):
            hooks.append(head.pixel_decoder.register_forward_hook(
                lambda m, i, o: captured.__setitem__("pixel_decoder", o)))
        try:
            results = self.model.predict(data["inputs"].to(self.device),
                                         [s.to(self.device) for s in data["data_samples"]], rescale=True)
        finally:
            for hk in hooks:
                hk.remove()

        outputs = []
        for b, (res, (h, w)) in enumerate(zip(results, sizes, strict=True)):
            feats = {name: _crop(self._layer(captured, name)[b], FEATURE_LAYERS[name][1], h, w) for name in layers}
            inst = res.pred_instances
            outputs.append(TeacherOutput(
                masks=inst.masks.bool().cpu().numpy(),
                scores=inst.scores.float().cpu().numpy(),
                labels=inst.labels.long().cpu().numpy(),
                features=feats,
                inference_size=(h, w),
            ))
        return outputs

    @staticmethod
    def _layer(captured: dict[str, Any], name: str) -> torch.Tensor:
        source, _ = FEATURE_LAYERS[name]
        if source == "backbone":
            return captured["backbone"][int(name[-1]) - 2]
        if "pixel_decoder" not in captured:
            raise ValueError(f"layer {name!r} needs a model with a pixel decoder")
        mask_features, multi_scale = captured["pixel_decoder"]
        # multi_scale runs from low to high resolution; the last is the finest (stride 8)
        return mask_features if source == "mask_features" else multi_scale[-1]


def stack_features(features: dict[str, torch.Tensor], layers: Sequence[str], stride: int = 8,
                   normalize: bool = False) -> torch.Tensor:
    """Concatenate layers at one stride: (sum C, ceil(h/stride), ceil(w/stride)) float32.

    Coarser maps are upsampled bilinearly and finer ones average-pooled, as the reference
    upsamples res4 to res3's stride 8. ``normalize`` L2-normalises each layer over channels
    first, so no layer dominates the distance by its scale alone."""
    if not layers:
        raise ValueError("no feature layers given")
    first = layers[0]
    h, w = features[first].shape[-2:]
    s = FEATURE_LAYERS[first][1]
    # the grid of cells of size `stride` covering the inference image (whose size is about h*s, w*s)
    size = (max(1, math.ceil(h * s / stride)), max(1, math.ceil(w * s / stride)))
    out = []
    for name in layers:
        f = features[name].float()
        if f.shape[-2:] != size:
            f = F.adaptive_avg_pool2d(f[None], size)[0] if FEATURE_LAYERS[name][1] < stride else \
                F.interpolate(f[None], size=size, mode="bilinear", align_corners=False)[0]
        out.append(F.normalize(f, dim=0) if normalize else f)
    return torch.cat(out, dim=0)


def _crop(feature: torch.Tensor, stride: int, h: int, w: int) -> torch.Tensor:
    """Drop the batch padding: keep the cells that cover the image."""
    return feature[:, : math.ceil(h / stride), : math.ceil(w / stride)].float().cpu()


def _resized(h: int, w: int, long_side: int | None) -> tuple[int, int]:
    if not long_side or max(h, w) == long_side:
        return h, w
    s = long_side / max(h, w)
    return max(1, round(h * s)), max(1, round(w * s))


def config_class_names(cfg: Any) -> list[str]:
    """The class names a detector built from an mmdet config (a ``Config``) predicts, in the
    order of its labels: the config's ``class_names``, else its datasets' ``metainfo.classes``,
    else COCO's 80 classes for an 80-class head, else ``class_0``, ``class_1``, ..."""
    names = cfg.get("class_names") or _metainfo_classes(cfg)
    if names:
        return list(names)
    head = cfg.model.get("panoptic_head", {})
    n = head.get("num_things_classes", 0)
    if n == 80:  # a COCO model
        from mmdet.datasets import CocoDataset

        return list(CocoDataset.METAINFO["classes"])
    return [f"class_{i}" for i in range(n)]


def _metainfo_classes(cfg: Any) -> list[str] | None:
    for key in ("train_dataloader", "test_dataloader", "val_dataloader"):
        ds = cfg.get(key, {}).get("dataset", {}) if cfg.get(key) else {}
        classes = ds.get("metainfo", {}).get("classes") if isinstance(ds, dict) else None
        if classes:
            return list(classes)
    return None


def _refuse_downloads(model_cfg: Any) -> None:
    """Nothing may be downloaded at run time: a config that would fetch weights fails here."""
    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            init = node.get("init_cfg")
            if isinstance(init, dict) and init.get("type") == "Pretrained":
                src = str(init.get("checkpoint", ""))
                if "://" in src or not Path(src).exists():
                    raise CheckpointError(
                        f"{path}.init_cfg would load pretrained weights from {src!r}, which cannot be "
                        "fetched here; give a local checkpoint or set init_cfg=None")
            for k, v in node.items():
                walk(v, f"{path}.{k}")
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    walk(dict(model_cfg), "model")


class BackboneFeatures:
    """A classification backbone as a feature source (the paper's Table 5 compares these with
    instance-segmentation teachers). Gives features only, named like a teacher's backbone:
    ``res2``…``res5`` at strides 4…32. Currently: the ImageNet EfficientNet-Lite0."""

    def __init__(self, name: str = "efficientnet_lite0", device: str = "cpu"):
        from partdistill.models.backbones import IMAGENET_MEAN, IMAGENET_STD, EfficientNetLite0

        if name != "efficientnet_lite0":
            raise ValueError(f"unknown backbone {name!r}; built: 'efficientnet_lite0'")
        self.model = EfficientNetLite0(pretrained=True).to(device).eval()
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self.device = device
        self.class_names: list[str] = []

    @torch.no_grad()
    def predict(self, images: Sequence[np.ndarray], layers: Sequence[str] = ("res3", "res4")) -> list[TeacherOutput]:
        outputs = []
        for img in images:  # one at a time: images may differ in size
            x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()
            feats = self.model(((x - self.mean) / self.std).to(self.device))
            h, w = img.shape[:2]
            named = {f"res{i + 2}": f[0] for i, f in enumerate(feats)}
            outputs.append(TeacherOutput(
                masks=np.zeros((0, h, w), bool), scores=np.zeros(0, np.float32), labels=np.zeros(0, np.int64),
                features={n: _crop(named[n], FEATURE_LAYERS[n][1], h, w) for n in layers},
                inference_size=(h, w)))
        return outputs
