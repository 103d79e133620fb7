"""PartModel: the frozen teacher backbone + part decoder the `proposals` stage trains."""

import numpy as np
import pytest
import torch

pytest.importorskip("mmdet")

from mmengine.config import Config  # noqa: E402

from partdistill.config import CONFIG_ROOT  # noqa: E402
from partdistill.evaluation.metrics import average_recall  # noqa: E402
from partdistill.models.part_model import model_config, predict_parts, teacher_init_state  # noqa: E402
from partdistill.models.teacher import register_mmdet  # noqa: E402

TEACHER = CONFIG_ROOT / "teachers" / "demo_mask2former_effnet-lite0_partsworld.py"


def _model(**kw):
    from mmdet.registry import MODELS

    register_mmdet()
    cfg = Config.fromfile(str(TEACHER))
    model = MODELS.build(model_config(cfg.model.to_dict(), num_queries=kw.pop("num_queries", 8),
                                      num_points=kw.pop("num_points", 256), **kw))
    model.init_weights()
    return model, cfg


def _batch(model, images, masks_per_image):
    """A training batch as the Runner would give it (after PackDetInputs)."""
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData

    inputs, samples = [], []
    for img, masks in zip(images, masks_per_image, strict=True):
        h, w = img.shape[:2]
        inputs.append(torch.from_numpy(img[:, :, ::-1].copy()).permute(2, 0, 1).float())
        s = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w)))
        s.gt_instances = InstanceData(labels=torch.zeros(len(masks), dtype=torch.long),
                                      masks=BitmapMasks(np.stack(masks).astype(np.uint8), h, w),
                                      bboxes=torch.zeros(len(masks), 4))
        samples.append(s)
    return model.data_preprocessor({"inputs": inputs, "data_samples": samples}, True)


def _scene(rng, h=64, w=96):
    """An image with two objects, each of two flat-coloured parts; returns (image, part masks)."""
    img = np.full((h, w, 3), 90, np.uint8) + rng.integers(0, 20, (h, w, 3), dtype=np.uint8)
    masks = []
    for x0, colours in ((8, ((220, 40, 40), (40, 200, 60))), (52, ((40, 60, 230), (230, 210, 40)))):
        y0 = int(rng.integers(4, 16))
        top = np.zeros((h, w), bool)
        top[y0:y0 + 20, x0:x0 + 32] = True
        bottom = np.zeros((h, w), bool)
        bottom[y0 + 20:y0 + 40, x0:x0 + 32] = True
        img[top], img[bottom] = colours
        masks += [top, bottom]
    return img, masks


def test_forward_backward_trains_only_the_decoder():
    model, _ = _model()
    model.train()
    rng = np.random.default_rng(0)
    images, masks = zip(*[_scene(rng) for _ in range(2)], strict=True)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("backbone.")
              or ".pixel_decoder." in k}
    data = _batch(model, list(images), list(masks))
    losses = model(**data, mode="loss")
    total = sum(losses.values())
    assert torch.isfinite(total) and total > 0
    assert {"loss_cls", "loss_mask", "loss_dice", "d0.loss_mask"} <= set(losses)
    total.backward()
    for name, p in model.named_parameters():
        if name.startswith("backbone.") or ".pixel_decoder." in name:
            assert not p.requires_grad and p.grad is None, name
    trained = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert any("transformer_decoder" in n for n in trained) and any("cls_embed" in n for n in trained)
    # one optimiser step changes the decoder and leaves the teacher's weights as they were
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    opt.step()
    model.train()  # frozen parts stay in eval mode (BatchNorm statistics untouched by the forward)
    assert not model.backbone.training
    model(**_batch(model, list(images), list(masks)), mode="loss")
    for k, v in model.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), k


def test_teacher_init_copies_what_fits():
    model, _ = _model(num_queries=8)
    teacher_like = {("panoptic_head." + k.removeprefix("decoder.head.") if k.startswith("decoder.head.") else k):
                    torch.full_like(v, 0.5) for k, v in model.state_dict().items()}
    teacher_like["panoptic_head.cls_embed.weight"] = torch.zeros(9, 128)  # 8 object classes + no-object
    teacher_like["panoptic_head.cls_embed.bias"] = torch.zeros(9)
    state, fresh = teacher_init_state(model, teacher_like)
    assert "decoder.head.cls_embed.weight" in fresh and "decoder.head.cls_embed.bias" in fresh
    assert torch.all(state["decoder.head.transformer_decoder.layers.0.ffn.layers.1.weight"] == 0.5)
    assert all(torch.all(state[k] == 0.5) for k in state if k.startswith("backbone.") and state[k].is_floating_point())
    del teacher_like[next(k for k in teacher_like if k.startswith("backbone."))]
    with pytest.raises(ValueError, match="frozen backbone"):
        teacher_init_state(model, teacher_like)


