"""The class-agnostic part decoder of the ``proposals`` stage (paper §4.3).

A query-based decoder trained on the frozen teacher's multi-scale backbone features, supervised
by mined parts: one class ("part"), binary masks per image. It is mmdet's ``Mask2FormerHead``
(pixel decoder, masked-attention transformer decoder, Hungarian assignment with
classification + BCE + Dice costs, point-sampled mask losses, deep supervision) with one thing
class and no stuff; nothing of it is written again here. On top it gives

- ``loss(feats, gt_masks, img_metas)``: part masks in, mmdet's loss dict out;
- ``predict(feats, img_metas)``: per image the query masks, part scores and the per-query
  decoded features (the last decoder layer's output after the decoder's post-norm), which the
  ranking stage clusters.

The features are the teacher's backbone maps at strides 4/8/16/32 (``res2``…``res5``), the same
tensors the teacher's own head consumes; they are detached, so no gradient reaches the teacher.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import mmdet.models  # noqa: F401  (registers the pixel decoder, losses, assigner, sampler, match costs)
import torch
import torch.nn.functional as F
from mmdet.models.dense_heads import Mask2FormerHead
from mmdet.registry import MODELS
from mmdet.structures import DetDataSample
from mmdet.structures.mask import BitmapMasks
from mmengine.config import ConfigDict
from mmengine.model import BaseModule
from mmengine.structures import InstanceData
from torch import Tensor

# keys of a teacher's Mask2FormerHead config that shape the network (kept as they are)
_ARCH_KEYS = ("in_channels", "strides", "feat_channels", "out_channels", "num_transformer_feat_level",
              "pixel_decoder", "enforce_decoder_input_project", "positional_encoding", "transformer_decoder")


@MODELS.register_module()
class ConditionedMask2FormerHead(Mask2FormerHead):
    """Mask2FormerHead whose classes are ``parts_per_class`` part clusters per object class, and
    whose class logits are limited, per image, to the slices of the object classes it holds
    (``metainfo["object_classes"]``) plus no-object.

    The reference knows each ImageNet image's one class and slices a linear layer of
    k × classes + 1 outputs by it; images with several objects get the union of their classes'
    slices here. A masked logit is set to a large negative constant, so it takes no part in the
    softmax, the matching cost or the loss, and its weights get no gradient. An image without
    ``object_classes`` is unconstrained."""

    def __init__(self, *args: Any, parts_per_class: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if parts_per_class < 1 or self.num_classes % parts_per_class:
            raise ValueError(f"{self.num_classes} classes are not a multiple of parts_per_class={parts_per_class}")
        self.parts_per_class = parts_per_class
        self._allowed: Tensor | None = None

    def allowed(self, samples: Sequence[DetDataSample], device: torch.device) -> Tensor | None:
        """bool (B, num_classes + 1): the logits each image may use; None when all may."""
        if not any("object_classes" in s.metainfo for s in samples):
            return None
        k, n_obj = self.parts_per_class, self.num_classes // self.parts_per_class
        mask = torch.zeros(len(samples), self.num_classes + 1, dtype=torch.bool, device=device)
        mask[:, -1] = True
        for b, s in enumerate(samples):
            classes = s.metainfo.get("object_classes")
            if classes is None:
                mask[b] = True
                continue
            for c in classes:
                if not 0 <= int(c) < n_obj:
                    raise ValueError(f"object class {c} outside the head's {n_obj} classes")
                mask[b, int(c) * k:(int(c) + 1) * k] = True
        return mask

    def forward(self, x: list[Tensor], batch_data_samples: Sequence[DetDataSample]):
        self._allowed = self.allowed(batch_data_samples, x[0].device)
        try:
            return super().forward(x, batch_data_samples)
        finally:
            self._allowed = None

    def _forward_head(self, decoder_out: Tensor, mask_feature: Tensor, attn_mask_target_size):
        cls_pred, mask_pred, attn_mask = super()._forward_head(decoder_out, mask_feature, attn_mask_target_size)
        if self._allowed is not None:
            cls_pred = cls_pred.masked_fill(~self._allowed[:, None, :], -1e4)
        return cls_pred, mask_pred, attn_mask


@MODELS.register_module()
class PartDecoder(BaseModule):
    """Class-agnostic Mask2Former part decoder on frozen multi-scale features.

    Args:
        head: the architecture part of a ``Mask2FormerHead`` config (``in_channels``, ``strides``,
            ``feat_channels``, ``out_channels``, ``num_transformer_feat_level``, ``pixel_decoder``,
            ``transformer_decoder``, ``positional_encoding``, ...), usually the teacher's
            ``model.panoptic_head``. Class counts, queries, losses and the train config given in
            it are replaced by this class's own.
        num_queries: part queries per image (the paper uses 200).
        num_points: points sampled per mask for the matching cost and the mask losses.
        oversample_ratio, importance_sample_ratio: mmdet's uncertainty-based point sampling.
        cls_weight, mask_weight, dice_weight: loss (and matching-cost) weights, paper 2 / 5 / 5.
        no_object_weight: the classification weight of the no-object class (0.1).
        num_classes: 1 ("part") for the class-agnostic proposals; the `distill` stage's
            class-conditioned head uses k part clusters × object classes.
        parts_per_class: k, for the class-conditioned head (:class:`ConditionedMask2FormerHead`).
    """

    def __init__(self, head: Mapping[str, Any], num_queries: int = 200, num_points: int = 12544,
                 oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75,
                 cls_weight: float = 2.0, mask_weight: float = 5.0, dice_weight: float = 5.0,
                 no_object_weight: float = 0.1, num_classes: int = 1, parts_per_class: int | None = None,
                 init_cfg: dict | None = None) -> None:
        super().__init__(init_cfg=init_cfg)
        arch = ConfigDict({k: copy.deepcopy(v) for k, v in dict(head).items() if k in _ARCH_KEYS})
        missing = [k for k in ("in_channels", "feat_channels", "out_channels", "pixel_decoder",
                               "transformer_decoder") if k not in arch]
        if missing:
            raise ValueError(f"head config lacks {missing}")
        self.num_queries = num_queries
        self.num_points = num_points
        self.num_classes = num_classes
        head_type = Mask2FormerHead
        if parts_per_class:
            head_type = functools.partial(ConditionedMask2FormerHead, parts_per_class=parts_per_class)
        self.head = head_type(
            **arch,
            num_things_classes=num_classes,
            num_stuff_classes=0,
            num_queries=num_queries,
            loss_cls=ConfigDict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=cls_weight,
                                reduction="mean", class_weight=[1.0] * num_classes + [no_object_weight]),
            loss_mask=ConfigDict(type="CrossEntropyLoss", use_sigmoid=True, reduction="mean",
                                 loss_weight=mask_weight),
            loss_dice=ConfigDict(type="DiceLoss", use_sigmoid=True, activate=True, reduction="mean",
                                 naive_dice=True, eps=1.0, loss_weight=dice_weight),
            train_cfg=ConfigDict(
                num_points=num_points,
                oversample_ratio=oversample_ratio,
                importance_sample_ratio=importance_sample_ratio,
                assigner=dict(type="HungarianAssigner", match_costs=[
                    dict(type="ClassificationCost", weight=cls_weight),
                    dict(type="CrossEntropyLossCost", weight=mask_weight, use_sigmoid=True),
                    dict(type="DiceCost", weight=dice_weight, pred_act=True, eps=1.0)]),
                sampler=dict(type="MaskPseudoSampler")),
            test_cfg=None,
        )

    @property
    def feat_channels(self) -> int:
        """C of the per-query features ``predict`` returns."""
        return self.head.decoder_embed_dims

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _check_feats(feats: Sequence[Tensor]) -> list[Tensor]:
        feats = [f.detach() for f in feats]  # frozen teacher: no gradient flows back into it
        if not feats or any(f.dim() != 4 for f in feats):
            raise ValueError("feats must be a non-empty list of (B, C_l, H_l, W_l) tensors")
        return feats

    @staticmethod
    def _padded_shape(feats: Sequence[Tensor]) -> tuple[int, int]:
        """The (padded) input size the features cover: 4 × the stride-4 map."""
        h4, w4 = feats[0].shape[-2:]
        return 4 * h4, 4 * w4

    def _samples(self, feats: Sequence[Tensor], img_metas: Sequence[Mapping[str, Any]] | None,
                 batch_size: int) -> list[DetDataSample]:
        pad = self._padded_shape(feats)
        metas = list(img_metas) if img_metas is not None else [{} for _ in range(batch_size)]
        if len(metas) != batch_size:
            raise ValueError(f"{len(metas)} img_metas for a batch of {batch_size}")
        samples = []
        for meta in metas:
            info = {"img_shape": pad, "ori_shape": pad, **dict(meta), "batch_input_shape": pad}
            samples.append(DetDataSample(metainfo=info))
        return samples

    # ------------------------------------------------------------------ training
    def loss(self, feats: Sequence[Tensor], gt_masks: Sequence[Tensor],
             img_metas: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Tensor]:
        """mmdet's Mask2Former losses for part masks.

        Args:
            feats: the teacher's backbone maps, float (B, C_l, H/s_l, W/s_l) for strides 4/8/16/32
                (in the head's ``in_channels`` order); detached here.
            gt_masks: per image bool (n_i, h_i, w_i) part masks at input resolution; (h_i, w_i) may be
                smaller than the padded input (4 × the stride-4 map) and is zero-padded bottom/right.
                n_i may be 0.
            img_metas: per image dict (e.g. ``img_shape``); optional.

        Returns:
            float scalar tensors: ``loss_cls``, ``loss_mask``, ``loss_dice`` for the last decoder
            layer and ``d{i}.loss_*`` for the earlier ones (deep supervision).
        """
        feats = self._check_feats(feats)
        batch = feats[0].shape[0]
        if len(gt_masks) != batch:
            raise ValueError(f"{len(gt_masks)} mask sets for a batch of {batch}")
        ph, pw = self._padded_shape(feats)
        samples = self._samples(feats, img_metas, batch)
        for sample, masks in zip(samples, gt_masks, strict=True):
            masks = torch.as_tensor(masks).bool()
            if masks.dim() != 3:
                raise ValueError(f"gt masks must be (n, H, W), got {tuple(masks.shape)}")
            h, w = masks.shape[-2:]
            if h > ph or w > pw:
                raise ValueError(f"gt masks {h}x{w} larger than the input the features cover ({ph}x{pw})")
            if (h, w) != (ph, pw):
                masks = F.pad(masks, (0, pw - w, 0, ph - h))
            sample.gt_instances = InstanceData(
                labels=torch.zeros(len(masks), dtype=torch.long, device=feats[0].device),
                masks=BitmapMasks(masks.cpu().numpy(), ph, pw))
        # mmdet returns the mask and dice terms as shape (1,) (their avg_factor is a 1-element tensor)
        return {k: v.reshape(()) for k, v in self.head.loss(feats, samples).items()}

    # ------------------------------------------------------------------ inference
    def forward(self, feats: Sequence[Tensor],
                img_metas: Sequence[Mapping[str, Any]] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Raw outputs of the last decoder layer.

        Returns:
            cls_logits float (B, Q, 2) ([part, no-object]), mask_logits float (B, Q, H/4, W/4),
            query_features float (B, Q, C): the last decoder layer's output after ``post_norm``.
        """
        feats = self._check_feats(feats)
        samples = self._samples(feats, img_metas, feats[0].shape[0])
        captured: list[Tensor] = []
        hook = self.head.transformer_decoder.post_norm.register_forward_hook(
            lambda m, i, o: captured.append(o))  # called once per layer; the last call is the final layer's
        try:
            cls_list, mask_list = self.head(feats, samples)
        finally:
            hook.remove()
        return cls_list[-1], mask_list[-1], captured[-1]

    @torch.no_grad()
    def predict(self, feats: Sequence[Tensor],
                img_metas: Sequence[Mapping[str, Any]] | None = None) -> list[dict[str, Tensor]]:
        """Part proposals per image.

        Args:
            feats: as for ``loss``.
            img_metas: per image dict; ``img_shape`` (h, w) crops the masks to the image (default:
                the padded input, 4 × the stride-4 map).

        Returns:
            per image dict:
            ``masks`` float32 (Q, h, w) mask probabilities (sigmoid of the logits, bilinearly upsampled);
            ``scores`` float32 (Q,) 1 − P(no-object) (with one class: P(part)), in [0, 1];
            ``class_scores`` float32 (Q, num_classes + 1), the softmax, when num_classes > 1;
            ``query_features`` float32 (Q, C) per-query decoded features (C = ``feat_channels``).
        """
        cls_logits, mask_logits, query_feats = self.forward(feats, img_metas)
        ph, pw = self._padded_shape(feats)
        masks = F.interpolate(mask_logits, size=(ph, pw), mode="bilinear", align_corners=False).sigmoid()
        probs = cls_logits.softmax(-1)
        scores = 1.0 - probs[..., -1]  # P(not no-object): with one class, P(part)
        out = []
        for b in range(masks.shape[0]):
            h, w = (img_metas[b].get("img_shape", (ph, pw)) if img_metas is not None else (ph, pw))[:2]
            item = {"masks": masks[b, :, :h, :w].float(), "scores": scores[b].float(),
                    "query_features": query_feats[b].float()}
            if self.num_classes > 1:
                item["class_scores"] = probs[b].float()
            out.append(item)
        return out


def build_part_decoder(teacher_head_cfg: Mapping[str, Any], num_queries: int = 200,
                       num_points: int = 12544, **kwargs: Any) -> PartDecoder:
    """A PartDecoder fitting a teacher: the same in_channels/strides/feat_channels, pixel decoder and
    transformer decoder as the teacher's ``Mask2FormerHead`` config (``cfg.model.panoptic_head``),
    freshly initialised (Mask2FormerHead's own init). ``kwargs`` go to ``PartDecoder`` (loss weights,
    point sampling)."""
    from partdistill.models.teacher import register_mmdet

    register_mmdet()  # mmdet's registries, and mmengine's logger at WARNING (init_weights logs every parameter)
    model = MODELS.build(dict(type="PartDecoder", head=dict(teacher_head_cfg), num_queries=num_queries,
                              num_points=num_points, **kwargs))
    model.init_weights()
    return model
