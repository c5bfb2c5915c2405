"""One trial: a typed configuration, then six named steps, then the measured objectives.

``TrialRunner.evaluate`` reads top to bottom:

1. ``_features``: frozen-trunk outputs of every split (cached on disk per trunk and data);
2. ``_train``: partial fine-tuning on cached trunk outputs, or full fine-tuning from a linear probe
   (a trial that only fits a linear probe takes the cheap path of ``search/probe_trial.py`` instead);
3. ``_prune``: structured (then recovery) or unstructured pruning, if the configuration asks;
4. ``_export``: the ONNX file, quantized to int8 if asked: the artifact that would ship;
5. ``_score``: validation and test accuracy of that artifact (a probe is judged by cross-validation
   minus what compression cost it on the validation split; a trained network ranks above the best
   probe only by a lead of one standard error, ``search/lead.py``);
6. ``_measure``: latency (batch 1) and throughput (serving batch) of the artifact, MACs, size, cost.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lepton_automl.accel import CPU, Accelerator
from lepton_automl.backbones import BackboneCard, BackboneRegistry
from lepton_automl.compression.pipeline import export_quantized
from lepton_automl.cost.hardware import CostModel
from lepton_automl.cost.measurement import measure_artifact
from lepton_automl.data.dataset import Splits
from lepton_automl.data.encoded import EncodedExamples
from lepton_automl.exceptions import ConfigError, ExportError
from lepton_automl.export.artifact import save_artifact
from lepton_automl.export.trunk import Progress, run_trunk_splits
from lepton_automl.interfaces import ConcatTrunk, ExportModel, Modality, ModelParts, TrialResult, build_seeded
from lepton_automl.log import get_logger
from lepton_automl.search.budget import EpochPacer
from lepton_automl.search.config import TrialConfig
from lepton_automl.search.early_stopping import EarlyStopping, StopCheck, TrialStopped, points_from_study
from lepton_automl.search.follow_ups import enqueue_member_probes
from lepton_automl.search.blend import PREDICTIONS_ATTR, save_predictions
from lepton_automl.search.lead import Incumbent, judge_lead
from lepton_automl.search.limits import Deadline, Limits, StageClock, TrialTimeout, usefulness_floor
from lepton_automl.search.probe_trial import ProbeTrials
from lepton_automl.search.repeats import skip_repeat
from lepton_automl.search.retired import retirement, run_instead, skip_retired
from lepton_automl.search.training_steps import REFIT_EPOCHS, REFIT_S, HeadRefit, TrainingSteps
from lepton_automl.search.trunks import TrunkStore
from lepton_automl.search.scoring import (
    Scores,
    concat_features,
    head_logits,
    onnx_accuracy,
    onnx_logits,
    onnx_logits_and_head_inputs,
)
from lepton_automl.search.space import SearchSpace, suggest
from lepton_automl.search.workers import SURPLUS_ATTR, WORKER_ATTR, is_surplus, worker_identity
from lepton_automl.sessions import ort_session
from lepton_automl.training.cache import CachedArrays, FeatureCache, cache_key
from lepton_automl.training.trainer import (
    TrainConfig,
    inverse_frequency_weights,
    select_probe,
    tail_features,
    train_tail,
)

__all__ = ["Limits", "TrialRunner", "TrialTimeout", "usefulness_floor", "onnx_accuracy"]

logger = get_logger(__name__)

# Static int8's min-max calibration runs every tensor of the trunk on these examples: 2 s of a 7 s int8
# trunk entry at 224 px with 64. With 32, nine int8 probes on glyphs (lite0-2 at 96/160/224 px) lost
# as much to quantization (2.4 points on average, out of fold) and scored the same on test (0.619).
CALIBRATION_EXAMPLES = 32
# ... and no more of them than hold this many input values (8 examples at 224 px, 15 at 160, 24 at 128,
# all 32 at 96): the calibration pass costs by the value. Calibrated on 16 examples, twelve int8 probes
# at 224 and 128 px (lite0-2 on glyphs and on digits) lost as much to quantization as with 32 (3.0 vs
# 2.7 points out of fold on glyphs, 1.0 vs 1.1 on digits) and scored as well on test (0.615 vs 0.613,
# 0.973 vs 0.970). With 8 instead of 16 (lite0-2 at 224 and 128 px, three draws each, a head fit on the
# fp32 features scoring the int8 ones), glyphs test 0.585 vs 0.583, digits 0.954 vs 0.955; quantizing lite0 at
# 224 px took 0.78 s instead of 1.13.
CALIBRATION_VALUES = 8 * 3 * 224 * 224


def _keep_stop_facts(trial: Any, stop: StopCheck | None) -> None:
    """Early stopping's learning curve and the facts behind a stop (``StopCheck.record``), kept on
    ``trial`` whether it stopped, completed or ran in a dry run."""
    trial.set_user_attr("curve", stop.curve if stop is not None else [])
    for key, value in (stop.record if stop is not None else {}).items():
        trial.set_user_attr(key, value)


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
    train_cost_ratio: float | None = None  # measured on this study's full fine-tuning trials
    n_trials: int | None = None  # the study's total (all workers): a trial past it is not run
    budget_s: float | None = None  # the search's --timeout, for the model card
    accelerator: Accelerator = CPU  # where features are extracted and networks trained (--device)

    def __post_init__(self) -> None:
        # One trunk store per worker process: each removes its own when it finishes, after writing out
        # the front trials that use it, so no worker ever loses a trunk another one still needs.
        self.steps = TrainingSteps(self)
        self._equivalents: dict[tuple[str, tuple[tuple[str, Any], ...]], dict[str, Any]] = {}
        self._latency_examples: dict[str, dict[str, np.ndarray]] = {}
        self.probes = ProbeTrials(self, TrunkStore(self.run_dir / "trunks" / worker_identity().replace(":", "-")))
        # The validation and test examples go through many files (int8 trunks, exported networks):
        # each is decoded once per preprocessing.
        self.encoded = EncodedExamples(self.modality, [*self.splits.validation.examples, *self.splits.test.examples])

    def __call__(self, trial: Any) -> tuple[float, float, float]:
        import optuna

        trial.set_user_attr(WORKER_ATTR, worker_identity())
        if is_surplus(trial, self.n_trials):
            reason = f"the study already has its {self.n_trials} trials"
            trial.set_user_attr(SURPLUS_ATTR, True)
            trial.set_user_attr("early_stop_reason", reason)
            trial.study.stop()
            raise optuna.TrialPruned(reason)
        params = self.equivalent(suggest(trial, self.space, self.modality, self.registry))
        # An option the study retired (search/retired.py) is not run: the draw runs without it
        # (int8: its fp32 twin), or not at all, uncounted (structured pruning).
        retired = retirement(trial.study, params, prune_choices=tuple(self.space.prune__method),
                             quant_choices=tuple(self.space.quant__mode),
                             size_limited=self.limits.max_size_mb is not None)
        if retired is not None and not retired.instead:
            trial.set_user_attr("config", {k: params[k] for k in sorted(params)})
            skip_retired(trial, retired)
        if retired is not None:
            params = run_instead(trial, retired, params)
        # The configuration that runs (suggest may override what the sampler drew: an ensemble is a
        # probe). A probe picks its own regularisation, so samplers often draw a finished
        # configuration again; it would measure the same numbers, so it is not run twice.
        config = {k: params[k] for k in sorted(params)}
        trial.set_user_attr("config", config)
        for other in trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                                    optuna.trial.TrialState.RUNNING)):
            if other.number != trial.number and other.user_attrs.get("config") == config:
                skip_repeat(trial, other.number)  # not run, not counted (search/repeats.py)
        ratios = [t.user_attrs["train_cost_ratio"] for t in trial.study.get_trials(deepcopy=False)
                  if t.user_attrs.get("train_cost_ratio")]
        self.train_cost_ratio = float(np.median(ratios)) if ratios else None
        stop = None if self.early_stopping is None else StopCheck(
            rule=self.early_stopping, points=lambda: points_from_study(trial.study),
            backbone=str(params["backbone"]), quant=str(params.get("quant__mode", "none")),
            floor=usefulness_floor(self.splits.train.labels))
        clock = StageClock(time.perf_counter())
        try:
            result = self.evaluate(params, trial_dir=self.run_dir / f"trial-{trial.number:04d}",
                                   seed=self.seed + trial.number, stop=stop,
                                   search={"study": trial.study.study_name, "trial": trial.number,
                                           "budget_s": self.budget_s, "seed": self.seed}, clock=clock,
                                   incumbent=lambda: Incumbent.from_study(trial.study, self.splits.validation.labels))
        except TrialStopped as exc:
            trial.set_user_attr("stage_seconds", clock.so_far())
            trial.set_user_attr("early_stop_reason", str(exc))
            _keep_stop_facts(trial, stop)
            logger.info("trial %d stopped early: %s", trial.number, exc)
            raise optuna.TrialPruned(str(exc)) from None
        except Exception as exc:
            trial.set_user_attr("stage_seconds", clock.so_far())
            trial.set_user_attr("fail_reason", f"{type(exc).__name__}: {exc}"[:500])
            raise
        if stop is not None:
            _keep_stop_facts(trial, stop)
            if stop.would_stop is not None:
                trial.set_user_attr("early_stop_would_stop_s", stop.would_stop[0])
                trial.set_user_attr("early_stop_reason", stop.would_stop[1])
        for key, value in self.limits.constraints(result).items():
            trial.set_constraint(key, value)
        trial.set_constraint("above_chance", usefulness_floor(self.splits.train.labels) - result.accuracy)
        for key in ("test_accuracy", "latency_p90_ms", "size_mb", "size_gz_mb", "params_m", "train_seconds",
                    "artifact"):
            trial.set_user_attr(key, getattr(result, key))
        for key, value in result.extra.items():
            trial.set_user_attr(key, value)
        if result.logits is not None:
            path = save_predictions(self.run_dir, trial.number, result.logits).resolve()
            trial.set_user_attr(PREDICTIONS_ATTR, str(path))
        enqueue_member_probes(trial.study, config)  # an ensemble's members alone are cheap now (search/follow_ups.py)
        return result.values

    def equivalent(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """``params`` with its data parameters at the least values that build the same model on this
        data (``Modality.equivalent_params``), so that the repeat check sees through them."""
        members = TrialConfig.from_params(params).members
        data = tuple(sorted((k, v) for k, v in params.items() if k.startswith("data__")))
        key = (members[0], data)
        if key not in self._equivalents:
            examples = [*self.splits.train.examples, *self.splits.validation.examples, *self.splits.test.examples]
            same = self.modality.equivalent_params(self.registry.get(members[0]), self.registry, params,
                                                   examples=examples)
            self._equivalents[key] = {k: v for k, v in same.items() if k.startswith("data__")}
        return {**params, **self._equivalents[key]}

    # -- one configuration, end to end ------------------------------------------------------
    def evaluate(self, params: Mapping[str, Any], *, trial_dir: Path, seed: int,
                 stop: StopCheck | None = None, search: Mapping[str, Any] | None = None,
                 clock: StageClock | None = None,
                 incumbent: Callable[[], Incumbent | None] | None = None) -> TrialResult:
        """One configuration, end to end. ``clock``: where its steps' wall seconds go (a new one when None).
        ``incumbent``: reads the study's most accurate cross-validated trial, once a trained network is
        scored (not for a probe, and counting probes that other workers finished meanwhile), which that
        network ranks above only by a lead of one standard error (``search/lead.py``)."""
        start = time.perf_counter()
        stages = clock if clock is not None else StageClock(start)
        config = TrialConfig.from_params(params)
        deadline = Deadline(start, self.trial_timeout, self.search_ends_at)
        cards = [self.registry.get(name) for name in config.members]
        card = cards[0]
        prep = self._preprocessing(cards, params)
        if config.probe_only(self.modality.structured_pruning):
            return self.probes.evaluate(config, params, cards, prep, trial_dir=trial_dir, stages=stages,
                                        deadline=deadline, stop=stop, search=search or {"seed": self.seed})
        member_parts = [build_seeded(self.modality, c, self.registry, params=params,
                                     finetune_blocks=config.finetune_blocks, pretrained=self.pretrained, seed=self.seed)
                        for c in cards]
        parts = member_parts[0] if len(cards) == 1 else ModelParts(
            trunk=ConcatTrunk([p.trunk for p in member_parts]), tail=torch.nn.Identity(),
            feature_dim=sum(p.feature_dim for p in member_parts))
        latency_input = self.latency_example(prep)  # latency, MACs and early stopping's estimate
        # wall seconds per step, kept on the trial (stage_seconds)
        stages.plan("features", "training", "pruning", "head refit", "export and quantization", "scoring", "measurement")
        self.steps.screen_trial(config, parts, latency_input, prep, deadline)  # before its features are extracted

        each = [self.features(c, lambda p=p: p, prep, config) for c, p in zip(cards, member_parts)]
        cached = concat_features(each)
        deadline.check(stages.done("features"))
        own_start = time.perf_counter()
        blocks = [int(c.arrays["train"][0].shape[1]) for c in each] if len(each) > 1 else None
        model, info = self._train(config, parts, cached, prep, seed=seed, deadline=deadline, stop=stop,
                                  latency_input=latency_input, blocks=blocks)
        deadline.check(stages.done("training"))
        zeros, rebuild = self.steps.prune(model, config, prep, seed=seed, deadline=deadline, stop=stop,
                                     latency_input=latency_input)
        stages.done("pruning")
        params = {**params, **rebuild}  # what a rebuild of the architecture needs (removed heads)
        refit = self.steps.final_head(model, config, cached, prep, seed=seed, deadline=deadline, blocks=blocks)
        stages.done("head refit")
        fp32, runtime = self._export(model, config, prep, trial_dir, seed)
        deadline.check(stages.done("export and quantization"))
        scores = self._score(config, model, runtime, refit, prep)
        if info.get("epoch_choice_optimism"):  # the kept epoch's advantage on validation that is luck
            scores = replace(scores, accuracy=scores.holdout - float(info["epoch_choice_optimism"]))
        best_probe = incumbent() if incumbent is not None and scores.logits is not None else None
        if best_probe is not None:
            lead = judge_lead(scores.accuracy, scores.logits["validation"].argmax(1) == self.splits.validation.labels,
                              best_probe)
            info = {**info, **lead.attrs(scores.accuracy)}
            if lead.accuracy < scores.accuracy:
                logger.info("val acc %.4f leads trial %d's %.4f by %.4f on the validation examples, under one "
                            "standard error (%.4f): judged %.4f", scores.accuracy, best_probe.trial,
                            best_probe.accuracy, lead.lead, lead.error, lead.accuracy)
            scores = replace(scores, accuracy=lead.accuracy)
        stages.done("scoring")
        train_seconds = cached.seconds + (time.perf_counter() - own_start)
        measured = self._measure(model, runtime, latency_input, train_seconds=train_seconds)
        stages.done("measurement")

        if not math.isfinite(scores.accuracy):
            raise FloatingPointError("accuracy is not finite")
        extra = {**measured, "cache_hit": cached.hit, "weight_zero_fraction": zeros,
                 "holdout_accuracy": scores.holdout, "head_refit_l2": refit.fit.l2, "stage_seconds": stages.seconds,
                 **info}
        metrics = {"accuracy": scores.accuracy, "test_accuracy": scores.test, "train_seconds": train_seconds,
                   **extra}
        save_artifact(trial_dir, model=model, fp32_onnx=fp32, runtime_onnx=runtime, modality=self.modality,
                      card=card, members=cards if len(cards) > 1 else None, params=params,
                      classes=self.splits.classes, preprocessing=prep,
                      finetune_blocks=config.finetune_blocks, metrics=metrics,
                      name=self.model_name(), data=self.data_card(), search=search or {"seed": self.seed})
        prune = config.prune
        logger.info(
            "%s %s %s prune=%s quant=%s: val acc %.4f, %.3f ms, $%.5f (%.1fs%s)",
            config.backbone, dict(config.data), config.train.mode,
            prune.method if prune.method == "none" else f"{prune.method}:{float(prune.amount):.2f}",
            config.quant.mode, scores.accuracy, measured["latency_ms"], measured["cost_usd"],
            time.perf_counter() - start, ", features cached" if cached.hit else "",
        )
        return TrialResult.from_measured(accuracy=scores.accuracy, test_accuracy=scores.test,
                                         train_seconds=train_seconds, artifact=str(trial_dir), extra=extra,
                                         logits=scores.logits)

    # -- 1. features ------------------------------------------------------------------------
    def _preprocessing(self, cards: list[BackboneCard], params: Mapping[str, Any]) -> dict[str, Any]:
        preps = [self.modality.preprocessing(c, self.registry, params=params) for c in cards]
        if any(p != preps[0] for p in preps[1:]):
            raise ConfigError(f"The ensemble {'+'.join(c.name for c in cards)} mixes backbones that need "
                              "different input preprocessing; its members must share one.")
        return preps[0]

    def feature_key(self, card: BackboneCard, prep: Mapping[str, Any], config: TrialConfig) -> str:
        """The feature cache's key: everything that changes the trunk's outputs on this data."""
        layer_pruning = ({"prune__method": config.prune.method, "prune__amount": config.prune.amount}
                         if config.drops_layers(self.modality.structured_pruning) else {})
        return cache_key({
            "ref": card.ref, "weights": card.weights, "build": dict(card.build_kwargs),
            "pretrained": self.pretrained, "prep": prep, "blocks": config.finetune_blocks, "pruning": layer_pruning,
            "data": self.splits.fingerprint(), "modality": self.modality.name,
            "features_version": self.modality.features_version,
        })

    def features(self, card: BackboneCard, parts: Callable[[], ModelParts], prep: Mapping[str, Any],
                 config: TrialConfig, *, key: str | None = None) -> CachedArrays:
        """Trunk outputs of every split, from the cache or computed (``parts`` is called only then). An
        example that another preprocessing encodes alike (``Modality.same_inputs``: a text that fits in
        two ``max_length`` choices) has that preprocessing's cached features, if there are any: only
        the others run through the trunk."""
        key = key or self.feature_key(card, prep, config)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        t0 = time.perf_counter()
        splits = ("train", "validation", "test")
        sizes = {split: len(getattr(self.splits, split)) for split in splits}
        shared = self._shared_features(card, prep, config)
        todo = {split: np.arange(n) if shared is None else np.flatnonzero(~shared[1][split])
                for split, n in sizes.items()}
        names = {f"{card.name} {split}": split for split in splits if len(todo[split])}
        outputs = {}
        if names:
            examples = {split: getattr(self.splits, split).examples for split in splits}
            outputs = run_trunk_splits(parts().trunk, self.modality,
                                       {name: [examples[split][i] for i in todo[split]]
                                        for name, split in names.items()},
                                       preprocessing=prep, progress=self.progress, accel=self.accelerator,
                                       encode=self.encoded.encoder(prep))
        computed = {split: outputs[name] for name, split in names.items()}
        seconds = time.perf_counter() - t0
        if shared is None:
            arrays = computed
        else:
            other, alike = shared
            arrays = {}
            for split in splits:
                rows = []
                for i, kept in enumerate(other.arrays[split]):
                    out = np.empty_like(np.asarray(kept))
                    out[alike[split]] = kept[alike[split]]
                    if split in computed:
                        out[~alike[split]] = computed[split][i]
                    rows.append(out)
                arrays[split] = tuple(rows)
            reused = sum(int(m.sum()) for m in alike.values()) / max(1, sum(sizes.values()))
            logger.info("%s %s: %.0f%% of the examples encode as in cached features at another preprocessing; "
                        "the other %d ran through the trunk (%.1fs)", card.name, dict(prep), 100 * reused,
                        sum(len(t) for t in todo.values()), seconds)
            seconds += reused * other.seconds  # what these features would cost computed whole
        return self.cache.put(key, arrays, seconds=seconds, label=f"{card.name} {prep} blocks={config.finetune_blocks}")

    def _shared_features(self, card: BackboneCard, prep: Mapping[str, Any],
                         config: TrialConfig) -> tuple[CachedArrays, dict[str, np.ndarray]] | None:
        """Cached features at another preprocessing and, per split, the examples it encodes as ``prep``
        does (the one with most of them); None when there are none. Pooled features only: a cut trunk's
        outputs (hidden states) are padded to their own set's longest example."""
        if config.finetune_blocks:
            return None
        splits = [self.splits.train, self.splits.validation, self.splits.test]
        every = [e for data in splits for e in data.examples]
        best: tuple[str, np.ndarray] | None = None
        for other, alike in self.modality.same_inputs(every, prep):
            other_key = self.feature_key(card, other, config)
            if alike.any() and self.cache.contains(other_key) and (best is None or alike.sum() > best[1].sum()):
                best = (other_key, np.asarray(alike, dtype=bool))
        found = None if best is None else self.cache.get(best[0])
        if found is None or any(np.ndim(a) != 2 for arrays in found.arrays.values() for a in arrays):
            return None
        bounds = np.cumsum([0, *(len(data) for data in splits)])
        return found, {name: best[1][bounds[k] : bounds[k + 1]]
                       for k, name in enumerate(("train", "validation", "test"))}

    # -- 2. training ------------------------------------------------------------------------
    def class_weights_for_training(self) -> tuple[float, ...] | None:
        labels = self.splits.train.labels
        return inverse_frequency_weights(labels, len(self.splits.classes)) if self.class_weights else None

    def _train(self, config: TrialConfig, parts: ModelParts, cached: CachedArrays, prep: Mapping[str, Any], *,
               seed: int, deadline: Deadline, stop: StopCheck | None,
               latency_input: Mapping[str, np.ndarray], blocks: list[int] | None = None,
               ) -> tuple[ExportModel, dict[str, Any]]:
        """The trained model and what to record about its training. ``blocks``: an ensemble's members'
        feature widths, each block scaled on its own in the probe it starts from, as in its probe trial."""
        train_inputs = cached.arrays["train"]
        labels = self.splits.train.labels
        weights = self.class_weights_for_training()
        num_classes = len(self.splits.classes)
        features = (np.asarray(train_inputs[0]) if config.finetune_blocks == 0
                    else tail_features(parts.tail, train_inputs))
        head = select_probe(features, labels, num_classes, seed=seed, class_weights=weights, blocks=blocks).head
        model = ExportModel(parts.trunk, parts.tail, head)
        info: dict[str, Any] = {}
        if config.train.mode == "full":
            # Linear probe first, then every layer from it (LP-FT: Kumar et al., "Fine-Tuning can Distort
            # Pretrained Features and Underperform Out-of-Distribution", ICLR 2022).
            info = self.steps.fine_tune_full(model, config, prep, seed=seed, deadline=deadline, stop=stop,
                                        latency_input=latency_input)
        elif config.train.mode == "finetune":
            ft = TrainConfig(lr=float(config.optim.lr), weight_decay=self.steps.weight_decay(config),
                             epochs=int(config.train.epochs), seed=seed, class_weights=weights)
            judge = self.steps.fine_tune_judge(stop, config, parts, head, cached.arrays["validation"], latency_input)
            judge(0, head)
            # Keep time for what follows: a structured pruning's recovery and the head refit after it,
            # in seconds from the pruned network's MACs; else the head refit alone (a forward pass of
            # the tail over train + validation and a probe fit: ``TrainingSteps.final_head``).
            later_s = self.steps.after_partial_fine_tuning(config, parts, latency_input, prep)
            pacer = EpochPacer(deadline, what="fine-tuning", steps_per_epoch=-(-len(labels) // ft.batch_size),
                               reserve_epochs=0.0 if later_s else REFIT_EPOCHS, reserve_s=later_s or REFIT_S)
            train_tail(parts.tail, head, train_inputs, labels, ft, after_batch=pacer.after_batch,
                       should_stop=lambda epoch, h: judge(epoch, h) or pacer.ends_after(epoch))
        return model.eval(), info

    # -- 4. export --------------------------------------------------------------------------
    def _export(self, model: ExportModel, config: TrialConfig, prep: Mapping[str, Any], trial_dir: Path,
                seed: int) -> tuple[Path, Path]:
        trial_dir.mkdir(parents=True, exist_ok=True)
        example = self.modality.encode(self.splits.train.examples[:1], preprocessing=prep)
        fp32, runtime, _ = export_quantized(model, example=example, modality=self.modality, quant=config.quant.mode,
                                            folder=trial_dir, calibration=lambda: self.calibration_feeds(prep, seed))
        return fp32, runtime

    # -- 5. scoring -------------------------------------------------------------------------
    def _score(self, config: TrialConfig, model: ExportModel, runtime: Path, refit: HeadRefit,
               prep: Mapping[str, Any]) -> Scores:
        """Validation and test accuracy of the file that ships. Its head (``refit``) was fit on the
        validation examples too, so each of them is scored by the fold head that did not see it, on
        the features the shipped file computes (int8 ones for an int8 file)."""
        if config.quant.mode == "none":
            # The artifact is the trained fp32 network: what its head reads on validation and test came
            # out of the head refit's pass (the trunk's fp32 export, or the cached outputs of a trunk
            # left as it was). Scored from those, after checking on real inputs that the file
            # predicts the same: no second pass over the data.
            validation = refit.inputs["validation"]
            logits = {"test": head_logits(model.head, refit.inputs["test"])}
            self._verify_artifact(runtime, model, validation, prep)
        else:
            encode = self.encoded.encoder(prep)
            _, validation = onnx_logits_and_head_inputs(runtime, self.modality, self.splits.validation, prep,
                                                        encode=encode)
            logits = {"test": onnx_logits(runtime, self.modality, self.splits.test, prep, encode=encode)}
        rows = len(self.splits.train) + np.arange(len(self.splits.validation))  # final_head pools train, then validation
        logits["validation"] = refit.fit.out_of_fold_logits(validation, rows)
        holdout, test = (float((logits[split].argmax(1) == getattr(self.splits, split).labels).mean())
                         for split in ("validation", "test"))
        return Scores(accuracy=holdout, holdout=holdout, test=test, logits=logits)

    def _verify_artifact(self, runtime: Path, model: ExportModel, validation_inputs: np.ndarray,
                         prep: Mapping[str, Any], n: int = 64) -> None:
        """The exported file must predict what the scored model predicts (its head on
        ``validation_inputs``, what it reads on the validation split), on real inputs."""
        data = self.splits.validation
        n = min(n, len(data))
        session = ort_session(runtime)
        file_pred = session.run(["logits"], self.encoded.encoder(prep)(data.examples[:n]))[0].argmax(1)
        scored_pred = head_logits(model.head, np.asarray(validation_inputs[:n])).argmax(1)
        agree = float((file_pred == scored_pred).mean())
        if agree < 0.95:
            raise ExportError(f"the exported model agrees with the trained model on only {agree:.0%} of "
                              f"{n} validation examples; report this with the trial's parameters")

    # -- 6. measurement ---------------------------------------------------------------------
    def _measure(self, model: ExportModel, runtime: Path, latency_input: Mapping[str, np.ndarray], *,
                 train_seconds: float) -> dict[str, Any]:
        return measure_artifact(runtime, latency_input, model=model, input_names=self.modality.input_names(),
                                cost=self.cost, train_seconds=train_seconds, threads=self.threads,
                                serving_batch=self.serving_batch).metrics()

    # -- what the model card says ------------------------------------------------------------
    def data_card(self) -> dict[str, Any]:
        train = self.splits.train
        counts = np.bincount(train.labels, minlength=len(self.splits.classes))
        return {"name": train.name.rsplit(":", 1)[0],
                "splits": {s: len(getattr(self.splits, s)) for s in ("train", "validation", "test")},
                "train_per_class": {str(c): int(n) for c, n in zip(self.splits.classes, counts)},
                "fixes": list(train.report)}

    def model_name(self) -> str:
        return f"{self.data_card()['name']} {self.modality.name} classifier"

    # -- inputs -----------------------------------------------------------------------------
    def latency_example(self, prep: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """A batch-1 input as long as the 98th-percentile example: of 64 random training examples (drawn
        with the search's seed), the one whose encoding is largest (text length; images are all the same
        size). One per preprocessing, so every trial at it is timed and counted on the same input: a
        probe's trunk and a network trained at the same length, and one trial and the next (each drew
        its own 64 before, and on text their MACs and latency differed by which were drawn)."""
        key = cache_key(dict(prep))
        if key not in self._latency_examples:
            rng = np.random.default_rng(self.seed)
            n = min(64, len(self.splits.train))
            idx = rng.choice(len(self.splits.train), size=n, replace=False)
            encoded = [self.modality.encode([self.splits.train.examples[i]], preprocessing=prep) for i in idx]
            self._latency_examples[key] = max(encoded, key=lambda e: sum(v.size for v in e.values()))
        return {name: array.copy() for name, array in self._latency_examples[key].items()}

    def calibration_feeds(self, prep: Mapping[str, Any], seed: int, batch: int = 16) -> list[dict[str, np.ndarray]]:
        """Encoded batches (of up to ``batch``) of random training examples, for static int8: up to
        ``CALIBRATION_EXAMPLES`` of them, and no more than hold ``CALIBRATION_VALUES`` input values (one at least)."""
        rng = np.random.default_rng(seed)
        order = rng.choice(len(self.splits.train), size=min(CALIBRATION_EXAMPLES, len(self.splits.train)), replace=False)
        examples = [self.splits.train.examples[i] for i in order]
        values = sum(int(v.size) for v in self.modality.encode(examples[:1], preprocessing=prep).values())
        examples = examples[: max(1, CALIBRATION_VALUES // max(values, 1))]
        return [self.modality.encode(examples[i : i + batch], preprocessing=prep) for i in range(0, len(examples), batch)]