def test_overfitting_a_few_images_raises_recall():
    torch.manual_seed(0)
    model, _ = _model(num_queries=8, num_points=512)
    rng = np.random.default_rng(1)
    images, masks = zip(*[_scene(rng) for _ in range(4)], strict=True)

    def recall():
        preds = predict_parts(model, list(images))
        return average_recall([list(m) for m in masks], [[p > 0.5 for p in pr["masks"].numpy()] for pr in preds],
                              max_dets=(4,), pred_scores=[pr["scores"].numpy() for pr in preds])["AR@4"]

    before = recall()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    first = last = None
    for _ in range(60):
        model.train()
        losses = model(**_batch(model, list(images), list(masks)), mode="loss")
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        first = float(total) if first is None else first
        last = float(total)
    after = recall()
    assert last < 0.5 * first
    assert after >= 0.5 and after > before + 0.3, (before, after)


def test_class_conditioned_head_routes_gradients_to_its_slice():
    """k = 2 part clusters × 3 object classes: an image holding only class 1 trains logits 2–3 and
    no-object, never the other classes' rows, and predicts nothing outside its slice."""
    model, _ = _model(num_classes=6, parts_per_class=2)
    model.train()
    rng = np.random.default_rng(3)
    img, masks = _scene(rng)
    data = _batch(model, [img], [masks])
    sample = data["data_samples"][0]
    sample.set_metainfo({"object_classes": [1]})
    sample.gt_instances.labels = torch.tensor([2, 3, 2, 3])
    losses = model(**data, mode="loss")
    sum(losses.values()).backward()
    grad = model.decoder.head.cls_embed.weight.grad
    row = grad.abs().sum(1)
    assert torch.all(row[[0, 1, 4, 5]] == 0), row
    assert torch.all(row[[2, 3, 6]] > 0), row

    preds = predict_parts(model, [img], metas=[{"object_classes": [2]}])
    probs = preds[0]["class_scores"]
    assert probs.shape == (8, 7)
    assert float(probs[:, :4].max()) < 1e-6 and torch.allclose(probs.sum(1), torch.ones(8))
    with pytest.raises(ValueError, match="outside the head's 3 classes"):
        predict_parts(model, [img], metas=[{"object_classes": [3]}])


def test_predict_objects_with_crops_pastes_each_object_back_in_its_box():
    from partdistill.models.object_crops import object_box
    from partdistill.models.part_model import predict_objects

    torch.manual_seed(0)
    model, _ = _model(num_queries=8)
    img, masks = _scene(np.random.default_rng(2))
    objects = [masks[0] | masks[1], masks[2] | masks[3]]
    whole = predict_objects(model, img, objects)
    assert len(whole) == 2 and whole[0] is whole[1]          # one pass over the image serves both
    assert whole[0]["masks"].shape == (8, *img.shape[:2])
    crop = {"enabled": True, "size": 64, "margin": 0.1}
    per_object = predict_objects(model, img, objects, crop=crop)
    assert per_object[0] is not per_object[1]
    for obj, pred in zip(objects, per_object, strict=True):
        assert pred["masks"].shape == (8, *img.shape[:2]) and pred["scores"].shape == (8,)
        y0, y1, x0, x1 = object_box(obj, 64, 0.1).region(img.shape[:2])
        outside = pred["masks"].clone()
        outside[:, y0:y1, x0:x1] = 0
        assert float(outside.abs().max()) == 0.0 and float(pred["masks"][:, y0:y1, x0:x1].max()) > 0
    # the model's own setting (load_part_model sets it from the artifact) is the default
    model.part_crop = crop
    again = predict_objects(model, img, objects)
    assert torch.equal(again[1]["masks"], per_object[1]["masks"])


@pytest.mark.parametrize("mode, learns", [
    ("all", ()),
    ("encoder", ("lateral_convs", "output_convs", "mask_feature")),
    ("none", ("lateral_convs", "output_convs", "mask_feature", "encoder", "input_convs")),
])
def test_freeze_pixel_decoder_modes(mode, learns):
    """'encoder' is the reference's split: the deformable encoder stays the teacher's, the stride-4
    convolutions and the mask projection learn; 'none' trains the whole pixel decoder."""
    model, _ = _model(freeze_pixel_decoder=mode)
    model.train()
    rng = np.random.default_rng(0)
    images, masks = zip(*[_scene(rng) for _ in range(2)], strict=True)
    sum(model(**_batch(model, list(images), list(masks)), mode="loss").values()).backward()
    pixel = {n.split(".pixel_decoder.")[1].split(".")[0]: p for n, p in model.named_parameters()
             if ".pixel_decoder." in n}
    for name in {n.split(".pixel_decoder.")[1].split(".")[0] for n, _ in model.named_parameters()
                 if ".pixel_decoder." in n}:
        grads = [p.grad for n, p in model.named_parameters() if f".pixel_decoder.{name}." in n]
        if name in learns:
            assert any(g is not None and g.abs().sum() > 0 for g in grads), (mode, name)
        elif mode != "none":
            assert all(g is None for g in grads), (mode, name)
    assert pixel and not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("backbone."))
    encoder_training = model.decoder.head.pixel_decoder.encoder.training
    assert encoder_training == (mode == "none")
    with pytest.raises(ValueError, match="freeze_pixel_decoder"):
        _model(freeze_pixel_decoder="decoder")
