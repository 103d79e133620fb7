"""The class-agnostic part decoder (proposals stage) on a random-init demo teacher's backbone features."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from partdistill.models.part_decoder import PartDecoder, build_part_decoder
from partdistill.models.teacher import Teacher

CFG = Path(__file__).resolve().parents[2] / "configs" / "teachers" / "demo_mask2former_effnet-lite0_partsworld.py"
# per image: part rectangles (y0, x0, y1, x1) in a 64x64 image
RECTS = [[(4, 4, 30, 28), (34, 10, 60, 40), (8, 40, 28, 60)], [(10, 6, 50, 22), (20, 34, 44, 58)]]


@pytest.fixture(scope="module")
def teacher() -> Teacher:
    return Teacher.from_config(CFG, None, cfg_options={"model.backbone.pretrained": False})


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Two 64x64 images with flat-coloured rectangles on black, and the rectangles as part masks."""
    g = torch.Generator().manual_seed(0)
    images = torch.zeros(2, 3, 64, 64)
    masks = []
    for b, rects in enumerate(RECTS):
        m = torch.zeros(len(rects), 64, 64, dtype=torch.bool)
        for i, (y0, x0, y1, x1) in enumerate(rects):
            m[i, y0:y1, x0:x1] = True
            images[b, :, y0:y1, x0:x1] = torch.rand(3, 1, 1, generator=g) * 2 - 1
        masks.append(m)
    return images, masks


def _decoder(teacher: Teacher) -> PartDecoder:
    """A 10-query decoder built from the teacher's head config, seeded."""
    from mmengine.config import Config

    torch.manual_seed(0)
    return build_part_decoder(Config.fromfile(str(CFG)).model.panoptic_head, num_queries=10, num_points=256)


def test_build_fits_the_teacher(teacher):
    dec = _decoder(teacher)
    head, t_head = dec.head, teacher.model.panoptic_head
    assert (head.num_classes, head.num_queries, dec.feat_channels) == (1, 10, 128)
    assert head.class_weight == [1.0, 0.1]
    assert (head.loss_cls.loss_weight, head.loss_mask.loss_weight, head.loss_dice.loss_weight) == (2.0, 5.0, 5.0)
    assert head.num_points == 256 and head.num_transformer_decoder_layers == 3
    # the pixel decoder takes the teacher's backbone maps: same input convolutions
    ours = {k: v.shape for k, v in head.pixel_decoder.state_dict().items()}
    theirs = {k: v.shape for k, v in t_head.pixel_decoder.state_dict().items()}
    assert ours == theirs


def test_loss_backward_reaches_decoder_not_teacher(teacher, data):
    images, masks = data
    # worst case: the teacher's parameters would take gradients; the decoder must not send any
    flags = [p.requires_grad for p in teacher.model.parameters()]
    for p in teacher.model.parameters():
        p.requires_grad_(True)
    try:
        before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
        feats = teacher.model.backbone(images)
        assert [tuple(f.shape[1:]) for f in feats] == [(24, 16, 16), (40, 8, 8), (112, 4, 4), (320, 2, 2)]
        dec = _decoder(teacher)
        losses = dec.loss(feats, masks, [dict(img_shape=(64, 64))] * 2)
        expected = {f"{p}loss_{k}" for p in ["", "d0.", "d1.", "d2."] for k in ("cls", "mask", "dice")}
        assert set(losses) == expected
        assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
        opt = torch.optim.AdamW(dec.parameters(), lr=1e-3)
        sum(losses.values()).backward()
        opt.step()
        grads = [p.grad for p in dec.parameters()]
        assert all(g is not None for g in grads)
        assert all(torch.isfinite(g).all() for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0
        assert all(p.grad is None for p in teacher.model.parameters())
        after = teacher.model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
    finally:
        for p, flag in zip(teacher.model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
            p.grad = None


def test_image_without_parts_and_smaller_masks(teacher, data):
    images, masks = data
    with torch.no_grad():
        feats = teacher.model.backbone(images)
    dec = _decoder(teacher)
    # no parts in image 0; image 1's masks cover a 60x60 image inside the 64x64 (padded) input
    losses = dec.loss(feats, [torch.zeros(0, 64, 64, dtype=torch.bool), masks[1][:, :60, :60]])
    assert all(torch.isfinite(v) for v in losses.values())
    with pytest.raises(ValueError, match="larger"):
        dec.loss(feats, [masks[0], torch.zeros(1, 65, 64, dtype=torch.bool)])


def test_predict_outputs(teacher, data):
    images, _ = data
    with torch.no_grad():
        feats = teacher.model.backbone(images)
    dec = _decoder(teacher).eval()
    out = dec.predict(feats, [dict(img_shape=(64, 64)), dict(img_shape=(60, 52))])
    assert len(out) == 2
    for o, (h, w) in zip(out, [(64, 64), (60, 52)], strict=True):
        assert o["masks"].shape == (10, h, w) and o["masks"].dtype == torch.float32
        assert o["scores"].shape == (10,) and o["query_features"].shape == (10, dec.feat_channels)
        assert float(o["scores"].min()) >= 0 and float(o["scores"].max()) <= 1
        assert float(o["masks"].min()) >= 0 and float(o["masks"].max()) <= 1
        # the query features are what the head classifies: the last layer after post-norm
        with torch.no_grad():
            scores = dec.head.cls_embed(o["query_features"]).softmax(-1)[:, 0]
        torch.testing.assert_close(scores, o["scores"])


def test_overfits_two_images(teacher, data):
    images, masks = data
    with torch.no_grad():
        feats = teacher.model.backbone(images)
    dec = _decoder(teacher)
    opt = torch.optim.AdamW(dec.parameters(), lr=1e-3, weight_decay=0.0)
    initial = None
    for _ in range(100):
        total = sum(dec.loss(feats, masks).values())
        opt.zero_grad()
        total.backward()
        opt.step()
        initial = float(total.detach()) if initial is None else initial
    dec.eval()
    with torch.no_grad():
        final = float(sum(dec.loss(feats, masks).values()))
    out = dec.predict(feats)
    ious = []
    for o, gt in zip(out, masks, strict=True):
        top = o["masks"][o["scores"].argsort(descending=True)[: len(gt)]] > 0.5  # as many proposals as parts
        for g in gt:
            inter = (top & g).flatten(1).sum(1).float()
            union = (top | g).flatten(1).sum(1).float()
            ious.append(float((inter / union).max()))
    mean_iou = sum(ious) / len(ious)
    print(f"overfit: loss {initial:.2f} -> {final:.2f}, mean best IoU {mean_iou:.3f}, IoUs {ious}")
    assert math.isfinite(final) and final < 0.3 * initial
    assert mean_iou > 0.7 and min(ious) > 0.5
