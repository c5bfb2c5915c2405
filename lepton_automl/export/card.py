"""The model card written beside every export (Mitchell et al., "Model Cards for Model Reporting", 2019)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def render_model_card(meta: Mapping[str, Any]) -> str:
    card = meta["backbone"]
    m = meta.get("metrics", {})
    params = meta.get("params", {})

    def fmt(key: str, spec: str = ".4f") -> str:
        v = m.get(key)
        return "n/a" if v is None else format(v, spec)

    lines = [
        f"# {meta.get('name', 'Lepton model')}",
        "",
        f"A {meta['modality']} classifier exported by Lepton AutoML {meta.get('lepton_version', '')}.",
        "",
        "## Model",
        f"- Backbone: `{card['name']}` (`{card['ref']}`), license {card.get('license', 'unknown')}",
        f"- Pretrained weights: {card.get('weights') or 'none (random initialisation)'}",
        f"- Training: {params.get('train__mode', 'probe')}"
        + (f", last {meta.get('finetune_blocks')} blocks fine-tuned" if meta.get("finetune_blocks") else ""),
        f"- Quantization: {params.get('compress__quant') or params.get('quant__mode', 'none')}; "
        + (f"runtime file `{meta['runtime_file']}` (ONNX Runtime)" if meta.get("runtime", "onnxruntime") == "onnxruntime"
           else f"runtime `{meta['runtime']}` (torch, re-applied to `model.safetensors` on load)"),
        f"- Classes ({len(meta['classes'])}): {', '.join(map(str, meta['classes']))}",
        "",
        "## Measured",
        "| metric | value |",
        "|---|---|",
        f"| validation accuracy | {fmt('accuracy')} |",
        f"| test accuracy | {fmt('test_accuracy')} |",
        f"| latency, batch 1, median (ms) | {fmt('latency_ms', '.3f')} |",
        f"| latency, batch 1, p90 (ms) | {fmt('latency_p90_ms', '.3f')} |",
        f"| latency, batch {m.get('serving_batch', '?')}, median (ms) | {fmt('latency_serving_batch_ms', '.3f')} |",
        f"| file size (MB) | {fmt('size_mb', '.2f')} |",
        f"| parameters (M) | {fmt('params_m', '.2f')} |",
        f"| cost objective (USD) | {fmt('cost_usd', '.6f')} |",
        "",
        f"Latency was timed in the model's runtime on {m.get('latency_device', 'the search machine')} "
        f"({m.get('latency_threads', '?')} threads).",
        "",
        "## Hyperparameters",
        "```",
        *(f"{k} = {v}" for k, v in sorted(params.items())),
        "```",
        "",
        "## Use",
        "```",
        "lepton predict THIS_FOLDER INPUT [INPUT ...]",
        "```",
        "",
        "## Limitations",
        "Accuracy was measured on a held-out split of the training data only; check it on data from",
        "your deployment before relying on it.",
        "",
    ]
    return "\n".join(lines)
