"""How a trial's accuracy is read: on cached trunk outputs when the artifact is the fp32 model over a
frozen trunk (checked against the exported file), else by running the exported file on the split."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lepton_automl.data.dataset import LabelledData
from lepton_automl.data.encoded import Encoder
from lepton_automl.export.trunk import run_onnx
from lepton_automl.interfaces import ExportModel, Modality
from lepton_automl.training.cache import CachedArrays
from lepton_automl.training.trainer import tail_features


@torch.no_grad()
def head_logits(head: torch.nn.Module, features: np.ndarray) -> np.ndarray:
    return head(torch.from_numpy(np.array(features, dtype=np.float32))).numpy()


def head_inputs(model: ExportModel, trunk_outputs: tuple[np.ndarray, ...], blocks: int) -> np.ndarray:
    """What ``model``'s linear head reads, from its trunk's outputs: those outputs themselves, or with
    ``blocks`` trained blocks, the tail's output on them."""
    return np.asarray(trunk_outputs[0]) if blocks == 0 else tail_features(model.tail, trunk_outputs)


def head_accuracy(head: torch.nn.Module, features: np.ndarray, labels: np.ndarray) -> float:
    return float((head_logits(head, features).argmax(1) == labels).mean())


def onnx_logits(path: Path, modality: Modality, data: LabelledData, preprocessing: Mapping[str, Any], *,
                encode: Encoder | None = None) -> np.ndarray:
    """The exported file's logits on ``data`` (examples, classes); ``encode`` as ``run_onnx``'s."""
    (logits,) = run_onnx(path, modality, data.examples, preprocessing=preprocessing, outputs=("logits",),
                         encode=encode)
    if not np.all(np.isfinite(logits)):
        raise FloatingPointError("the exported model produced NaN/inf logits")
    return np.asarray(logits, dtype=np.float32)


HEAD_INPUT_NODE = "/head/head.0/Sub"  # an ExportModel head's first node (Standardize), as torch.onnx names it


def onnx_logits_and_head_inputs(path: Path, modality: Modality, data: LabelledData,
                                preprocessing: Mapping[str, Any], *,
                                encode: Encoder | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The exported file's logits on ``data`` and what its linear head reads (the features before
    ``Standardize``), from one pass: the head's input is added as a second output of a copy of the
    graph. It is the dequantized tensor in an int8 file, so a head refit on fp32 features (its fold
    heads too) can score what the shipped trunk computes. ``ExportError`` when the file has no such head."""
    import onnx

    from lepton_automl.exceptions import ExportError

    graph = onnx.load(str(path))
    node = next((n for n in graph.graph.node if n.name == HEAD_INPUT_NODE), None)
    if node is None:
        raise ExportError(f"{path} has no node {HEAD_INPUT_NODE!r}: not an ExportModel with a linear head")
    graph.graph.output.append(onnx.helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, None))
    logits, inputs = run_onnx(graph.SerializeToString(), modality, data.examples, preprocessing=preprocessing,
                              outputs=("logits", node.input[0]), encode=encode)
    if not np.all(np.isfinite(logits)):
        raise FloatingPointError("the exported model produced NaN/inf logits")
    return np.asarray(logits, dtype=np.float32), np.asarray(inputs, dtype=np.float32)


def onnx_accuracy(path: Path, modality: Modality, data: LabelledData, preprocessing: Mapping[str, Any]) -> float:
    if not len(data):
        return 0.0
    return float((onnx_logits(path, modality, data, preprocessing).argmax(1) == data.labels).mean())


def concat_features(parts: list[CachedArrays]) -> CachedArrays:
    """One member's trunk outputs, or several members' pooled features side by side (each cached alone,
    so an ensemble costs no extraction once its members ran)."""
    if len(parts) == 1:
        return parts[0]
    arrays = {split: (np.concatenate([np.asarray(p.arrays[split][0]) for p in parts], axis=1),)
              for split in parts[0].arrays}
    return CachedArrays(arrays=arrays, seconds=sum(p.seconds for p in parts), hit=all(p.hit for p in parts))


@dataclass(frozen=True)
class Scores:
    accuracy: float  # the objective
    holdout: float  # validation accuracy of the artifact
    test: float
    logits: dict[str, np.ndarray] | None = None  # the artifact's, by split (validation, test)
