"""The trainable part model of the `proposals` and `distill` stages, and its training data.

``PartModel`` is an mmengine model: the teacher's backbone (frozen, in eval mode) feeding a
:class:`~partdistill.models.part_decoder.PartDecoder`. How much of the pixel decoder learns is
``freeze_pixel_decoder``: the reference freezes the deformable encoder with the backbone and
trains the rest ('encoder'); the stages' default trains all of it (False), by measurement
(BENCHMARKS.md, issue 14). The transformer decoder, the query embeddings and the class/mask heads
always learn. Everything starts from the teacher's weights (:func:`teacher_init_state`), except
the class head, whose size differs, and the queries when their number differs.

``PartsDataset`` reads a JSON list of images with part masks (COCO RLE), which the stage writes
into the training run's folder; ``FilterSmallParts`` is the reference's "a part must cover at
least 5% of the summed part area" filter, applied after augmentation.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from mmcv.transforms import BaseTransform
from mmdet.datasets import BaseDetDataset
from mmdet.registry import DATASETS, MODELS, TRANSFORMS
from mmengine.model import BaseModel
from torch import Tensor

from partdistill.models.part_decoder import PartDecoder

# the pixel decoder's modules the reference keeps frozen with the backbone (mmdet's
# MSDeformAttnPixelDecoder): the input projections, the deformable encoder and its level embedding
_ENCODER_PARTS = ("input_convs", "encoder", "level_encoding")
FREEZE_MODES = ("all", "encoder", "none")


def _freeze_mode(value: bool | str) -> str:
    """``freeze_pixel_decoder`` as one of :data:`FREEZE_MODES` (True is 'all', False 'none')."""
    if value is True or value is False:
        return "all" if value else "none"
    if value not in FREEZE_MODES:
        raise ValueError(f"freeze_pixel_decoder must be True, False or one of {FREEZE_MODES}, got {value!r}")
    return str(value)


@MODELS.register_module()
class PartModel(BaseModel):
    """Frozen teacher backbone + part decoder, trained with mmengine's Runner.

    Args:
        backbone: the teacher's ``model.backbone`` config.
        head: the teacher's ``model.panoptic_head`` config (its architecture keys are used).
        data_preprocessor: the teacher's ``model.data_preprocessor`` config.
        num_queries, num_points, num_classes, loss weights: see :class:`PartDecoder`.
        freeze_pixel_decoder: what of the teacher's pixel decoder stays fixed: ``'encoder'`` (the
            reference: its input projections and deformable encoder; the stride-4 lateral/output
            convolutions and the mask-feature projection learn), ``True`` / ``'all'`` (all of it),
            ``False`` / ``'none'`` (none).
        parts_per_class: k for the `distill` stage's class-conditioned head (num_classes = k × object
            classes; the images' ``object_classes`` select the logits), None for the proposals.
    """

    def __init__(self, backbone: Mapping[str, Any], head: Mapping[str, Any],
                 data_preprocessor: Mapping[str, Any] | None = None, num_queries: int = 200,
                 num_points: int = 12544, num_classes: int = 1, cls_weight: float = 2.0,
                 mask_weight: float = 5.0, dice_weight: float = 5.0, no_object_weight: float = 0.1,
                 importance_sample_ratio: float = 0.75, freeze_pixel_decoder: bool | str = True,
                 parts_per_class: int | None = None, init_cfg: dict | None = None) -> None:
        super().__init__(data_preprocessor=dict(data_preprocessor) if data_preprocessor else None,
                         init_cfg=init_cfg)
        backbone = dict(backbone)
        backbone.pop("init_cfg", None)   # weights come from the teacher's checkpoint, never a download
        if "pretrained" in backbone:
            backbone["pretrained"] = False
        self.backbone = MODELS.build(backbone)
        self.decoder = PartDecoder(head, num_queries=num_queries, num_points=num_points,
                                   num_classes=num_classes, cls_weight=cls_weight, mask_weight=mask_weight,
                                   dice_weight=dice_weight, no_object_weight=no_object_weight,
                                   importance_sample_ratio=importance_sample_ratio,
                                   parts_per_class=parts_per_class)
        self.freeze_pixel_decoder = _freeze_mode(freeze_pixel_decoder)
        for p in self.frozen_modules().parameters():
            p.requires_grad_(False)

    def frozen_modules(self) -> torch.nn.ModuleList:
        mods = [self.backbone]
        pixel = self.decoder.head.pixel_decoder
        if self.freeze_pixel_decoder == "all":
            mods.append(pixel)
        elif self.freeze_pixel_decoder == "encoder":
            mods += [m for m in (getattr(pixel, n, None) for n in _ENCODER_PARTS) if m is not None]
        return torch.nn.ModuleList(mods)

    def train(self, mode: bool = True) -> PartModel:
        super().train(mode)
        self.frozen_modules().eval()  # frozen BatchNorm/GroupNorm statistics stay the teacher's
        return self

    def extract_feat(self, inputs: Tensor) -> list[Tensor]:
        with torch.no_grad():
            return list(self.backbone(inputs))

    def loss(self, inputs: Tensor, data_samples: Sequence[Any]) -> dict[str, Tensor]:
        feats = self.extract_feat(inputs)
        return {k: v.reshape(()) for k, v in self.decoder.head.loss(feats, data_samples).items()}

    def forward(self, inputs: Tensor, data_samples: Sequence[Any] | None = None, mode: str = "tensor"):
        if mode == "loss":
            return self.loss(inputs, data_samples)
        metas = [s.metainfo for s in data_samples] if data_samples is not None else None
        feats = self.extract_feat(inputs)
        if mode == "predict":
            return self.decoder.predict(feats, metas)
        if mode == "tensor":
            return self.decoder(feats, metas)
        raise ValueError(f"unknown mode {mode!r}: 'loss', 'predict' or 'tensor'")


def model_config(teacher_model: Mapping[str, Any], **kwargs: Any) -> dict[str, Any]:
    """A ``PartModel`` config from a teacher's mmdet ``model`` config; kwargs go to PartModel."""
    for key in ("backbone", "panoptic_head", "data_preprocessor"):
        if key not in teacher_model:
            raise ValueError(f"the teacher's model config has no {key!r}: the part decoder needs a "
                             "Mask2Former-style teacher (backbone + panoptic_head)")
    return dict(type="PartModel", backbone=dict(teacher_model["backbone"]), head=dict(teacher_model["panoptic_head"]),
                data_preprocessor=dict(teacher_model["data_preprocessor"]), **kwargs)


