"""Compression: quantization of exported ONNX models (pruning arrives in issue 4)."""
