"""Int8 quantization of an exported ONNX model with ONNX Runtime (static) and optimum (dynamic).

Which int8 scheme is used depends on the graph, not on a guess:

- graphs with convolutions get **static** int8 (QDQ, signed 8-bit per-channel weights, unsigned
  activations, calibrated with min-max ranges on training examples). Measured here on
  efficientnet_lite0 at 96 px, batch 1, 2 cores: fp32 1.50 ms; QDQ s8 per-channel 0.72 ms;
  QDQ u8/u8 (optimum's ``avx2`` preset) 7.5 ms, so the preset is not used.
  On an x86 CPU without VNNI (AVX2 only), ONNX Runtime multiplies u8 activations by s8 weights with
  ``VPMADDUBSW``, whose 16-bit pair sums saturate (255 x 127 x 2 > 32767): there the weights are
  quantized to 7 bits (``reduce_range``, ONNX Runtime's own advice; ``saturating_int8``). On an AMD
  EPYC (Zen 1, AVX2) the lite0 glyph probe at 224 px scored 0.416 test with 8-bit weights, 0.603 with
  7-bit and 0.688 in fp32; its int8 file also ran slower than fp32 there (20 ms against 13). Dynamic
  int8 keeps 8-bit weights: on the same CPU the MiniLM + n-grams man-page probe (64 tokens) scored
  0.776 test with 8-bit weights, 0.744 with 7-bit, 0.783 in fp32.
- graphs without convolutions (transformers) get **dynamic** int8 restricted to MatMul/Gemm.
  Dynamic int8 is never applied to convolutions: it is 2-15x slower than fp32 on this CPU.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lepton_automl.exceptions import ConfigError
from lepton_automl.export.int8 import saturating_int8
from lepton_automl.log import get_logger

logger = get_logger(__name__)

QUANT_MODES = ("none", "int8")
def graph_has_conv(path: str | Path) -> bool:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return any(node.op_type == "Conv" for node in model.graph.node)


class _Reader:
    """ONNX Runtime calibration reader over a list of feed dicts (one example each)."""

    def __init__(self, rows: list[Mapping[str, np.ndarray]]) -> None:
        self._it = iter(rows)

    def get_next(self) -> Mapping[str, np.ndarray] | None:
        return next(self._it, None)


def quantize_onnx(
    src: str | Path,
    dst: str | Path,
    *,
    mode: str = "int8",
    calibration: Iterable[Mapping[str, np.ndarray]] | None = None,
    reduce_range: bool | None = None,
) -> Path:
    """Write an int8 version of ``src`` to ``dst``; ``mode`` is ``int8``, ``int8-static`` or ``int8-dynamic``.
    ``reduce_range`` quantizes weights to 7 bits; by default for static int8 where this CPU's int8
    kernels saturate (``saturating_int8``), never for dynamic int8, which lost accuracy with it there."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = Path(src), Path(dst)
    if mode == "int8":
        mode = "int8-static" if graph_has_conv(src) else "int8-dynamic"
    if mode not in ("int8-static", "int8-dynamic"):
        raise ConfigError(f"Unknown quantization mode {mode!r}. Use one of: int8, int8-static, int8-dynamic.")
    static = mode == "int8-static"
    if reduce_range is None:
        reduce_range = static and saturating_int8()
    rows = list(calibration or [])
    if static and not rows:
        raise ConfigError("Static int8 needs calibration examples; pass calibration=[{input: array}, ...].")
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lepton-quant-") as tmp:
        work = Path(tmp)
        if static:
            # Shape inference and graph clean-up first; ORT's static quantizer is much better on the
            # result. Dynamic int8 gains nothing from it: on MiniLM the quantized trunk computed the
            # same features to the last bit, as fast, and the pre-processing took 0.4 s of its 1.1 s.
            quant_pre_process(str(src), str(work / "model.onnx"), skip_symbolic_shape=True)
            # ONNX Runtime's own static quantizer: on efficientnet_lite0 digits (96 px) it kept 0.903
            # validation accuracy (fp32 0.918) where optimum's ORTQuantizer.fit/quantize with the
            # same QDQ s8/u8 per-channel settings gave 0.66, so the calibrated path goes direct.
            with _quiet_root_logger(), _vectorized_channel_weights():
                quantize_static(
                    str(work / "model.onnx"), str(dst), _Reader(rows), quant_format=QuantFormat.QDQ,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8, per_channel=True,
                    calibrate_method=CalibrationMethod.MinMax,
                    # All supported op types, not just Conv/Gemm: quantizing only the convolutions
                    # leaves float Clip/pooling nodes between them, and the features' cosine to
                    # fp32 fell to 0.87 (0.98 with every op quantized; efficientnet_lite0, 128 px).
                    op_types_to_quantize=None, reduce_range=reduce_range,
                    extra_options={"TensorQuantOverrides": conv_weight_scales(work / "model.onnx",
                                                                               reduce_range=reduce_range)},
                )
        else:
            shutil.copyfile(src, work / "model.onnx")
            _dynamic_with_optimum(work, dst, reduce_range=reduce_range)
    logger.debug("quantized %s -> %s (%s, %d-bit weights)", src.name, dst.name, mode, 7 if reduce_range else 8)
    return dst


