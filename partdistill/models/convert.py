"""Convert Mask2Former checkpoints between detectron2 and mmdet 3.x key layouts.

The PartDistillation teacher is Mask2Former (Swin-L, COCO instances) as distributed by the
Mask2Former authors: a detectron2 checkpoint (``model_final_*.pkl``, a pickled
``{"model": {name: numpy array}, ...}``).  We run it through mmdet 3.3.0, whose ``Mask2Former``
uses different module names.  This module maps every key in both directions:

=====================================================  ====================================================
detectron2 (``facebookresearch/Mask2Former``)          mmdet 3.3.0 (``Mask2Former``)
=====================================================  ====================================================
``backbone.patch_embed.proj``                          ``backbone.patch_embed.projection``
``backbone.layers.{i}.blocks.{j}.attn.{qkv,proj,..}``  ``backbone.stages.{i}.blocks.{j}.attn.w_msa.{..}``
``backbone.layers.{i}.blocks.{j}.mlp.fc1 / fc2``       ``backbone.stages.{i}.blocks.{j}.ffn.layers.0.0 / 1``
``backbone.layers.{i}.downsample.{reduction,norm}``    ``backbone.stages.{i}.downsample.{..}`` (reordered)
``backbone.norm{i}``                                   ``backbone.norm{i}``
``sem_seg_head.pixel_decoder.input_proj.{i}.0 / 1``    ``panoptic_head.pixel_decoder.input_convs.{i}.conv / gn``
``...pixel_decoder.transformer.level_embed``           ``...pixel_decoder.level_encoding.weight``
``...transformer.encoder.layers.{i}.norm1 / norm2``    ``...encoder.layers.{i}.norms.0 / 1``
``...transformer.encoder.layers.{i}.linear1 / 2``      ``...encoder.layers.{i}.ffn.layers.0.0 / 1``
``...pixel_decoder.adapter_{i+1}`` / ``layer_{i+1}``   ``...pixel_decoder.lateral_convs.{i}`` / ``output_convs.{i}``
``...pixel_decoder.mask_features``                     ``...pixel_decoder.mask_feature``
``...predictor.transformer_cross_attention_layers``    ``...transformer_decoder.layers.{i}.cross_attn.attn``,
``.{i}.{multihead_attn,norm}``                         ``norms.0``
``...predictor.transformer_self_attention_layers``     ``...transformer_decoder.layers.{i}.self_attn.attn``,
``.{i}.{self_attn,norm}``                              ``norms.1``
``...predictor.transformer_ffn_layers.{i}``            ``...transformer_decoder.layers.{i}.ffn.layers.0.0 / 1``,
``.{linear1,linear2,norm}``                            ``norms.2``
``...predictor.decoder_norm``                          ``...transformer_decoder.post_norm``
``...predictor.class_embed``                           ``panoptic_head.cls_embed``
``...predictor.mask_embed.layers.{0,1,2}``             ``panoptic_head.mask_embed.{0,2,4}``
``...predictor.{query_feat,query_embed,level_embed}``  ``panoptic_head.{query_feat,query_embed,level_embed}``
=====================================================  ====================================================

Facts behind the table (checked against the public Mask2Former source and mmdet 3.3.0):

* Both Swin implementations put the patch merging that *follows* stage ``i`` in stage ``i``
  (d2 ``layers.{i}.downsample``, mmdet ``stages.{i}.downsample``, ``i < 3``): same index.
* The only tensor transform is the patch merging.  detectron2 (like the official Swin)
  concatenates the 2x2 neighbours as ``[x(0,0), x(1,0), x(0,1), x(1,1)]`` (row, col) in blocks
  of ``C`` channels; mmdet's ``PatchMerging`` uses ``nn.Unfold``, whose channel order is
  channel-major with the 2x2 positions in raster order ``(0,0), (0,1), (1,0), (1,1)``.
  ``downsample.reduction.weight`` (input dim) and ``downsample.norm.{weight,bias}`` are
  permuted accordingly -- the same reordering as mmdet's own ``swin_converter``
  (``correct_unfold_reduction_order`` / ``correct_unfold_norm_order``), plus its inverse.
* ``relative_position_index`` is a persistent buffer on both sides and both compute the same
  values, so it is copied; a d2 state without it is accepted and the buffer is recomputed from
  the bias table's window size (:data:`OPTIONAL_MMDET_KEYS`).  The bias table needs no transform.
* The deformable encoder and the decoder order their levels from low to high resolution on
  both sides (``input_proj.0`` / ``input_convs.0`` is res5), so level indices map 1:1.
* mmdet's decoder layer runs cross-attention, self-attention, FFN (as Mask2Former does) with
  ``norms.0/1/2`` after each; detectron2 keeps one norm per sub-layer.  Norms are mapped by
  role: cross -> ``norms.0``, self -> ``norms.1``, FFN -> ``norms.2``.
* d2 ``Conv2d`` with a norm stores the norm as ``<conv>.norm``; mmdet's ``ConvModule`` uses
  ``<module>.conv`` and ``<module>.gn``.
* ``criterion.empty_weight`` (d2's loss class weight buffer) and ``pixel_mean`` / ``pixel_std``
  have no mmdet parameter and are dropped (:data:`IGNORED_DETECTRON2_KEYS`).

Security: detectron2 ``.pkl`` files are Python pickles; unpickling runs arbitrary code, so
only load checkpoints from trusted sources.

CLI::

    python -m partdistill.models.convert SRC.pkl DST.pth [--config MMDET_CONFIG.py]
"""

