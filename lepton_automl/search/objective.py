"""One trial: configuration -> trained model -> exported, compressed artifact -> measured objectives.

Every number a trial reports is measured on the artifact it would ship: accuracy by running the
(possibly quantized) ONNX file on the validation split with ONNX Runtime, latency by timing that
file at batch 1, cost from the measured seconds and latency.
"""

from __future__ import annotations

import gzip
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lepton_automl.backbones import BackboneRegistry
from lepton_automl.compression.pruning import prune_structured, prune_transformer, prune_unstructured, zero_fraction
from lepton_automl.compression.quantization import quantize_onnx
from lepton_automl.compression.recovery import RECOVERY_LR, recover, torch_accuracy
from lepton_automl.cost.hardware import CostModel
from lepton_automl.cost.latency import TimingPlan, batch_of, measure_onnx_latency
from lepton_automl.cost.macs import count_macs
from lepton_automl.data.dataset import LabelledData, Splits
from lepton_automl.export.artifact import save_artifact
from lepton_automl.export.onnx import export_onnx
from lepton_automl.interfaces import Modality, TrialResult
from lepton_automl.exceptions import LeptonError
from lepton_automl.log import get_logger
from lepton_automl.search.early_stopping import EarlyStopping, StopCheck, TrialStopped, points_from_study
from lepton_automl.search.space import SearchSpace, suggest
from lepton_automl.training.cache import FeatureCache, cache_key
from lepton_automl.export.trunk import run_trunk_fast
from lepton_automl.sessions import ort_session
from lepton_automl.export.trunk import Progress
from lepton_automl.interfaces import ExportModel
from lepton_automl.training.trainer import (
    TrainConfig,
    cross_validated_probe_accuracy,
    fold_standardize,
    inverse_frequency_weights,
    tail_features,
    train_probe,
    train_tail,
)

logger = get_logger(__name__)

CALIBRATION_EXAMPLES = 64


class TrialTimeout(LeptonError):
    """A trial ran past the per-trial time limit."""


@dataclass(frozen=True)
class _Deadline:
    start: float
    limit: float | None
    search_ends_at: float | None = None  # time.perf_counter() value after which no trial may go on

    def check(self, stage: str) -> None:
        now = time.perf_counter()
        if self.limit is not None and now - self.start > self.limit:
            raise TrialTimeout(f"trial passed the per-trial limit of {self.limit:.0f} s during {stage} "
                               "(raise --trial-timeout, or narrow the space)")
        if self.search_ends_at is not None and now > self.search_ends_at:
            raise TrialTimeout(f"the search's --timeout ran out during {stage}; the trial was stopped")


@dataclass(frozen=True)
class Limits:
    """Hard limits; a trial over any of them is infeasible and never enters the front.

    ``max_size_mb`` applies to the gzip-compressed runtime file (what is shipped): that is where
    unstructured pruning pays off, since dense kernels gain nothing from zeros.
    """

    max_latency_ms: float | None = None
    max_size_mb: float | None = None
    max_cost_usd: float | None = None
    max_params_m: float | None = None
    min_accuracy: float | None = None

    def constraints(self, result: TrialResult) -> dict[str, float]:
        """Optuna constraint values: <= 0 is feasible."""
        out = {}
        if self.min_accuracy is not None:
            out["min_accuracy"] = float(self.min_accuracy - result.accuracy)
        pairs = {
            "latency_ms": (result.latency_ms, self.max_latency_ms),
            "size_mb": (result.size_mb, self.max_size_mb),
            "cost_usd": (result.cost_usd, self.max_cost_usd),
            "params_m": (result.params_m, self.max_params_m),
        }
        out.update({k: float(v - lim) for k, (v, lim) in pairs.items() if lim is not None and v is not None})
        return out


