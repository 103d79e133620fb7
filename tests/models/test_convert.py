"""Tests for the detectron2 <-> mmdet Mask2Former checkpoint converter (Swin-T instance config, CPU)."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

mmdet = pytest.importorskip("mmdet")

from partdistill.models import convert  # noqa: E402
from partdistill.models.convert import (  # noqa: E402
    ConversionError,
    StateDictMismatchError,
    build_mmdet_model,
    convert_checkpoint,
    detectron2_to_mmdet,
    load_detectron2_checkpoint,
    load_mmdet_state_dict,
    mmdet_to_detectron2,
)

CONFIG = Path(mmdet.__file__).parent / ".mim/configs/mask2former/mask2former_swin-t-p4-w7-224_8xb2-lsj-50e_coco.py"

D2_SAMPLE = [
    "backbone.patch_embed.proj.weight",
    "backbone.layers.0.blocks.0.attn.qkv.weight",
    "backbone.layers.0.blocks.1.attn.relative_position_bias_table",
    "backbone.layers.0.blocks.0.attn.relative_position_index",
    "backbone.layers.2.blocks.5.mlp.fc2.bias",
    "backbone.layers.2.downsample.reduction.weight",
    "backbone.norm3.weight",
    "sem_seg_head.pixel_decoder.input_proj.2.1.weight",
    "sem_seg_head.pixel_decoder.transformer.level_embed",
    "sem_seg_head.pixel_decoder.transformer.encoder.layers.0.self_attn.sampling_offsets.weight",
    "sem_seg_head.pixel_decoder.transformer.encoder.layers.5.norm2.bias",
    "sem_seg_head.pixel_decoder.adapter_1.weight",
    "sem_seg_head.pixel_decoder.adapter_1.norm.weight",
    "sem_seg_head.pixel_decoder.layer_1.norm.bias",
    "sem_seg_head.pixel_decoder.mask_features.weight",
    "sem_seg_head.predictor.query_feat.weight",
    "sem_seg_head.predictor.query_embed.weight",
    "sem_seg_head.predictor.level_embed.weight",
    "sem_seg_head.predictor.transformer_self_attention_layers.8.self_attn.in_proj_weight",
    "sem_seg_head.predictor.transformer_cross_attention_layers.0.multihead_attn.out_proj.bias",
    "sem_seg_head.predictor.transformer_ffn_layers.3.linear1.weight",
    "sem_seg_head.predictor.decoder_norm.weight",
    "sem_seg_head.predictor.class_embed.weight",
    "sem_seg_head.predictor.mask_embed.layers.2.bias",
]


def _randomize(model: nn.Module, seed: int) -> None:
    """Give every float tensor distinct random values (norm weights are all 1 after init)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05 + (1.0 if p.ndim == 1 else 0.0))


@pytest.fixture(scope="module")
def model() -> nn.Module:
    m = build_mmdet_model(CONFIG).eval()
    _randomize(m, 0)
    return m


@pytest.fixture(scope="module")
def d2_state(model: nn.Module) -> dict[str, Tensor]:
    return mmdet_to_detectron2(model.state_dict())


@pytest.fixture(scope="module")
def scratch(model: nn.Module) -> nn.Module:
    """A second model of the same config (a copy: cheaper than rebuilding); re-randomize before use."""
    return copy.deepcopy(model)


def _fresh(scratch: nn.Module, model: nn.Module, seed: int) -> nn.Module:
    """``scratch`` with new random weights, different from ``model``'s."""
    _randomize(scratch, seed)
    assert not torch.equal(scratch.state_dict()["panoptic_head.query_feat.weight"],
                           model.state_dict()["panoptic_head.query_feat.weight"])
    return scratch


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key, value in sb.items():
        assert torch.equal(sa[key], value), key


# --- (a) round trip ---------------------------------------------------------------------------


