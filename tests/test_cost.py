"""Cost arithmetic against hand-computed values, and latency measurement on a real ONNX model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from lepton_automl.cost.hardware import CostModel, HardwareProfile, get_profile, load_profiles
from lepton_automl.cost.latency import measure_onnx_latency
from lepton_automl.exceptions import ConfigError
from lepton_automl.export.onnx import export_onnx


def test_cost_matches_hand_computation() -> None:
    train = HardwareProfile("t", "cpu", usd_per_hour=3.6)
    serve = HardwareProfile("s", "cpu", usd_per_hour=0.36)
    model = CostModel(train=train, serve=serve, predictions_per_month=2_000_000)
    # 100 s at 3.6 $/h = 0.1 $; 5 ms per prediction at 0.36 $/h = 5e-7 $ each; x 2e6 = 1.0 $.
    assert model.training_usd(100) == pytest.approx(0.1)
    assert model.inference_usd_per_million(5.0) == pytest.approx(0.5)
    assert model.total_usd(train_seconds=100, latency_ms=5.0) == pytest.approx(1.1)


def test_builtin_profiles_and_user_file(tmp_path) -> None:
    profiles = load_profiles()
    assert profiles["local-cpu"].usd_per_hour > 0 and profiles["local-cpu"].source
    extra = tmp_path / "hw.toml"
    extra.write_text('[my-box]\ndevice = "cpu"\nusd_per_hour = 0.5\nsource = "invoice"\ndate = "2026-11"\n')
    assert load_profiles(extra)["my-box"].usd_per_hour == 0.5
    with pytest.raises(ConfigError, match="Did you mean 'local-cpu'"):
        get_profile("local-cpus", profiles)
    extra.write_text('[bad]\ndevice = "cpu"\nusd_per_hr = 1\n')
    with pytest.raises(ConfigError, match="usd_per_hour"):
        load_profiles(extra)


def test_latency_report_summarises_the_timed_calls() -> None:
    from lepton_automl.cost.latency import _report

    report = _report(np.arange(1.0, 11.0), threads=2, batch=32, device="cpu")
    assert report.median_ms == pytest.approx(5.5) and report.p90_ms == pytest.approx(9.1)
    assert report.runs == 10 and report.throughput_per_s == pytest.approx(1000.0 * 32 / 5.5)


def test_latency_is_measured_and_sane(tmp_path) -> None:
    small = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    big = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(8)]).eval()
    x16 = {"x": np.zeros((1, 16), np.float32)}
    x512 = {"x": np.zeros((1, 512), np.float32)}
    p_small = export_onnx(small, x16, tmp_path / "s.onnx", input_names=["x"], dynamic_axes={"x": {0: "b"}})
    p_big = export_onnx(big, x512, tmp_path / "b.onnx", input_names=["x"], dynamic_axes={"x": {0: "b"}})
    r_small = measure_onnx_latency(p_small, x16, threads=1)
    r_big = measure_onnx_latency(p_big, x512, threads=1)
    assert r_small.median_ms > 0
    assert r_small.runs >= 20 and r_small.threads == 1 and r_small.batch_size == 1
    # 8 x 512x512 matmuls are about 1000x the work of the tiny MLP; the ordering must show.
    assert r_big.median_ms > r_small.median_ms


def test_the_gzip_size_is_exact_for_small_files_and_estimated_closely_for_large_ones() -> None:
    import gzip

    from lepton_automl.cost.measurement import GZIP_EXACT_BYTES, gzip_size

    rng = np.random.default_rng(0)
    small = rng.normal(size=1000).astype(np.float32).tobytes()
    assert gzip_size(small) == len(gzip.compress(small, compresslevel=6))
    # weights as a model file holds them: float32, about a third pruned to zero, a few layers of
    # different scale; the estimate is within 1% of compressing the whole file
    layers = []
    for scale in (0.02, 0.1, 0.5, 0.05):
        w = rng.normal(0, scale, size=GZIP_EXACT_BYTES // 8).astype(np.float32)
        w[rng.random(w.size) < 0.35] = 0.0
        layers.append(w)
    large = np.concatenate(layers).tobytes()
    assert len(large) > GZIP_EXACT_BYTES
    assert gzip_size(large) == pytest.approx(len(gzip.compress(large, compresslevel=6)), rel=0.01)
    # up to GZIP_EXACT_BYTES every byte is compressed, in 1 MiB pieces on two threads: within 0.05%
    middle = large[: 3 * 2**20 + 12345]
    assert gzip_size(middle, threads=2) == pytest.approx(len(gzip.compress(middle, compresslevel=6)), rel=5e-4)


def test_an_artifact_in_memory_is_measured_like_its_file(tmp_path) -> None:
    """A trunk entry is measured on the serialized model (nothing written): the same latency protocol,
    the same sizes as the file that would ship, and the serving batch timed on the same session."""
    from lepton_automl.cost.measurement import measure_artifact

    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 3)).eval()
    feeds = {"x": np.zeros((1, 64), np.float32)}
    path = export_onnx(net, feeds, tmp_path / "m.onnx", input_names=["x"], dynamic_axes={"x": {0: "b"}})
    counts = (0.0001, 0.02)
    from_file = measure_artifact(path, feeds, model=None, input_names=("x",), threads=1, serving_batch=8,
                                 counts=counts)
    from_bytes = measure_artifact(path.read_bytes(), feeds, model=None, input_names=("x",), threads=1,
                                  serving_batch=8, counts=counts)
    for m in (from_file, from_bytes):
        assert m.runtime == "onnxruntime" and m.serving_batch == 8 and m.latency_runs >= 20
        assert m.latency_ms > 0 and m.throughput_per_s == pytest.approx(8000.0 / m.latency_serving_batch_ms)
    assert from_bytes.size_mb == from_file.size_mb == pytest.approx(path.stat().st_size / 2**20)
    assert from_bytes.size_gz_mb == from_file.size_gz_mb


def test_timing_stops_at_its_time_budget_once_it_has_its_fewest_calls() -> None:
    import time

    from lepton_automl.cost.latency import TimingPlan, time_calls

    calls = []

    def slow() -> None:  # each call outlasts the whole budget
        calls.append(1)
        time.sleep(0.03)

    plan = TimingPlan(warmup=1, round_runs=5, max_rounds=1, max_seconds=0.01)
    assert len(time_calls(slow, plan)) == 5 and len(calls) == 6
    calls.clear()
    assert len(time_calls(slow, dataclasses.replace(plan, min_runs=2))) == 2 and len(calls) == 3


def test_rounds_of_slow_calls_are_cut_to_their_time_and_fast_calls_keep_rounds_of_twenty() -> None:
    """A 70 ms call (a three-backbone ensemble at 224 px on a slow CPU) is timed in rounds of 9, about
    0.6 s each: two rounds whose medians agree, not two of 20 (2.8 s). Calls of 1 ms keep rounds of 20."""
    import time

    from lepton_automl.cost.latency import TimingPlan, time_calls

    calls = []

    def call(seconds: float) -> None:
        calls.append(seconds)
        time.sleep(seconds)

    ms = time_calls(lambda: call(0.07), TimingPlan())
    assert len(ms) == 18 and len(calls) == 5 + 18 and np.median(ms) >= 70.0
    calls.clear()
    ms = time_calls(lambda: call(0.001), TimingPlan())
    assert len(ms) >= 40 and len(ms) % 20 == 0 and len(calls) == 5 + len(ms)
    calls.clear()
    assert len(time_calls(lambda: call(0.07), TimingPlan(round_seconds=None, max_rounds=1))) == 20


def test_the_serving_batch_is_timed_once_when_one_call_outlasts_its_second() -> None:
    import time

    from lepton_automl.cost.latency import time_calls
    from lepton_automl.cost.measurement import SERVING_PLAN

    calls = []

    def call(seconds: float) -> None:
        calls.append(seconds)
        time.sleep(seconds)

    assert len(time_calls(lambda: call(1.05), SERVING_PLAN)) == 1 and len(calls) == 3  # two warm-ups + one
    calls.clear()
    assert len(time_calls(lambda: call(0.02), SERVING_PLAN)) == 3 and len(calls) == 5  # fast: three


def test_a_checked_batch_is_the_warm_up_of_its_shape(tmp_path) -> None:
    """A trunk entry's check runs a serving-size batch through the timing session; timing that shape
    then makes no warm-up call of its own, while a shape the session has not run is warmed up."""
    from lepton_automl.cost.latency import OnnxTimer, TimingPlan

    net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3)).eval()
    batch = {"x": np.random.default_rng(0).normal(size=(8, 64)).astype(np.float32)}
    path = export_onnx(net, batch, tmp_path / "m.onnx", input_names=["x"], dynamic_axes={"x": {0: "b"}})
    timer = OnnxTimer(path, threads=1)
    session, calls = timer.session, []

    class Counted:
        def run(self, names, feeds):
            calls.append(len(feeds["x"]))
            return session.run(names, feeds)

    timer.session = Counted()
    (out,) = timer.run(None, batch)
    with torch.no_grad():
        np.testing.assert_allclose(out, net(torch.from_numpy(batch["x"])).numpy(), rtol=1e-4, atol=1e-5)
    plan = TimingPlan(warmup=1, round_runs=3, max_rounds=1, max_seconds=10.0, min_runs=2)
    assert timer(batch, plan).runs == 3 and calls == [8, 8, 8, 8]
    calls.clear()
    assert timer({"x": batch["x"][:1]}, plan).runs == 3 and calls == [1, 1, 1, 1]
    calls.clear()
    assert timer({"x": batch["x"][:1]}, plan).runs == 3 and calls == [1, 1, 1]
