"""Compression table: backbone x variant -> params, size, MACs, latency (batch 1 and 32), accuracy.

The source of every variant is a linear probe exported by the search's own trial code
(``TrialRunner.evaluate``); the compressed variants are made from it by ``lepton compress``'s
function (``compress_export``), which prunes, recovers, quantizes and measures. Input-size and
layer-dropping rows are search trials of their own. "fp32 eager" times the source's torch model,
rebuilt from its safetensors, on the same input: the reference for speed-ups. All latencies of
one backbone use one input (the longest of 64 random training examples, as in the search).

    python benchmarks/compression.py                      # digits (efficientnet_lite0)
    python benchmarks/compression.py --text benchmarks/data/debian_sections.csv   # + MiniLM

Writes benchmarks/results/compression.json and .md. Run by hand; timings are this machine's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lepton_automl.backbones import BackboneRegistry
from lepton_automl.compression.compress import compress_export
from lepton_automl.cost.hardware import CostModel, load_profiles
from lepton_automl.cost.latency import TimingPlan, batch_of, measure_onnx_latency, measure_torch_latency
from lepton_automl.cost.macs import count_macs
from lepton_automl.data.split import split_data
from lepton_automl.export.artifact import Predictor, load_metadata, rebuild_model
from lepton_automl.plugins import MODALITIES, PluginRegistry
from lepton_automl.search.objective import TrialRunner
from lepton_automl.search.probe_export import materialize
from lepton_automl.search.space import SearchSpace
from lepton_automl.training.cache import FeatureCache

OUT = Path(__file__).parent / "results"
QUICK = TimingPlan(warmup=2, round_runs=5, max_seconds=3.0)
ROUNDS = 3


def accuracy(folder: Path, data: Any) -> float:
    return float((Predictor(folder).logits(list(data.examples)).argmax(1) == data.labels).mean())


def describe(folder: Path, feeds: dict[str, np.ndarray], names: tuple[str, ...]) -> dict[str, Any]:
    model = rebuild_model(folder)
    meta = load_metadata(folder)
    shipped = folder / (meta["runtime_file"] if meta.get("runtime", "onnxruntime") == "onnxruntime"
                        else "model.safetensors")
    return {"params_m": sum(p.numel() for p in model.parameters()) / 1e6, "size_mb": shipped.stat().st_size / 2**20,
            "gmacs": count_macs(model, feeds, names) / 1e9}


def latency(folder: Path, feeds: dict[str, np.ndarray]) -> tuple[float, float, float]:
    pred = Predictor(folder)
    names = pred.meta["input_names"]
    if pred.session is not None:
        path = folder / pred.meta["runtime_file"]
        b1 = measure_onnx_latency(path, feeds)
        b32 = measure_onnx_latency(path, batch_of(feeds, 32), plan=QUICK)
    else:
        b1 = measure_torch_latency(pred.torch_model, feeds, names, device=pred.torch_model.device)
        b32 = measure_torch_latency(pred.torch_model, batch_of(feeds, 32), names, device=pred.torch_model.device,
                                    plan=QUICK)
    return b1.median_ms, b1.p90_ms, b32.median_ms


def run(modality_name: str, data_source: str, base: dict, compressions: dict, trials: dict, work: Path) -> list[dict]:
    modality = PluginRegistry(MODALITIES).load(modality_name)()
    registry = BackboneRegistry()
    splits = split_data(modality.load(data_source), seed=0)
    profiles = load_profiles()
    runner = TrialRunner(modality=modality, registry=registry, splits=splits,
                         space=SearchSpace(backbones=(base["backbone"],)), cache=FeatureCache(work / "cache"),
                         cost=CostModel(train=profiles["local-cpu"], serve=profiles["local-cpu"]), run_dir=work)
    runner.evaluate(base, trial_dir=work / "source", seed=0)
    # A probe trial writes a recipe (head + its trunk's entry); the export folder is made from it.
    source = materialize(work / "source", modality=modality, registry=registry)
    prep = Predictor(source).preprocessing
    feeds = runner.latency_example(prep)  # the input every latency of this backbone is taken on
    names = modality.input_names()
    model = rebuild_model(source)
    src_row = describe(source, feeds, names)
    folders = {"ORT fp32": (source, 0.0)}
    for name, kwargs in compressions.items():
        t0 = time.perf_counter()
        compress_export(source, data=data_source, out=work / name.replace(" ", "_"), **kwargs)
        folders[name] = (work / name.replace(" ", "_"), time.perf_counter() - t0)
    for name, extra in trials.items():
        t0 = time.perf_counter()
        runner.evaluate({**base, **extra}, trial_dir=work / name.replace(" ", "_"), seed=0)
        folders[name] = (materialize(work / name.replace(" ", "_"), modality=modality, registry=registry),
                         time.perf_counter() - t0)
    inputs = {name: runner.latency_example(Predictor(folder).preprocessing) if name in trials else feeds
              for name, (folder, _) in folders.items()}  # another input size: its encoding of the same example
    # Latency in ROUNDS interleaved rounds over all variants (drift on a shared machine hits them
    # alike); each variant's figure is the median of its round medians, the spread is kept.
    timings: dict[str, list[tuple[float, float, float]]] = {name: [] for name in ["fp32 eager (torch)", *folders]}
    for _ in range(ROUNDS):
        e1 = measure_torch_latency(model, feeds, names)
        e32 = measure_torch_latency(model, batch_of(feeds, 32), names, plan=QUICK)
        timings["fp32 eager (torch)"].append((e1.median_ms, e1.p90_ms, e32.median_ms))
        for name, (folder, _) in folders.items():
            timings[name].append(latency(folder, inputs[name]))

    def lat(name: str) -> dict[str, Any]:
        b1, p90, b32 = (sorted(x[i] for x in timings[name]) for i in range(3))
        return {"latency_b1_ms": float(np.median(b1)), "latency_b1_p90_ms": float(np.median(p90)),
                "latency_b32_ms": float(np.median(b32)), "latency_b1_round_medians": [round(v, 3) for v in b1]}

    rows = [{"backbone": base["backbone"], "variant": "fp32 eager (torch)", **src_row, "size_mb": None,
             **lat("fp32 eager (torch)"), "val_accuracy": accuracy(source, splits.validation),
             "test_accuracy": accuracy(source, splits.test), "seconds": None}]
    for name, (folder, seconds) in folders.items():
        rows.append({"backbone": base["backbone"], "variant": name, **describe(folder, inputs[name], names),
                     **lat(name), "val_accuracy": accuracy(folder, splits.validation),
                     "test_accuracy": accuracy(folder, splits.test), "seconds": round(seconds, 1)})
        print(json.dumps(rows[-1]), flush=True)
    for row in rows[1:]:
        row["speedup_vs_eager_b1"] = rows[0]["latency_b1_ms"] / row["latency_b1_ms"]
        row["test_points_vs_fp32"] = 100 * (row["test_accuracy"] - rows[0]["test_accuracy"])
        row["val_points_vs_fp32"] = 100 * (row["val_accuracy"] - rows[0]["val_accuracy"])
    return rows


IMAGE_BASE = {"backbone": "efficientnet_lite0", "data__image_size": 224, "train__mode": "probe",
              "optim__weight_decay": 1e-4, "prune__method": "none", "quant__mode": "none"}
IMAGE_COMPRESSIONS = {
    "ORT int8 static": {"quant": "int8"},
    "pruned 30% + recovery": {"prune": 0.3, "recovery_epochs": 2},
    "pruned 50% + recovery": {"prune": 0.5, "recovery_epochs": 2},
    "pruned 30% + recovery + int8": {"prune": 0.3, "recovery_epochs": 2, "quant": "int8"},
}
IMAGE_TRIALS = {
    "96 px, int8": {"data__image_size": 96, "quant__mode": "int8"},
    "unstructured 50% (size only)": {"prune__method": "unstructured", "prune__amount": 0.5},
}
TEXT_BASE = {"backbone": "all-MiniLM-L6-v2", "data__max_length": 128, "train__mode": "probe",
             "optim__weight_decay": 1e-4, "prune__method": "none", "quant__mode": "none"}
TEXT_COMPRESSIONS = {
    "ORT int8 dynamic (MatMul)": {"quant": "int8"},
    "torch int8 dynamic (Linear)": {"quant": "torch-int8"},
    "heads+MLP pruned 30% + recovery": {"prune": 0.3, "recovery_epochs": 2},
    "heads+MLP pruned 50% + recovery": {"prune": 0.5, "recovery_epochs": 2},
    "heads+MLP pruned 50% + recovery + int8": {"prune": 0.5, "recovery_epochs": 2, "quant": "int8"},
}
TEXT_TRIALS = {
    "first 3 of 6 layers": {"prune__method": "structured", "prune__amount": 0.5},
}
COLUMNS = ["backbone", "variant", "params_m", "size_mb", "gmacs", "latency_b1_ms", "latency_b1_p90_ms",
           "latency_b1_round_medians", "latency_b32_ms", "speedup_vs_eager_b1", "val_accuracy", "test_accuracy", "test_points_vs_fp32"]


def to_markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = []
        for c in COLUMNS:
            v = r.get(c)
            cells.append("-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--text", help="Debian text CSV from build_debian_text.py")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lepton-bench-") as tmp:
        rows = run("image", "demo:digits", IMAGE_BASE, IMAGE_COMPRESSIONS, IMAGE_TRIALS, Path(tmp) / "image")
        if args.text:
            rows += run("text", args.text, TEXT_BASE, TEXT_COMPRESSIONS, TEXT_TRIALS, Path(tmp) / "text")
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {"machine": f"{platform.processor() or platform.machine()} x{os.cpu_count()}",
            "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
    (OUT / "compression.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (OUT / "compression.md").write_text(
        f"# Compression benchmark ({meta['date']}, {meta['machine']})\n\n"
        "Accuracy deltas and speed-ups are against the fp32 source (a linear probe) run eagerly in torch on the "
        "same input. Validation accuracy is in-sample for the source and the variants that keep its head (the probe is fit on train + validation), held-out for pruned variants (their head is refit on the training split); compare test accuracy.\n\n"
        + to_markdown(rows) + "\n")
    print(to_markdown(rows))


if __name__ == "__main__":
    main()
