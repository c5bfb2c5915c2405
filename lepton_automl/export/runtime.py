"""Torch runtimes for serving: dynamic int8 on CPU, fp16/bf16 on a GPU, re-applied at load time."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lepton_automl.exceptions import ConfigError

TORCH_RUNTIMES = ("torch-int8", "torch-fp16", "torch-bf16")


class TorchRuntime:
    """A model prepared for serving in torch: dynamic int8 on CPU, or fp16/bf16 (GPU).

    Dynamic int8 quantizes the weights of every ``Linear`` to int8 (activations per batch), a pure
    function of the fp32 weights: an export stores fp32 safetensors plus the runtime's name, and
    loading re-applies it, so no pickled module is ever shipped. It is the fallback for graphs
    ONNX Runtime's quantizer cannot handle; convolutions stay fp32 (like ORT's dynamic mode,
    dynamic int8 convolutions are slower than fp32 on CPU).
    """

    def __init__(self, model: Any, kind: str, *, device: str | None = None) -> None:
        import copy

        import torch

        if kind not in TORCH_RUNTIMES:
            raise ConfigError(f"Unknown torch runtime {kind!r}. Use one of: {', '.join(TORCH_RUNTIMES)}.")
        self.kind = kind
        model = copy.deepcopy(model).eval()
        if kind == "torch-int8":
            self.device, self.dtype = "cpu", None
            self.model = torch.ao.quantization.quantize_dynamic(model.cpu(), {torch.nn.Linear}, dtype=torch.qint8)
        else:
            self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            self.dtype = torch.float16 if kind == "torch-fp16" else torch.bfloat16
            self.model = model.to(self.device, self.dtype)

    def __call__(self, *inputs: Any) -> Any:
        cast = [x.to(self.dtype) if self.dtype is not None and x.is_floating_point() else x for x in inputs]
        return self.model(*cast)

    def logits(self, feeds: Mapping[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self(*[torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device) for n in names])
        return out.float().cpu().numpy()


def to_torch_runtime(model: Any, kind: str, *, device: str | None = None) -> TorchRuntime:
    return TorchRuntime(model, kind, device=device)
