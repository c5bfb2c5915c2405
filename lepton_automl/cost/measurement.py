"""Everything measured on a shipped artifact, in one place: latency at batch 1 (the objective, what one
request waits), throughput at the serving batch (what prices inference), MACs and parameters (reported
beside latency, never instead of it), file size raw and gzip-compressed, and the cost objective."""

from __future__ import annotations

import dataclasses
import gzip
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lepton_automl.cost.hardware import CostModel
from lepton_automl.cost.latency import OnnxTimer, TimingPlan, batch_of, measure_torch_latency
from lepton_automl.cost.macs import count_macs


@dataclass(frozen=True)
class Measurement:
    """What was measured on one shipped model: the search's trials, ``lepton compress`` and the facade's
    ``compress()`` all report this. ``accuracy`` and ``runtime`` are filled in by callers that score
    the model (``dataclasses.replace``); ``cost_usd`` when a cost model was given."""

    latency_ms: float  # batch 1, median: what one request waits (the latency objective)
    latency_p90_ms: float
    latency_runs: int
    latency_threads: int
    latency_device: str
    serving_batch: int
    latency_serving_batch_ms: float
    throughput_per_s: float  # at the serving batch: what prices inference
    gmacs: float
    params_m: float
    size_mb: float  # the runtime file as written
    size_gz_mb: float  # what --max-size-mb limits
    cost_usd: float | None = None
    accuracy: float | None = None  # validation accuracy, where the caller scored the model
    runtime: str = "onnxruntime"

    def metrics(self) -> dict[str, Any]:
        """The measured numbers by name (a trial's user attributes): everything but accuracy and runtime."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("accuracy", "runtime")}


# Throughput at the serving batch prices inference; it does not order the front the way batch-1
# latency does. Two warm-up calls (one when the caller's check already ran a batch of that size through
# the session: ``OnnxTimer.run``), then the median of up to three timed calls within a second, or the one
# call that took longer. ONNX Runtime's first two calls at a new batch size are slow: through the
# three-backbone ensemble at 224 px, 1.45 s and 1.53 s, then 0.58 s per call; after its check and the
# batch-1 timing, 1.71 s, then 0.60-0.67 s (efficientnet_lite0: 0.22 s, then 0.17-0.19 s). With one
# warm-up the ensemble's throughput was timed on its slow second call: 2.8x too low, and so its
# inference cost 2.8x too high. At 224 px a steady batch of 32 takes 0.15-0.25 s per call through one
# backbone and about 0.6 s through the ensemble; a call of a second or more is long beside the timer's
# resolution and the scheduler's jitter, and the machine's drift, which is what is left, one more call
# would not average out.
SERVING_PLAN = TimingPlan(warmup=2, round_runs=3, max_rounds=1, max_seconds=1.0, min_runs=1, round_seconds=None)


def measure_artifact(runtime: str | Path | bytes | Any, latency_input: Mapping[str, np.ndarray], *, model: Any,
                     input_names: Sequence[str], cost: CostModel | None = None, train_seconds: float = 0.0,
                     threads: int | None = None, serving_batch: int = 32,
                     counts: tuple[float, float] | None = None, shipped: str | Path | None = None,
                     serving_ms: float | None = None, size_gz_mb: float | None = None) -> Measurement:
    """Measure ``runtime``: an ONNX file, or a serialized ONNX model's bytes (ONNX Runtime; the bytes
    are what would be written), or an ``OnnxTimer`` already holding a session on one (whose caller
    checked its outputs first), or a ``TorchRuntime`` (torch, CUDA events on a GPU; ``shipped`` then
    names the file that ships, its safetensors). ``model`` is its torch twin, for MACs and parameters,
    or None when ``counts`` gives them (GMACs per example, millions of parameters). ``serving_ms``: the
    time of one call at ``serving_batch`` where the caller knows it without timing this model (a merge
    of models run one after another: the sum of theirs); batch-1 latency is always timed. ``size_gz_mb``:
    the compressed size where the caller knows it (files merged side by side: the sum of theirs, since
    deflate looks back 32 KB; for efficientnet_lite0+1+2 within 0.001% in fp32 and 0.07% in int8 of
    compressing the merge, which the sampled ``gzip_size`` estimated within 0.5%, in 0.8 s on 2 cores)."""
    in_ort = isinstance(runtime, (str, Path, bytes, OnnxTimer))
    if isinstance(runtime, OnnxTimer):
        timed: Any = runtime
        data = Path(shipped).read_bytes() if shipped else runtime.model_bytes()
    elif isinstance(runtime, (str, Path, bytes)):
        timed = OnnxTimer(runtime, threads=threads)  # one session for both batch sizes
        data = runtime if isinstance(runtime, bytes) else Path(shipped or runtime).read_bytes()
    else:
        def timed(feeds: Mapping[str, np.ndarray], plan: TimingPlan) -> Any:
            return measure_torch_latency(runtime, feeds, input_names, device=runtime.device, threads=threads, plan=plan)
        if shipped is None:
            raise ValueError("a torch runtime ships no file of its own: pass shipped=PATH (its safetensors)")
        data = Path(shipped).read_bytes()
    latency = timed(latency_input, TimingPlan())
    if serving_ms is not None and serving_batch > 1:
        served = dataclasses.replace(latency, median_ms=float(serving_ms), p90_ms=float(serving_ms), runs=0,
                                     batch_size=serving_batch)
    else:
        served = latency if serving_batch <= 1 else timed(batch_of(latency_input, serving_batch), SERVING_PLAN)
    return Measurement(
        latency_ms=latency.median_ms, latency_p90_ms=latency.p90_ms, latency_runs=latency.runs,
        latency_threads=latency.threads, latency_device=latency.device, serving_batch=served.batch_size,
        latency_serving_batch_ms=served.median_ms, throughput_per_s=served.throughput_per_s,
        gmacs=counts[0] if counts else count_macs(model, latency_input, input_names) / 1e9,
        params_m=counts[1] if counts else sum(p.numel() for p in model.parameters()) / 1e6,
        size_mb=len(data) / 2**20,
        size_gz_mb=gzip_size(data, threads=threads) / 2**20 if size_gz_mb is None else float(size_gz_mb),
        cost_usd=None if cost is None else cost.total_usd(train_seconds=train_seconds,
                                                          latency_ms=1000.0 / served.throughput_per_s),
        runtime="onnxruntime" if in_ort else str(getattr(runtime, "kind", "torch")),
    )


GZIP_EXACT_BYTES = 16 * 2**20  # files up to this size are compressed whole, in GZIP_WHOLE_PIECE pieces
GZIP_WHOLE_PIECE = 2**20
GZIP_SAMPLES = 128  # beyond it, this many evenly spaced pieces of GZIP_PIECE bytes are
GZIP_PIECE = 2**17


def gzip_size(data: bytes, *, level: int = 6, threads: int | None = None) -> int:
    """Bytes of ``data`` gzip-compressed at ``level``: up to ``GZIP_EXACT_BYTES``, the sum over its
    1 MiB pieces (deflate looks back 32 KB, so the sum is within 0.02% of one stream: lite0, its int8
    twin, 16 MB of MiniLM); above that, the ratio of ``GZIP_SAMPLES`` evenly spaced ``GZIP_PIECE``-byte
    pieces times the length (compressing a 90 MB MiniLM file whole took 3-4.5 s of every trunk
    measurement; the estimate was within 0.5% on it, 0.2% on its int8 twin). The pieces are compressed
    on ``threads`` threads (zlib lets go of the GIL): half the time on 2 cores."""
    view = memoryview(data)
    if len(data) <= GZIP_EXACT_BYTES:
        starts, piece = range(0, max(len(data), 1), GZIP_WHOLE_PIECE), GZIP_WHOLE_PIECE
    else:
        starts, piece = np.linspace(0, len(data) - GZIP_PIECE, GZIP_SAMPLES).astype(np.int64).tolist(), GZIP_PIECE
    with ThreadPoolExecutor(max_workers=int(threads or os.cpu_count() or 1)) as pool:
        packed = sum(pool.map(lambda s: len(gzip.compress(view[s : s + piece], compresslevel=level)), starts))
    if len(data) <= GZIP_EXACT_BYTES:
        return packed
    return int(round(packed / (GZIP_SAMPLES * piece) * len(data)))