def test_mmdet_to_d2_names_and_round_trip(model: nn.Module, d2_state: dict[str, Tensor]) -> None:
    sd = model.state_dict()
    assert len(d2_state) == len(sd)
    missing = [k for k in D2_SAMPLE if k not in d2_state]
    assert not missing, missing
    assert not any(k.startswith(("panoptic_head", "backbone.stages")) for k in d2_state)

    back = detectron2_to_mmdet(d2_state)
    assert list(back) == list(sd)
    for key, value in sd.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    # the patch merging is the one tensor that is reordered, not just renamed
    red = "backbone.stages.0.downsample.reduction.weight"
    assert not torch.equal(d2_state["backbone.layers.0.downsample.reduction.weight"], sd[red])


def test_round_trip_model_outputs_identical(model: nn.Module, scratch: nn.Module,
                                            d2_state: dict[str, Tensor]) -> None:
    from mmdet.structures import DetDataSample

    other = load_mmdet_state_dict(_fresh(scratch, model, 1), detectron2_to_mmdet(d2_state))
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    samples = [DetDataSample(metainfo={"img_shape": (128, 128), "pad_shape": (128, 128),
                                       "batch_input_shape": (128, 128)})]
    with torch.no_grad():
        cls_a, mask_a = model._forward(x, samples)
        cls_b, mask_b = other._forward(x, samples)
    assert len(cls_a) == len(cls_b) == 10  # query-feature prediction + 9 decoder layers
    for a, b in zip([*cls_a, *mask_a], [*cls_b, *mask_b], strict=True):
        assert torch.equal(a, b)
    assert cls_a[-1].shape == (1, 100, 81) and mask_a[-1].shape == (1, 100, 32, 32)


def test_backbone_rules_match_mmdet_swin_converter(d2_state: dict[str, Tensor]) -> None:
    """mmdet's own converter for the official Swin layout (= d2's backbone) gives the same result."""
    from mmdet.models.backbones.swin import swin_converter

    backbone = {k[len("backbone."):]: v for k, v in d2_state.items() if k.startswith("backbone.")}
    ours = {k: v for k, v in detectron2_to_mmdet(d2_state).items() if k.startswith("backbone.")}
    theirs = swin_converter(backbone)
    assert set(theirs) == set(ours)
    for key, value in theirs.items():
        assert torch.equal(value, ours[key]), key


