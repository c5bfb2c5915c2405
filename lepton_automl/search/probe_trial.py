"""A linear-probe trial, the search's cheapest rung: a head on cached trunk features, nothing else trained.

Everything that depends only on the trunk is done once per trunk signature and shared by every probe
on it (``search/trunks.py``): the ONNX export, its check against the cached features, int8
quantization, the quantized trunk's features on the validation and test splits, and the latency,
throughput, size and MACs of trunk + head. The probe fit itself (L2 strength by cross-validation) is
shared by the trials on the same features, whatever they quantize. An ensemble's trunk entry is its
members' entries side by side (``export/compose.merge_side_by_side``: their files merged, their
quantized outputs concatenated), so an ensemble probe costs a probe fit and a latency measurement once
its members were probed. What is left per trial is
scoring the head on stored features and writing the head with a recipe (``search/probe_export.py``);
the model files are written for the trials a user can be shown (the front), or on request.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lepton_automl.backbones import BackboneCard
from lepton_automl.compression.quantization import quantize_onnx
from lepton_automl.cost.latency import OnnxTimer
from lepton_automl.cost.measurement import measure_artifact
from lepton_automl.exceptions import ExportError
from lepton_automl.cost.macs import count_macs
from lepton_automl.export.compose import TrunkFeatures, linear_head_bytes, merge_side_by_side
from lepton_automl.export.onnx import export_onnx
from lepton_automl.export.trunk import run_onnx
from lepton_automl.interfaces import ExportModel, ModelParts, TrialResult, build_seeded
from lepton_automl.log import get_logger
from lepton_automl.search.config import TrialConfig
from lepton_automl.search.early_stopping import StopCheck
from lepton_automl.search.limits import Deadline, StageClock
from lepton_automl.search.probe_export import write_recipe
from lepton_automl.search.retired import STOPPED_FP32_ATTR, STOPPED_SLOWER_ATTR
from lepton_automl.search.scoring import concat_features, head_accuracy, head_logits
from lepton_automl.search.trunks import TrunkEntry, TrunkStore
from lepton_automl.sessions import ort_session
from lepton_automl.training.cache import CachedArrays, cache_key
from lepton_automl.training.trainer import ProbeFit, make_head, select_probe

if TYPE_CHECKING:
    from lepton_automl.search.objective import TrialRunner

logger = get_logger(__name__)

VERIFY_EXAMPLES = 32
# A merge of trunks each checked on VERIFY_EXAMPLES rows is checked on this many, one per call: batch-1
# calls, the shape its latency is timed at, so they are that timing's warm-up. A batch of 32 rows
# through the three-backbone ensemble at 224 px took 1.45 s on its first call.
MERGE_VERIFY_EXAMPLES = 8
# The exported trunk must compute the cached features: per example, |exported - cached| / |cached| at most this.
VERIFY_MAX_ERROR = 0.01


def _head_gmacs(head: torch.nn.Sequential) -> float:
    return head[1].weight.numel() / 1e9


def _head_params_m(head: torch.nn.Sequential) -> float:
    return (head[1].weight.numel() + head[1].bias.numel()) / 1e6


_Made = tuple[str, str, dict[str, np.ndarray], dict[str, Any]]  # what TrunkStore.build's maker returns


def not_faster(measured: Mapping[str, Any], twin: Mapping[str, Any], *, quant: str, serving_batch: int) -> str | None:
    """Why a compressed trunk + head timed as ``measured`` cannot reach the front beside its fp32 ``twin``
    (the same features uncompressed): no lower latency at batch 1, no higher throughput at the serving
    batch. Its accuracy is the fp32 features' less what compression costs. None when it is faster either way."""
    ms, fp32_ms = float(measured["latency_ms"]), float(twin["latency_ms"])
    rate, fp32_rate = float(measured["throughput_per_s"]), float(twin["throughput_per_s"])
    if ms < fp32_ms or rate > fp32_rate:
        return None
    return (f"its {quant} trunk + head ran in {ms:.3g} ms at batch 1 and {rate:.0f}/s at batch {serving_batch}, "
            f"no faster than the fp32 trunk's {fp32_ms:.3g} ms and {fp32_rate:.0f}/s: at the fp32 features' "
            f"accuracy less what {quant} costs, it cannot reach the front")


