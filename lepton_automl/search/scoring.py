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
from lepton_automl.interfaces import Modality
from lepton_automl.sessions import ort_session
from lepton_automl.training.cache import CachedArrays


@torch.no_grad()
def head_accuracy(head: torch.nn.Module, features: np.ndarray, labels: np.ndarray) -> float:
    return float((head(torch.from_numpy(np.array(features, dtype=np.float32))).argmax(1).numpy() == labels).mean())


def onnx_accuracy(path: Path, modality: Modality, data: LabelledData, preprocessing: Mapping[str, Any]) -> float:
    session = ort_session(path)
    correct = 0
    for start in range(0, len(data), 64):
        feeds = modality.encode(data.examples[start : start + 64], preprocessing=preprocessing)
        logits = session.run(["logits"], feeds)[0]
        if not np.all(np.isfinite(logits)):
            raise FloatingPointError("the exported model produced NaN/inf logits")
        correct += int((logits.argmax(1) == data.labels[start : start + 64]).sum())
    del session
    return correct / max(1, len(data))


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
