"""An export folder: ``model.safetensors``, ``model.onnx`` (and ``model.int8.onnx``), ``lepton.json``,
a model card ``README.md``, and the modality's assets (a tokenizer). ``Predictor`` loads it back.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lepton_automl.accel import in_batch_order
from lepton_automl.backbones import BackboneCard
from lepton_automl.exceptions import ExportError
from lepton_automl.export.card import render_model_card
from lepton_automl.export.int8 import Int8Weights, int8_weights
from lepton_automl.log import get_logger
from lepton_automl.sessions import ort_session

logger = get_logger(__name__)

FORMAT_VERSION = 1
METADATA = "lepton.json"
BLEND_KIND = "blend"  # an export folder of several members' exports (``export/blend.py``)


def card_to_dict(card: BackboneCard) -> dict[str, Any]:
    out = {f.name: getattr(card, f.name) for f in fields(card)}
    out["build_kwargs"] = dict(card.build_kwargs)
    return out


def save_artifact(
    directory: str | Path,
    *,
    model: Any,
    fp32_onnx: str | Path,
    runtime_onnx: str | Path,
    modality: Any,
    card: BackboneCard,
    members: Sequence[BackboneCard] | None = None,
    params: Mapping[str, Any],
    classes: Sequence[str],
    preprocessing: Mapping[str, Any],
    finetune_blocks: int,
    metrics: Mapping[str, Any],
    name: str = "Lepton model",
    runtime: str = "onnxruntime",
    data: Mapping[str, Any] | None = None,
    search: Mapping[str, Any] | None = None,
) -> Path:
    """Write an export folder. ``model`` is the torch ``ExportModel`` (saved as safetensors).

    ``runtime`` is ``onnxruntime`` (serve ``runtime_onnx``) or a torch runtime (``torch-int8``,
    ``torch-fp16``, ``torch-bf16``) that ``Predictor`` re-applies to the safetensors weights."""
    from safetensors.torch import save_file

    from lepton_automl import __version__

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(_dedupe_shared(state), str(out / "model.safetensors"))
    if Path(fp32_onnx).resolve() != (out / "model.onnx").resolve():
        shutil.copyfile(fp32_onnx, out / "model.onnx")
    runtime_file = "model.onnx"
    if Path(runtime_onnx).resolve() != Path(fp32_onnx).resolve():
        runtime_file = "model.int8.onnx"
        if Path(runtime_onnx).resolve() != (out / runtime_file).resolve():
            shutil.copyfile(runtime_onnx, out / runtime_file)
    modality.save_assets(out, preprocessing=preprocessing)
    meta = {
        "format_version": FORMAT_VERSION,
        "lepton_version": __version__,
        "name": name,
        "modality": modality.name,
        "backbone": card_to_dict(card),
        **({"members": [card_to_dict(c) for c in members]} if members else {}),
        "params": dict(params),
        "classes": list(map(str, classes)),
        "preprocessing": modality.portable(preprocessing),
        "finetune_blocks": int(finetune_blocks),
        "runtime_file": runtime_file,
        "runtime": runtime,
        **_int8_meta(out / runtime_file),
        "input_names": list(modality.input_names()),
        "metrics": dict(metrics),
        **({"data": dict(data)} if data else {}),  # what the model was trained on (model card)
        **({"search": dict(search)} if search else {}),  # the study and trial that produced it
    }
    (out / "README.md").write_text(render_model_card(meta))
    # lepton.json last, renamed into place: a folder without it is not an export (``load_metadata``
    # refuses it), so a crash while writing never leaves a half model that loads.
    tmp = out / f".{METADATA}.tmp"
    tmp.write_text(json.dumps(meta, indent=2, default=str))
    os.replace(tmp, out / METADATA)
    return out


def _dedupe_shared(state: dict[str, Any]) -> dict[str, Any]:
    # safetensors refuses tensors that share memory (tied weights); keep a clone of each.
    seen: dict[int, str] = {}
    out = {}
    for k, v in state.items():
        ptr = v.data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.setdefault(ptr, k)
    return out


def load_metadata(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / METADATA
    if not path.is_file():
        raise ExportError(
            f"{str(directory)!r} is not a Lepton export (no {METADATA}). Create one with "
            "`lepton export --study NAME --trial N --out DIR`."
        )
    meta = json.loads(path.read_text())
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ExportError(
            f"{str(directory)!r} was written by a newer Lepton (format {meta['format_version']}). "
            "Upgrade with `pip install -U lepton-automl`."
        )
    return meta


def card_from_dict(data: Mapping[str, Any]) -> BackboneCard:
    values = dict(data)
    for key in ("tasks", "input_size", "mean", "std"):
        if isinstance(values.get(key), list):
            values[key] = tuple(values[key])
    return BackboneCard(**values)


def fit_to_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """Resize ``model``'s conv, linear and norm layers to the shapes in ``state`` (a pruned model's
    weights), so that ``load_state_dict(state, strict=True)`` works on a freshly built architecture."""
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        weight = state.get(prefix + "weight")
        if isinstance(module, nn.Conv2d) and weight is not None and weight.shape != module.weight.shape:
            depthwise = module.groups > 1 and module.groups == module.in_channels
            module.out_channels = int(weight.shape[0])
            if depthwise:
                module.groups = module.in_channels = int(weight.shape[0])
            else:
                module.in_channels = int(weight.shape[1]) * module.groups
            module.weight = nn.Parameter(torch.empty_like(weight))
            if module.bias is not None:
                module.bias = nn.Parameter(torch.empty(weight.shape[0]))
        elif isinstance(module, nn.Linear) and weight is not None and weight.shape != module.weight.shape:
            module.out_features, module.in_features = int(weight.shape[0]), int(weight.shape[1])
            module.weight = nn.Parameter(torch.empty_like(weight))
            if module.bias is not None:
                module.bias = nn.Parameter(torch.empty(weight.shape[0]))
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            mean = state.get(prefix + "running_mean")
            if mean is not None and mean.shape != module.running_mean.shape:
                n = int(mean.shape[0])
                module.num_features = n
                module.weight = nn.Parameter(torch.empty(n))
                module.bias = nn.Parameter(torch.empty(n))
                module.running_mean = torch.zeros(n)
                module.running_var = torch.ones(n)
        # Buffers of other modules (e.g. the head's Standardize) take the saved shapes as they are.
        for buf_name, buf in list(module.named_buffers(recurse=False)):
            saved = state.get(prefix + buf_name)
            if saved is not None and buf is not None and saved.shape != buf.shape:
                setattr(module, buf_name, torch.empty_like(saved))
    return model


def rebuild_model(directory: str | Path, *, registry: Any = None, modalities: Any = None) -> Any:
    """The export's torch model (``ExportModel``) rebuilt from ``model.safetensors``: architecture from
    the modality and backbone card, resized to the saved (possibly pruned) shapes, loaded strictly."""
    import torch
    from safetensors.torch import load_file

    from lepton_automl.backbones import BackboneRegistry
    from lepton_automl.plugins import MODALITIES, PluginRegistry
    from lepton_automl.interfaces import ConcatTrunk, ExportModel, ModelParts, Standardize

    directory = Path(directory)
    meta = load_metadata(directory)
    if meta.get("kind") == BLEND_KIND:
        raise ExportError(f"{str(directory)!r} is a blend of {len(meta['blend'])} models, not one network; "
                          f"rebuild or compress one of its members instead ({directory}/{meta['blend'][0]['path']}).")
    if "build_fn" in meta["params"]:
        raise ExportError(f"{str(directory)!r} was saved by the Lepton facade; reload it with "
                          "`Lepton.load(path)` and call `.compress(prune=..., quant=...)` on it.")
    modality = (modalities or PluginRegistry(MODALITIES)).load(meta["modality"])()
    registry = registry or BackboneRegistry()
    cards = [card_from_dict(c) for c in meta.get("members", [meta["backbone"]])]
    built = [modality.build(c, registry, params=meta["params"], finetune_blocks=int(meta["finetune_blocks"]),
                            pretrained=False) for c in cards]
    parts = built[0] if len(built) == 1 else ModelParts(trunk=ConcatTrunk([p.trunk for p in built]),
                                                        tail=torch.nn.Identity(), feature_dim=0)
    state = load_file(str(directory / "model.safetensors"))
    weight = state["head.1.weight"]
    first: torch.nn.Module = torch.nn.Identity()
    if "head.0.mean" in state:
        first = Standardize(torch.zeros(weight.shape[1]), torch.ones(weight.shape[1]))
    head = torch.nn.Sequential(first, torch.nn.Linear(weight.shape[1], weight.shape[0]))
    model = ExportModel(parts.trunk, parts.tail, head)
    fit_to_state_dict(model, state)
    model.load_state_dict(state, strict=True)
    return model.eval()


def softmax(logits: np.ndarray) -> np.ndarray:
    """Class probabilities from a ``(batch, classes)`` array of logits."""
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _int8_meta(runtime_file: Path) -> dict[str, Any]:
    """``{"int8_weights": {"static": ..., "bits": ...}}`` for an int8 runtime file, read from it (the model
    card says how it was quantized; ``Predictor`` warns where this CPU would lose its accuracy)."""
    weights = int8_weights(runtime_file) if runtime_file.name.endswith("int8.onnx") else None
    return {} if weights is None else {"int8_weights": asdict(weights)}


class Predictor:
    """Run an export folder: raw inputs in, class names out. The runtime is ONNX Runtime on the
    export's ONNX file, or torch for the torch runtimes (``torch-int8`` dynamic quantization on CPU,
    ``torch-fp16``/``torch-bf16`` on GPU), rebuilt from the safetensors weights.

    ``device`` ("cpu", "auto", "cuda[:N]"): on a CUDA GPU the export runs in torch there, in its own
    fp16/bf16 runtime or else in bf16 rebuilt from the fp32 weights (ONNX Runtime's int8 files and
    torch's dynamic int8 are CPU runtimes); ``runtime_used`` says which.
    """

    def __init__(self, directory: str | Path, *, threads: int | None = None, modalities: Any = None,
                 device: str | None = None) -> None:
        from lepton_automl.accel import resolve_device
        from lepton_automl.plugins import MODALITIES, PluginRegistry

        self.directory = Path(directory)
        self.meta = load_metadata(self.directory)
        registry = modalities or PluginRegistry(MODALITIES)
        self.modality = registry.load(self.meta["modality"])()
        self.members: list[tuple[Predictor, float, float]] = []  # a blend's: (member, weight, temperature)
        if self.meta.get("kind") == BLEND_KIND:
            self.members = [(Predictor(self.directory / m["path"], threads=threads, modalities=registry, device=device),
                             float(m["weight"]), float(m["temperature"])) for m in self.meta["blend"]]
            self.classes = list(self.meta["classes"])
            if any(p.classes != self.classes for p, _, _ in self.members):
                raise ExportError(f"{self.directory}: the blend's members predict other classes than it names")
            self.runtime = BLEND_KIND
            self.runtime_used = "blend of " + ", ".join(p.runtime_used for p, _, _ in self.members)
            self.preprocessing, self.session, self.torch_model = {}, None, None
            return
        self.preprocessing = self.modality.prepare(self.meta["preprocessing"], self.directory)
        self.classes = list(self.meta["classes"])
        self.runtime = self.meta.get("runtime", "onnxruntime")
        self.session = self.torch_model = None
        accel = resolve_device(device or "cpu")
        kind = self.runtime
        if accel.cuda and kind not in ("torch-fp16", "torch-bf16"):
            kind = "torch-bf16"
            logger.info("%s: the %s runtime runs on the CPU; serving its fp32 weights in bf16 on %s instead",
                        self.directory, self.runtime, accel.name())
        self.runtime_used = f"{kind} ({accel.device})" if accel.cuda else self.runtime
        if kind == "onnxruntime":
            weights = self.meta.get("int8_weights")
            if weights and Int8Weights(**weights).saturates_here():
                logger.warning(
                    "%s: its int8 file was quantized with 8-bit weights on a CPU with VNNI; this CPU has no VNNI, "
                    "and its int8 kernels can saturate with such weights and lose accuracy. Re-quantize it here: "
                    "lepton compress %s --data YOUR_DATA --quant int8 (7-bit weights on this CPU)",
                    self.directory, self.directory)
            self.session = ort_session(self.directory / self.meta["runtime_file"], threads=threads, spinning=True)
        else:
            from lepton_automl.export.runtime import to_torch_runtime

            self.torch_model = to_torch_runtime(rebuild_model(self.directory, modalities=registry), kind,
                                                device=accel.device if accel.cuda else None)

    @classmethod
    def load(cls, directory: str | Path, **kwargs: Any) -> Predictor:
        return cls(directory, **kwargs)

    def logits(self, examples: Sequence[Any], *, batch_size: int = 64) -> np.ndarray:
        """(examples, classes), in the order given (batched in the modality's ``batch_order``). A blend's
        are the log of its members' weighted mean probabilities."""
        if self.members:
            probs = sum(weight * softmax(p.logits(examples, batch_size=batch_size) / temperature)
                        for p, weight, temperature in self.members)
            return np.log(np.clip(probs, 1e-30, None)).astype(np.float32)

        def run(ordered: Sequence[Any]) -> tuple[np.ndarray]:
            outs = []
            for start in range(0, len(ordered), batch_size):
                feeds = self.modality.encode(ordered[start : start + batch_size], preprocessing=self.preprocessing)
                if self.session is not None:
                    outs.append(self.session.run(["logits"], feeds)[0])
                else:
                    outs.append(self.torch_model.logits(feeds, self.meta["input_names"]))  # type: ignore[union-attr]
            return (np.concatenate(outs) if outs else np.zeros((0, len(self.classes)), np.float32),)

        return in_batch_order(self.modality, examples, run)[0]

    def predict(self, items: Sequence[Any]) -> list[str]:
        """Class names for what a user passes (files, folders, texts, a table of texts)."""
        return self.predict_examples(self.modality.read_inputs(list(items)))

    def predict_examples(self, examples: Sequence[Any]) -> list[str]:
        return [self.classes[i] for i in self.logits(examples).argmax(1)]
