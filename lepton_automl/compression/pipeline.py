"""The one prune -> recover -> export -> quantize pipeline.

``lepton compress`` (``compression.compress``), the facade's ``compress()`` and the search's trials all
call these steps. Only the scheduling of recovery differs: the search checks its deadline and early
stopping between batches and epochs, so it calls ``prune_structure`` and ``export_quantized`` around
its own recovery; the other two call ``compress_model``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from lepton_automl.accel import CPU, Accelerator
from lepton_automl.compression.pruning import PruneReport, prune_structured, prune_transformer
from lepton_automl.compression.quantization import quantize_onnx
from lepton_automl.compression.recovery import RECOVERY_LR, recover
from lepton_automl.data.dataset import LabelledData
from lepton_automl.export.onnx import export_onnx
from lepton_automl.export.runtime import TORCH_RUNTIMES, to_torch_runtime
from lepton_automl.interfaces import Modality
from lepton_automl.training.trainer import fold_standardize

Feeds = Mapping[str, np.ndarray]


def classifier(model: nn.Module) -> list[nn.Module]:
    """The layer whose outputs pruning must keep: the model's last ``Linear``, its classifier (the head
    of a search or registry model, the last layer of a user's ``build_fn`` network)."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]


def prune_structure(model: nn.Module, *, kind: str, amount: float,
                    example: Feeds | Sequence[Any]) -> tuple[PruneReport, dict[str, list[int]]]:
    """Structured pruning in place, by the modality's ``structured_pruning`` kind: "channels" removes
    convolution channels (torch-pruning; a ``Standardize`` in the head is folded into its linear layer
    first), anything else removes attention heads and MLP width of a transformer. Returns the report
    and, for transformers, the removed heads per layer (a rebuild needs them)."""
    if kind == "channels":
        head = getattr(model, "head", None)
        if isinstance(head, nn.Sequential):
            fold_standardize(head)
        return prune_structured(model, example, amount=amount, ignored=classifier(model)), {}
    return prune_transformer(model, amount=amount)


def export_quantized(model: nn.Module, *, example: Feeds, modality: Modality, quant: str, folder: Path,
                     calibration: Callable[[], list[dict[str, np.ndarray]]]) -> tuple[Path, Path, str]:
    """``model.onnx`` in ``folder`` and the file that ships: itself, ``model.int8.onnx`` for the int8
    modes (``calibration`` is called only then), or itself beside a torch runtime's name. Returns
    (fp32 file, runtime file, runtime name)."""
    fp32 = export_onnx(model, example, folder / "model.onnx", input_names=modality.input_names(),
                       dynamic_axes=modality.dynamic_axes())
    if quant in TORCH_RUNTIMES:
        to_torch_runtime(model, quant)  # fails here, not at load time, if the runtime cannot be built
        return fp32, fp32, quant
    if quant == "none":
        return fp32, fp32, "onnxruntime"
    return fp32, quantize_onnx(fp32, folder / "model.int8.onnx", mode=quant, calibration=calibration()), "onnxruntime"


@dataclass(frozen=True)
class Compressed:
    fp32_onnx: Path
    runtime_onnx: Path  # the file that ships (the fp32 one unless an ONNX int8 mode was asked)
    runtime: str  # "onnxruntime" or a torch runtime's name
    pruning: PruneReport | None = None
    removed_heads: dict[str, list[int]] = field(default_factory=dict)


def compress_model(model: nn.Module, *, modality: Modality, preprocessing: Mapping[str, Any], train: LabelledData,
                   example: Feeds, prune: float, quant: str, folder: Path, recovery_epochs: int,
                   recovery_lr: float | None = None, seed: int = 0, calibration_examples: int = 64,
                   accel: Accelerator = CPU) -> Compressed:
    """Prune ``model`` in place (then a short recovery fine-tune on ``train``), export it to ``folder``
    and quantize it. Calibration uses ``calibration_examples`` random training examples (``seed``)."""
    report, heads = None, {}
    if prune > 0.0:
        report, heads = prune_structure(model, kind=modality.structured_pruning, amount=prune, example=example)
        recover(model, modality, train, preprocessing, epochs=recovery_epochs, seed=seed,
                lr=recovery_lr or RECOVERY_LR[modality.structured_pruning], accel=accel)

    def calibration() -> list[dict[str, np.ndarray]]:
        rng = np.random.default_rng(seed)
        idx = rng.choice(len(train), size=min(calibration_examples, len(train)), replace=False)
        return [modality.encode([train.examples[i]], preprocessing=preprocessing) for i in idx]

    fp32, runtime, name = export_quantized(model, example=example, modality=modality, quant=quant, folder=folder,
                                           calibration=calibration)
    return Compressed(fp32_onnx=fp32, runtime_onnx=runtime, runtime=name, pruning=report, removed_heads=heads)
