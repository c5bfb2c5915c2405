"""Compress an export folder on its own: ``lepton compress MODEL_DIR --data PATH --prune 0.3 --quant int8``.

The model is rebuilt from the folder's safetensors, pruned (structured: conv channels, or attention
heads and MLP width for transformers) and given a short recovery fine-tune on the training split,
then exported and quantized. Nothing is assumed: the source and the result are both measured on the
same validation split of ``data`` (split with the same seed as the search), with latency at batch 1
and at the serving batch size, in their own runtimes. The result is a new export folder.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lepton_automl.accel import resolve_device
from lepton_automl.compression.pipeline import compress_model
from lepton_automl.compression.pruning import count_params
from lepton_automl.export.runtime import TORCH_RUNTIMES
from lepton_automl.cost.measurement import Measurement, measure_artifact
from lepton_automl.data.dataset import LabelledData
from lepton_automl.data.split import split_data
from lepton_automl.exceptions import ConfigError, DataError
from lepton_automl.export.artifact import Predictor, card_from_dict, load_metadata, rebuild_model, save_artifact
from lepton_automl.log import get_logger

logger = get_logger(__name__)

QUANT_CHOICES = ("none", "int8", "int8-static", "int8-dynamic", *TORCH_RUNTIMES)


@dataclass(frozen=True)
class CompressResult:
    before: Measurement
    after: Measurement
    out: Path
    prune: float
    quant: str
    seconds: float

    def summary(self) -> str:
        b, a = self.before, self.after
        return (f"validation accuracy {b.accuracy:.4f} -> {a.accuracy:.4f} ({100 * (a.accuracy - b.accuracy):+.2f} pts); "
                f"batch-1 latency {b.latency_ms:.3f} -> {a.latency_ms:.3f} ms ({b.latency_ms / a.latency_ms:.2f}x); "
                f"batch-{a.serving_batch} {b.latency_serving_batch_ms:.2f} -> {a.latency_serving_batch_ms:.2f} ms; "
                f"file {b.size_mb:.2f} -> {a.size_mb:.2f} MB; params {b.params_m:.2f} -> {a.params_m:.2f} M")


def align_classes(data: LabelledData, classes: list[str]) -> LabelledData:
    """Relabel ``data`` to the export's class order; refuse classes the model does not know."""
    unknown = sorted(set(data.classes) - set(classes))
    if unknown:
        raise DataError(f"The data has classes the model was not trained on: {unknown[:5]}. Compress with "
                        f"data labelled with the model's classes ({', '.join(classes[:8])}...).")
    index = {name: i for i, name in enumerate(classes)}
    mapping = np.array([index[name] for name in data.classes])
    return dataclasses.replace(data, labels=mapping[data.labels], classes=tuple(classes))


def measure_export(directory: Path, data: LabelledData, *, latency_input: Mapping[str, np.ndarray],
                   serving_batch: int = 32, threads: int | None = None, device: str = "cpu") -> Measurement:
    """Accuracy on ``data``, latency (batch 1 and ``serving_batch``), size and parameters of an export,
    run where ``device`` says (on a GPU, timed with CUDA events)."""
    predictor = Predictor(directory, threads=threads, device=device)
    logits = predictor.logits(list(data.examples))
    accuracy = float((logits.argmax(1) == data.labels).mean())
    onnx = predictor.session is not None
    runtime_file = directory / predictor.meta["runtime_file"]
    measured = measure_artifact(runtime_file if onnx else predictor.torch_model, latency_input,
                                model=rebuild_model(directory), input_names=predictor.meta["input_names"],
                                threads=threads, serving_batch=serving_batch,
                                shipped=runtime_file if onnx else directory / "model.safetensors")
    return dataclasses.replace(measured, accuracy=accuracy,
                               runtime=predictor.meta["runtime_file"] if onnx else predictor.runtime_used)