def test_patch_merging_reorder_matches_detectron2_forward(model: nn.Module, d2_state: dict[str, Tensor]) -> None:
    """d2's PatchMerging (concat x(0,0), x(1,0), x(0,1), x(1,1); norm; reduction) == mmdet's with converted weights."""
    merge = model.backbone.stages[1].downsample
    w = d2_state["backbone.layers.1.downsample.reduction.weight"]
    g = d2_state["backbone.layers.1.downsample.norm.weight"]
    b = d2_state["backbone.layers.1.downsample.norm.bias"]
    batch, h, wd, c = 2, 6, 10, w.shape[1] // 4
    x = torch.randn(batch, h * wd, c, generator=torch.Generator().manual_seed(3))

    grid = x.view(batch, h, wd, c)
    cat = torch.cat([grid[:, 0::2, 0::2], grid[:, 1::2, 0::2], grid[:, 0::2, 1::2], grid[:, 1::2, 1::2]], -1)
    expected = F.linear(F.layer_norm(cat.view(batch, -1, 4 * c), (4 * c,), g, b), w)
    with torch.no_grad():
        got, out_size = merge(x, (h, wd))
    assert tuple(out_size) == (h // 2, wd // 2)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_relative_position_index_same_as_detectron2(model: nn.Module) -> None:
    ws = 7
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
    d2_index = rel[..., 0] * (2 * ws - 1) + rel[..., 1]
    assert torch.equal(model.backbone.stages[0].blocks[0].attn.w_msa.relative_position_index, d2_index)
    assert torch.equal(convert.relative_position_index(ws), d2_index)


# --- (b) detectron2 .pkl -------------------------------------------------------------------------


def _write_pkl(path: Path, state: dict[str, Tensor], **extra: object) -> Path:
    with path.open("wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in state.items()}, "__author__": "test", **extra}, f)
    return path


def test_pkl_checkpoint_converts_and_loads(model: nn.Module, scratch: nn.Module, d2_state: dict[str, Tensor],
                                           tmp_path: Path) -> None:
    from mmengine.runner import load_checkpoint

    state = dict(d2_state)
    state["criterion.empty_weight"] = torch.ones(81)  # d2's SetCriterion buffer: dropped
    # model-zoo files may omit the deterministic index buffers: the model's own are kept
    state = {k: v for k, v in state.items() if not k.endswith("relative_position_index")}
    src = _write_pkl(tmp_path / "model_final.pkl", state)

    loaded = load_detectron2_checkpoint(src)
    assert set(loaded) == set(state)
    assert all(isinstance(v, Tensor) for v in loaded.values())

    dst = tmp_path / "out" / "m2f.pth"
    out = convert_checkpoint(src, dst)
    ckpt = torch.load(dst, map_location="cpu", weights_only=True)
    assert set(ckpt) == {"state_dict", "meta"}
    assert ckpt["meta"]["dropped_keys"] == ["criterion.empty_weight"]
    assert ckpt["meta"]["source"] == str(src)
    assert set(ckpt["state_dict"]) == set(out)

    # the recomputed index buffers make the file complete: mmengine's own loader takes it strictly
    assert len(ckpt["meta"]["filled_buffers"]) == 2 + 2 + 6 + 2
    target = _fresh(scratch, model, 4)
    load_checkpoint(target, str(dst), map_location="cpu", strict=True, logger="silent")
    _assert_same_state(target, model)


def test_cli_with_config_verification(scratch: nn.Module, d2_state: dict[str, Tensor], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    built = []
    monkeypatch.setattr(convert, "build_mmdet_model", lambda config: built.append(config) or scratch)
    src = _write_pkl(tmp_path / "m.pkl", d2_state)
    assert convert.main([str(src), str(tmp_path / "m.pth"), "--config", str(CONFIG)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert built == [CONFIG]
    bad = dict(d2_state)
    bad["sem_seg_head.predictor.query_feat.weight"] = torch.zeros(50, 256)
    src = _write_pkl(tmp_path / "bad.pkl", bad)
    with pytest.raises(SystemExit) as exc:
        convert.main([str(src), str(tmp_path / "bad.pth"), "--config", str(CONFIG)])
    assert exc.value.code == 1
    assert "panoptic_head.query_feat.weight" in capsys.readouterr().err
    assert not (tmp_path / "bad.pth").exists()


def test_missing_index_buffers_filled_or_kept(model: nn.Module, d2_state: dict[str, Tensor]) -> None:
    state = {k: v for k, v in d2_state.items() if not k.endswith("relative_position_index")}
    bare = detectron2_to_mmdet(state, fill_buffers=False)
    assert not any(k.endswith("relative_position_index") for k in bare)
    load_mmdet_state_dict(model, bare)  # allowed: OPTIONAL_MMDET_KEYS keep the model's buffers
    filled = detectron2_to_mmdet(state)
    for key, value in model.state_dict().items():
        if key.endswith("relative_position_index"):
            assert torch.equal(filled[key], value), key
    with pytest.raises(StateDictMismatchError, match=r"missing: .*relative_position_index"):
        load_mmdet_state_dict(model, bare, optional=())


def test_pth_checkpoint_and_aliases(d2_state: dict[str, Tensor], tmp_path: Path) -> None:
    state = dict(d2_state)
    state["sem_seg_head.predictor.static_query.weight"] = state.pop("sem_seg_head.predictor.query_feat.weight")
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "iteration": 7}, tmp_path / "m.pth")
    loaded = load_detectron2_checkpoint(tmp_path / "m.pth")
    assert "sem_seg_head.predictor.static_query.weight" in loaded
    out = detectron2_to_mmdet(loaded)
    assert torch.equal(out["panoptic_head.query_feat.weight"], d2_state["sem_seg_head.predictor.query_feat.weight"])


# --- (c) errors ----------------------------------------------------------------------------------


def test_unknown_key_is_named(d2_state: dict[str, Tensor]) -> None:
    bad = dict(d2_state)
    bad["sem_seg_head.predictor.not_a_layer.weight"] = torch.zeros(3)
    bad["backbone.absolute_pos_embed"] = torch.zeros(1, 96, 56, 56)  # APE: not used by Mask2Former
    with pytest.raises(ConversionError, match=r"2 unknown key\(s\).*not_a_layer\.weight") as exc:
        detectron2_to_mmdet(bad)
    assert "backbone.absolute_pos_embed" in str(exc.value)
    with pytest.raises(ConversionError, match=r"panoptic_head\.bogus"):
        mmdet_to_detectron2({"panoptic_head.bogus": torch.zeros(1)})


def test_wrong_shape_missing_and_unexpected_are_named(model: nn.Module, d2_state: dict[str, Tensor]) -> None:
    bad = dict(d2_state)
    bad["sem_seg_head.predictor.class_embed.weight"] = torch.zeros(134, 256)  # a panoptic (133+1) head
    del bad["sem_seg_head.pixel_decoder.mask_features.bias"]
    state = detectron2_to_mmdet(bad)
    state["panoptic_head.extra.weight"] = torch.zeros(1)
    with pytest.raises(StateDictMismatchError) as exc:
        load_mmdet_state_dict(model, state)
    msg = str(exc.value)
    assert "panoptic_head.cls_embed.weight (detectron2: sem_seg_head.predictor.class_embed.weight)" in msg
    assert "(134, 256) vs model (81, 256)" in msg
    assert "1 missing: panoptic_head.pixel_decoder.mask_feature.bias" in msg
    assert "1 unexpected: panoptic_head.extra.weight" in msg
    assert exc.value.mismatched and exc.value.missing and exc.value.unexpected


def test_bad_buffer_and_untransformable_shape(model: nn.Module, d2_state: dict[str, Tensor]) -> None:
    bad = dict(d2_state)
    key = "backbone.layers.0.blocks.0.attn.relative_position_index"
    bad[key] = bad[key].flip(0)
    with pytest.raises(StateDictMismatchError, match="relative_position_index.*values differ"):
        load_mmdet_state_dict(model, detectron2_to_mmdet(bad))

    bad = dict(d2_state)
    bad["backbone.layers.0.downsample.norm.weight"] = torch.ones(383)
    with pytest.raises(ConversionError, match=r"backbone\.layers\.0\.downsample\.norm\.weight with shape \(383,\)"):
        detectron2_to_mmdet(bad)


def test_num_levels_checked(d2_state: dict[str, Tensor]) -> None:
    with pytest.raises(ConversionError, match="level_encoding.weight has 3 levels, expected num_levels=4"):
        detectron2_to_mmdet(d2_state, num_levels=4)


def test_reorder_helpers_are_inverse() -> None:
    w = torch.arange(2 * 4 * 5, dtype=torch.float32).reshape(2, 20)
    v = torch.arange(20, dtype=torch.float32)
    assert torch.equal(convert._reduction_mmdet_to_d2(convert._reduction_d2_to_mmdet(w)), w)
    assert torch.equal(convert._norm_mmdet_to_d2(convert._norm_d2_to_mmdet(v)), v)
    # d2 block order x(0,0) x(1,0) x(0,1) x(1,1) of C=5 channels -> per channel (0,0) (0,1) (1,0) (1,1)
    assert convert._norm_d2_to_mmdet(v)[:4].tolist() == [0.0, 10.0, 5.0, 15.0]


def test_load_detectron2_checkpoint_rejects_non_checkpoints(tmp_path: Path) -> None:
    path = tmp_path / "x.pkl"
    path.write_bytes(pickle.dumps([np.zeros(3)]))
    with pytest.raises(ConversionError, match="not a checkpoint"):
        load_detectron2_checkpoint(path)
