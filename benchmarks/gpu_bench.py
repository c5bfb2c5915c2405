"""GPU benchmark (issue: the GPU path): what the hardware can do, what Lepton's pipeline gets of it.

Three parts, one script, under 5 minutes on one GPU:

1. **Limits**: forward and training throughput of efficientnet_lite0, resnet50 and a MiniLM-shaped
   BERT (6 layers x 384, 128 tokens) on random inputs, bf16 autocast (fp16 where bf16 is missing),
   channels-last, batch 256: the most any data pipeline can reach.
2. **Lepton's pipeline** on real data: feature extraction (``export.trunk.run_trunk``) and full
   fine-tuning (``training.finetune.fine_tune``) of the same backbones, through the modality's own
   decoding (PIL for images, the tokenizer for texts) in DataLoader workers. The figure is the ratio
   to the limit, in the steady state: extraction's second pass over the data, the last epoch of a
   second fine-tuning (the first pass and run, which pay for worker start-up and for cuDNN's and the
   attention kernels' choices at each new shape, are kept beside them). Images: the glyph set of ``build_glyph_images.py`` (or digits), 224 px. Texts:
   man-page summaries (``build_manpage_text.py``) joined into texts of at least 128 tokens, so that
   they run at the limit's length.
3. **A short search** on the demo (``lepton search`` defaults, ``--timeout`` 180 s) with training and
   feature extraction on the device.

    python benchmarks/gpu_bench.py --device cuda              # on a GPU machine
    python benchmarks/gpu_bench.py --device cpu --smoke       # the same code, tiny, on a laptop

Results go to ``benchmarks/results/gpu_bench.json`` (``--out``), with the GPU's name. Weights do not
change throughput, so backbones without offline weights run from random initialisation; the
MiniLM-shaped model is built from the MiniLM package's config when it is installed, else from
``--tokenizer DIR`` (a folder holding MiniLM's tokenizer files) and MiniLM's published shape.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
# Reference: an H100, bf16, channels-last, batch 256, random inputs (the GPU issue).
REFERENCE_H100 = {"efficientnet_lite0": {"forward_per_s": 23_300, "train_per_s": 5_800},
                  "resnet50": {"forward_per_s": 12_800, "train_per_s": 3_900},
                  "minilm": {"forward_per_s": 45_600, "train_per_s": 11_900}}
TARGETS = {"features_ratio": 0.70, "finetune_ratio": 0.60}
MINILM_SHAPE = {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536,
                "vocab_size": 30522, "max_position_embeddings": 512}
SEQ = 128


def log(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


def timed_throughput(step: Callable[[], Any], batch: int, accel: Any, *, seconds: float, warmup: int) -> float:
    """Examples per second of ``step`` (one batch), after ``warmup`` calls, timed for about ``seconds``."""
    for _ in range(warmup):
        step()
    accel.synchronize()
    runs, start = 0, time.perf_counter()
    while True:
        step()
        runs += 1
        if runs % 5 == 0 or not accel.cuda:
            accel.synchronize()
            if time.perf_counter() - start >= seconds:
                break
    accel.synchronize()
    return runs * batch / (time.perf_counter() - start)


# -- 1. limits ----------------------------------------------------------------------------------

def limit(model: nn.Module, inputs: list[torch.Tensor], *, accel: Any, seconds: float, warmup: int) -> dict[str, float]:
    """Forward (inference mode) and training (forward, backward, AdamW step) throughput on random inputs."""
    accel.prepare(model)
    inputs = accel.inputs(inputs)
    batch = int(inputs[0].shape[0])
    model.eval()

    def forward() -> None:
        with torch.inference_mode(), accel.autocast(), accel.kernels(autotune=True):
            model(*inputs)

    fwd = timed_throughput(forward, batch, accel, seconds=seconds, warmup=warmup)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    scaler = accel.grad_scaler()
    target = torch.zeros(batch, dtype=torch.long, device=accel.device)

    def train() -> None:
        opt.zero_grad(set_to_none=True)
        with accel.kernels(autotune=True):
            with accel.autocast():
                out = model(*inputs)
            loss = nn.functional.cross_entropy(_logits(out).float(), target)
            scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    trn = timed_throughput(train, batch, accel, seconds=seconds, warmup=warmup)
    model.to("cpu")
    return {"forward_per_s": round(fwd, 1), "train_per_s": round(trn, 1), "batch": batch}


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden.mean(1) if hidden.ndim == 3 else hidden


def minilm_shaped(config_from: Path | None) -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig.from_pretrained(str(config_from)) if config_from else BertConfig(**MINILM_SHAPE)
    return BertModel(config, add_pooling_layer=False)


# -- 2. Lepton's pipeline --------------------------------------------------------------------------

def image_data(args: argparse.Namespace, modality: Any, n: int) -> Any:
    from lepton_automl.data.dataset import LabelledData

    folder = Path(args.images)
    if not folder.is_dir():
        from lepton_automl.data.demo import materialize_digits

        folder = materialize_digits(Path(tempfile.mkdtemp(prefix="gpu-bench-digits-")))
    data = modality.load(str(folder))
    reps = -(-n // len(data))
    examples = (tuple(data.examples) * reps)[:n]
    labels = np.tile(np.asarray(data.labels), reps)[:n]
    return LabelledData(examples=examples, labels=labels, classes=data.classes, name=f"{folder.name} x{reps}")


def text_data(args: argparse.Namespace, n: int) -> Any:
    """Man-page summaries joined in groups of 12 (about 130-200 tokens), labelled by the first one's section."""
    import csv

    from lepton_automl.data.dataset import LabelledData

    path = Path(args.texts)
    rows = list(csv.DictReader(path.open())) if path.is_file() else []
    if not rows:  # no man-page table: English sentences from the docstrings of this module's imports
        rows = [{"text": line.strip(), "label": "doc"} for mod in (np, torch, nn, json)
                for line in (mod.__doc__ or "").splitlines() if len(line.split()) > 3]
    texts, labels = [], []
    for i in range(0, len(rows) - 12, 12):
        texts.append(". ".join(r["text"] for r in rows[i : i + 12]))
        labels.append(rows[i]["label"])
    classes = tuple(sorted(set(labels)))
    reps = -(-n // len(texts))
    examples = (tuple(texts) * reps)[:n]
    y = np.tile(np.array([classes.index(label) for label in labels]), reps)[:n]
    return LabelledData(examples=examples, labels=y, classes=classes, name=f"{path.stem} joined x{reps}")


def pipeline(card: Any, registry: Any, modality: Any, data: Any, params: dict[str, Any], *, accel: Any,
             batch: int, epochs: int) -> dict[str, Any]:
    """Feature extraction and full fine-tuning throughput through Lepton's own code."""
    from lepton_automl.export.trunk import run_trunk
    from lepton_automl.interfaces import ExportModel
    from lepton_automl.training.finetune import FineTuneConfig, fine_tune

    prep = modality.preprocessing(card, registry, params=params)
    parts = modality.build(card, registry, params=params, pretrained=False)
    out: dict[str, Any] = {"examples": len(data), "data": data.name}

    def extract(**kwargs: Any) -> tuple[float, Any]:
        accel.synchronize()
        start = time.perf_counter()
        feats = run_trunk(parts.trunk, modality, data.examples, preprocessing=prep, batch_size=batch, accel=accel,
                          **kwargs)
        accel.synchronize()
        return time.perf_counter() - start, feats

    # The first pass pays once per process and input shape: worker start-up, cuDNN's autotuning of each
    # convolution. The second is the steady state every later pass of a search gets.
    first, _ = extract()
    seconds, feats = extract()
    out.update(features_first_pass_per_s=round(len(data) / first, 1), features_per_s=round(len(data) / seconds, 1),
               features_s=round(seconds, 2), feature_width=int(feats[0].shape[-1]))
    log(f"  features: {out['features_per_s']:.0f}/s ({len(data)} in {seconds:.1f} s; first pass {first:.1f} s)")
    if accel.cuda:  # the search extracts in fp32 (its features must match the fp32 export's)
        out["features_fp32_per_s"] = round(len(data) / extract(mixed_precision=False)[0], 1)

    model = ExportModel(parts.trunk, parts.tail, nn.Linear(parts.feature_dim, len(data.classes)))
    runs = []
    for seed in range(2):  # the first run also pays for kernel selection at each new sequence length or shape
        cfg = FineTuneConfig(epochs=epochs, lr=1e-4, batch_size=batch, seed=seed)
        start = time.perf_counter()
        ft = fine_tune(model, modality, data, prep, cfg, accel=accel)
        runs.append((time.perf_counter() - start, ft))
    total, ft = runs[-1]
    steady = ft.seconds_per_epoch[-1]
    out.update(finetune_per_s=round(len(data) / steady, 1), finetune_epoch_s=[round(s, 2) for s in ft.seconds_per_epoch],
               finetune_first_run_epoch_s=[round(s, 2) for s in runs[0][1].seconds_per_epoch],
               finetune_total_s=round(total, 2), decode_and_setup_s=round(total - sum(ft.seconds_per_epoch), 2),
               micro_batch=ft.micro_batch)
    log(f"  fine-tuning: {out['finetune_per_s']:.0f}/s in the second run's last epoch ({ft.seconds_per_epoch}; "
        f"first run {runs[0][1].seconds_per_epoch})")
    return out


# -- 3. a short search -----------------------------------------------------------------------------

def short_search(args: argparse.Namespace, accel: Any) -> dict[str, Any]:
    from lepton_automl.backbones import BackboneRegistry
    from lepton_automl.search.engine import quiet_optuna, search

    quiet_optuna()
    registry = BackboneRegistry()
    available = [c.name for c in registry.list(modality="image", available=True)]
    root = Path(tempfile.mkdtemp(prefix="gpu-bench-search-"))
    start = time.perf_counter()
    outcome = search("demo:digits", registry=registry, backbones=available or ["efficientnet_lite0"],
                     untrained=not available, n_trials=args.search_trials, timeout=args.search_seconds,
                     run_root=root, device=accel, seed=0)
    wall = time.perf_counter() - start
    trials = outcome.study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state.name == "COMPLETE"]
    return {"budget_s": args.search_seconds, "wall_s": round(wall, 1), "backbones": available,
            "trials_complete": len(done), "trials_started": len(trials),
            "modes": sorted({t.params.get("train__mode", "?") for t in done}),
            "failed": [[n, reason[:200]] for n, reason in outcome.failed[:5]],
            "front": [[round(r.accuracy, 4), None if r.test_accuracy is None else round(r.test_accuracy, 4),
                       round(r.latency_ms, 3)] for r in outcome.front],
            "latency_runtime": "ONNX Runtime on this machine's CPU (the search's serving target)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the code, measures nothing")
    parser.add_argument("--out", default=str(HERE / "results" / "gpu_bench.json"))
    parser.add_argument("--images", default=str(HERE / "data" / "glyphs"))
    parser.add_argument("--texts", default=str(HERE / "data" / "manpages.csv"))
    parser.add_argument("--tokenizer", default=None, help="MiniLM tokenizer folder, when the MiniLM package is absent")
    parser.add_argument("--search-seconds", type=float, default=180.0)
    parser.add_argument("--search-trials", type=int, default=1000)
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: limits,pipeline,search")
    parser.add_argument("--limits-from", default=None, help="take the limits from this earlier result file "
                        "(same GPU kind) instead of measuring them")
    args = parser.parse_args()

    from lepton_automl.accel import resolve_device
    from lepton_automl.backbones import BackboneCard, BackboneRegistry
    from lepton_automl.plugins import MODALITIES, PluginRegistry

    accel = resolve_device(args.device)
    smoke = args.smoke
    batch = 8 if smoke else 256
    seconds, warmup = (0.5, 1) if smoke else (4.0, 5)
    n_images, n_texts = (32, 32) if smoke else (12_288, 24_576)
    skip = set(filter(None, args.skip.split(",")))
    if smoke:
        args.search_seconds, args.search_trials = min(args.search_seconds, 30.0), min(args.search_trials, 2)
    result: dict[str, Any] = {
        "device": accel.name(), "device_string": accel.device, "smoke": smoke,
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "settings": {"amp_dtype": accel.amp_dtype, "channels_last": accel.channels_last, "workers": accel.workers,
                     "pin_memory": accel.pin_memory, "batch": batch, "image_size": 224, "tokens": SEQ},
        "reference_h100_limits": REFERENCE_H100, "targets": TARGETS, "limits": {}, "pipeline": {}, "errors": {},
    }
    registry = BackboneRegistry()
    modalities = PluginRegistry(MODALITIES)
    image, text = modalities.load("image")(), modalities.load("text")()
    minilm_card = registry.get("all-MiniLM-L6-v2")
    minilm_dir = None
    if not registry.available(minilm_card):
        if args.tokenizer:  # a MiniLM-shaped model with random weights, beside the given tokenizer
            import shutil

            minilm_dir = Path(tempfile.mkdtemp(prefix="gpu-bench-minilm-"))
            for f in Path(args.tokenizer).iterdir():
                shutil.copy(f, minilm_dir / f.name)
            minilm_shaped(None).save_pretrained(str(minilm_dir))
            minilm_card = BackboneCard(name="minilm-shaped", ref=f"local-dir:{minilm_dir}", modality="text",
                                       max_length=SEQ)
            registry.register(minilm_card)
        else:
            minilm_card = None
    from lepton_registry import transformers_path

    config_dir = Path(transformers_path(minilm_card)) if minilm_card is not None else None
    cards = {"efficientnet_lite0": registry.get("efficientnet_lite0"),
             "resnet50": registry.register(BackboneCard(name="resnet50", ref="timm:resnet50", modality="image"))}

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every part: a run stopped by a time limit keeps what it measured
        out.write_text(json.dumps(result, indent=2) + "\n")

    def guarded(part: str, name: str, run: Callable[[], Any]) -> Any:
        try:
            return run()
        except Exception as exc:  # a benchmark reports what broke and goes on with the next part
            result["errors"][f"{part}/{name}"] = f"{type(exc).__name__}: {exc}"[:500]
            log(f"{part}/{name} failed: {exc!r}")
            if accel.cuda:
                torch.cuda.empty_cache()
            return None

    import timm

    if args.limits_from:
        earlier = json.loads(Path(args.limits_from).read_text())
        result["limits"] = earlier["limits"]
        result["limits_from"] = {"device": earlier["device"], "torch": earlier["torch"], "file": args.limits_from}
    elif "limits" not in skip:
        for name in ("efficientnet_lite0", "resnet50"):
            log(f"limit {name}")
            result["limits"][name] = guarded("limits", name, lambda: limit(
                timm.create_model(name, pretrained=False), [torch.randn(batch, 3, 224, 224)], accel=accel,
                seconds=seconds, warmup=warmup))
        log("limit minilm")
        ids = torch.randint(1000, 30000, (batch, SEQ))
        result["limits"]["minilm"] = guarded("limits", "minilm", lambda: limit(
            minilm_shaped(config_dir), [ids, torch.ones_like(ids)], accel=accel, seconds=seconds, warmup=warmup))
        log(json.dumps(result["limits"]))
        save()

    if "pipeline" not in skip:
        images = image_data(args, image, n_images)
        for name, card in cards.items():
            log(f"pipeline {name}")
            result["pipeline"][name] = guarded("pipeline", name, lambda: pipeline(
                card, registry, image, images, {"data__image_size": 224}, accel=accel, batch=batch, epochs=2))
        if minilm_card is not None:
            log("pipeline minilm")
            texts = text_data(args, n_texts)
            result["pipeline"]["minilm"] = guarded("pipeline", "minilm", lambda: pipeline(
                minilm_card, registry, text, texts, {"data__max_length": SEQ}, accel=accel, batch=batch, epochs=2))
        else:
            result["errors"]["pipeline/minilm"] = "no MiniLM package and no --tokenizer folder"
        for name, row in result["pipeline"].items():
            lim = result["limits"].get(name)
            if row and lim:
                row["features_ratio"] = round(row["features_per_s"] / lim["forward_per_s"], 3)
                row["features_first_pass_ratio"] = round(row["features_first_pass_per_s"] / lim["forward_per_s"], 3)
                row["finetune_ratio"] = round(row["finetune_per_s"] / lim["train_per_s"], 3)
        save()

    if "search" not in skip:
        log("search")
        result["search"] = guarded("search", "demo", lambda: short_search(args, accel))

    save()
    print(json.dumps(result, indent=2))
    if minilm_dir is not None:
        import shutil

        shutil.rmtree(minilm_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
