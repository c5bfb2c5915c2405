"""Compression table: backbone x variant -> params, size, MACs, latency (batch 1 and 32), accuracy.

Every variant is trained, exported and measured by the search's own trial code
(``TrialRunner.evaluate``), so the numbers are the ones a search would see. "fp32 eager" times
the same architecture in PyTorch without ONNX Runtime, as the reference for speed-ups.

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

import numpy as np
import torch

from lepton_automl.backbones import BackboneRegistry
from lepton_automl.cost.hardware import CostModel, load_profiles
from lepton_automl.cost.latency import measure_onnx_latency
from lepton_automl.data.split import split_data
from lepton_automl.export.artifact import Predictor, load_metadata
from lepton_automl.plugins import MODALITIES, PluginRegistry
from lepton_automl.search.objective import TrialRunner
from lepton_automl.search.space import SearchSpace
from lepton_automl.training.cache import FeatureCache
from lepton_automl.training.trainer import ExportModel

OUT = Path(__file__).parent / "results"


def eager_latency(model: torch.nn.Module, feeds: dict[str, np.ndarray], names, runs: int = 30) -> float:
    args = [torch.from_numpy(feeds[n]) for n in names]
    with torch.no_grad():
        for _ in range(3):
            model(*args)
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            model(*args)
            times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000)


def run(modality_name: str, data_source: str, backbone: str, base: dict, variants: dict) -> list[dict]:
    modality = PluginRegistry(MODALITIES).load(modality_name)()
    registry = BackboneRegistry()
    data = modality.load(data_source)
    splits = split_data(data, seed=0)
    profiles = load_profiles()
    work = Path(tempfile.mkdtemp(prefix="lepton-bench-"))
    runner = TrialRunner(modality=modality, registry=registry, splits=splits,
                         space=SearchSpace(backbones=(backbone,)), cache=FeatureCache(work / "cache"),
                         cost=CostModel(train=profiles["local-cpu"], serve=profiles["local-cpu"]), run_dir=work)
    card = registry.get(backbone)
    prep = modality.preprocessing(card, registry, params=base)
    parts = modality.build(card, registry, params=base)
    eager = ExportModel(parts.trunk, parts.tail, torch.nn.Linear(parts.feature_dim, data.num_classes)).eval()
    one = modality.encode(splits.test.examples[:1], preprocessing=prep)
    batch = modality.encode(splits.test.examples[:32], preprocessing=prep)
    rows = [{"backbone": backbone, "variant": "fp32 eager (torch)", "params_m": None, "size_mb": None, "gmacs": None,
             "latency_b1_ms": eager_latency(eager, one, modality.input_names()),
             "latency_b32_ms": eager_latency(eager, batch, modality.input_names(), runs=5),
             "val_accuracy": None, "test_accuracy": None}]
    for name, extra in variants.items():
        params = {**base, **extra}
        t0 = time.perf_counter()
        result = runner.evaluate(params, trial_dir=work / name.replace(" ", "_"), seed=0)
        meta = load_metadata(result.artifact)
        runtime = Path(result.artifact) / meta["runtime_file"]
        pred = Predictor.load(result.artifact)
        b32 = modality.encode(splits.test.examples[:32], preprocessing=pred.preprocessing)
        rows.append({
            "backbone": backbone, "variant": name, "params_m": result.params_m,
            "size_mb": result.extra["size_raw_mb"], "size_gz_mb": result.size_mb, "gmacs": result.extra["gmacs"],
            "latency_b1_ms": result.latency_ms, "latency_b1_p90_ms": result.latency_p90_ms,
            "latency_b32_ms": measure_onnx_latency(runtime, b32).median_ms,
            "val_accuracy": result.accuracy, "test_accuracy": result.test_accuracy,
            "seconds": round(time.perf_counter() - t0, 1),
        })
        print(json.dumps(rows[-1]), flush=True)
    rows[0]["test_accuracy"] = rows[1]["test_accuracy"]  # same fp32 weights as the ORT fp32 variant
    rows[0]["val_accuracy"] = rows[1]["val_accuracy"]
    return rows


IMAGE_VARIANTS = {
    "ORT fp32": {"prune__method": "none", "quant__mode": "none"},
    "ORT int8 static": {"prune__method": "none", "quant__mode": "int8"},
    "pruned 30% + recovery": {"prune__method": "structured", "prune__amount": 0.3, "prune__recovery_epochs": 2,
                              "quant__mode": "none"},
    "pruned 50% + recovery": {"prune__method": "structured", "prune__amount": 0.5, "prune__recovery_epochs": 2,
                              "quant__mode": "none"},
    "pruned 30% + recovery + int8": {"prune__method": "structured", "prune__amount": 0.3,
                                     "prune__recovery_epochs": 2, "quant__mode": "int8"},
    "96 px, int8": {"data__image_size": 96, "prune__method": "none", "quant__mode": "int8"},
    "unstructured 50% (size only)": {"prune__method": "unstructured", "prune__amount": 0.5, "quant__mode": "none"},
}
TEXT_VARIANTS = {
    "ORT fp32": {"prune__method": "none", "quant__mode": "none"},
    "ORT int8 dynamic (MatMul)": {"prune__method": "none", "quant__mode": "int8"},
    "first 3 of 6 layers": {"prune__method": "structured", "prune__amount": 0.5, "quant__mode": "none"},
    "first 3 of 6 layers + int8": {"prune__method": "structured", "prune__amount": 0.5, "quant__mode": "int8"},
}


def to_markdown(rows: list[dict]) -> str:
    cols = ["backbone", "variant", "params_m", "size_mb", "gmacs", "latency_b1_ms", "latency_b32_ms",
            "val_accuracy", "test_accuracy"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append("-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--text", help="Debian text CSV from build_debian_text.py")
    args = parser.parse_args()
    rows = run("image", "demo:digits", "efficientnet_lite0",
               {"backbone": "efficientnet_lite0", "data__image_size": 224, "train__mode": "probe",
                "optim__weight_decay": 1e-4}, IMAGE_VARIANTS)
    if args.text:
        rows += run("text", args.text, "all-MiniLM-L6-v2",
                    {"backbone": "all-MiniLM-L6-v2", "data__max_length": 128, "train__mode": "probe",
                     "optim__weight_decay": 1e-4}, TEXT_VARIANTS)
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {"machine": f"{platform.processor() or platform.machine()} x{os.cpu_count()}",
            "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
    (OUT / "compression.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (OUT / "compression.md").write_text(f"# Compression benchmark ({meta['date']}, {meta['machine']})\n\n"
                                        + to_markdown(rows) + "\n")
    print(to_markdown(rows))


if __name__ == "__main__":
    main()
