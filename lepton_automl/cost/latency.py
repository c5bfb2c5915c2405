"""Latency measured on the exact exported artifact, in its runtime (ONNX Runtime, or torch).

Timing protocol: warm-up runs first (allocator and kernel selection), then timed runs in rounds
until the median of the last two rounds agrees within ``rtol`` or ``max_seconds`` runs out. These
machines are noisy (medians moved up to 60% between runs here), so the spread (p90) and the
number of runs are reported with the median, and the thread count is recorded. On CUDA each
call is timed with CUDA events (the GPU's own clock), synchronising after each call.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
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


@dataclass(frozen=True)
class TimingPlan:
    """How long to time: ``warmup`` calls, then rounds of ``round_runs`` until the medians of the last
    two rounds agree within ``rtol``, at most ``max_rounds`` rounds or ``max_seconds`` (but never
    fewer than ``min_runs`` timed calls). ``round_seconds``: a round of slow calls is cut to as many
    as fill about this long (from the first timed call; never fewer than ``min_runs``)."""

    warmup: int = 5
    round_runs: int = 20
    max_rounds: int = 5
    max_seconds: float = 3.0
    rtol: float = 0.05
    min_runs: int = 5
    # Twenty calls of the three-backbone ensemble at 224 px (68 ms each on an AMD EPYC) made a round of
    # 1.4 s, and two rounds took most of the 4.2 s of every such trunk's measurement. A call that long
    # is long beside the timer's resolution and the scheduler's tick; the median of 2 x 9 of them moves
    # with the machine's drift, which more calls in a row would not average out. Calls under 30 ms keep
    # rounds of 20.
    round_seconds: float | None = 0.6


def time_calls(call: Callable[[], float | None], plan: TimingPlan = TimingPlan()) -> np.ndarray:
    """Milliseconds per call. ``call`` returns its own time in ms (CUDA events) or None (wall clock)."""
    for _ in range(plan.warmup):
        call()
    times: list[float] = []
    medians: list[float] = []
    deadline = time.perf_counter() + plan.max_seconds
    round_runs = plan.round_runs
    for _ in range(plan.max_rounds):
        end = len(times) + round_runs
        while len(times) < end:
            start = time.perf_counter()
            own = call()
            times.append(float(own) if isinstance(own, float) else (time.perf_counter() - start) * 1000.0)
            if len(times) == 1 and plan.round_seconds is not None:  # rounds of slow calls are cut
                fill = int(np.ceil(plan.round_seconds * 1000.0 / max(times[0], 1e-6)))
                round_runs = end = max(min(plan.round_runs, fill), plan.min_runs)
            if time.perf_counter() > deadline and len(times) >= plan.min_runs:
                break
        medians.append(float(np.median(times)))
        if len(medians) >= 2 and abs(medians[-1] - medians[-2]) <= plan.rtol * medians[-1]:
            break
        if time.perf_counter() > deadline:
            break
    return np.asarray(times)


def _report(ms: np.ndarray, *, threads: int, batch: int, device: str) -> LatencyReport:
    return LatencyReport(median_ms=float(np.median(ms)), p90_ms=float(np.percentile(ms, 90)), runs=len(ms),
                         threads=threads, batch_size=batch, device=device)


class OnnxTimer:
    """One ONNX Runtime session for ``model`` (a file, or the bytes of one), threads spinning and their
    count pinned, timing ``session.run`` on any feeds: the batch-1 latency and the serving-batch
    throughput of one artifact come from the same session, built once."""

    def __init__(self, model: str | Path | bytes, *, threads: int | None = None) -> None:
        from lepton_automl.sessions import ort_session

        self.threads = int(threads or os.cpu_count() or 1)
        self.model = model
        self.session = ort_session(model, threads=self.threads, spinning=True)
        self._calls: dict[tuple[tuple[int, ...], ...], int] = {}  # calls made so far, by input shapes

    def run(self, output_names: Sequence[str] | None, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """``session.run``, counted: a caller checking the outputs on real inputs first (a batch of the
        serving size) warms the session up for that shape, and timing it then skips as many warm-up calls."""
        shapes = _shapes(feeds)
        self._calls[shapes] = self._calls.get(shapes, 0) + 1
        return self.session.run(None if output_names is None else list(output_names), dict(feeds))

    def model_bytes(self) -> bytes:
        """The timed model as serialized (what would be shipped)."""
        return self.model if isinstance(self.model, bytes) else Path(self.model).read_bytes()

    def __call__(self, feeds: Mapping[str, np.ndarray], plan: TimingPlan = TimingPlan()) -> LatencyReport:
        """Median and p90 latency of one ``session.run`` on ``feeds`` (which fix the batch size)."""
        feeds = {k: np.ascontiguousarray(v) for k, v in feeds.items()}
        shapes = _shapes(feeds)
        plan = dataclasses.replace(plan, warmup=max(0, plan.warmup - self._calls.get(shapes, 0)))

        def call() -> None:
            self.session.run(None, feeds)

        ms = time_calls(call, plan)
        self._calls[shapes] = self._calls.get(shapes, 0) + plan.warmup + len(ms)
        return _report(ms, threads=self.threads, batch=int(next(iter(feeds.values())).shape[0]), device=device_name())


def _shapes(feeds: Mapping[str, np.ndarray]) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(np.shape(feeds[k])) for k in sorted(feeds))


def measure_onnx_latency(
    path: str | Path | bytes,
    feeds: Mapping[str, np.ndarray],
    *,
    threads: int | None = None,
    plan: TimingPlan = TimingPlan(),
) -> LatencyReport:
    """Median and p90 latency of one ``session.run`` of ``path`` on ``feeds`` (which fix the batch size)."""
    return OnnxTimer(path, threads=threads)(feeds, plan)


def measure_torch_latency(
    model: object,
    feeds: Mapping[str, np.ndarray],
    input_names: Sequence[str],
    *,
    device: str = "cpu",
    dtype: object = None,
    threads: int | None = None,
    plan: TimingPlan = TimingPlan(),
) -> LatencyReport:
    """Latency of ``model(*inputs)`` in torch (``inference_mode``); CUDA events on a GPU.

    ``dtype`` (e.g. ``torch.float16``) casts floating inputs, for a model already cast to it.
    """
    import torch

    args = []
    for name in input_names:
        t = torch.from_numpy(np.ascontiguousarray(feeds[name])).to(device)
        args.append(t.to(dtype) if dtype is not None and t.is_floating_point() else t)
    n_threads = int(threads or torch.get_num_threads())
    cuda = str(device).startswith("cuda")

    def call() -> float | None:
        if not cuda:
            model(*args)  # type: ignore[operator]
            return None
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        model(*args)  # type: ignore[operator]
        end.record()
        torch.cuda.synchronize()
        return float(begin.elapsed_time(end))

    previous = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        with torch.inference_mode():
            ms = time_calls(call, plan)
    finally:
        torch.set_num_threads(previous)
    name = torch.cuda.get_device_name(torch.device(device)) if cuda else device_name()
    return _report(ms, threads=n_threads, batch=int(args[0].shape[0]), device=name)


def batch_of(feeds: Mapping[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """``feeds`` (one example) repeated to ``batch_size`` rows: the serving batch for throughput."""
    return {k: np.ascontiguousarray(np.repeat(v[:1], batch_size, axis=0)) for k, v in feeds.items()}