class ProbeTrials:
    """The probe path of a ``TrialRunner``; holds the fits shared across its trials."""

    def __init__(self, runner: TrialRunner, trunks: TrunkStore) -> None:
        self.runner = runner
        self.trunks = trunks
        self._fits: dict[str, ProbeFit] = {}

    def evaluate(self, config: TrialConfig, params: Mapping[str, Any], cards: list[BackboneCard],
                 prep: Mapping[str, Any], *, trial_dir: Path, stages: StageClock, deadline: Deadline,
                 search: Mapping[str, Any], stop: StopCheck | None = None) -> TrialResult:
        """``stop``: early stopping's judge; an int8 trunk it finds no faster than its fp32 twin is not
        run over the splits (``_make_trunk``). Not with a size limit, which int8's smaller file may meet."""
        r = self.runner
        stages.plan("features", "probe fit (cv)", "trunk", "scoring", "recipe")

        built: dict[int, ModelParts] = {}

        def member(i: int) -> ModelParts:  # built only when features or the trunk file are missing
            if i not in built:
                built[i] = build_seeded(r.modality, cards[i], r.registry, params=params, finetune_blocks=0,
                                        pretrained=r.pretrained, seed=r.seed)
            return built[i]

        keys = [r.feature_key(card, prep, config) for card in cards]
        members = [r.features(card, lambda i=i: member(i), prep, config, key=key)
                   for i, (card, key) in enumerate(zip(cards, keys))]
        cached = concat_features(members)
        deadline.check(stages.done("features"))
        fit = self._fit(keys, cached, [int(m.arrays["train"][0].shape[1]) for m in members])
        deadline.check(stages.done("probe fit (cv)"))
        # A new trunk entry marks its own steps on the clock: export, quantization, quantized features, measurement.
        built_here = self.trunks.get(self._trunk_key(keys, config.quant.mode)) is None
        judge = None if stop is None or r.limits.max_size_mb is not None else stop
        entry = self._entry(keys, member, members, prep, config.quant.mode, fit.head, clock=stages, stop=judge)
        deadline.check(stages.done("trunk"))

        validation = entry.features.get("validation", cached.arrays["validation"][0])
        test = entry.features.get("test", cached.arrays["test"][0])
        holdout = head_accuracy(fit.head, validation, r.splits.validation.labels)
        test_logits = head_logits(fit.head, test)
        test_accuracy = float((test_logits.argmax(1) == r.splits.test.labels).mean())
        # Judged by its cross-validated accuracy over train+validation, minus what compression cost on
        # the validation split: the artifact's features against the fp32 ones, each example scored by
        # the fold head that did not see it (the final head saw them all, and in-sample accuracy
        # overstates what int8 costs: lite0 on glyphs, 8.4 points in-sample, 0.3 on test).
        rows = len(r.splits.train) + np.arange(len(r.splits.validation))  # _fit pools train, then validation
        compression_cost = 0.0
        if "validation" in entry.features:
            compression_cost = (fit.out_of_fold_accuracy(cached.arrays["validation"][0], r.splits.validation.labels, rows)
                                - fit.out_of_fold_accuracy(validation, r.splits.validation.labels, rows))
        accuracy = fit.cv_accuracy - compression_cost
        if not np.isfinite(accuracy):
            raise FloatingPointError("accuracy is not finite")
        train_seconds = cached.seconds + stages.seconds["probe fit (cv)"]
        measured = {**entry.measured, "cost_usd": r.cost.total_usd(
            train_seconds=train_seconds, latency_ms=1000.0 / float(entry.measured["throughput_per_s"]))}
        deadline.check(stages.done("scoring"))
        extra = {**measured, "cache_hit": cached.hit, "weight_zero_fraction": 0.0, "holdout_accuracy": holdout,
                 "cv_accuracy": fit.cv_accuracy, "compression_cost": compression_cost, "probe_l2": fit.l2, "trunk": entry.folder.name,
                 "trunk_built": built_here}
        write_recipe(trial_dir, head=fit.head, trunk=entry.folder, quant=config.quant.mode, modality=r.modality,
                     cards=cards, params=params, classes=r.splits.classes, preprocessing=prep,
                     metrics={"accuracy": accuracy, "test_accuracy": test_accuracy, "train_seconds": train_seconds,
                              **extra},
                     pretrained=r.pretrained, seed=r.seed, name=r.model_name(), data=r.data_card(), search=search)
        deadline.check(stages.done("recipe"))
        extra["stage_seconds"] = stages.seconds
        logger.info("%s %s probe quant=%s: val acc %.4f, %.3f ms, $%.5f (%.1fs%s)", config.backbone,
                    dict(config.data), config.quant.mode, accuracy, measured["latency_ms"], measured["cost_usd"],
                    time.perf_counter() - deadline.start, ", features cached" if cached.hit else "")
        logits = {"validation": fit.out_of_fold_logits(validation, rows), "test": test_logits}
        return TrialResult.from_measured(accuracy=accuracy, test_accuracy=test_accuracy, train_seconds=train_seconds,
                                         artifact=str(trial_dir), extra=extra, logits=logits)

    def _fit(self, keys: list[str], cached: CachedArrays, blocks: list[int]) -> ProbeFit:
        """The probe on train+validation features, its L2 strength chosen by cross-validation; one fit
        per feature set and search (its folds come from the search's seed, not the trial's). ``blocks``:
        the members' feature widths, each standardised on its own (``training.trainer.feature_scale``)."""
        r = self.runner
        key = "+".join(keys)
        if key not in self._fits:
            pooled = np.concatenate([np.asarray(cached.arrays["train"][0]), np.asarray(cached.arrays["validation"][0])])
            labels = np.concatenate([r.splits.train.labels, r.splits.validation.labels])
            self._fits[key] = select_probe(pooled, labels, len(r.splits.classes), seed=r.seed,
                                           class_weights=r.class_weights_for_training(), blocks=blocks)
        return self._fits[key]

    def _trunk_key(self, keys: list[str], quant: str) -> str:
        r = self.runner
        return cache_key({"features": keys, "quant": quant, "classes": len(r.splits.classes), "threads": r.threads,
                          "serving_batch": r.serving_batch})

    def _entry(self, keys: list[str], member: Callable[[int], ModelParts], cached: list[CachedArrays],
               prep: Mapping[str, Any], quant: str, head: torch.nn.Sequential, *, clock: StageClock,
               stop: StopCheck | None = None) -> TrunkEntry:
        """The trunk entry of these features at ``quant``. An ensemble's is its members' entries side by
        side (each shared with that member's own probes): nothing is exported, quantized or run twice.
        Building one marks its steps on ``clock``."""
        key = self._trunk_key(keys, quant)
        found = self.trunks.get(key)
        if found is not None:
            return found
        twins = [self.trunks.get(self._trunk_key(keys, other)) for other in ("none", "int8") if other != quant]
        twin = next((t for t in twins if t is not None), None)
        if len(keys) == 1:
            return self.trunks.build(key, lambda folder: self._make_trunk(
                folder, lambda: member(0).trunk, quant, prep, np.asarray(cached[0].arrays["validation"][0]), head,
                twin=twin, clock=clock, stop=stop))
        # A member's entry is measured with a head of its shape: weights change no measurement, so no
        # cross-validated fit is needed for it.
        parts = [self._entry([k], lambda _, i=i: member(i), [c], prep, quant,
                             make_head(c.arrays["train"][0], len(self.runner.splits.classes),
                                       generator=torch.Generator().manual_seed(self.runner.seed)), clock=clock,
                             stop=stop)
                 for i, (k, c) in enumerate(zip(keys, cached))]
        joined = np.concatenate([np.asarray(c.arrays["validation"][0]) for c in cached], axis=1)
        return self.trunks.build(key, lambda folder: self._merge_trunks(folder, parts, quant, prep, joined, head,
                                                                        twin=twin, clock=clock))

    def _make_trunk(self, folder: Path, trunk: Callable[[], torch.nn.Module], quant: str, prep: Mapping[str, Any],
                    cached_validation: np.ndarray, head: torch.nn.Sequential, *,
                    twin: TrunkEntry | None = None, clock: StageClock, stop: StopCheck | None = None) -> _Made:
        """Export (and verify, and quantize) one backbone's trunk. With ``twin``, the same trunk's entry
        at another quantization, its verified fp32 file and its counts are reused: of the twin entries
        only the first one exports, checks and counts.

        An int8 trunk is timed before it runs over the validation and test splits (its accuracy's cost):
        with ``stop`` and an fp32 ``twin`` that it is no faster than (``not_faster``), the trial stops
        there. On an AMD EPYC without VNNI the lite0 glyph trunk at 224 px took 10.8 s over the two
        splits, after 6 s of quantization and timing that showed it slower than fp32."""
        r = self.runner
        if twin is not None:
            fp32 = folder / "trunk.onnx"
            shutil.copyfile(twin.fp32, fp32)
            gmacs, params_m = float(twin.measured["trunk_gmacs"]), float(twin.measured["trunk_params_m"])
        else:
            module = trunk()
            example = r.modality.encode(r.splits.train.examples[:1], preprocessing=prep)
            fp32 = export_onnx(TrunkFeatures(module), example, folder / "trunk.onnx",
                               input_names=r.modality.input_names(), dynamic_axes=r.modality.dynamic_axes(),
                               output_names=("features",))
            model = ExportModel(module, torch.nn.Identity(), head)
            gmacs = count_macs(model, r.latency_example(prep), r.modality.input_names()) / 1e9 - _head_gmacs(head)
            params_m = sum(p.numel() for p in module.parameters()) / 1e6
        if quant != "none" and twin is None:  # int8 ships beside the fp32 file: checked here (a twin's was)
            self._verify(ort_session(fp32), cached_validation, prep)
        clock.done("export")
        counts = (gmacs + _head_gmacs(head), params_m + _head_params_m(head))
        if quant == "none":
            check = cached_validation if twin is None else None  # checked as measured
            measured = self._measure(fp32, prep, head, counts, check=check)
            clock.done("measurement")
            return fp32.name, quant, {}, {**measured, "trunk_gmacs": gmacs, "trunk_params_m": params_m}
        runtime = quantize_onnx(fp32, folder / "trunk.int8.onnx", mode=quant,
                                calibration=r.calibration_feeds(prep, r.seed))
        clock.done("quantization")
        measured = self._measure(runtime, prep, head, counts)
        clock.done("measurement")
        if stop is not None and twin is not None and twin.quant == "none":
            reason = not_faster(measured, twin.measured, quant=quant, serving_batch=r.serving_batch)
            if reason:
                stop.stop(reason, **{STOPPED_SLOWER_ATTR: float(measured["latency_ms"]),
                                     STOPPED_FP32_ATTR: float(twin.measured["latency_ms"])})
        features = self._run_splits(runtime, prep)
        clock.done("quantized features")
        return runtime.name, quant, features, {**measured, "trunk_gmacs": gmacs, "trunk_params_m": params_m}

    def _merge_trunks(self, folder: Path, parts: list[TrunkEntry], quant: str, prep: Mapping[str, Any],
                      cached_validation: np.ndarray, head: torch.nn.Sequential, *,
                      twin: TrunkEntry | None = None, clock: StageClock) -> _Made:
        """The members' entries side by side. With ``twin``, the same ensemble's entry at another
        quantization, its checked fp32 merge is copied, not merged and checked again (0.6 s of a
        MiniLM + hashed n-grams entry)."""
        names = list(self.runner.modality.input_names())
        fp32 = folder / "trunk.onnx"
        if twin is not None:
            shutil.copyfile(twin.fp32, fp32)
        else:
            merge_side_by_side([p.fp32 for p in parts], fp32, input_names=names)
        # The fp32 merge ships beside an int8 one, its members each checked: checked here (a twin's was).
        if quant != "none" and twin is None:
            self._verify(ort_session(fp32), cached_validation, prep)
        clock.done("export")
        runtime, features = fp32, {}
        if quant != "none":  # the int8 merge is what is measured
            runtime = merge_side_by_side([p.runtime for p in parts], folder / "trunk.int8.onnx", input_names=names)
            features = {split: np.concatenate([p.features[split] for p in parts], axis=1)
                        for split in ("validation", "test")}
            clock.done("quantization")
        gmacs = sum(float(p.measured["trunk_gmacs"]) for p in parts)
        params_m = sum(float(p.measured["trunk_params_m"]) for p in parts)
        counts = (gmacs + _head_gmacs(head), params_m + _head_params_m(head))
        check = cached_validation if quant == "none" else None  # fp32: checked as measured, copied or not
        measured = self._measure(runtime, prep, head, counts, check=check, members=parts)
        clock.done("measurement")
        return runtime.name, quant, features, {**measured, "trunk_gmacs": gmacs, "trunk_params_m": params_m}

    def _run_splits(self, path: Path, prep: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The runtime trunk's features of the validation and test splits, in one pass (one session)."""
        r = self.runner
        validation, test = r.splits.validation.examples, r.splits.test.examples
        (features,) = run_onnx(path, r.modality, [*validation, *test], preprocessing=prep, outputs=("features",),
                               encode=r.encoded.encoder(prep))
        return {"validation": features[: len(validation)], "test": features[len(validation) :]}

    def _measure(self, runtime: Path, prep: Mapping[str, Any], head: torch.nn.Sequential,
                 counts: tuple[float, float], *, check: np.ndarray | None = None,
                 members: list[TrunkEntry] | None = None) -> dict[str, Any]:
        """Latency, throughput and size of the trunk with a head of the study's shape appended. With
        ``check`` (the cached features of the validation split), the measured model is first checked
        against them, through the session that then times it.

        ``members``: the measured entries ``runtime`` merges side by side. Its batch-1 latency is timed
        as any trunk's; its time at the serving batch, which prices inference and orders nothing, is
        the sum of theirs (the merge runs them one after another). Summed and timed, the three
        backbones' merge at batch 32 took 104/107 ms (96 px), 296/291 and 291/291 ms (160 px), 587/577
        and 585/576 ms (224 px); timing it took 3-3.5 s of every such entry's 4.6-5.0 s of measurement,
        most of it ONNX Runtime's two slow first calls at a new batch size. Its compressed size is the
        sum of theirs too (each member's with a head of its width: together, the merge's head and a
        bias per extra member)."""
        r = self.runner
        timer = OnnxTimer(linear_head_bytes(runtime, head), threads=r.threads)
        serving_ms = size_gz_mb = None
        if members is not None:
            serving_ms = sum(float(m.measured["latency_serving_batch_ms"]) for m in members)
            size_gz_mb = sum(float(m.measured["size_gz_mb"]) for m in members)
        if check is not None:
            # VERIFY_EXAMPLES rows: at the default --serving-batch (32) the same shape the throughput is
            # timed at, so this call is that timing's warm-up (OnnxTimer.run); a merge's rows go one
            # per call, the batch-1 timing's warm-up
            self._verify(timer, check, prep, head=head,
                         **({} if members is None else {"examples": MERGE_VERIFY_EXAMPLES, "batch": 1}))
        measured = measure_artifact(timer, r.latency_example(prep), model=None,
                                    input_names=r.modality.input_names(), cost=r.cost, train_seconds=0.0,
                                    threads=r.threads, serving_batch=r.serving_batch, counts=counts,
                                    serving_ms=serving_ms, size_gz_mb=size_gz_mb).metrics()
        return {**measured, "serving_batch_summed": serving_ms is not None}

    def _verify(self, session: Any, cached_validation: np.ndarray, prep: Mapping[str, Any], *,
                head: torch.nn.Sequential | None = None, examples: int = VERIFY_EXAMPLES,
                batch: int | None = None) -> None:
        """The exported trunk must compute the features the probe was fit on, on real inputs (the first
        ``examples`` of the validation split, ``batch`` per call, all in one by default). With
        ``head``, ``session`` runs trunk + head, and its logits are held against the head's logits
        on the cached features: the check then covers the very bytes that are measured."""
        r = self.runner
        n = min(examples, len(r.splits.validation))
        feeds = r.encoded.encoder(prep)(r.splits.validation.examples[:n])
        step = batch or n
        got = np.concatenate([session.run(None, {name: feeds[name][i : i + step] for name in r.modality.input_names()})[0]
                              for i in range(0, n, step)])
        want = cached_validation[:n]
        if head is not None:
            with torch.no_grad():
                want = head(torch.from_numpy(np.array(want, dtype=np.float32))).numpy()
        error = np.linalg.norm(got - want, axis=1) / (np.linalg.norm(want, axis=1) + 1e-6)
        if float(error.max()) > VERIFY_MAX_ERROR:
            what = "logits (trunk + head)" if head is not None else "features"
            raise ExportError(f"the exported trunk's {what} differ from the cached ones' (relative error "
                              f"{error.max():.4f} on {n} validation examples); report this with the trial's parameters")
