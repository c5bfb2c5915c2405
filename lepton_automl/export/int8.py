"""What an int8 ONNX file holds, read from the file, and whether this CPU serves it faithfully.

ONNX Runtime multiplies u8 activations by s8 weights on x86 with ``VPMADDUBSW`` where the CPU lacks
VNNI (AVX2 only); its 16-bit pair sums saturate (255 x 127 x 2 > 32767), and a statically quantized
convolutional network with 8-bit weights loses accuracy there: on an AMD EPYC (Zen 1) the lite0
glyph probe at 224 px scored 0.416 test with 8-bit weights, 0.603 with 7-bit, 0.688 in fp32. ONNX
Runtime's advice is 7-bit weights (``reduce_range``), which ``compression.quantization`` writes on
such CPUs. A file quantized on a VNNI machine keeps 8 bits, so the model card records the bits and
loading such a file on a saturating CPU says how to re-quantize it there.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # /proc/cpuinfo flags of CPUs whose int8 dot products don't saturate


def saturating_int8(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether ONNX Runtime's u8 x s8 kernels can saturate on this CPU: x86 without VNNI. Where the CPU's
    flags cannot be read on x86 the answer is yes (7-bit weights are safe everywhere); never on ARM."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return True
    flags = {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[-1].split()}
    return not any(f in flags for f in VNNI_FLAGS)


@dataclass(frozen=True)
class Int8Weights:
    """How an int8 ONNX file was quantized, read from the file itself."""

    static: bool  # activations quantized with calibrated scales (QuantizeLinear), else at run time
    bits: int  # 7 (reduce_range: |q| <= 64) or 8

    def saturates_here(self) -> bool:
        """Whether this CPU's int8 kernels can lose this file's accuracy: static 8-bit weights on x86
        without VNNI (dynamic int8 kept its accuracy there with 8 bits: see ``quantize_onnx``)."""
        return self.static and self.bits == 8 and saturating_int8()

    def describe(self) -> str:
        return f"{'static' if self.static else 'dynamic'}, {self.bits}-bit weights"


def int8_weights(path: str | Path) -> Int8Weights | None:
    """The int8 weights of the ONNX file ``path`` (None when it holds none): 7-bit when no quantized
    weight exceeds 64 in magnitude (ONNX Runtime's ``reduce_range`` scales to +-64; 8-bit symmetric
    weights reach +-127 in every channel)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    largest = [int(np.abs(numpy_helper.to_array(t).astype(np.int16)).max()) for t in model.graph.initializer
               if t.data_type == onnx.TensorProto.INT8 and np.prod(t.dims) > 1]
    if not largest:
        return None
    return Int8Weights(static=any(n.op_type == "QuantizeLinear" for n in model.graph.node),
                       bits=7 if max(largest) <= 64 else 8)
