"""Int8 quantization round trips: the quantized file runs and agrees with fp32."""

from __future__ import annotations

import numpy as np
import pytest
import onnxruntime as ort
import torch

from lepton_automl.compression.quantization import graph_has_conv, quantize_onnx
from lepton_automl.export.int8 import Int8Weights, int8_weights
from lepton_automl.export.onnx import export_onnx


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _patterns(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Four classes of 16x16 RGB images: horizontal, vertical and diagonal stripes, and a centred square,
    at random periods, phases and colours, with noise."""
    labels = torch.arange(n) % 4
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    period = torch.randint(3, 6, (n,), generator=gen).float()
    phase = torch.rand(n, generator=gen) * 6
    shapes = []
    for c, p, f in zip(labels.tolist(), period, phase):
        wave = {0: yy + f, 1: xx + f, 2: xx + yy + f}.get(c)
        shapes.append((wave % p < p / 2) if wave is not None else ((yy - 7.5).abs().maximum((xx - 7.5).abs()) < p))
    colour = torch.rand(n, 3, 1, 1, generator=gen) * 0.8 + 0.2
    return torch.stack(shapes).float()[:, None] * colour + 0.15 * torch.rand(n, 3, 16, 16, generator=gen), labels


def _train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, rows: int, gen: torch.Generator) -> None:
    """60 Adam steps on batches of 64 of the first ``rows`` examples; leaves ``model`` in eval mode."""
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(60):
        batch = torch.randint(0, rows, (64,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def test_static_int8_for_convolutions(tmp_path) -> None:
    """A small convolutional classifier, trained: its static int8 file keeps its decisions. (An untrained
    network's logits are near ties that int8 rounding flips: over 300 random initialisations, the
    old test's untrained one agreed with its int8 file on 47% of its examples at worst.)"""
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():  # the initialisation, independent of the tests run before
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3, padding=1),
            torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 4),
        )
    x, y = _patterns(512, gen)
    _train(model, x, y, rows=384, gen=gen)
    held_out, labels = x[384:].numpy(), y[384:].numpy()
    fp32 = export_onnx(model, {"x": held_out[:1]}, tmp_path / "m.onnx", input_names=["x"],
                       dynamic_axes={"x": {0: "b"}})
    assert graph_has_conv(fp32)
    q = quantize_onnx(fp32, tmp_path / "q.onnx", calibration=[{"x": x[i : i + 8].numpy()} for i in range(0, 64, 8)])
    a, b = _run(fp32, held_out), _run(q, held_out)
    assert (a.argmax(1) == labels).mean() >= 0.9  # the classifier learned the task
    # over 30 seeds: agreement 1.0 every time, mean error 0.03-0.08 of the logits' spread
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.95
    assert np.abs(a - b).mean() < 0.2 * a.std(0).mean()


