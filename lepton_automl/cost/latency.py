"""Latency measured on the exact exported artifact, in its runtime (ONNX Runtime here).

Timing protocol: warm-up runs first (allocator and kernel selection), then timed runs in rounds
until the median of the last two rounds agrees within ``rtol`` or ``max_seconds`` runs out. These
machines are noisy (medians moved up to 60% between runs here), so the spread (p90) and the
number of runs are reported with the median, and the thread count is recorded.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class LatencyReport:
    median_ms: float
    p90_ms: float
    runs: int
    threads: int
    batch_size: int
    device: str

    @property
    def throughput_per_s(self) -> float:
        return 1000.0 * self.batch_size / self.median_ms


def device_name() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{cpu} x{os.cpu_count()} ({platform.system()})"


def measure_onnx_latency(
    path: str | Path,
    feeds: Mapping[str, np.ndarray],
    *,
    threads: int | None = None,
    warmup: int = 5,
    round_runs: int = 20,
    max_rounds: int = 5,
    max_seconds: float = 3.0,
    rtol: float = 0.05,
) -> LatencyReport:
    """Median and p90 latency of one ``session.run`` on ``feeds`` (which fix the batch size)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    n_threads = int(threads or os.cpu_count() or 1)
    options.intra_op_num_threads = n_threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {k: np.ascontiguousarray(v) for k, v in feeds.items()}
    for _ in range(warmup):
        session.run(None, feeds)
    times: list[float] = []
    medians: list[float] = []
    deadline = time.perf_counter() + max_seconds
    for _ in range(max_rounds):
        for _ in range(round_runs):
            start = time.perf_counter()
            session.run(None, feeds)
            times.append(time.perf_counter() - start)
            if time.perf_counter() > deadline and len(times) >= 5:
                break
        medians.append(float(np.median(times)))
        if len(medians) >= 2 and abs(medians[-1] - medians[-2]) <= rtol * medians[-1]:
            break
        if time.perf_counter() > deadline:
            break
    arr = np.asarray(times) * 1000.0
    batch = int(next(iter(feeds.values())).shape[0])
    return LatencyReport(
        median_ms=float(np.median(arr)),
        p90_ms=float(np.percentile(arr, 90)),
        runs=len(arr),
        threads=n_threads,
        batch_size=batch,
        device=device_name(),
    )