def usefulness_floor(labels: np.ndarray) -> float:
    """The least accuracy a recommendable model needs: a tenth of the way from always predicting the
    most common class to perfect. A pruned model that collapsed to guessing is fast, cheap and
    therefore Pareto-optimal, but useless; this keeps it off the front."""
    majority = float(np.bincount(labels).max() / max(1, len(labels)))
    return majority + 0.1 * (1.0 - majority)


@torch.no_grad()
def _torch_accuracy(head: torch.nn.Module, features: np.ndarray, labels: np.ndarray) -> float:
    return float((head(torch.from_numpy(np.array(features, dtype=np.float32))).argmax(1).numpy() == labels).mean())


def onnx_accuracy(path: Path, modality: Modality, data: LabelledData, preprocessing: Mapping[str, Any]) -> float:
    session = ort_session(path)
    correct = 0
    for start in range(0, len(data), 64):
        feeds = modality.encode(data.examples[start : start + 64], preprocessing=preprocessing)
        logits = session.run(["logits"], feeds)[0]
        if not np.all(np.isfinite(logits)):
            raise FloatingPointError("the exported model produced NaN/inf logits")
        correct += int((logits.argmax(1) == data.labels[start : start + 64]).sum())
    del session
    return correct / max(1, len(data))


@dataclass
class TrialRunner:
    """Callable objective for ``study.optimize``; holds the state shared by all trials of a search."""

    modality: Modality
    registry: BackboneRegistry
    splits: Splits
    space: SearchSpace
    cache: FeatureCache
    cost: CostModel
    run_dir: Path
    limits: Limits = field(default_factory=Limits)
    seed: int = 0
    pretrained: bool = True
    threads: int | None = None
    trial_timeout: float | None = None
    search_ends_at: float | None = None
    class_weights: bool = False
    early_stopping: EarlyStopping | None = None
    serving_batch: int = 32
    progress: Progress | None = None

    def __call__(self, trial: Any) -> tuple[float, float, float]:
        import optuna

        params = suggest(trial, self.space, self.modality, self.registry)
        stop = None if self.early_stopping is None else StopCheck(
            rule=self.early_stopping, points=lambda: points_from_study(trial.study),
            backbone=str(params["backbone"]), quant=str(params.get("quant__mode", "none")))
        try:
            result = self.evaluate(params, trial_dir=self.run_dir / f"trial-{trial.number:04d}",
                                   seed=self.seed + trial.number, stop=stop)
        except TrialStopped as exc:
            trial.set_user_attr("early_stop_reason", str(exc))
            trial.set_user_attr("curve", stop.curve if stop else [])
            logger.info("trial %d stopped early: %s", trial.number, exc)
            raise optuna.TrialPruned(str(exc)) from None
        except Exception as exc:
            trial.set_user_attr("fail_reason", f"{type(exc).__name__}: {exc}"[:500])
            raise
        if stop is not None:
            trial.set_user_attr("curve", stop.curve)
            if stop.would_stop is not None:
                trial.set_user_attr("early_stop_would_stop_s", stop.would_stop[0])
                trial.set_user_attr("early_stop_reason", stop.would_stop[1])
        for key, value in self.limits.constraints(result).items():
            trial.set_constraint(key, value)
        trial.set_constraint("above_chance", usefulness_floor(self.splits.train.labels) - result.accuracy)
        for key in ("test_accuracy", "latency_p90_ms", "size_mb", "params_m", "train_seconds", "artifact"):
            trial.set_user_attr(key, getattr(result, key))
        for key, value in result.extra.items():
            trial.set_user_attr(key, value)
        return result.values

    # -- one configuration, end to end ------------------------------------------------------
    def evaluate(self, params: Mapping[str, Any], *, trial_dir: Path, seed: int,
                 stop: StopCheck | None = None) -> TrialResult:
        start = time.perf_counter()
        deadline = _Deadline(start, self.trial_timeout, self.search_ends_at)
        card = self.registry.get(params["backbone"])
        blocks = int(params.get("train__blocks", 0)) if params.get("train__mode") == "finetune" else 0
        parts = self.modality.build(card, self.registry, params=params, finetune_blocks=blocks,
                                    pretrained=self.pretrained)
        prep = self.modality.preprocessing(card, self.registry, params=params)
        latency_input = self.latency_example(prep, seed)  # latency, MACs and early stopping's estimate
        layer_pruning = ({k: params[k] for k in ("prune__method", "prune__amount") if k in params}
                         if self.modality.structured_pruning == "layers" and
                         params.get("prune__method") == "structured" and
                         params.get("prune__target", "layers") == "layers" else {})
        key = cache_key({
            "ref": card.ref, "weights": card.weights, "build": dict(card.build_kwargs),
            "pretrained": self.pretrained, "prep": prep, "blocks": blocks, "pruning": layer_pruning,
            "data": self.splits.fingerprint(), "modality": self.modality.name,
        })
        cached = self.cache.get(key)
        if cached is None:
            t0 = time.perf_counter()
            arrays = {
                split: run_trunk_fast(parts.trunk, self.modality, getattr(self.splits, split).examples,
                                 preprocessing=prep, progress=self.progress, desc=f"{card.name} {split}")
                for split in ("train", "validation", "test")
            }
            cached = self.cache.put(key, arrays, seconds=time.perf_counter() - t0,
                                    label=f"{card.name} {prep} blocks={blocks}")
        deadline.check("feature extraction")
        own_start = time.perf_counter()
        train_inputs = cached.arrays["train"]
        labels = self.splits.train.labels
        weights = inverse_frequency_weights(labels, len(self.splits.classes)) if self.class_weights else None
        cfg = TrainConfig(lr=float(params.get("optim__lr", 1e-3)),
                          weight_decay=float(params["optim__weight_decay"]), seed=seed, class_weights=weights)
        num_classes = len(self.splits.classes)
        if blocks == 0:
            head = train_probe(np.asarray(train_inputs[0]), labels, num_classes, cfg)
        else:
            feats = tail_features(parts.tail, train_inputs)
            head = train_probe(feats, labels, num_classes, cfg)
            ft = TrainConfig(lr=cfg.lr, weight_decay=cfg.weight_decay, epochs=int(params["train__epochs"]),
                             seed=seed, class_weights=weights)
            judge = self._fine_tune_judge(stop, params, parts, head, cached.arrays["validation"], latency_input)
            judge(0, head)
            train_tail(parts.tail, head, train_inputs, labels, ft,
                       should_stop=lambda epoch, h: deadline.check(f"fine-tuning epoch {epoch}") or judge(epoch, h))
        deadline.check("training")
        model = ExportModel(parts.trunk, parts.tail, head).eval()
        zeros, pruned = self._prune(model, params, prep, cfg, seed=seed, deadline=deadline, stop=stop,
                                    latency_input=latency_input)
        params = {**params, **pruned}  # what a rebuild of the architecture needs (removed heads)

        trial_dir.mkdir(parents=True, exist_ok=True)
        example = self.modality.encode(self.splits.train.examples[:1], preprocessing=prep)
        fp32 = export_onnx(model, example, trial_dir / "model.onnx",
                           input_names=self.modality.input_names(), dynamic_axes=self.modality.dynamic_axes())
        runtime = fp32
        if params.get("quant__mode", "none") != "none":
            calib = [self.modality.encode([e], preprocessing=prep)
                     for e in self._calibration_examples(seed)]
            runtime = quantize_onnx(fp32, trial_dir / "model.int8.onnx", mode=str(params["quant__mode"]),
                                    calibration=calib)
        deadline.check("export and quantization")
        prune = params.get("prune__method", "none")
        if params.get("quant__mode", "none") == "none" and (prune == "none" or layer_pruning):
            # The artifact is the trained fp32 model: score it on the cached trunk outputs (no second
            # pass over the data), after checking on real inputs that the file computes the same.
            holdout, test_accuracy = (
                _torch_accuracy(model.head, self._head_inputs(model, cached.arrays[split], blocks),
                                getattr(self.splits, split).labels)
                for split in ("validation", "test"))
            self._verify_artifact(runtime, model, cached.arrays["validation"], blocks, prep)
        else:
            holdout = onnx_accuracy(runtime, self.modality, self.splits.validation, prep)
            test_accuracy = onnx_accuracy(runtime, self.modality, self.splits.test, prep)
        accuracy = holdout
        cv = None
        if blocks == 0 and (prune == "none" or layer_pruning):
            # A probe on cached features: judge it by 5-fold cross-validation over train+validation,
            # then subtract what compression cost on the held-out split (measured, artifact vs fp32).
            pooled = np.concatenate([np.asarray(train_inputs[0]), np.asarray(cached.arrays["validation"][0])])
            pooled_labels = np.concatenate([labels, self.splits.validation.labels])
            cv = cross_validated_probe_accuracy(pooled, pooled_labels, num_classes, cfg)
            fp32_holdout = _torch_accuracy(head, np.asarray(cached.arrays["validation"][0]),
                                           self.splits.validation.labels)
            accuracy = cv + (holdout - fp32_holdout)
        latency = measure_onnx_latency(runtime, latency_input, threads=self.threads)
        # Throughput at the serving batch size prices inference (cost per prediction); the latency
        # objective stays batch 1, what one request waits.
        served = latency if self.serving_batch <= 1 else measure_onnx_latency(
            runtime, batch_of(latency_input, self.serving_batch), threads=self.threads,
            plan=TimingPlan(warmup=2, round_runs=5, max_seconds=2.0))
        gmacs = count_macs(model, latency_input, self.modality.input_names()) / 1e9
        train_seconds = cached.seconds + (time.perf_counter() - own_start)
        cost = self.cost.total_usd(train_seconds=train_seconds, latency_ms=1000.0 / served.throughput_per_s)
        params_m = sum(p.numel() for p in model.parameters()) / 1e6
        size_mb = Path(runtime).stat().st_size / 2**20
        size_gz_mb = len(gzip.compress(Path(runtime).read_bytes(), compresslevel=6)) / 2**20
        if not math.isfinite(accuracy):
            raise FloatingPointError("accuracy is not finite")
        metrics = {
            "accuracy": accuracy, "holdout_accuracy": holdout, "cv_accuracy": cv, "test_accuracy": test_accuracy, "latency_ms": latency.median_ms,
            "latency_p90_ms": latency.p90_ms, "latency_runs": latency.runs, "latency_threads": latency.threads,
            "latency_device": latency.device, "serving_batch": served.batch_size,
            "latency_serving_batch_ms": served.median_ms, "throughput_per_s": served.throughput_per_s,
            "cost_usd": cost, "train_seconds": train_seconds,
            "size_mb": size_mb, "size_gz_mb": size_gz_mb, "params_m": params_m, "gmacs": gmacs,
            "weight_zero_fraction": zeros,
        }
        save_artifact(trial_dir, model=model, fp32_onnx=fp32, runtime_onnx=runtime, modality=self.modality,
                      card=card, params=params, classes=self.splits.classes, preprocessing=prep,
                      finetune_blocks=blocks, metrics=metrics, name=f"{self.splits.train.name} classifier")
        logger.info(
            "%s %s %s prune=%s quant=%s: val acc %.4f, %.3f ms, $%.5f (%.1fs%s)",
            card.name, {k: v for k, v in params.items() if k.startswith("data__")}, params["train__mode"],
            prune if prune == "none" else f"{prune}:{float(params['prune__amount']):.2f}",
            params.get("quant__mode"), accuracy, latency.median_ms, cost, time.perf_counter() - start,
            ", features cached" if cached.hit else "",
        )
        return TrialResult(
            accuracy=accuracy, latency_ms=latency.median_ms, cost_usd=cost, test_accuracy=test_accuracy,
            latency_p90_ms=latency.p90_ms, size_mb=size_gz_mb, params_m=params_m, train_seconds=train_seconds,
            artifact=str(trial_dir), extra={"cache_hit": cached.hit, "latency_runs": latency.runs,
                                            "latency_threads": latency.threads, "gmacs": gmacs,
                                            "serving_batch": served.batch_size,
                                            "latency_serving_batch_ms": served.median_ms,
                                            "throughput_per_s": served.throughput_per_s,
                                            "size_raw_mb": size_mb, "weight_zero_fraction": zeros,
                                            "holdout_accuracy": holdout, "cv_accuracy": cv},
        )

    @staticmethod
    def _head_inputs(model: ExportModel, trunk_outputs: tuple[np.ndarray, ...], blocks: int) -> np.ndarray:
        return np.asarray(trunk_outputs[0]) if blocks == 0 else tail_features(model.tail, trunk_outputs)

    def _verify_artifact(self, runtime: Path, model: ExportModel, trunk_outputs: tuple[np.ndarray, ...],
                         blocks: int, prep: Mapping[str, Any], n: int = 64) -> None:
        """The exported file must predict what the scored model predicts, on real inputs."""
        from lepton_automl.exceptions import ExportError

        data = self.splits.validation
        n = min(n, len(data))
        session = ort_session(runtime)
        file_pred = session.run(["logits"], self.modality.encode(data.examples[:n], preprocessing=prep))[0].argmax(1)
        with torch.no_grad():
            feats = self._head_inputs(model, tuple(np.asarray(a[:n]) for a in trunk_outputs), blocks)
            scored_pred = model.head(torch.from_numpy(np.array(feats, dtype=np.float32))).argmax(1).numpy()
        agree = float((file_pred == scored_pred).mean())
        if agree < 0.95:
            raise ExportError(f"the exported model agrees with the trained model on only {agree:.0%} of "
                              f"{n} validation examples; report this with the trial's parameters")

    def _fine_tune_judge(self, stop: StopCheck | None, params: Mapping[str, Any], parts: Any,
                         head: torch.nn.Module, validation: tuple[np.ndarray, ...],
                         example: Mapping[str, np.ndarray]) -> Callable[[int, torch.nn.Module], bool]:
        """Early stopping during fine-tuning: validation accuracy of tail + head on cached trunk
        outputs after each epoch (epoch 0: the probe the head starts from)."""
        if stop is None:
            return lambda epoch, h: False
        epochs = int(params["train__epochs"])
        later = int(params.get("prune__recovery_epochs", 0)) if params.get("prune__method") == "structured" else 0
        # MACs left after the pruning still to come, at best: channels cut both sides of a conv,
        # heads and MLP width cut one side of each projection.
        keep = 1.0 - float(params.get("prune__amount", 0.0))
        ratio = (keep**2 if self.modality.structured_pruning == "channels" else keep) if later else 1.0
        gmacs = count_macs(ExportModel(parts.trunk, parts.tail, head), example, self.modality.input_names()) / 1e9

        def judge(epoch: int, h: torch.nn.Module) -> bool:
            was_training = h.training
            accuracy = _torch_accuracy(h.eval(), tail_features(parts.tail, validation), self.splits.validation.labels)
            h.train(was_training)
            stop(stage="fine-tuning", epoch=epoch, epochs_left=epochs - epoch + later, accuracy=accuracy,
                 gmacs=gmacs, macs_ratio=ratio)
            return False

        return judge

    def _prune(self, model: ExportModel, params: Mapping[str, Any], prep: Mapping[str, Any], cfg: TrainConfig,
               *, seed: int, deadline: _Deadline, stop: StopCheck | None = None,
               latency_input: Mapping[str, np.ndarray] | None = None) -> tuple[float, dict[str, Any]]:
        """Apply the trial's pruning to ``model`` in place; return the fraction of zero weights and
        the parameters a rebuild of the pruned architecture needs."""
        method = params.get("prune__method", "none")
        head = [m for m in model.head.modules() if isinstance(m, torch.nn.Linear)][-1:]
        if method == "structured" and self.modality.structured_pruning == "channels":
            fold_standardize(model.head)
            example = self.modality.encode(self.splits.train.examples[:1], preprocessing=prep)
            prune_structured(model, example, amount=float(params["prune__amount"]), ignored=head)
            deadline.check("pruning")
            self._recover(model, prep, epochs=int(params["prune__recovery_epochs"]), seed=seed, deadline=deadline,
                          stop=stop, latency_input=latency_input)
        elif method == "structured" and params.get("prune__target") == "width":
            _, heads = prune_transformer(model, amount=float(params["prune__amount"]))
            deadline.check("pruning")
            self._recover(model, prep, epochs=int(params["prune__recovery_epochs"]), seed=seed, deadline=deadline,
                          stop=stop, latency_input=latency_input)
            return zero_fraction(model), {"prune__heads": heads}
        elif method == "unstructured":
            prune_unstructured(model, amount=float(params["prune__amount"]), ignored=head)
            zeros = zero_fraction(model)
            # The head was fit to the unpruned features; refit it to the pruned network's. Measured on
            # digits (efficientnet_lite0, 96 px, 50% of weights zeroed): 0.128 validation accuracy
            # with the old head, 0.955 with a refit one, for about 5 s of extraction.
            outs = run_trunk_fast(model.trunk, self.modality, self.splits.train.examples, preprocessing=prep)
            model.head = train_probe(tail_features(model.tail, outs), self.splits.train.labels,
                                     len(self.splits.classes), cfg)
            deadline.check("refitting the head after pruning")
            return zeros, {}
        return zero_fraction(model), {}

    def _recover(self, model: ExportModel, prep: Mapping[str, Any], *, epochs: int, seed: int,
                 deadline: _Deadline, stop: StopCheck | None = None,
                 latency_input: Mapping[str, np.ndarray] | None = None) -> None:
        """Recovery after structured pruning, with deadline checks per batch and early stopping per epoch."""
        gmacs = None
        if stop is not None:
            example = latency_input if latency_input is not None else self.latency_example(prep, seed)
            gmacs = count_macs(model, example, self.modality.input_names()) / 1e9

        def judge(epoch: int) -> None:
            if stop is not None and gmacs is not None:
                stop(stage="pruning recovery", epoch=epoch, epochs_left=epochs - epoch, gmacs=gmacs,
                     accuracy=torch_accuracy(model, self.modality, self.splits.validation, prep))

        recover(model, self.modality, self.splits.train, prep, epochs=epochs, seed=seed,
                lr=RECOVERY_LR[self.modality.structured_pruning],
                after_batch=lambda epoch: deadline.check(f"pruning recovery epoch {epoch}"), after_epoch=judge)

    def latency_example(self, prep: Mapping[str, Any], seed: int) -> dict[str, np.ndarray]:
        """A batch-1 input as long as the 98th-percentile example: of 64 random training examples,
        the one whose encoding is largest (text length; images are all the same size)."""
        rng = np.random.default_rng(seed)
        n = min(64, len(self.splits.train))
        idx = rng.choice(len(self.splits.train), size=n, replace=False)
        encoded = [self.modality.encode([self.splits.train.examples[i]], preprocessing=prep) for i in idx]
        return max(encoded, key=lambda e: sum(v.size for v in e.values()))

    def _calibration_examples(self, seed: int) -> list[Any]:
        rng = np.random.default_rng(seed)
        n = min(CALIBRATION_EXAMPLES, len(self.splits.train))
        idx = rng.choice(len(self.splits.train), size=n, replace=False)
        return [self.splits.train.examples[i] for i in idx]