from __future__ import annotations

import argparse
import pickle
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "IGNORED_DETECTRON2_KEYS",
    "OPTIONAL_MMDET_KEYS",
    "ConversionError",
    "StateDictMismatchError",
    "build_mmdet_model",
    "check_state_dict",
    "convert_checkpoint",
    "detectron2_name",
    "detectron2_to_mmdet",
    "load_detectron2_checkpoint",
    "load_mmdet_state_dict",
    "main",
    "mmdet_name",
    "mmdet_to_detectron2",
    "relative_position_index",
]

ArrayOrTensor = Tensor | np.ndarray

#: detectron2 keys with no mmdet counterpart; dropped by :func:`detectron2_to_mmdet`.
IGNORED_DETECTRON2_KEYS: tuple[str, ...] = (
    r"criterion\.empty_weight",  # SetCriterion's class-weight buffer (mmdet: loss_cls.class_weight)
    r"pixel_mean",  # non-persistent in Mask2Former, persistent in older detectron2 meta-archs
    r"pixel_std",
)

#: mmdet keys a detectron2 state may lack: :func:`detectron2_to_mmdet` recomputes them (``fill_buffers``)
#: and :func:`load_mmdet_state_dict` keeps the model's value when they are still absent.
OPTIONAL_MMDET_KEYS: tuple[str, ...] = (
    r"backbone\.stages\.\d+\.blocks\.\d+\.attn\.w_msa\.relative_position_index",
)

_MAX_NAMED = 5  # how many offending keys an error message names


class ConversionError(ValueError):
    """A state dict cannot be converted: unknown keys, duplicates or inconsistent shapes."""


class StateDictMismatchError(ConversionError):
    """A converted state dict does not fit a model (missing, unexpected or mis-shaped keys)."""

    def __init__(self, missing: list[str], unexpected: list[str], mismatched: list[str]) -> None:
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("mismatched", mismatched)):
            if keys:
                more = f" (+{len(keys) - _MAX_NAMED} more)" if len(keys) > _MAX_NAMED else ""
                parts.append(f"{len(keys)} {what}: {'; '.join(keys[:_MAX_NAMED])}{more}")
        super().__init__("state dict does not match the model: " + " | ".join(parts))


# ---------------------------------------------------------------------------------------------
# Tensor transforms (patch merging channel order)
# ---------------------------------------------------------------------------------------------

_D2_TO_UNFOLD = [0, 2, 1, 3]  # d2 block order [x(0,0), x(1,0), x(0,1), x(1,1)] -> raster; an involution


