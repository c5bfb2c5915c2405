"""The simple facade, for people who want one model, not a search.

    model = Lepton(build_fn="efficientnet_lite0", input_shape=(32, 32, 3), num_classes=10)
    model.fit(x_train, y_train, epochs=3, batch_size=64)
    loss, acc = model.evaluate(x_test, y_test)
    report = model.compress(prune=0.3, quant="int8")   # measured before and after
    model.save("lepton_model")                          # safetensors + ONNX + model card
    same = Lepton.load("lepton_model")

It is built from the same parts as the search: the image modality's preprocessing, the registry's
backbones, the pruning and quantization of ``lepton_automl.compression``, ONNX export and measured
latency. A saved facade model is a regular Lepton export: ``lepton predict`` runs it.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lepton_automl.accel import resolve_device
from lepton_automl.backbones import BackboneCard, BackboneRegistry
from lepton_automl.compression.pipeline import compress_model
from lepton_automl.compression.pruning import PruneReport
from lepton_automl.cost.measurement import Measurement, measure_artifact
from lepton_automl.data.dataset import LabelledData
from lepton_automl.exceptions import ConfigError
from lepton_automl.export.artifact import fit_to_state_dict, load_metadata, save_artifact
from lepton_automl.export.onnx import export_onnx
from lepton_automl.log import get_logger
from lepton_automl.names import safe_name
from lepton_automl.plugins import MODALITIES, PluginRegistry
from lepton_automl.sessions import ort_session
from lepton_automl.interfaces import ExportModel, TupleOut
from lepton_automl.training.finetune import FineTuneConfig, fine_tune
from lepton_automl.training.trainer import TrainingDiverged

logger = get_logger(__name__)


@dataclass(frozen=True)
class CompressionReport:
    before: Measurement
    after: Measurement
    prune: PruneReport | None
    quant: str

    def __str__(self) -> str:
        rows = [("", "before", "after")]
        for label, key, spec in (("accuracy", "accuracy", ".4f"), ("latency ms (batch 1)", "latency_ms", ".3f"),
                                 ("file MB", "size_mb", ".2f"), ("params M", "params_m", ".3f")):
            b, a = getattr(self.before, key), getattr(self.after, key)
            rows.append((label, "-" if b is None else format(b, spec), "-" if a is None else format(a, spec)))
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"{r[0]:<{width}}  {r[1]:>10}  {r[2]:>10}" for r in rows)


def _call_build_fn(build_fn: Any, *, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Call a user's ``build_fn`` with what it accepts: an ``nn.Module`` instance is used as is; a
    callable gets ``num_classes`` and ``input_shape`` if its signature names them (or takes
    ``**kwargs``), so ``torchvision.models.resnet18`` and ``def SmallCNN(num_classes=10)`` both work."""
    import inspect

    if isinstance(build_fn, nn.Module):
        return build_fn
    if not callable(build_fn):
        raise ConfigError(f"build_fn must be a registry name, a callable returning an nn.Module, or an "
                          f"nn.Module; got {type(build_fn).__name__}.")
    offered = {"num_classes": num_classes, "input_shape": tuple(input_shape)}
    try:
        params = inspect.signature(build_fn).parameters
    except (TypeError, ValueError):  # builtins without a signature: offer everything
        params = {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kwargs = offered
    else:
        kwargs = {k: v for k, v in offered.items() if k in params}
    required = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in kwargs
                and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    name = getattr(build_fn, "__name__", "build_fn")
    if required:
        raise ConfigError(f"build_fn {name}() requires {', '.join(map(repr, required))}, which the facade cannot "
                          "supply; it passes only num_classes and input_shape. Wrap it: "
                          f"build_fn=lambda num_classes: {name}(..., num_classes=num_classes).")
    model = build_fn(**kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"build_fn {name}() returned {type(model).__name__}, not a torch nn.Module.")
    return model


def _as_uint8_images(x: np.ndarray) -> list[np.ndarray]:
    x = np.asarray(x)
    if x.ndim not in (3, 4):
        raise ConfigError(f"Expected images shaped (N, H, W) or (N, H, W, C), got {x.shape}.")
    if x.dtype != np.uint8:
        top = float(x.max()) if x.size else 1.0
        x = np.clip(x * (255.0 if top <= 1.0 else 255.0 / top), 0, 255).astype(np.uint8)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    return list(x)


class Lepton:
    """One image classifier: ``fit``, ``evaluate``, ``predict``, ``compress``, ``save``, ``load``."""

    def __init__(
        self,
        build_fn: str | Callable[..., nn.Module] = "efficientnet_lite0",
        input_shape: tuple[int, int, int] = (224, 224, 3),
        num_classes: int | None = None,
        *,
        pretrained: bool = True,
        seed: int = 0,
        registry: BackboneRegistry | None = None,
        verbose: bool = True,
        device: str = "cpu",
    ) -> None:
        if len(input_shape) != 3:
            raise ConfigError(f"input_shape is (height, width, channels), got {input_shape}.")
        self.build_fn = build_fn
        self.input_shape = tuple(int(v) for v in input_shape)
        self.num_classes = num_classes
        self.pretrained = pretrained
        self.seed = seed
        self.verbose = verbose
        self._accel = resolve_device(device)  # where fit() trains: "cpu", "auto", "cuda[:N]"
        self._registry = registry or BackboneRegistry()
        self._modality = PluginRegistry(MODALITIES).load("image")()
        self._generator = torch.Generator().manual_seed(seed)
        self.model: ExportModel | None = None
        self._card: BackboneCard | None = None
        self._prep: dict[str, Any] = {}
        self._runtime: Path | None = None  # the ONNX file predictions use once compressed
        self._workdir = tempfile.TemporaryDirectory(prefix="lepton-facade-")
        self._train: tuple[np.ndarray, np.ndarray] | None = None
        self._val: tuple[np.ndarray, np.ndarray] | None = None
        self._compression: dict[str, Any] = {"prune__amount": 0.0, "quant__mode": "none"}

    # -- building --------------------------------------------------------------------------
    def _build(self, num_classes: int) -> ExportModel:
        h, w, _ = self.input_shape
        if isinstance(self.build_fn, str):
            card = self._registry.get(self.build_fn)
            if card.modality != "image":
                raise ConfigError(f"Backbone {card.name!r} is a {card.modality} backbone; the facade takes images.")
            params = {"data__image_size": [h, w]}
            parts = self._modality.build(card, self._registry, params=params, pretrained=self.pretrained)
            head = nn.Linear(parts.feature_dim, num_classes)
            with torch.no_grad():
                bound = 1.0 / np.sqrt(parts.feature_dim)
                head.weight.uniform_(-bound, bound, generator=self._generator)
                head.bias.zero_()
            self._card = card
            self._prep = self._modality.preprocessing(card, self._registry, params=params)
            return ExportModel(parts.trunk, parts.tail, head)
        model = _call_build_fn(self.build_fn, input_shape=self.input_shape, num_classes=num_classes)
        name = safe_name(getattr(self.build_fn, "__name__", type(self.build_fn).__name__), default="build-fn")
        self._card = BackboneCard(name=name, ref=f"build-fn:{name}", modality="image")
        self._prep = {"image_size": [h, w], "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0],
                      "interpolation": "bicubic"}
        return ExportModel(TupleOut(model), nn.Identity(), nn.Identity())

    def _inputs(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self._modality.encode(_as_uint8_images(x), preprocessing=self._prep)["pixel_values"])

    def _require_model(self) -> ExportModel:
        if self.model is None:
            raise ConfigError("The model is not trained yet. Call fit(x, y) first, or Lepton.load(path).")
        return self.model

    # -- training --------------------------------------------------------------------------
    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int = 3,
        batch_size: int = 64,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        validation_split: float = 0.1,
    ) -> Lepton:
        """Fine-tune the whole network on numpy images ``x`` (N, H, W[, C]) and integer labels ``y``."""
        y = np.asarray(y, dtype=np.int64)
        if len(x) != len(y):
            raise ConfigError(f"x has {len(x)} images but y has {len(y)} labels.")
        num_classes = self.num_classes or int(y.max()) + 1
        if y.min() < 0 or y.max() >= num_classes:
            raise ConfigError(f"Labels must be integers in [0, {num_classes}); got {y.min()}..{y.max()}.")
        self.num_classes = num_classes
        order = torch.randperm(len(y), generator=self._generator).numpy()
        n_val = int(round(len(y) * validation_split))
        val_idx, train_idx = order[:n_val], order[n_val:]
        self._train = (np.asarray(x)[train_idx], y[train_idx])
        self._val = (np.asarray(x)[val_idx], y[val_idx]) if n_val else None
        if self.model is None:
            self.model = self._build(num_classes)
        self._train_epochs(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay)
        # New weights: an earlier compress() no longer describes this model.
        self._runtime = None
        self._compression = {"prune__amount": 0.0, "quant__mode": "none"}
        return self

    def _train_epochs(self, *, epochs: int, batch_size: int, lr: float, weight_decay: float) -> None:
        """Every layer, by the search's one training loop (``training.finetune.fine_tune``) at a constant
        rate after a short warm-up, batch-norm statistics re-estimated; with a validation split the
        best epoch is kept."""
        from rich.progress import Progress

        model = self._require_model()
        train = self._labelled(self._train)  # type: ignore[arg-type]
        validation = self._labelled(self._val) if self._val is not None and len(self._val[1]) else None
        cfg = FineTuneConfig(epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
                             schedule="constant", label_smoothing=0.0, freeze_batchnorm=False,
                             seed=int(torch.randint(0, 2**31 - 1, (1,), generator=self._generator)))
        with Progress(disable=not self.verbose, transient=True) as progress:
            task = progress.add_task("fit", total=None)

            def shown(what: str, done: int, total: int) -> None:
                progress.update(task, completed=done, total=total, description=what)

            try:
                log = fine_tune(model, self._modality, train, self._prep, cfg, validation=validation,
                                progress=shown, accel=self._accel)
            except TrainingDiverged as exc:
                where = str(exc).split(";")[0]
                raise ConfigError(f"Training diverged ({where}); lower lr (now {lr}).") from None
        if log.curve:
            logger.info("validation accuracy by epoch: %s (kept epoch %d)",
                        ", ".join(f"{a:.4f}" for a in log.curve), log.best_epoch)

    def _labelled(self, split: tuple[np.ndarray, np.ndarray]) -> LabelledData:
        x, y = split
        return LabelledData(examples=_as_uint8_images(x), labels=np.array(y),  # a copy: it is made read-only
                            classes=tuple(str(c) for c in range(int(self.num_classes or 0))))

    # -- inference -------------------------------------------------------------------------
    def _logits(self, x: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
        model = self._require_model()
        outs = []
        session = None
        if self._runtime is not None:
            session = ort_session(self._runtime)
        for start in range(0, len(x), batch_size):
            inputs = self._inputs(x[start : start + batch_size])
            if session is not None:
                outs.append(session.run(["logits"], {"pixel_values": inputs.numpy()})[0])
            else:
                with torch.no_grad():
                    outs.append(model.eval()(inputs).numpy())
        return np.concatenate(outs)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        logits = torch.from_numpy(self._logits(x))
        return logits.softmax(-1).numpy()

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self._logits(x).argmax(1)

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """(mean cross-entropy, accuracy) on ``x``, ``y``."""
        logits = torch.from_numpy(self._logits(x))
        target = torch.as_tensor(np.asarray(y, dtype=np.int64))
        loss = float(nn.functional.cross_entropy(logits, target))
        return loss, float((logits.argmax(1) == target).float().mean())

    # -- compression -----------------------------------------------------------------------
    def _export(self, path: Path) -> Path:
        example = {"pixel_values": self._inputs(self._train[0][:1] if self._train else
                                                np.zeros((1, *self.input_shape), np.uint8)).numpy()}
        return export_onnx(self._require_model(), example, path, input_names=("pixel_values",),
                           dynamic_axes={"pixel_values": {0: "batch"}})

    def _measure(self, onnx_path: Path) -> Measurement:
        """``cost.measurement``'s measurement of the ONNX file, with validation accuracy when there is a split."""
        example = {"pixel_values": self._inputs(np.zeros((1, *self.input_shape), np.uint8)).numpy()}
        measured = measure_artifact(onnx_path, example, model=self._require_model(), input_names=("pixel_values",))
        accuracy = None
        if self._val is not None and len(self._val[1]):
            previous, self._runtime = self._runtime, onnx_path
            try:
                accuracy = self.evaluate(*self._val)[1]
            finally:
                self._runtime = previous
        return dataclasses.replace(measured, accuracy=accuracy)

    def compress(self, prune: float = 0.0, quant: str = "none", *, recovery_epochs: int = 3,
                 recovery_lr: float = 1e-3) -> CompressionReport:
        """Prune channels (then a short recovery fine-tune) and/or quantize; measured before and after.
        The steps are ``lepton compress``'s (``compression.pipeline.compress_model``)."""
        model = self._require_model()
        if quant not in ("none", "int8"):
            raise ConfigError(f"Unknown quant {quant!r}. Use 'none' or 'int8'.")
        if prune and self._train is None:
            raise ConfigError("Pruning needs the training data for recovery: call fit(x, y) first.")
        work = Path(tempfile.mkdtemp(prefix="compress-", dir=self._workdir.name))
        before = self._measure(self._export(work / "before.onnx"))
        # Without training data (a reloaded model), int8 is calibrated on blank images.
        train = self._labelled(self._train if self._train is not None else
                               (np.zeros((8, *self.input_shape), np.uint8), np.zeros(8, np.int64)))
        example = {"pixel_values": self._inputs(np.asarray(train.examples[0])[None]).numpy()}
        done = compress_model(model, modality=self._modality, preprocessing=self._prep, train=train, example=example,
                              prune=float(prune), quant=quant, folder=work, recovery_epochs=recovery_epochs,
                              recovery_lr=recovery_lr, seed=self.seed, accel=self._accel)
        self._runtime = done.runtime_onnx if quant != "none" else None
        self._compression = {"prune__amount": float(prune), "quant__mode": quant}
        after = self._measure(done.runtime_onnx)
        report = CompressionReport(before, after, done.pruning, quant)
        logger.info("compression (prune=%s, quant=%s):\n%s", prune, quant, report)
        return report

    # -- persistence -----------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write safetensors + ONNX (+ int8 ONNX when compressed) + lepton.json + model card."""
        model = self._require_model()
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        fp32 = self._export(out / "model.onnx")
        runtime = self._runtime or fp32
        metrics: dict[str, Any] = {}
        if self._val is not None and len(self._val[1]):
            metrics["accuracy"] = self.evaluate(*self._val)[1]
        params = {
            "build_fn": self.build_fn if isinstance(self.build_fn, str) else getattr(self.build_fn, "__name__", "?"),
            "build_fn_kind": "registry" if isinstance(self.build_fn, str) else "callable",
            "input_shape": list(self.input_shape), "num_classes": self.num_classes, "train__mode": "finetune",
            **self._compression,
        }
        return save_artifact(out, model=model, fp32_onnx=fp32, runtime_onnx=runtime, modality=self._modality,
                             card=self._card, params=params,  # type: ignore[arg-type]
                             classes=[str(i) for i in range(self.num_classes or 0)], preprocessing=self._prep,
                             finetune_blocks=0, metrics=metrics, name="Lepton facade model")

    @classmethod
    def load(cls, path: str | Path, *, build_fn: Callable[..., nn.Module] | None = None,
             registry: BackboneRegistry | None = None) -> Lepton:
        """Rebuild a saved model (pruned layers are resized to the saved shapes)."""
        from safetensors.torch import load_file

        path = Path(path)
        meta = load_metadata(path)
        params = meta["params"]
        if "build_fn" not in params:
            raise ConfigError(f"{str(path)!r} was not saved by the facade; run it with `lepton predict`.")
        fn: str | Callable[..., nn.Module] = build_fn or params["build_fn"]
        if params.get("build_fn_kind") == "callable" and build_fn is None:
            raise ConfigError("This model was built by a callable; pass it again: Lepton.load(path, build_fn=fn).")
        obj = cls(fn, tuple(params["input_shape"]), int(params["num_classes"]), pretrained=False,
                  registry=registry, verbose=False)
        model = obj._build(obj.num_classes)  # type: ignore[arg-type]
        state = load_file(str(path / "model.safetensors"))
        fit_to_state_dict(model, state)
        model.load_state_dict(state, strict=True)
        obj.model = model.eval()
        obj._compression = {k: params.get(k) for k in ("prune__amount", "quant__mode")}
        if meta["runtime_file"] != "model.onnx":
            obj._runtime = path / meta["runtime_file"]
        return obj