def teacher_init_state(model: PartModel, teacher_state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """The PartModel state that starts from a checkpoint: a teacher's (keys ``backbone.*`` and
    ``panoptic_head.*``) or another PartModel's (``decoder.head.*``). Every tensor whose name and
    shape fit is copied; the rest keep the model's own initialisation (the class head, when the
    class count differs). Returns (the full state dict, the keys left at their initialisation)."""
    own = model.state_dict()
    state: dict[str, Tensor] = {}
    fresh = []
    for key, value in own.items():
        source = "panoptic_head." + key.removeprefix("decoder.head.") if key.startswith("decoder.head.") else key
        theirs = teacher_state.get(key, teacher_state.get(source))
        if theirs is not None and theirs.shape == value.shape:
            state[key] = theirs.detach().clone()
        else:
            state[key] = value.detach().clone()
            fresh.append(key)
    missing_frozen = [k for k in fresh if k.startswith("backbone.") or ".pixel_decoder." in k]
    if missing_frozen and model.freeze_pixel_decoder != "none":
        raise ValueError(f"the teacher checkpoint lacks {len(missing_frozen)} weights of the frozen backbone/pixel "
                         f"decoder (first: {', '.join(missing_frozen[:3])}): they would stay random")
    return state, fresh


@torch.no_grad()
def predict_parts(model: PartModel, images: Sequence[np.ndarray], device: str = "cpu",
                  metas: Sequence[Mapping[str, Any]] | None = None) -> list[dict[str, Tensor]]:
    """Part queries for RGB uint8 (H, W, 3) images at their own size: per image ``masks`` float
    (Q, H, W) probabilities, ``scores`` float (Q,) (num_classes = 1) or ``class_scores`` (Q,
    num_classes + 1) and ``query_features`` (Q, C); see :meth:`PartDecoder.predict`. ``metas``: per
    image extra metainfo, e.g. ``object_classes`` for a class-conditioned model."""
    from mmdet.structures import DetDataSample

    model.eval()
    inputs, samples = [], []
    for i, img in enumerate(images):
        h, w = img.shape[:2]
        inputs.append(torch.from_numpy(np.ascontiguousarray(img[:, :, ::-1])).permute(2, 0, 1).float())  # BGR
        extra = dict(metas[i]) if metas is not None else {}
        samples.append(DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), **extra)))
    data = model.data_preprocessor({"inputs": inputs, "data_samples": samples}, False)
    return model(data["inputs"].to(device), data["data_samples"], mode="predict")


