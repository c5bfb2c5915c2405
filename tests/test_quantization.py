"""Int8 quantization round trips: the quantized file runs and agrees with fp32."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch

from lepton_automl.compression.quantization import graph_has_conv, quantize_onnx
from lepton_automl.export.onnx import export_onnx


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_static_int8_for_convolutions(tmp_path) -> None:
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3, padding=1),
        torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 5),
    ).eval()
    x = torch.rand(64, 3, 16, 16, generator=gen).numpy()
    fp32 = export_onnx(model, {"x": x[:1]}, tmp_path / "m.onnx", input_names=["x"], dynamic_axes={"x": {0: "b"}})
    assert graph_has_conv(fp32)
    q = quantize_onnx(fp32, tmp_path / "q.onnx", calibration=[{"x": x[i : i + 1]} for i in range(32)])
    a, b = _run(fp32, x), _run(q, x)
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.9
    assert np.abs(a - b).max() < 0.1 * np.abs(a).max() + 1e-3


def test_dynamic_int8_for_matmul_graphs(tmp_path) -> None:
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 6)).eval()
    x = torch.randn(128, 64, generator=gen).numpy()
    fp32 = export_onnx(model, {"x": x[:1]}, tmp_path / "m.onnx", input_names=["x"], dynamic_axes={"x": {0: "b"}})
    assert not graph_has_conv(fp32)
    q = quantize_onnx(fp32, tmp_path / "q.onnx")
    import onnx

    ops = {n.op_type for n in onnx.load(str(q)).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops or "DynamicQuantizeLinear" in ops
    a, b = _run(fp32, x), _run(q, x)
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.9
    assert q.stat().st_size < fp32.stat().st_size