def compress_export(
    source: str | Path,
    *,
    data: Any,
    out: str | Path,
    prune: float = 0.0,
    quant: str = "none",
    recovery_epochs: int = 2,
    recovery_lr: float | None = None,
    seed: int = 0,
    data_options: Mapping[str, Any] | None = None,
    serving_batch: int = 32,
    threads: int | None = None,
    registry: Any = None,
    device: str = "cpu",
) -> CompressResult:
    """Prune and/or quantize the export at ``source`` into a new export folder ``out``, measured.
    ``device``: where pruning recovery trains and both exports are measured."""
    accel = resolve_device(device)
    start = time.perf_counter()
    source, out = Path(source), Path(out)
    if quant not in QUANT_CHOICES:
        raise ConfigError(f"Unknown --quant {quant!r}. Use one of: {', '.join(QUANT_CHOICES)}.")
    if not 0.0 <= prune < 1.0:
        raise ConfigError(f"--prune must be in [0, 1), got {prune}. Try 0.3.")
    if prune == 0.0 and quant == "none":
        raise ConfigError("Nothing to do: pass --prune AMOUNT and/or --quant MODE.")
    if out.resolve() == source.resolve():
        raise ConfigError("--out must be a new folder; the source export is kept as it is.")
    meta = load_metadata(source)
    model = rebuild_model(source, registry=registry)  # fails early, with the fix, for facade exports
    source_predictor = Predictor(source)
    modality, prep = source_predictor.modality, source_predictor.preprocessing
    labelled = align_classes(modality.load(data, options=data_options), list(meta["classes"]))
    splits = split_data(labelled, seed=seed)
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(splits.train), size=min(64, len(splits.train)), replace=False)
    encoded = [modality.encode([splits.train.examples[i]], preprocessing=prep) for i in idx]
    latency_input = max(encoded, key=lambda e: sum(v.size for v in e.values()))
    before = measure_export(source, splits.validation, latency_input=latency_input, serving_batch=serving_batch,
                            threads=threads, device=accel.device)
    logger.info("source %s: validation accuracy %.4f, %.3f ms", source, before.accuracy, before.latency_ms)

    params = dict(meta["params"])
    with tempfile.TemporaryDirectory(prefix="lepton-compress-") as tmp:
        done = compress_model(model, modality=modality, preprocessing=prep, train=splits.train,
                              example=latency_input, prune=prune, quant=quant, folder=Path(tmp),
                              recovery_epochs=recovery_epochs, recovery_lr=recovery_lr, seed=seed, accel=accel)
        if done.pruning is not None:
            logger.info("pruned %.0f%%: %.2f -> %.2f M parameters; recovered for %d epochs", 100 * prune,
                        done.pruning.params_before / 1e6, done.pruning.params_after / 1e6, recovery_epochs)
        if done.removed_heads:  # indices of the original heads, so that rounds add up
            merged = {k: list(v) for k, v in dict(params.get("prune__heads") or {}).items()}
            for layer, removed in done.removed_heads.items():
                merged[layer] = sorted(set(merged.get(layer, [])) | set(removed))
            params["prune__heads"] = merged
        params.update({"compress__prune": prune, "compress__quant": quant})
        card = card_from_dict(meta["backbone"])
        members = [card_from_dict(c) for c in meta["members"]] if "members" in meta else None
        save_artifact(out, model=model, fp32_onnx=done.fp32_onnx, runtime_onnx=done.runtime_onnx, modality=modality,
                      card=card, members=members, params=params, classes=meta["classes"], preprocessing=prep,
                      finetune_blocks=int(meta["finetune_blocks"]), metrics={}, name=meta.get("name", "Lepton model"),
                      runtime=done.runtime)
    after = measure_export(out, splits.validation, latency_input=latency_input, serving_batch=serving_batch,
                           threads=threads, device=accel.device)
    result = CompressResult(before=before, after=after, out=out, prune=prune, quant=quant,
                            seconds=time.perf_counter() - start)
    _record_metrics(out, result, params_m=count_params(model) / 1e6)
    logger.info("compressed: %s", result.summary())
    return result


def _record_metrics(out: Path, result: CompressResult, *, params_m: float) -> None:
    import json

    from lepton_automl.export.artifact import METADATA
    from lepton_automl.export.card import render_model_card

    meta = json.loads((out / METADATA).read_text())
    meta["metrics"] = {"accuracy": result.after.accuracy, "latency_ms": result.after.latency_ms,
                       "latency_p90_ms": result.after.latency_p90_ms, "serving_batch": result.after.serving_batch,
                       "latency_serving_batch_ms": result.after.latency_serving_batch_ms,
                       "size_mb": result.after.size_mb, "params_m": params_m,
                       "compressed_from": {"source_accuracy": result.before.accuracy,
                                           "source_latency_ms": result.before.latency_ms}}
    (out / METADATA).write_text(json.dumps(meta, indent=2, default=str))
    (out / "README.md").write_text(render_model_card(meta))