@torch.no_grad()
def predict_objects(model: PartModel, image: np.ndarray, objects: Sequence[np.ndarray], device: str = "cpu",
                    classes: Sequence[int] | None = None, crop: Mapping[str, Any] | None = None,
                    batch_size: int = 8) -> list[dict[str, Tensor]]:
    """Part queries for each object of one RGB uint8 (H, W, 3) image, as :func:`predict_parts`
    gives them (``masks`` float (Q, H, W) in image coordinates, ``scores`` or ``class_scores``,
    ``query_features``), one dict per object.

    With ``crop`` (:func:`~partdistill.models.object_crops.crop_settings`; default: the model's
    ``part_crop``, which :func:`~partdistill.stages.proposals.load_part_model` sets from its
    artifact) each object is cut out, resized to ``crop["size"]`` and predicted alone, and its
    masks are pasted back (zero outside its box); a class-conditioned model sees that object's
    class only. Without, one pass over the whole image serves every object (the same dict, with
    the image's classes). ``classes``: the objects' class ids (for a class-conditioned model)."""
    from partdistill.models.object_crops import crop_image, object_box, paste_probs

    crop = crop if crop is not None else getattr(model, "part_crop", None)
    if not objects:
        return []
    if not crop:
        metas = [{"object_classes": sorted({int(c) for c in classes})}] if classes is not None else None
        pred = predict_parts(model, [image], device, metas)[0]
        return [pred for _ in objects]
    boxes = [object_box(np.asarray(m, bool), crop["size"], crop["margin"], crop.get("box", "mask")) for m in objects]
    out: list[dict[str, Tensor]] = []
    for start in range(0, len(boxes), batch_size):
        group = list(range(start, min(start + batch_size, len(boxes))))
        metas = [{"object_classes": [int(classes[i])]} for i in group] if classes is not None else None
        preds = predict_parts(model, [crop_image(image, boxes[i]) for i in group], device, metas)
        for i, pred in zip(group, preds, strict=True):
            out.append({**pred, "masks": paste_probs(pred["masks"], boxes[i], image.shape[:2])})
    return out


@DATASETS.register_module()
class PartsDataset(BaseDetDataset):
    """Images with part masks, from a JSON list written by the stage. Each entry:
    ``{img_path, img_id, height, width, instances: [{bbox: [x1, y1, x2, y2], bbox_label,
    mask: {size, counts}, ignore_flag}]}``; labels are 0 ("part") for the proposals."""

    METAINFO = {"classes": ("part",)}

    def load_data_list(self) -> list[dict]:
        with open(self.ann_file) as f:
            return json.load(f)


@TRANSFORMS.register_module()
class FilterSmallParts(BaseTransform):
    """Drop part masks under ``min_fraction`` of the image's summed part area (after augmentation);
    an image left with no part is dropped (the dataset then draws another)."""

    def __init__(self, min_fraction: float = 0.05) -> None:
        self.min_fraction = min_fraction

    def transform(self, results: dict) -> dict | None:
        masks = results.get("gt_masks")
        if masks is None or len(masks) == 0:
            return None
        areas = np.asarray(masks.areas, dtype=np.float64)
        keep = (areas > 0) & (areas >= self.min_fraction * areas.sum())
        if not keep.any():
            return None
        if not keep.all():
            for key in ("gt_masks", "gt_bboxes", "gt_bboxes_labels", "gt_ignore_flags"):
                if key in results:
                    results[key] = results[key][keep]
        return results

