"""A trunk's ONNX file (``features`` out) plus a linear head (standardise, then ``Gemm``): one ONNX file
with ``logits`` out, written without running torch again.

A linear probe's trunk does not change with its head, so a search exports, quantizes, verifies and
times each trunk once (``search/trunks.py``) and writes a probe's model file only when it is asked
for, by appending that probe's head to the stored trunk here. The head stays fp32 in an int8 trunk:
it is a few thousand multiply-adds, and its inputs are the trunk's dequantized features.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from lepton_automl.exceptions import ExportError

FEATURES = "features"
LOGITS = "logits"


class TrunkFeatures(torch.nn.Module):
    """A trunk (1-tuple of ``(batch, features)`` out) as a module with one tensor out, for export."""

    def __init__(self, trunk: torch.nn.Module) -> None:
        super().__init__()
        self.trunk = trunk

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.trunk(*inputs)[0]


def head_arrays(head: torch.nn.Module) -> dict[str, np.ndarray]:
    """``mean``, ``std``, ``weight`` (classes x features) and ``bias`` of a ``Sequential(Standardize or
    Identity, Linear)`` head."""
    first, linear = head[0], head[1]
    width = linear.weight.shape[1]
    mean = getattr(first, "mean", torch.zeros(width))
    std = getattr(first, "std", torch.ones(width))
    return {name: t.detach().cpu().numpy().astype(np.float32)
            for name, t in (("mean", mean), ("std", std), ("weight", linear.weight), ("bias", linear.bias))}


def append_linear_head(trunk_path: str | Path, dst: str | Path, head: torch.nn.Module) -> Path:
    """Write ``dst``: the graph of ``trunk_path`` with ``(features - mean) / std @ weight.T + bias`` as
    its ``logits`` output."""
    import onnx

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(_with_linear_head(trunk_path, head), str(dst))
    return dst


def linear_head_bytes(trunk_path: str | Path, head: torch.nn.Module) -> bytes:
    """What ``append_linear_head`` would write, serialized in memory (for measuring, nothing written)."""
    return _with_linear_head(trunk_path, head).SerializeToString()


def _with_linear_head(trunk_path: str | Path, head: torch.nn.Module) -> Any:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(trunk_path))
    graph = model.graph
    outputs = [o.name for o in graph.output]
    if outputs != [FEATURES]:
        raise ExportError(f"{trunk_path} is not a trunk file: its outputs are {outputs}, not [{FEATURES!r}]")
    arrays = head_arrays(head)
    names = {k: f"lepton_head_{k}" for k in arrays}
    graph.initializer.extend(numpy_helper.from_array(v, names[k]) for k, v in arrays.items())
    graph.node.extend([
        helper.make_node("Sub", [FEATURES, names["mean"]], ["lepton_head_centred"]),
        helper.make_node("Div", ["lepton_head_centred", names["std"]], ["lepton_head_scaled"]),
        helper.make_node("Gemm", ["lepton_head_scaled", names["weight"], names["bias"]], [LOGITS], transB=1),
    ])
    classes = int(arrays["weight"].shape[0])
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["batch", classes]))
    return model


def merge_side_by_side(trunk_paths: list[str | Path], dst: str | Path, *, input_names: list[str]) -> Path:
    """One trunk file running several trunk files on the same inputs, their ``features`` concatenated
    (the ONNX twin of ``ConcatTrunk``): each graph's names get a prefix, the inputs stay shared."""
    import onnx
    from onnx import compose, helper

    models = [onnx.load(str(p)) for p in trunk_paths]
    nodes, initializers, outputs = [], [], []
    opsets: dict[str, int] = {}
    for i, model in enumerate(models):
        if [o.name for o in model.graph.output] != [FEATURES]:
            raise ExportError(f"{trunk_paths[i]} is not a trunk file (outputs {[o.name for o in model.graph.output]})")
        prefixed = compose.add_prefix(model, prefix=f"m{i}_")
        shared = {f"m{i}_{name}": name for name in input_names}
        for node in prefixed.graph.node:
            node.input[:] = [shared.get(x, x) for x in node.input]
        nodes.extend(prefixed.graph.node)
        initializers.extend(prefixed.graph.initializer)
        outputs.append(f"m{i}_{FEATURES}")
        for opset in model.opset_import:
            opsets[opset.domain] = max(opsets.get(opset.domain, 0), opset.version)
    nodes.append(helper.make_node("Concat", outputs, [FEATURES], axis=1))
    graph = helper.make_graph(nodes, "lepton_ensemble_trunk", inputs=list(models[0].graph.input),
                              outputs=[helper.make_tensor_value_info(FEATURES, onnx.TensorProto.FLOAT,
                                                                     ["batch", "features"])],
                              initializer=initializers)
    merged = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])
    merged.ir_version = max(m.ir_version for m in models)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(merged, str(dst))
    return dst
