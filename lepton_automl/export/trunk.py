"""Run a frozen trunk over a dataset, batch by batch, through the modality's ``encode``.

``run_trunk_fast`` exports the trunk to ONNX and runs it with ONNX Runtime: for efficientnet_lite0 at
224 px on 2 cores, torch eager extracted digits features at about 23 images/s and ONNX Runtime at
about 4x that (see benchmarks/). If the export fails, ``run_trunk`` (torch eager) is used. On a CUDA
``Accelerator`` both run the trunk in torch on the GPU (mixed precision, channels-last, examples
decoded in worker processes, the batch size backed off on out-of-memory errors).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lepton_automl.accel import CPU, Accelerator, concat_batches, encoded_batches, in_batch_order, with_oom_backoff
from lepton_automl.data.encoded import Encoder
from lepton_automl.exceptions import ExportError
from lepton_automl.export.onnx import export_onnx
from lepton_automl.interfaces import Modality
from lepton_automl.log import get_logger
from lepton_automl.sessions import ort_session

logger = get_logger(__name__)

Progress = Callable[[str, int, int], None]


@torch.no_grad()
def run_trunk(
    trunk: nn.Module,
    modality: Modality,
    examples: Sequence[Any],
    *,
    preprocessing: Mapping[str, Any],
    batch_size: int = 64,
    progress: Progress | None = None,
    desc: str = "features",
    accel: Accelerator = CPU,
    mixed_precision: bool = True,
) -> tuple[np.ndarray, ...]:
    """Trunk outputs for all ``examples``, concatenated per output. On a GPU, in ``accel``'s mixed
    precision unless ``mixed_precision`` is False (then fp32 throughout, TF32 convolutions off)."""
    trunk.eval()
    if accel.cuda:
        return in_batch_order(modality, examples, lambda ordered: _run_on_gpu(
            trunk, modality, ordered, preprocessing=preprocessing, batch_size=batch_size, progress=progress,
            desc=desc, accel=accel, mixed_precision=mixed_precision))
    names = modality.input_names()

    def call(feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return [o.detach().cpu().numpy() for o in trunk(*[torch.from_numpy(feeds[n]) for n in names])]

    return _in_batches(call, modality, examples, preprocessing=preprocessing, batch_size=batch_size,
                       progress=progress, desc=desc)


GPU_BATCH = 256  # the first batch size tried on a GPU; halved on out-of-memory errors


def _run_on_gpu(trunk: nn.Module, modality: Modality, examples: Sequence[Any], *,
                preprocessing: Mapping[str, Any], batch_size: int, progress: Progress | None, desc: str,
                accel: Accelerator, mixed_precision: bool) -> tuple[np.ndarray, ...]:
    """``run_trunk`` on a GPU. The trunk is moved there for the pass and back to the CPU after it."""
    accel.prepare(trunk)
    precision = accel.autocast() if mixed_precision else contextlib.nullcontext()

    def attempt(size: int) -> tuple[np.ndarray, ...]:
        chunks, done = [], 0
        # Autotuning pays for itself only over many batches of one shape.
        with torch.inference_mode(), precision, accel.kernels(autotune=len(examples) >= 32 * size,
                                                              tf32=mixed_precision):
            for idx, tensors in encoded_batches(modality, examples, preprocessing, batch_size=size, accel=accel):
                chunks.append([o.float() for o in trunk(*accel.model_inputs(modality, tensors, preprocessing))])
                done += len(idx)
                if progress is not None:
                    progress(desc, done, len(examples))
        return concat_batches([[o.cpu().numpy() for o in c] for c in chunks])

    try:
        out, fit = with_oom_backoff(attempt, max(batch_size, GPU_BATCH), what=f"feature extraction ({desc}) batch")
    finally:
        trunk.to("cpu", memory_format=torch.contiguous_format)
    logger.info("%s: %d examples on %s at batch %d", desc, len(examples), accel.name(), fit)
    return out


def _in_batches(call: Callable[[Mapping[str, np.ndarray]], Sequence[np.ndarray]], modality: Modality,
                examples: Sequence[Any], *, preprocessing: Mapping[str, Any], batch_size: int,
                progress: Progress | None, desc: str, encode: Encoder | None = None) -> tuple[np.ndarray, ...]:
    """``call`` on each encoded batch of ``examples`` (taken in the modality's ``batch_order``),
    outputs concatenated in the order given, progress reported. ``encode``: the modality's ``encode``
    at ``preprocessing`` by default (``data.encoded.EncodedExamples.encoder`` keeps decoded examples)."""
    encode = encode or (lambda batch: modality.encode(batch, preprocessing=preprocessing))

    def run(ordered: Sequence[Any]) -> tuple[np.ndarray, ...]:
        chunks = []
        for start in range(0, len(ordered), batch_size):
            chunks.append(call(encode(ordered[start : start + batch_size])))
            if progress is not None:
                progress(desc, min(start + batch_size, len(ordered)), len(ordered))
        return concat_batches(chunks)

    return in_batch_order(modality, examples, run)


def run_trunk_fast(
    trunk: nn.Module,
    modality: Modality,
    examples: Sequence[Any],
    *,
    preprocessing: Mapping[str, Any],
    batch_size: int = 64,
    progress: Progress | None = None,
    desc: str = "features",
    accel: Accelerator = CPU,
) -> tuple[np.ndarray, ...]:
    """``run_trunk`` through ONNX Runtime (same outputs within float tolerance), torch as fallback;
    on a GPU, ``run_trunk`` there."""
    return run_trunk_splits(trunk, modality, {desc: examples}, preprocessing=preprocessing, batch_size=batch_size,
                            progress=progress, accel=accel)[desc]


def run_trunk_splits(
    trunk: nn.Module,
    modality: Modality,
    splits: Mapping[str, Sequence[Any]],
    *,
    preprocessing: Mapping[str, Any],
    batch_size: int = 64,
    progress: Progress | None = None,
    accel: Accelerator = CPU,
    encode: Encoder | None = None,
) -> dict[str, tuple[np.ndarray, ...]]:
    """``run_trunk_fast`` over several example lists (``{name: examples}``, ``name`` also the progress
    label) through one export and one session: exporting efficientnet_lite2 takes 1.3-1.7 s on 2 cores,
    once per split before. ``encode``: as ``_in_batches``'s, on the CPU."""
    if accel.cuda:
        # fp32: these outputs stand for what the fp32 export computes, and the search checks that they
        # do. bf16 features of efficientnet_lite0 differed from the export's by 4-5% (relative L2).
        return {name: run_trunk(trunk, modality, examples, preprocessing=preprocessing, batch_size=batch_size,
                                progress=progress, desc=name, accel=accel, mixed_precision=False)
                for name, examples in splits.items()}
    names = modality.input_names()
    first = next((list(examples[:1]) for examples in splits.values() if len(examples)), None)
    if first is None:
        raise ValueError("run_trunk_splits needs at least one example")
    example = modality.encode(first, preprocessing=preprocessing)
    with torch.no_grad():
        n_out = len(trunk(*[torch.from_numpy(example[n]) for n in names]))
    out_names = [f"out{i}" for i in range(n_out)]
    with tempfile.TemporaryDirectory(prefix="lepton-trunk-") as tmp:
        try:
            path = export_onnx(trunk, example, Path(tmp) / "trunk.onnx", input_names=names,
                               dynamic_axes=modality.dynamic_axes(), output_names=out_names)
        except ExportError:
            return {name: run_trunk(trunk, modality, examples, preprocessing=preprocessing, batch_size=batch_size,
                                    progress=progress, desc=name) for name, examples in splits.items()}
        session = ort_session(path)
        return {name: _in_batches(lambda feeds: session.run(out_names, {n: feeds[n] for n in names}), modality,
                                  examples, preprocessing=preprocessing, batch_size=batch_size, progress=progress,
                                  desc=name, encode=encode)
                for name, examples in splits.items()}


def run_onnx(
    path: str | Path | bytes,
    modality: Modality,
    examples: Sequence[Any],
    *,
    preprocessing: Mapping[str, Any],
    outputs: Sequence[str],
    batch_size: int = 64,
    progress: Progress | None = None,
    desc: str = "features",
    encode: Encoder | None = None,
) -> tuple[np.ndarray, ...]:
    """The named ``outputs`` of the ONNX file ``path`` (or a serialized model's bytes) for all ``examples``
    (``encode``: as ``_in_batches``'s)."""
    names = modality.input_names()
    session = ort_session(path)
    return _in_batches(lambda feeds: session.run(list(outputs), {n: feeds[n] for n in names}), modality,
                       examples, preprocessing=preprocessing, batch_size=batch_size, progress=progress, desc=desc,
                       encode=encode)