def test_dynamic_int8_for_matmul_graphs(tmp_path) -> None:
    """A small MLP trained on a 6-class task (its logits then have margins; an untrained one's are
    near ties, and over 40 initialisations from the global RNG its int8 file agreed with it on 0.898
    of the examples at worst, so the old test failed now and then): int8 keeps its decisions."""
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():  # the initialisation, independent of the tests run before
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 6))
    inputs = torch.randn(768, 64, generator=gen)
    labels = (inputs @ torch.randn(64, 6, generator=gen)).argmax(1)
    _train(model, inputs, labels, rows=512, gen=gen)
    x = inputs[512:].numpy()
    fp32 = export_onnx(model, {"x": x[:1]}, tmp_path / "m.onnx", input_names=["x"], dynamic_axes={"x": {0: "b"}})
    assert not graph_has_conv(fp32)
    q = quantize_onnx(fp32, tmp_path / "q.onnx")
    import onnx

    ops = {n.op_type for n in onnx.load(str(q)).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops or "DynamicQuantizeLinear" in ops
    a, b = _run(fp32, x), _run(q, x)
    assert (a.argmax(1) == labels[512:].numpy()).mean() >= 0.6  # the MLP learned the task (chance: 1/6)
    # over 30 seeds (128 held-out rows) on a CPU without VNNI: agreement 0.969 at worst, mean error at
    # most 0.009 of the logits' spread
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.95
    assert np.abs(a - b).mean() < 0.05 * a.std(0).mean()
    assert q.stat().st_size < fp32.stat().st_size
    assert int8_weights(q) == Int8Weights(static=False, bits=8)  # dynamic int8 keeps 8 bits on every CPU
    seven = quantize_onnx(fp32, tmp_path / "q7.onnx", reduce_range=True)
    assert int8_weights(seven) == Int8Weights(static=False, bits=7)


@pytest.mark.parametrize("reduce_range", [False, True], ids=["8-bit", "7-bit"])
def test_static_int8_weight_scales_match_onnx_runtimes_own(tmp_path, reduce_range) -> None:
    """``quantize_onnx`` hands ORT precomputed per-channel weight scales (``conv_weight_scales``); the
    file must be the one ORT writes computing them itself: same initializers, same outputs, with 8-bit
    weights and with 7-bit ones (``reduce_range``, for CPUs without VNNI). The model has a grouped
    (depthwise) convolution and an all-zero output channel, whose scale ORT sets to 1."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from lepton_automl.compression.quantization import _Reader, conv_weight_scales

    gen = torch.Generator().manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU6(), torch.nn.Conv2d(8, 8, 3, padding=1, groups=8),
        torch.nn.ReLU6(), torch.nn.Conv2d(8, 12, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
    ).eval()
    with torch.no_grad():
        model[4].weight[3].zero_()
    x = torch.rand(48, 3, 12, 12, generator=gen).numpy()
    fp32 = export_onnx(model, {"x": x[:1]}, tmp_path / "m.onnx", input_names=["x"], dynamic_axes={"x": {0: "b"}},
                       output_names=("features",))
    feeds = [{"x": x[i : i + 8]} for i in range(0, 32, 8)]
    ours = quantize_onnx(fp32, tmp_path / "ours.onnx", calibration=feeds, reduce_range=reduce_range)

    quant_pre_process(str(fp32), str(tmp_path / "pre.onnx"), skip_symbolic_shape=True)
    scales = conv_weight_scales(tmp_path / "pre.onnx", reduce_range=reduce_range)
    assert len(scales) == 3 and float(scales[next(reversed(scales))][3]["scale"]) == 1.0
    quantize_static(str(tmp_path / "pre.onnx"), str(tmp_path / "ort.onnx"), _Reader(feeds),
                    quant_format=QuantFormat.QDQ, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                    per_channel=True, calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=None,
                    reduce_range=reduce_range)

    def initializers(path):
        return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}

    a, b = initializers(ours), initializers(tmp_path / "ort.onnx")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name
    assert np.array_equal(_run(ours, x), _run(tmp_path / "ort.onnx", x))
    weights = [a[n] for n in a if a[n].dtype == np.int8 and a[n].ndim == 4]  # the convolutions'
    assert len(weights) == 3 and max(int(np.abs(w).max()) for w in weights) == (64 if reduce_range else 127)
    assert int8_weights(ours) == Int8Weights(static=True, bits=7 if reduce_range else 8)  # read from the file
    assert int8_weights(fp32) is None


def test_int8_weights_are_7_bit_exactly_where_the_cpu_lacks_vnni(tmp_path) -> None:
    """ONNX Runtime's u8 x s8 kernels saturate on x86 CPUs without VNNI; the flags decide."""
    import platform

    from lepton_automl.compression.quantization import saturating_int8

    vnni, avx2 = tmp_path / "vnni", tmp_path / "avx2"
    vnni.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n")
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    assert saturating_int8(vnni) is False
    assert saturating_int8(avx2) is x86
    assert saturating_int8(tmp_path / "missing") is x86
