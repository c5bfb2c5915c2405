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
from lepton_automl.export.trunk import run_onnx
from lepton_automl.interfaces import Modality
from lepton_automl.training.cache import CachedArrays


@torch.no_grad()
def head_logits(head: torch.nn.Module, features: np.ndarray) -> np.ndarray:
    return head(torch.from_numpy(np.array(features, dtype=np.float32))).numpy()


def head_accuracy(head: torch.nn.Module, features: np.ndarray, labels: np.ndarray) -> float:
    return float((head_logits(head, features).argmax(1) == labels).mean())


def onnx_logits(path: Path, modality: Modality, data: LabelledData, preprocessing: Mapping[str, Any]) -> np.ndarray:
    """The exported file's logits on ``data`` (examples, classes)."""
    (logits,) = run_onnx(path, modality, data.examples, preprocessing=preprocessing, outputs=("logits",))
    if not np.all(np.isfinite(logits)):
        raise FloatingPointError("the exported model produced NaN/inf logits")
    return np.asarray(logits, dtype=np.float32)


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