def conv_weight_scales(path: str | Path, *, reduce_range: bool = False) -> dict[str, list[dict[str, Any]]]:
    """The per-channel int8 scales of every float32 ``Conv`` weight in ``path``, in the form of ONNX
    Runtime's ``TensorQuantOverrides``: symmetric, ``scale = max|w| / 127`` per output channel
    (``/ 64`` with ``reduce_range``, 7-bit weights; 1.0 for an all-zero channel), zero point 0, the
    values ``quantize_static`` itself computes for signed per-channel weights. ORT computes them one
    channel at a time in Python (efficientnet_lite0 has 21,008): quantizing lite0 on 2 cores took 3.6-4.1 s that way and 1.6-2.8 s with these, at 96 and
    224 px. The quantized file is the same (``tests/test_quantization.py`` holds it to that)."""
    import onnx
    from onnx import TensorProto, numpy_helper

    model = onnx.load(str(path))
    weights = {i.name: i for i in model.graph.initializer if i.data_type == TensorProto.FLOAT}
    out: dict[str, list[dict[str, Any]]] = {}
    zero = np.zeros((), np.int8)
    for node in model.graph.node:
        name = node.input[1] if node.op_type == "Conv" and len(node.input) > 1 else None
        if name is None or name not in weights or name in out:
            continue
        w = numpy_helper.to_array(weights[name])
        if w.ndim < 2:
            continue
        absmax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1).astype(np.float64)
        # (rmax - rmin) / (qmax - qmin): qmax = -qmin = 127, or 64 with reduce_range
        scale = (2.0 * absmax / (128.0 if reduce_range else 254.0)).astype(np.float32)
        scale[scale < np.finfo(np.float32).tiny] = 1.0
        out[name] = [{"axis": 0, "scale": s, "zero_point": zero} for s in scale]
    return out


class _vectorized_channel_weights:
    """While open, ONNX Runtime's QDQ quantizer writes per-channel int8 weights in one numpy expression
    per tensor instead of one Python call per channel (``quant_utils.quantize_onnx_initializer``: 0.35-0.4
    s of every efficientnet_lite0 quantization, 21,008 channels). Same arithmetic, in the same float32
    order, so the same bytes (``tests/test_quantization.py`` holds our file to ORT's own); any case it
    does not cover (per-tensor, blocks, other types, another ORT layout) goes to ORT's function."""

    def __enter__(self) -> None:
        from onnxruntime.quantization import qdq_quantizer

        self._module = qdq_quantizer
        self._original = getattr(qdq_quantizer, "quantize_onnx_initializer", None)
        if self._original is not None:
            qdq_quantizer.quantize_onnx_initializer = _per_channel_initializer(self._original)

    def __exit__(self, *exc: object) -> None:
        if self._original is not None:
            self._module.quantize_onnx_initializer = self._original


def _per_channel_initializer(original: Any) -> Any:
    import onnx
    from onnx import TensorProto, numpy_helper
    from onnxruntime.quantization.quant_utils import TENSOR_NAME_QUANT_SUFFIX, get_qmin_qmax_for_qType

    def quantize(weight: Any, quant_type: int, zero_point: np.ndarray, scale: np.ndarray, axis: int | None = None,
                 quant_weight_name: str | None = None, block_size: int = 0) -> Any:
        if axis is None or block_size or quant_type not in (TensorProto.INT8, TensorProto.UINT8):
            return original(weight, quant_type, zero_point, scale, axis, quant_weight_name, block_size=block_size)
        data = numpy_helper.to_array(weight)
        shape = [1] * data.ndim
        shape[axis] = data.shape[axis]
        scale, zero_point = np.asarray(scale), np.asarray(zero_point)
        if scale.size != data.shape[axis] or zero_point.size != data.shape[axis]:
            return original(weight, quant_type, zero_point, scale, axis, quant_weight_name, block_size=block_size)
        qmin, qmax = get_qmin_qmax_for_qType(quant_type)
        values = np.asarray((data.astype(np.float32) / scale.reshape(shape)).round() + zero_point.reshape(shape))
        np.clip(values, qmin, qmax, out=values)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(quant_type)
        name = quant_weight_name or f"{weight.name}{TENSOR_NAME_QUANT_SUFFIX}"
        return numpy_helper.from_array(values.astype(dtype).reshape(tuple(weight.dims)), name)

    return quantize


def _dynamic_with_optimum(work: Path, dst: Path, *, reduce_range: bool) -> None:
    """Dynamic int8 on MatMul/Gemm only, through optimum's ``ORTQuantizer`` (7-bit weights with ``reduce_range``)."""
    from onnxruntime.quantization import QuantFormat, QuantizationMode, QuantType
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import QuantizationConfig

    with _quiet_root_logger():  # a bare ONNX file has no transformers config, which optimum warns about
        quantizer = ORTQuantizer.from_pretrained(work, file_name="model.onnx")
    config = QuantizationConfig(
        is_static=False, format=QuantFormat.QOperator, mode=QuantizationMode.IntegerOps,
        activations_dtype=QuantType.QUInt8, weights_dtype=QuantType.QInt8, per_channel=False,
        reduce_range=reduce_range, operators_to_quantize=["MatMul", "Gemm"],
    )
    with _quiet_root_logger():
        out_dir = quantizer.quantize(quantization_config=config, save_dir=work / "out")
    shutil.move(str(next(Path(out_dir).glob("*.onnx"))), dst)


class _quiet_root_logger:
    """ONNX Runtime's quantizer logs per-tensor notes on the root logger, and optimum warns that a
    bare ONNX file has no transformers config; neither concerns the user."""

    def __enter__(self) -> None:
        import logging

        self._loggers = [logging.getLogger(), logging.getLogger("optimum")]
        self._levels = [lg.level for lg in self._loggers]
        for lg, level in zip(self._loggers, self._levels):
            lg.setLevel(max(level, logging.ERROR))

    def __exit__(self, *exc: object) -> None:
        for lg, level in zip(self._loggers, self._levels):
            lg.setLevel(level)