def _reduction_d2_to_mmdet(w: Tensor) -> Tensor:
    """``(out, 4C)`` weight with input blocks ``[4][C]`` (d2) -> channel-major ``[C][4]`` raster (mmdet)."""
    out_c, in_c = w.shape
    return w.reshape(out_c, 4, in_c // 4)[:, _D2_TO_UNFOLD, :].transpose(1, 2).reshape(out_c, in_c)


def _reduction_mmdet_to_d2(w: Tensor) -> Tensor:
    """Inverse of :func:`_reduction_d2_to_mmdet`."""
    out_c, in_c = w.shape
    return w.reshape(out_c, in_c // 4, 4).transpose(1, 2)[:, _D2_TO_UNFOLD, :].reshape(out_c, in_c)


def _norm_d2_to_mmdet(v: Tensor) -> Tensor:
    """``(4C,)`` LayerNorm weight/bias, d2 block order -> mmdet unfold order."""
    (n,) = v.shape
    return v.reshape(4, n // 4)[_D2_TO_UNFOLD, :].transpose(0, 1).reshape(n)


def _norm_mmdet_to_d2(v: Tensor) -> Tensor:
    """Inverse of :func:`_norm_d2_to_mmdet`."""
    (n,) = v.shape
    return v.reshape(n // 4, 4).transpose(0, 1)[_D2_TO_UNFOLD, :].reshape(n)


def _identity(t: Tensor) -> Tensor:
    return t


#: name -> (detectron2 -> mmdet, mmdet -> detectron2)
_TRANSFORMS: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]] = {
    "": (_identity, _identity),
    "merge_reduction": (_reduction_d2_to_mmdet, _reduction_mmdet_to_d2),
    "merge_norm": (_norm_d2_to_mmdet, _norm_mmdet_to_d2),
}

# ---------------------------------------------------------------------------------------------
# Rename rules: (detectron2 pattern, mmdet pattern, transform).  ``{i}``/``{j}`` match a layer
# index and must appear on both sides; ``{p}`` matches ``weight`` or ``bias``; ``{q}`` matches
# an nn.MultiheadAttention parameter.  Every pattern matches a whole key.
# ---------------------------------------------------------------------------------------------

_BB, _SB = "backbone.layers.{i}.blocks.{j}.", "backbone.stages.{i}.blocks.{j}."
_PD, _MPD = "sem_seg_head.pixel_decoder.", "panoptic_head.pixel_decoder."
_PR, _MH, _TD = "sem_seg_head.predictor.", "panoptic_head.", "panoptic_head.transformer_decoder."
_ENC, _MENC = _PD + "transformer.encoder.layers.{i}.", _MPD + "encoder.layers.{i}."

_RULES: list[tuple[str, str, str]] = [
    # --- Swin backbone -------------------------------------------------------------------
    ("backbone.patch_embed.proj.{p}", "backbone.patch_embed.projection.{p}", ""),
    ("backbone.patch_embed.norm.{p}", "backbone.patch_embed.norm.{p}", ""),
    (_BB + "norm1.{p}", _SB + "norm1.{p}", ""),
    (_BB + "attn.qkv.{p}", _SB + "attn.w_msa.qkv.{p}", ""),
    (_BB + "attn.proj.{p}", _SB + "attn.w_msa.proj.{p}", ""),
    (_BB + "attn.relative_position_bias_table", _SB + "attn.w_msa.relative_position_bias_table", ""),
    (_BB + "attn.relative_position_index", _SB + "attn.w_msa.relative_position_index", ""),
    (_BB + "norm2.{p}", _SB + "norm2.{p}", ""),
    (_BB + "mlp.fc1.{p}", _SB + "ffn.layers.0.0.{p}", ""),
    (_BB + "mlp.fc2.{p}", _SB + "ffn.layers.1.{p}", ""),
    ("backbone.layers.{i}.downsample.reduction.weight", "backbone.stages.{i}.downsample.reduction.weight",
     "merge_reduction"),
    ("backbone.layers.{i}.downsample.norm.{p}", "backbone.stages.{i}.downsample.norm.{p}", "merge_norm"),
    ("backbone.norm{i}.{p}", "backbone.norm{i}.{p}", ""),
    # --- pixel decoder (MSDeformAttnPixelDecoder) ------------------------------------------
    (_PD + "input_proj.{i}.0.{p}", _MPD + "input_convs.{i}.conv.{p}", ""),
    (_PD + "input_proj.{i}.1.{p}", _MPD + "input_convs.{i}.gn.{p}", ""),
    (_PD + "transformer.level_embed", _MPD + "level_encoding.weight", ""),
    *[(_ENC + f"self_attn.{m}.{{p}}", _MENC + f"self_attn.{m}.{{p}}", "")
      for m in ("sampling_offsets", "attention_weights", "value_proj", "output_proj")],
    (_ENC + "norm1.{p}", _MENC + "norms.0.{p}", ""),
    (_ENC + "linear1.{p}", _MENC + "ffn.layers.0.0.{p}", ""),
    (_ENC + "linear2.{p}", _MENC + "ffn.layers.1.{p}", ""),
    (_ENC + "norm2.{p}", _MENC + "norms.1.{p}", ""),
    (_PD + "mask_features.{p}", _MPD + "mask_feature.{p}", ""),
    # d2 names the extra FPN convs adapter_{idx+1}/layer_{idx+1} by input feature idx (res2 = 0);
    # mmdet's forward indexes lateral_convs/output_convs by the same feature idx.
    *[rule for k in range(3) for rule in (
        (_PD + f"adapter_{k + 1}.{{p}}", _MPD + f"lateral_convs.{k}.conv.{{p}}", ""),
        (_PD + f"adapter_{k + 1}.norm.{{p}}", _MPD + f"lateral_convs.{k}.gn.{{p}}", ""),
        (_PD + f"layer_{k + 1}.{{p}}", _MPD + f"output_convs.{k}.conv.{{p}}", ""),
        (_PD + f"layer_{k + 1}.norm.{{p}}", _MPD + f"output_convs.{k}.gn.{{p}}", ""),
    )],
    # --- transformer decoder (MultiScaleMaskedTransformerDecoder) --------------------------
    (_PR + "transformer_cross_attention_layers.{i}.multihead_attn.{q}", _TD + "layers.{i}.cross_attn.attn.{q}", ""),
    (_PR + "transformer_cross_attention_layers.{i}.norm.{p}", _TD + "layers.{i}.norms.0.{p}", ""),
    (_PR + "transformer_self_attention_layers.{i}.self_attn.{q}", _TD + "layers.{i}.self_attn.attn.{q}", ""),
    (_PR + "transformer_self_attention_layers.{i}.norm.{p}", _TD + "layers.{i}.norms.1.{p}", ""),
    (_PR + "transformer_ffn_layers.{i}.linear1.{p}", _TD + "layers.{i}.ffn.layers.0.0.{p}", ""),
    (_PR + "transformer_ffn_layers.{i}.linear2.{p}", _TD + "layers.{i}.ffn.layers.1.{p}", ""),
    (_PR + "transformer_ffn_layers.{i}.norm.{p}", _TD + "layers.{i}.norms.2.{p}", ""),
    (_PR + "decoder_norm.{p}", _TD + "post_norm.{p}", ""),
    # --- heads ------------------------------------------------------------------------------
    (_PR + "query_feat.weight", _MH + "query_feat.weight", ""),
    (_PR + "query_embed.weight", _MH + "query_embed.weight", ""),
    (_PR + "level_embed.weight", _MH + "level_embed.weight", ""),
    (_PR + "class_embed.{p}", _MH + "cls_embed.{p}", ""),
    *[(_PR + f"mask_embed.layers.{k}.{{p}}", _MH + f"mask_embed.{2 * k}.{{p}}", "") for k in range(3)],
    # only with ENFORCE_INPUT_PROJ / enforce_decoder_input_project (identity otherwise)
    (_PR + "input_proj.{i}.{p}", _MH + "decoder_input_projs.{i}.{p}", ""),
]

#: detectron2-only aliases (old names accepted on input, never produced).
_D2_ALIASES: list[tuple[str, str, str]] = [
    (_PR + "static_query.weight", _MH + "query_feat.weight", ""),  # Mask2Former decoder version < 2
]

_PLACEHOLDERS = {
    "i": r"\d+",
    "j": r"\d+",
    "p": r"weight|bias",
    "q": r"in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias",
}
_FIELD = re.compile(r"\{(\w)\}")


@dataclass(frozen=True)
class _Pattern:
    regex: re.Pattern[str]
    template: str

    @classmethod
    def compile(cls, pattern: str) -> _Pattern:
        pieces, last = [], 0
        for m in _FIELD.finditer(pattern):
            pieces.append(re.escape(pattern[last:m.start()]))
            pieces.append(f"(?P<{m.group(1)}>{_PLACEHOLDERS[m.group(1)]})")
            last = m.end()
        pieces.append(re.escape(pattern[last:]))
        return cls(re.compile("".join(pieces)), pattern)


@dataclass(frozen=True)
class _Rule:
    src: _Pattern
    dst: _Pattern
    transform: Callable[[Tensor], Tensor]

    def apply(self, key: str) -> str | None:
        m = self.src.regex.fullmatch(key)
        return None if m is None else self.dst.template.format(**m.groupdict())


def _compile(rules: Iterable[tuple[str, str, str]], reverse: bool) -> list[_Rule]:
    out = []
    for d2, mm, transform in rules:
        if set(_FIELD.findall(d2)) != set(_FIELD.findall(mm)):
            raise AssertionError(f"rule {d2!r} <-> {mm!r} has unbalanced placeholders")
        fwd, inv = _TRANSFORMS[transform]
        pd2, pmm = _Pattern.compile(d2), _Pattern.compile(mm)
        out.append(_Rule(pmm, pd2, inv) if reverse else _Rule(pd2, pmm, fwd))
    return out


_D2_TO_MM = _compile([*_RULES, *_D2_ALIASES], reverse=False)
_MM_TO_D2 = _compile(_RULES, reverse=True)
_IGNORED_D2 = re.compile("|".join(f"(?:{p})" for p in IGNORED_DETECTRON2_KEYS))
_OPTIONAL_MM = re.compile("|".join(f"(?:{p})" for p in OPTIONAL_MMDET_KEYS))


def _lookup(rules: list[_Rule], key: str) -> tuple[str, Callable[[Tensor], Tensor]] | None:
    for rule in rules:
        new = rule.apply(key)
        if new is not None:
            return new, rule.transform
    return None


def mmdet_name(detectron2_key: str) -> str | None:
    """The mmdet key for a detectron2 key, or ``None`` when no rule knows it."""
    hit = _lookup(_D2_TO_MM, detectron2_key)
    return None if hit is None else hit[0]


def detectron2_name(mmdet_key: str) -> str | None:
    """The detectron2 key for an mmdet key, or ``None`` when no rule knows it."""
    hit = _lookup(_MM_TO_D2, mmdet_key)
    return None if hit is None else hit[0]


# ---------------------------------------------------------------------------------------------
# State dict conversion
# ---------------------------------------------------------------------------------------------


def _as_tensor(value: ArrayOrTensor | Any, key: str) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.array(value, copy=True))  # own, writable, contiguous memory
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConversionError(f"{key}: value of type {type(value).__name__} is not an array") from exc


def _named(keys: list[str]) -> str:
    more = f" (+{len(keys) - _MAX_NAMED} more)" if len(keys) > _MAX_NAMED else ""
    return ", ".join(keys[:_MAX_NAMED]) + more


def _convert(state: Mapping[str, ArrayOrTensor], rules: list[_Rule], ignored: re.Pattern[str] | None,
             direction: str) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    unknown: list[str] = []
    for key, value in state.items():
        hit = _lookup(rules, key)
        if hit is None:
            if ignored is None or not ignored.fullmatch(key):
                unknown.append(key)
            continue
        new_key, transform = hit
        if new_key in out:
            raise ConversionError(f"{direction}: {key} and {origin[new_key]} both map to {new_key}")
        tensor = _as_tensor(value, key)
        try:
            out[new_key] = transform(tensor).contiguous()
        except RuntimeError as exc:  # a reshape that does not fit: report the key, not torch's message alone
            raise ConversionError(f"{direction}: {key} with shape {tuple(tensor.shape)}: {exc}") from exc
        origin[new_key] = key
    if unknown:
        raise ConversionError(f"{direction}: {len(unknown)} unknown key(s): {_named(unknown)}")
    return out


def _check_levels(state: Mapping[str, Tensor], num_levels: int, level_keys: Iterable[str],
                  input_proj: re.Pattern[str], direction: str) -> None:
    for key in level_keys:
        if key in state and state[key].shape[0] != num_levels:
            raise ConversionError(f"{direction}: {key} has {state[key].shape[0]} levels, expected "
                                  f"num_levels={num_levels}")
    for key in state:
        m = input_proj.fullmatch(key)
        if m is not None and int(m.group(1)) >= num_levels:
            raise ConversionError(f"{direction}: {key} is beyond num_levels={num_levels}")


def relative_position_index(window_size: int) -> Tensor:
    """Swin's ``(W*W, W*W)`` index into the relative position bias table (same in d2 and mmdet).

    Entry ``[p, q]`` is ``(dy + W - 1) * (2W - 1) + (dx + W - 1)`` for the offset ``(dy, dx)``
    from token ``q`` to token ``p`` of a ``W x W`` window (raster order).
    """
    ys, xs = torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + window_size - 1
    dx = xs[:, None] - xs[None, :] + window_size - 1
    return dy * (2 * window_size - 1) + dx


def _fill_relative_position_index(state: dict[str, Tensor]) -> list[str]:
    """Add the ``relative_position_index`` buffer of every Swin block that has a bias table but no index."""
    suffix_table, suffix_index = "relative_position_bias_table", "relative_position_index"
    added = []
    for key in list(state):
        if not (key.startswith("backbone.stages.") and key.endswith(suffix_table)):
            continue
        index_key = key[: -len(suffix_table)] + suffix_index
        if index_key in state:
            continue
        rows = state[key].shape[0]
        window = (round(rows ** 0.5) + 1) // 2
        if (2 * window - 1) ** 2 != rows:
            raise ConversionError(f"{key}: {rows} rows is not (2W-1)^2 for a square window")
        state[index_key] = relative_position_index(window)
        added.append(index_key)
    return added


def detectron2_to_mmdet(state: Mapping[str, ArrayOrTensor], num_levels: int = 3,
                        fill_buffers: bool = True) -> dict[str, Tensor]:
    """Rename a detectron2 Mask2Former state dict to mmdet 3.x ``Mask2Former`` keys.

    Args:
        state: detectron2 model state (``checkpoint["model"]``), values tensors or numpy arrays.
        num_levels: number of feature levels of the deformable encoder and of the masked decoder
            (3 in Mask2Former); the level embeddings and input projections are checked against it.
        fill_buffers: add Swin ``relative_position_index`` buffers that ``state`` lacks
            (:data:`OPTIONAL_MMDET_KEYS`; deterministic, see :func:`relative_position_index`), so
            the result loads strictly without this module's help.

    Returns:
        A new dict of contiguous tensors with mmdet names (``backbone.*``, ``panoptic_head.*``);
        Swin patch-merging weights are reordered for mmdet's ``nn.Unfold`` layout.  Keys in
        :data:`IGNORED_DETECTRON2_KEYS` are dropped.

    Raises:
        ConversionError: a key matches no rule (the first few are named), two keys map to the
            same name, a level count disagrees with ``num_levels`` or a tensor cannot be reordered.
    """
    out = _convert(state, _D2_TO_MM, _IGNORED_D2, "detectron2 -> mmdet")
    if fill_buffers:
        _fill_relative_position_index(out)
    _check_levels(out, num_levels, (_MPD + "level_encoding.weight", _MH + "level_embed.weight"),
                  re.compile(re.escape(_MPD) + r"input_convs\.(\d+)\..*"), "detectron2 -> mmdet")
    return out


def mmdet_to_detectron2(state: Mapping[str, ArrayOrTensor], num_levels: int = 3) -> dict[str, Tensor]:
    """Rename an mmdet 3.x ``Mask2Former`` state dict to detectron2 Mask2Former keys.

    The exact inverse of :func:`detectron2_to_mmdet` (``detectron2_to_mmdet(mmdet_to_detectron2(s))``
    reproduces ``s`` bit for bit).  ``data_preprocessor.*`` buffers, if present, are dropped.

    Args:
        state: mmdet model state (``checkpoint["state_dict"]``).
        num_levels: see :func:`detectron2_to_mmdet`.

    Raises:
        ConversionError: a key matches no rule, or a level count disagrees with ``num_levels``.
    """
    out = _convert(state, _MM_TO_D2, re.compile(r"data_preprocessor\..*"), "mmdet -> detectron2")
    _check_levels(out, num_levels, (_PD + "transformer.level_embed", _PR + "level_embed.weight"),
                  re.compile(re.escape(_PD) + r"input_proj\.(\d+)\..*"), "mmdet -> detectron2")
    return out


# ---------------------------------------------------------------------------------------------
# Checkpoint files
# ---------------------------------------------------------------------------------------------


def _model_state(obj: Any, path: Path) -> dict[str, Any]:
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise ConversionError(f"{path}: not a checkpoint (expected a dict of named arrays, or one under 'model')")
    return dict(obj)


def load_detectron2_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """Read the model weights of a detectron2 checkpoint as a ``{name: tensor}`` dict.

    ``.pkl`` files (the Mask2Former model zoo format: a pickled ``{"model": {name: ndarray}, ...}``)
    are unpickled with ``encoding="latin1"`` (they may have been written by Python 2) and their
    arrays converted to CPU tensors.  Any other suffix (``.pth``, ``.pt``) is read with
    ``torch.load(weights_only=True)``.  The weights may sit under ``"model"`` or be the whole
    file; a DistributedDataParallel ``module.`` prefix is removed.

    Warning:
        Unpickling a ``.pkl`` executes code chosen by whoever wrote the file.  Load only
        checkpoints from a trusted source (e.g. the Mask2Former model zoo, checksum verified).

    Raises:
        ConversionError: the file holds no dict of named arrays.
    """
    path = Path(path)
    if path.suffix == ".pkl":
        with path.open("rb") as f:
            obj = pickle.load(f, encoding="latin1")  # trusted checkpoints only (see docstring)
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    state = _model_state(obj, path)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return {k: _as_tensor(v, k) for k, v in state.items()}


def check_state_dict(model: nn.Module, state: Mapping[str, Tensor],
                     optional: Iterable[str] = OPTIONAL_MMDET_KEYS) -> None:
    """Check that ``state`` has exactly the model's keys and shapes.

    Args:
        model: the mmdet model to load into.
        state: converted (mmdet-named) state dict.
        optional: regexes of model keys that ``state`` may lack (default :data:`OPTIONAL_MMDET_KEYS`);
            when present they must equal the model's own values (these are deterministic buffers).

    Raises:
        StateDictMismatchError: naming the first few missing, unexpected and mismatched keys,
            each with its detectron2 name where one exists.
    """
    patterns = tuple(optional)
    optional_re = re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None
    expected = model.state_dict()

    def label(key: str) -> str:
        d2 = detectron2_name(key)
        return key if d2 is None or d2 == key else f"{key} (detectron2: {d2})"

    missing = [label(k) for k in expected
               if k not in state and not (optional_re is not None and optional_re.fullmatch(k))]
    unexpected = [label(k) for k in state if k not in expected]
    mismatched = []
    for key, value in state.items():
        if key not in expected:
            continue
        ref = expected[key]
        if tuple(value.shape) != tuple(ref.shape):
            mismatched.append(f"{label(key)}: checkpoint {tuple(value.shape)} vs model {tuple(ref.shape)}")
        elif optional_re is not None and optional_re.fullmatch(key) and not torch.equal(value.to(ref), ref):
            mismatched.append(f"{label(key)}: values differ from the model's own buffer")
    if missing or unexpected or mismatched:
        raise StateDictMismatchError(missing, unexpected, mismatched)


def load_mmdet_state_dict(model: nn.Module, state: Mapping[str, Tensor],
                          optional: Iterable[str] = OPTIONAL_MMDET_KEYS) -> nn.Module:
    """Strictly load a converted state dict into an mmdet model.

    :func:`check_state_dict` runs first, so any disagreement raises a
    :class:`StateDictMismatchError` naming keys instead of torch's long message; keys matched by
    ``optional`` that ``state`` lacks keep the model's values.  Then
    ``model.load_state_dict(strict=True)``.

    Returns:
        ``model``.
    """
    check_state_dict(model, state, tuple(optional))
    full = dict(state)
    for key, value in model.state_dict().items():
        full.setdefault(key, value)
    model.load_state_dict(full, strict=True)
    return model


def build_mmdet_model(config: str | Path | Any, device: str | torch.device = "cpu") -> nn.Module:
    """Build a randomly initialised mmdet model from a config file or ``mmengine.Config``.

    Pretrained-weight ``init_cfg`` entries (backbone and model) are removed, so nothing is
    downloaded.  Imports mmdet lazily (several seconds).
    """
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine import Config

    register_all_modules()
    cfg = config if isinstance(config, Config) else Config.fromfile(str(config))
    model_cfg = cfg.model.copy()
    model_cfg["init_cfg"] = None
    if "backbone" in model_cfg:
        model_cfg["backbone"]["init_cfg"] = None
    model = MODELS.build(model_cfg)
    return model.to(device)


def convert_checkpoint(src: str | Path, dst: str | Path, num_levels: int = 3,
                       config: str | Path | None = None) -> dict[str, Tensor]:
    """Convert a detectron2 Mask2Former checkpoint file to an mmdet checkpoint file.

    Writes ``{"state_dict": {...}, "meta": {...}}`` with :func:`torch.save` (loadable by
    ``mmengine.runner.load_checkpoint``).  ``meta`` records the source file, the converter, the
    package versions and the dropped keys.

    Args:
        src: detectron2 ``.pkl`` or ``.pth`` (see :func:`load_detectron2_checkpoint`: trusted files only).
        dst: output path (parent directories are created).
        num_levels: see :func:`detectron2_to_mmdet`.
        config: optional mmdet config; when given, the model is built and the converted state is
            loaded strictly into it before anything is written.

    Returns:
        The converted mmdet state dict.
    """
    src, dst = Path(src), Path(dst)
    d2_state = load_detectron2_checkpoint(src)
    state = detectron2_to_mmdet(d2_state, num_levels=num_levels, fill_buffers=False)
    filled = _fill_relative_position_index(state)
    if config is not None:
        load_mmdet_state_dict(build_mmdet_model(config), state)
    versions = {}
    for pkg in ("torch", "mmdet", "mmengine"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    meta = {
        "source": str(src),
        "source_format": "detectron2 Mask2Former",
        "converted_by": "partdistill.models.convert.detectron2_to_mmdet",
        "num_levels": num_levels,
        "dropped_keys": sorted(k for k in d2_state if _IGNORED_D2.fullmatch(k)),
        "filled_buffers": filled,
        "verified_config": None if config is None else str(config),
        "versions": versions,
    }
    from partdistill.models.train_teacher import save_checkpoint

    dst.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(dst, state, meta)  # atomically, with the same bytes for the same weights
    return state


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m partdistill.models.convert SRC DST [--config CFG] [--num-levels N]``."""
    parser = argparse.ArgumentParser(prog="python -m partdistill.models.convert",
                                     description="Convert a detectron2 Mask2Former checkpoint to mmdet 3.x.")
    parser.add_argument("src", type=Path, help="detectron2 checkpoint (.pkl or .pth); trusted files only")
    parser.add_argument("dst", type=Path, help="output mmdet checkpoint (.pth)")
    parser.add_argument("--config", type=Path, default=None,
                        help="mmdet config to verify against (strict load before writing)")
    parser.add_argument("--num-levels", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        state = convert_checkpoint(args.src, args.dst, num_levels=args.num_levels, config=args.config)
    except (ConversionError, OSError, pickle.UnpicklingError) as exc:
        parser.exit(1, f"error: {exc}\n")
    print(f"wrote {len(state)} tensors to {args.dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
