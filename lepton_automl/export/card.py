"""The model card written beside every export: Hugging Face's model-card layout (YAML front matter with
``library_name``, ``tags``, ``pipeline_tag`` and ``model-index`` metrics, then the text), with the
content of Mitchell et al., "Model Cards for Model Reporting" (2019): the data, every metric with the
split it comes from, latency and cost with their hardware, the compression, the search, limitations."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from lepton_automl.export.int8 import Int8Weights

PIPELINE_TAGS = {"image": "image-classification", "text": "text-classification",
                 "audio": "audio-classification", "tabular": "tabular-classification"}


def _article(word: str) -> str:
    return "An" if word[:1].lower() in "aeiou" else "A"


def _yaml_str(value: Any) -> str:
    return json.dumps(str(value))  # a JSON string is a valid YAML scalar


def front_matter(meta: Mapping[str, Any]) -> list[str]:
    m = meta.get("metrics", {})
    modality = str(meta["modality"])
    tag = PIPELINE_TAGS.get(modality, f"{modality}-classification")
    data_name = (meta.get("data") or {}).get("name", "user data")
    lines = ["---", "library_name: onnxruntime", "tags:", "- lepton-automl", f"- {modality}", "- onnx"]
    if meta.get("runtime_file", "").endswith("int8.onnx"):
        lines.append("- int8")
    lines += [f"pipeline_tag: {tag}", "model-index:", f"- name: {_yaml_str(meta.get('name', 'Lepton model'))}",
              "  results:", "  - task:", f"      type: {tag}", "    dataset:", f"      name: {_yaml_str(data_name)}",
              "      type: user", "    metrics:"]
    # A probe's head was fit on train+validation: its held-out estimate is the cross-validated one.
    held_out = (("cv_accuracy", "cross-validated accuracy") if m.get("cv_accuracy") is not None
                else ("holdout_accuracy", "validation accuracy"))
    for key, name in (held_out, ("test_accuracy", "test accuracy")):
        if m.get(key) is not None:
            lines += ["    - type: accuracy", f"      name: {_yaml_str(name)}", f"      value: {float(m[key]):.4f}"]
    lines.append("---")
    return lines


def render_model_card(meta: Mapping[str, Any]) -> str:
    card = meta["backbone"]
    members = meta.get("members") or [card]
    m = meta.get("metrics", {})
    params = meta.get("params", {})
    data = meta.get("data") or {}
    search = meta.get("search") or {}
    modality = str(meta["modality"])

    def fmt(key: str, spec: str = ".4f") -> str:
        v = m.get(key)
        return "n/a" if v is None else format(v, spec)

    mode = params.get("train__mode", "probe")
    training = {"probe": "a linear probe (logistic regression) on the frozen backbone's features, its L2 strength "
                         "chosen by 5-fold cross-validation",
                "finetune": f"the last {meta.get('finetune_blocks')} block(s) fine-tuned on frozen trunk outputs",
                "full": "every layer fine-tuned, starting from a linear probe"}.get(str(mode), str(mode))
    prune = params.get("prune__method", "none")
    pruning = "none" if prune in (None, "none") else (
        f"{prune}, {float(params.get('prune__amount', 0)):.0%}"
        + (f" ({params['prune__target']})" if params.get("prune__target") else ""))
    quant = params.get("compress__quant") or params.get("quant__mode", "none")
    if meta.get("int8_weights"):  # read from the int8 file (export/int8.py)
        weights = Int8Weights(**meta["int8_weights"])
        quant = (f"{quant} ({weights.describe()}"
                 + ("; on an x86 CPU without VNNI (AVX2 only) the int8 kernels can saturate with 8-bit weights "
                    "and lose accuracy: re-quantize there with `lepton compress --quant int8`, which writes "
                    "7-bit weights" if weights.static and weights.bits == 8 else "") + ")")
    runtime = (f"`{meta['runtime_file']}` in ONNX Runtime" if meta.get("runtime", "onnxruntime") == "onnxruntime"
               else f"`{meta['runtime']}` (torch, re-applied to `model.safetensors` on load)")
    size = params.get("data__image_size") or params.get("data__max_length")
    lines = [
        *front_matter(meta),
        "",
        f"# {meta.get('name', 'Lepton model')}",
        "",
        f"{_article(modality)} {modality} classifier into {len(meta['classes'])} classes, found and exported by "
        f"Lepton AutoML {meta.get('lepton_version', '')}.",
        "",
        "## Model",
        *(f"- Backbone: `{c['name']}` (`{c['ref']}`), license {c.get('license') or 'unknown'}; pretrained "
          f"weights: {c.get('weights') or 'none (random initialisation)'}" for c in members),
        *(["- The backbones run side by side and one linear head reads their concatenated features."]
          if len(members) > 1 else []),
        f"- Input: {'images resized to ' + str(size) + ' px' if modality == 'image' and size else ''}"
        f"{'texts truncated to ' + str(size) + ' tokens' if modality == 'text' and size else ''}"
        f"{'as the modality encodes it' if not size else ''}",
        f"- Training: {training}",
        f"- Pruning: {pruning}",
        f"- Quantization: {quant}; served from {runtime}",
        f"- Classes: {', '.join(map(str, meta['classes']))}",
        "",
        "## Data",
    ]
    if data:
        splits = data.get("splits", {})
        lines += [f"- Dataset: {data.get('name', 'user data')}; split {splits.get('train', '?')} train / "
                  f"{splits.get('validation', '?')} validation / {splits.get('test', '?')} test examples "
                  f"(seed {search.get('seed', '?')})"]
        per_class = data.get("train_per_class") or {}
        if per_class:
            lines.append("- Training examples per class: " + ", ".join(f"{k} {v}" for k, v in per_class.items()))
        fixes = data.get("fixes") or []
        lines.append("- Fixes made by the data check: " + ("; ".join(fixes) if fixes else "none needed"))
    else:
        lines.append("- Not recorded for this export.")
    # Trained networks ship a head refit on train+validation features (search.training_steps.final_head).
    refit = (" (the head was refit on train+validation: each example scored by the fold head fit without it)"
             if m.get("head_refit_l2") is not None else "")
    lines += [
        "",
        "## Measured",
        "| metric | value | measured on |",
        "|---|---|---|",
        f"| objective accuracy | {fmt('accuracy')} | "
        + ("5-fold cross-validation over train+validation, minus the compression's loss on validation"
           if m.get("cv_accuracy") is not None
           else f"validation split{refit}, less the kept epoch's advantage there that cross-fitting calls luck "
                f"({float(m['epoch_choice_optimism']):.4f})" if m.get("epoch_choice_optimism")
           else f"validation split{refit}")
        + (f"; {float(m['accuracy_before_lead_rule']):.4f} before the one-standard-error rule: it led the most "
           f"accurate cross-validated trial (trial {m.get('lead_incumbent')}) by {float(m['lead_over_incumbent']):.4f} "
           f"on the validation examples, under one error ({float(m['lead_error']):.4f})"
           if m.get("accuracy_before_lead_rule") is not None and m.get("accuracy") is not None
           and float(m["accuracy"]) < float(m["accuracy_before_lead_rule"]) else "") + " |",
        f"| validation accuracy | {fmt('holdout_accuracy')} | validation split, this file"
        + (" (the probe was fit on train+validation: not held out)" if m.get("cv_accuracy") is not None
           else refit) + " |",
        f"| test accuracy | {fmt('test_accuracy')} | test split, this file (never used to choose) |",
        f"| latency, batch 1, median / p90 (ms) | {fmt('latency_ms', '.3f')} / {fmt('latency_p90_ms', '.3f')} | "
        f"{m.get('latency_device', 'the search machine')}, {m.get('latency_threads', '?')} threads |",
        f"| latency, batch {m.get('serving_batch', '?')}, median (ms) | {fmt('latency_serving_batch_ms', '.3f')} | "
        + ("the sum of the merged backbones' own, each timed so" if m.get("serving_batch_summed") else "same") + " |",
        f"| throughput (examples/s) | {fmt('throughput_per_s', '.1f')} | same, serving batch |",
        f"| MACs per example (G) | {fmt('gmacs', '.3f')} | counted on the torch model |",
        f"| parameters (M) | {fmt('params_m', '.2f')} | |",
        f"| file size, raw / gzip (MB) | {fmt('size_mb', '.2f')} / {fmt('size_gz_mb', '.2f')} | the runtime file |",
        f"| cost objective (USD) | {fmt('cost_usd', '.6f')} | training time + serving at the measured throughput, "
        "priced by the search's hardware profiles |",
        "",
        "## Search",
    ]
    if search:
        budget = search.get("budget_s")
        lines.append(f"- Study `{search.get('study', '?')}`, trial {search.get('trial', '?')}"
                     + (f", search budget {float(budget):.0f} s" if budget else "")
                     + f"; training took {fmt('train_seconds', '.1f')} s.")
    else:
        lines.append("- Not recorded for this export.")
    lines += [
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
        "- Accuracy was measured on held-out splits of the same data the model was trained on; check it on data",
        "  from your deployment before relying on it.",
        "- Latency was measured on the machine named above; other CPUs (and their int8 kernels) differ.",
        f"- The model knows only the {len(meta['classes'])} classes above: every input gets one of them.",
        "",
    ]
    return "\n".join(lines)
