"""Trial modes beyond the single probe: concatenated-features ensembles, full fine-tuning with a
predicted wall time, and the typed configuration that refuses misspelt keys."""

from __future__ import annotations

import gzip
import time

import numpy as np
import pytest
import torch

from lepton_automl.backbones import BackboneRegistry
from lepton_automl.exceptions import ConfigError
from lepton_automl.export.artifact import Predictor, load_metadata, rebuild_model
from lepton_automl.search.config import TrialConfig
from lepton_automl.search.probe_export import materialize
from lepton_automl.search.early_stopping import TrialStopped
from lepton_automl.search.limits import StageClock
from lepton_automl.search.space import SearchSpace, ensemble_of, warm_start_configs
from lepton_image import ImageModality
from tests.test_pruning_in_search import _runner, _tiny_text_runner
from lepton_text import TextModality

ENSEMBLE = "efficientnet_lite0+efficientnet_lite1"


def test_misspelt_configuration_keys_are_errors_with_the_fix() -> None:
    with pytest.raises(ConfigError, match="'quant_mode'.*Did you mean 'quant__mode'"):
        TrialConfig.from_params({"backbone": "efficientnet_lite0", "quant_mode": "int8"})
    with pytest.raises(ConfigError, match="quant__mode='int4' is not valid"):
        TrialConfig.from_params({"backbone": "efficientnet_lite0", "quant__mode": "int4"})
    with pytest.raises(ConfigError, match="Unknown search-space option 'lr'.*Did you mean 'optim__lr'"):
        SearchSpace.from_options(backbones=["efficientnet_lite0"], options={"lr": (1e-4, 1e-3)})
    config = TrialConfig.from_params({"backbone": "b", "data__image_size": 96, "train__mode": "full",
                                      "train__epochs": 2, "optim__lr": 1e-4})
    assert config.train.mode == "full" and config.data == {"data__image_size": 96}
    assert TrialConfig.from_params(config.to_params()) == config


def test_unstructured_pruning_joins_the_space_with_a_size_limit_or_when_named() -> None:
    names = ["efficientnet_lite0"]
    assert "unstructured" not in SearchSpace.from_options(backbones=names).prune__method
    assert "unstructured" in SearchSpace.from_options(backbones=names, size_limited=True).prune__method
    named = SearchSpace.from_options(backbones=names, options={"prune__method": ["none", "unstructured"]})
    assert named.prune__method == ("none", "unstructured")


def test_the_image_backbones_form_one_ensemble_offered_after_their_probes_and_before_fine_tuning() -> None:
    registry, modality = BackboneRegistry(), ImageModality()
    names = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    assert ensemble_of(names, modality, registry) == ["+".join(names)]
    assert ensemble_of(names[:1], modality, registry) == []
    space = SearchSpace.from_options(backbones=names, ensembles=ensemble_of(names, modality, registry))
    configs = warm_start_configs(space, modality, registry, modality.warm_start_variants(registry.get(names[0])))
    order = [c["backbone"] for c in configs]
    # every probe first, the ensemble last of them (it reuses their features), the costly fine-tuning last
    assert [c["train__mode"] for c in configs] == ["probe"] * (len(configs) - 1) + ["full"]
    assert order[-2] == "+".join(names) and {"efficientnet_lite1", "efficientnet_lite2"} <= set(order[:-2])
    assert configs[-1]["backbone"] == "efficientnet_lite0"
    without = SearchSpace.from_options(backbones=names, options={"train__mode": ["probe", "finetune"]})
    assert all(c["train__mode"] == "probe" for c in warm_start_configs(
        without, modality, registry, modality.warm_start_variants(registry.get(names[0]))))


def test_an_ensemble_trial_exports_one_model_that_serves_what_it_measured(image_folder, tmp_path) -> None:
    modality = ImageModality()
    runner = _runner(modality, modality.load(image_folder), BackboneRegistry(), tmp_path, "efficientnet_lite0")
    base = {"data__image_size": 64, "train__mode": "probe", "prune__method": "none", "quant__mode": "none"}
    single = runner.evaluate({"backbone": "efficientnet_lite0", **base}, trial_dir=tmp_path / "one", seed=0)
    both = runner.evaluate({"backbone": ENSEMBLE, **base}, trial_dir=tmp_path / "two", seed=0)
    assert both.extra["cache_hit"] is False  # lite1 was never extracted before
    # Its batch-1 latency was timed; its time at the serving batch is its members' summed (each timed).
    store = runner.probes.trunks
    members = [store.get(p.name) for p in store.root.iterdir() if p.name != both.extra["trunk"]]
    assert len(members) == 2 and not any(m.measured["serving_batch_summed"] for m in members)
    assert both.extra["serving_batch_summed"] and not single.extra["serving_batch_summed"]
    assert both.extra["latency_serving_batch_ms"] == pytest.approx(
        sum(m.measured["latency_serving_batch_ms"] for m in members))
    assert both.extra["throughput_per_s"] == pytest.approx(
        1000.0 * both.extra["serving_batch"] / both.extra["latency_serving_batch_ms"])
    materialize(tmp_path / "two", modality=modality, registry=runner.registry)
    # so is its compressed size, which is what compressing the shipped file gives
    assert both.size_gz_mb == pytest.approx(sum(m.measured["size_gz_mb"] for m in members))
    shipped = (tmp_path / "two" / "model.onnx").read_bytes()
    assert both.size_gz_mb == pytest.approx(len(gzip.compress(shipped, 6)) / 2**20, rel=0.002)
    assert both.params_m > single.params_m and both.extra["gmacs"] > single.extra["gmacs"]
    assert len(load_metadata(tmp_path / "two")["members"]) == 2
    test = runner.splits.test
    served = Predictor(tmp_path / "two").logits(list(test.examples))
    assert float((served.argmax(1) == test.labels).mean()) == pytest.approx(both.test_accuracy)
    feeds = modality.encode(list(test.examples), preprocessing=Predictor(tmp_path / "two").preprocessing)
    with torch.no_grad():
        rebuilt = rebuild_model(tmp_path / "two")(torch.from_numpy(feeds["pixel_values"])).numpy()
    np.testing.assert_allclose(served, rebuilt, atol=1e-3, rtol=1e-3)
    for bad in ({"train__mode": "finetune", "train__blocks": 1, "train__epochs": 1, "optim__lr": 1e-4},
                {"prune__method": "structured", "prune__amount": 0.3}):
        with pytest.raises(ConfigError, match="is an ensemble: it takes train__mode='probe' or 'full'"):
            runner.evaluate({"backbone": ENSEMBLE, **base, **bad}, trial_dir=tmp_path / "bad", seed=0)


def test_full_fine_tuning_predicts_its_time_and_serves_what_it_measured(text_csv, tiny_bert_dir, tmp_path) -> None:
    runner = _tiny_text_runner(TextModality(), text_csv, tiny_bert_dir, tmp_path)
    params = {"backbone": "tiny", "data__max_length": 32, "train__mode": "full", "train__epochs": 2,
              "optim__lr": 1e-3, "optim__weight_decay": 0.01, "prune__method": "none", "quant__mode": "none"}
    result = runner.evaluate(params, trial_dir=tmp_path / "full", seed=0)
    extra = result.extra
    assert extra["epochs_run"] == 2 and 1 <= extra["best_epoch"] <= 2 and len(extra["validation_curve"]) == 2
    assert extra["predicted_epoch_s"] > 0 and extra["measured_epoch_s"] > 0 and extra["train_cost_ratio"] > 0
    assert extra["best_epoch"] == 1 + int(np.argmax(extra["validation_curve"]))  # the best epoch was kept
    # It ships a head refit on train+validation features of the fine-tuned network. Each validation
    # example is scored by the fold head fit without it: those are the logits stored for blends, and
    # what the validation accuracy counts; the shipped head saw the examples, so its logits differ.
    validation, test = runner.splits.validation, runner.splits.test
    assert extra["head_refit_l2"] > 0
    held_out = result.logits["validation"]
    assert extra["holdout_accuracy"] == pytest.approx(float((held_out.argmax(1) == validation.labels).mean()))
    predictor = Predictor(tmp_path / "full")
    assert not np.allclose(predictor.logits(list(validation.examples)), held_out, atol=1e-3)
    served = predictor.logits(list(test.examples))
    np.testing.assert_allclose(served, result.logits["test"], atol=1e-4)
    assert float((served.argmax(1) == test.labels).mean()) == pytest.approx(result.test_accuracy)
    # The objective is that validation accuracy less the part of the kept epoch's lead that choosing
    # it on the same split bought (cross-fitted; nothing when one epoch is best on every half).
    assert 0.0 <= extra["epoch_choice_optimism"] <= 0.5
    assert result.accuracy == pytest.approx(extra["holdout_accuracy"] - extra["epoch_choice_optimism"])
    # A configuration predicted to outlast the time the trial has is not started: here the study
    # measured earlier fine-tuning at a million forward passes per example.
    runner.trial_timeout, runner.train_cost_ratio = 60.0, 1e6
    with pytest.raises(TrialStopped, match="not started"):
        runner.evaluate(params, trial_dir=tmp_path / "late", seed=0)
    assert not (tmp_path / "late").exists()
    # Once the search has timed a training step, a configuration that could not fit one epoch even at the
    # fastest rate per GMAC measured is stopped before its own step is timed (three forward and backward
    # passes). 15 s is what export and measurement keep, so no epoch fits here.
    timed = len(runner.steps.step_seconds_per_gmac)
    assert timed == 2 and all(rate > 0 for rate in runner.steps.step_seconds_per_gmac)
    runner.trial_timeout, runner.train_cost_ratio = 15.0, None
    clock = StageClock(time.perf_counter())
    with pytest.raises(TrialStopped, match="at least .from its MACs"):
        runner.evaluate({**params, "data__max_length": 64}, trial_dir=tmp_path / "later", seed=0, clock=clock)
    assert len(runner.steps.step_seconds_per_gmac) == timed
    assert clock.seconds == {}  # stopped before its features were extracted (64 tokens: not cached)


def test_lexical_ngrams_join_a_transformer_in_one_exported_ensemble(text_csv, tiny_bert_dir, tmp_path) -> None:
    from lepton_automl.backbones import BackboneCard

    modality = TextModality()
    runner = _tiny_text_runner(modality, text_csv, tiny_bert_dir, tmp_path)
    runner.registry.register(BackboneCard(name="ngrams", ref="lexical:hashed-ngrams", modality="text",
                                          weights=f"local-dir:{tiny_bert_dir}", build_kwargs={"buckets": 256}))
    assert ensemble_of(["ngrams", "tiny"], modality, runner.registry) == ["tiny+ngrams"]
    base = {"data__max_length": 32, "train__mode": "probe", "prune__method": "none", "quant__mode": "none"}
    lexical = runner.evaluate({"backbone": "ngrams", **base}, trial_dir=tmp_path / "ngrams", seed=0)
    both = runner.evaluate({"backbone": "tiny+ngrams", **base}, trial_dir=tmp_path / "both", seed=0)
    assert lexical.params_m * 1e6 == 256 * 3 + 3 and lexical.accuracy >= 0.8  # the head alone; disjoint topic words
    test = runner.splits.test
    for folder, result in (("ngrams", lexical), ("both", both)):
        served = Predictor(materialize(tmp_path / folder, modality=modality, registry=runner.registry)
                           ).logits(list(test.examples))
        assert float((served.argmax(1) == test.labels).mean()) == pytest.approx(result.test_accuracy)


def test_a_transformer_fine_tunes_whole_with_fixed_ngram_features_beside_it(text_csv, tiny_bert_dir, tmp_path) -> None:
    """An ensemble with one trainable member (a transformer beside hashed n-grams) is offered full
    fine-tuning, the warm start's, from the probe on both blocks; the export holds both members and
    serves what it scored, and rebuilds from its weights."""
    import optuna

    from lepton_automl.backbones import BackboneCard
    from lepton_automl.search.space import suggest, trains_as_one

    modality = TextModality()
    runner = _tiny_text_runner(modality, text_csv, tiny_bert_dir, tmp_path)
    registry = runner.registry
    registry.register(BackboneCard(name="ngrams", ref="lexical:hashed-ngrams", modality="text",
                                   weights=f"local-dir:{tiny_bert_dir}", build_kwargs={"buckets": 256}))
    assert trains_as_one("tiny+ngrams", modality, registry)
    assert not trains_as_one(ENSEMBLE, ImageModality(), BackboneRegistry())  # two trunks to train
    space = SearchSpace.from_options(backbones=["tiny", "ngrams"], ensembles=["tiny+ngrams"])
    last = warm_start_configs(space, modality, registry, modality.warm_start_variants(registry.get("tiny")))[-1]
    assert last["backbone"] == "tiny+ngrams" and last["train__mode"] == "full"
    drawn = [suggest(optuna.trial.FixedTrial({"backbone": "tiny+ngrams", "data__max_length": 32,
                                               "train__mode": mode, "train__epochs": 2, "optim__lr": 1e-4,
                                               "optim__weight_decay": 0.01, "quant__mode": "none"}),
                     space, modality, registry) for mode in ("full", "finetune")]
    assert drawn[0]["train__mode"] == "full" and drawn[0]["prune__method"] == "none"
    assert drawn[1]["train__mode"] == "probe"  # partial fine-tuning is not an ensemble's
    # A single backbone in a probe-only space is still pruned when the sampler says so.
    probes = SearchSpace.from_options(backbones=["tiny"], options={"train__mode": ["probe"]})
    single = suggest(optuna.trial.FixedTrial({"backbone": "tiny", "data__max_length": 32, "train__mode": "probe",
                                              "prune__method": "structured", "prune__amount": 0.3,
                                              "prune__target": "layers", "quant__mode": "none"}),
                     probes, modality, registry)
    assert single["prune__method"] == "structured" and single["train__mode"] == "probe"

    params = {"backbone": "tiny+ngrams", "data__max_length": 32, "train__mode": "full", "train__epochs": 2,
              "optim__lr": 1e-3, "optim__weight_decay": 0.01, "prune__method": "none", "quant__mode": "none"}
    result = runner.evaluate(params, trial_dir=tmp_path / "whole", seed=0)
    assert result.extra["epochs_run"] == 2
    assert result.extra["holdout_accuracy"] == pytest.approx(max(result.extra["validation_curve"]))
    meta = load_metadata(tmp_path / "whole")
    assert [m["name"] for m in meta["members"]] == ["tiny", "ngrams"]
    test = runner.splits.test
    predictor = Predictor(tmp_path / "whole")
    served = predictor.logits(list(test.examples))
    assert float((served.argmax(1) == test.labels).mean()) == pytest.approx(result.test_accuracy)
    feeds = modality.encode(list(test.examples), preprocessing=predictor.preprocessing)
    with torch.no_grad():
        rebuilt = rebuild_model(tmp_path / "whole", registry=registry)(
            *[torch.from_numpy(feeds[n]) for n in modality.input_names()]).numpy()
    np.testing.assert_allclose(served, rebuilt, atol=1e-3, rtol=1e-3)


def test_a_fine_tuning_keeps_time_for_all_the_pruning_stage_after_it_needs() -> None:
    """What a full fine-tuning reserves for what follows it is what that then demands: the recovery
    epochs of a structured pruning, at the MACs left, and the head refit (a third of an epoch and a
    probe fit) that every trained network ends with."""
    from types import SimpleNamespace

    from lepton_automl.search.training_steps import PROBE_FIT_S, TrainingSteps

    def reserve(modality, **prune):
        steps = TrainingSteps(SimpleNamespace(modality=modality))
        return steps.after_fine_tuning(TrialConfig.from_params({
            "backbone": "b", "train__mode": "full", "train__epochs": 2, "optim__lr": 1e-4, "quant__mode": "none",
            **{f"prune__{k}": v for k, v in prune.items()}}))

    epochs, seconds = reserve(ImageModality(), method="structured", amount=0.5, recovery_epochs=2)
    assert epochs == pytest.approx((2 + 1 / 3) * 0.25) and seconds == PROBE_FIT_S  # channels: (1 - 0.5)^2 of the MACs
    epochs, seconds = reserve(TextModality(), method="structured", amount=0.5, recovery_epochs=1, target="width")
    assert epochs == pytest.approx((1 + 1 / 3) * 0.5) and seconds == PROBE_FIT_S
    # nothing to recover (dropping a transformer's layers, or no pruning): the head refit alone
    assert reserve(TextModality(), method="structured", amount=0.5, target="layers") == (1 / 3, PROBE_FIT_S)
    assert reserve(ImageModality(), method="none") == (1 / 3, PROBE_FIT_S)


def test_a_partial_fine_tuning_keeps_time_for_the_recovery_after_it(image_folder, tmp_path) -> None:
    """A partial fine-tuning followed by a structured pruning keeps, in seconds, what the recovery
    epochs and the head refit take at least: the pruned network's MACs at the fastest rate timed."""
    from lepton_automl.cost.macs import count_macs
    from lepton_automl.interfaces import ExportModel, build_seeded
    from lepton_automl.search.training_steps import PROBE_FIT_S

    modality = ImageModality()
    runner = _runner(modality, modality.load(image_folder), BackboneRegistry(), tmp_path, "efficientnet_lite0")
    params = {"backbone": "efficientnet_lite0", "data__image_size": 64, "train__mode": "finetune", "train__blocks": 1,
              "train__epochs": 2, "optim__lr": 1e-3, "quant__mode": "none", "prune__method": "structured",
              "prune__amount": 0.5, "prune__recovery_epochs": 2}
    config = TrialConfig.from_params(params)
    card = runner.registry.get("efficientnet_lite0")
    parts = build_seeded(modality, card, runner.registry, params=params, finetune_blocks=config.finetune_blocks,
                         pretrained=False, seed=0)
    prep = runner._preprocessing([card], params)
    example = runner.latency_example(prep)
    steps = runner.steps
    assert steps.after_partial_fine_tuning(config, parts, example, prep) == 0.0  # no training step timed yet
    steps.step_seconds_per_gmac.append(0.01)
    gmacs = count_macs(ExportModel(parts.trunk, parts.tail, torch.nn.Identity()), example, modality.input_names()) / 1e9
    assert steps.training_gmacs(gmacs, example, prep) == gmacs  # images all cost alike
    epoch = steps.least_epoch_seconds(gmacs * 0.25)  # channels cut by half: a quarter of the MACs
    assert epoch is not None and epoch > 0
    assert steps.after_partial_fine_tuning(config, parts, example, prep) == pytest.approx(
        epoch * (2 + 1 / 3) + PROBE_FIT_S)
    for other in ({"prune__method": "none"}, {"prune__method": "unstructured", "prune__amount": 0.5}):
        assert steps.after_partial_fine_tuning(TrialConfig.from_params({**params, **other}), parts, example,
                                               prep) == 0.0


def test_a_text_epoch_is_costed_at_its_mean_example_not_the_longest(tiny_bert_dir, tmp_path) -> None:
    """Training GMACs follow what an epoch's length-grouped batches hold, padding included; latency's
    example is the longest of 64, which grows with ``max_length`` where most texts stay short."""
    from lepton_automl.training.finetune import length_grouped, length_rank

    # a few long texts among short ones
    path = _texts(tmp_path / "texts.csv", 150, lambda rng, i: 60 if i % 25 == 0 else int(rng.integers(2, 9)), seed=0)
    modality = TextModality()
    runner = _tiny_text_runner(modality, path, tiny_bert_dir, tmp_path)
    train = runner.splits.train.examples
    example = {}
    for max_length in (16, 64):
        prep = {"max_length": max_length, "tokenizer": str(tiny_bert_dir)}
        mean = runner.steps.mean_example_size(prep)
        rank = length_rank(modality, train)
        for seed in range(3):  # epochs drawn as fine_tune draws them
            order = length_grouped(np.random.default_rng(10 + seed).permutation(len(train)), rank, 32)
            padded = sum(sum(v.size for v in modality.encode([train[i] for i in order[s : s + 32]],
                                                             preprocessing=prep).values())
                         for s in range(0, len(train), 32))
            assert mean == pytest.approx(padded / len(train), rel=0.1)
        example[max_length] = runner.latency_example(prep)
        assert runner.steps.training_gmacs(1.0, example[max_length], prep) == pytest.approx(
            mean / sum(v.size for v in example[max_length].values()))
    # the longest example grew with max_length; the mean text much less
    longest = {k: sum(v.size for v in e.values()) for k, e in example.items()}
    means = {k: runner.steps.mean_example_size({"max_length": k, "tokenizer": str(tiny_bert_dir)}) for k in (16, 64)}
    assert longest[64] > 3 * longest[16] and means[64] < 2 * means[16]


def test_the_head_input_comes_out_of_fp32_and_int8_exports_beside_the_logits(image_folder, tmp_path) -> None:
    """``onnx_logits_and_head_inputs``: what the linear head of an exported ``ExportModel`` reads, from
    the same pass as its logits, in an fp32 file and in its int8 twins (the dequantized tensor)."""
    from torch import nn

    from lepton_automl.compression.quantization import quantize_onnx
    from lepton_automl.exceptions import ExportError
    from lepton_automl.export.onnx import export_onnx
    from lepton_automl.interfaces import ExportModel, Standardize, TupleOut
    from lepton_automl.search.scoring import onnx_logits_and_head_inputs

    modality = ImageModality()
    data = modality.load(image_folder)
    prep = {"image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bicubic"}
    torch.manual_seed(0)
    trunk = TupleOut(nn.Sequential(nn.Conv2d(3, 16, 3, stride=2), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(),
                                   nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    head = nn.Sequential(Standardize(torch.full((16,), 0.1), torch.full((16,), 0.5)), nn.Linear(16, len(data.classes)))
    model = ExportModel(trunk, nn.Identity(), head).eval()
    feeds = modality.encode(list(data.examples), preprocessing=prep)
    with torch.no_grad():
        features = trunk(torch.from_numpy(feeds["pixel_values"]))[0].numpy()
    fp32 = export_onnx(model, modality.encode(list(data.examples[:1]), preprocessing=prep), tmp_path / "m.onnx",
                       input_names=modality.input_names(), dynamic_axes=modality.dynamic_axes())
    logits, inputs = onnx_logits_and_head_inputs(fp32, modality, data, prep)
    np.testing.assert_allclose(inputs, features, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        np.testing.assert_allclose(logits, head(torch.from_numpy(inputs)).numpy(), rtol=1e-4, atol=1e-5)
    calibration = [{"pixel_values": feeds["pixel_values"][:8]}]
    for mode in ("int8", "int8-dynamic"):
        int8 = quantize_onnx(fp32, tmp_path / f"{mode}.onnx", mode=mode, calibration=calibration)
        logits8, inputs8 = onnx_logits_and_head_inputs(int8, modality, data, prep)
        assert logits8.shape == logits.shape and inputs8.shape == inputs.shape
        cosine = (inputs8 * features).sum(1) / (np.linalg.norm(inputs8, axis=1) * np.linalg.norm(features, axis=1))
        assert cosine.min() > 0.9, (mode, cosine.min())  # the same features, quantized
    bare = export_onnx(TupleOut(nn.Sequential(trunk.module, nn.Linear(16, 2))).eval(),
                       modality.encode(list(data.examples[:1]), preprocessing=prep), tmp_path / "bare.onnx",
                       input_names=modality.input_names(), dynamic_axes=modality.dynamic_axes())
    with pytest.raises(ExportError, match="not an ExportModel with a linear head"):
        onnx_logits_and_head_inputs(bare, modality, data, prep)


def test_every_trial_at_one_length_is_measured_on_the_same_input(tiny_bert_dir, tmp_path) -> None:
    """The latency example is drawn with the search's seed, once per preprocessing: two fine-tunes that
    differ only in their trial's seed, and the probe at the same length, count and time the same input.
    Texts of a long-tailed length make the longest of any 64 drawn depend on which were drawn."""
    path = _texts(tmp_path / "texts.csv", 60, lambda rng, _: min(2 + int(rng.pareto(2.5) * 3), 50), seed=1)
    runner = _tiny_text_runner(TextModality(), path, tiny_bert_dir, tmp_path)
    base = {"backbone": "tiny", "data__max_length": 64, "prune__method": "none", "quant__mode": "none"}
    full = {**base, "train__mode": "full", "train__epochs": 1, "optim__lr": 1e-3, "optim__weight_decay": 0.01}
    train = runner.splits.train.examples
    prep = runner._preprocessing([runner.registry.get("tiny")], full)

    def longest_drawn(seed: int) -> int:  # the longest of 64 drawn with ``seed``, in tokens
        drawn = np.random.default_rng(seed).choice(len(train), size=64, replace=False)
        return max(runner.modality.encode([train[i]], preprocessing=prep)["input_ids"].shape[1] for i in drawn)

    # two trials whose own draws (what each timed before) differ in length
    other = next(seed for seed in range(4, 100) if longest_drawn(seed) != longest_drawn(3))
    assert runner.latency_example(prep)["input_ids"].shape[1] == longest_drawn(runner.seed)
    gmacs = {seed: runner.evaluate(full, trial_dir=tmp_path / f"full{seed}", seed=seed).extra["gmacs"]
             for seed in (3, other)}
    assert gmacs[3] == gmacs[other]
    probe = runner.evaluate({**base, "train__mode": "probe"}, trial_dir=tmp_path / "probe", seed=5).extra["gmacs"]
    assert probe == pytest.approx(gmacs[3], rel=1e-6)


def _texts(path, per_class: int, words_in, *, seed: int):
    """A labelled CSV of ``per_class`` texts per topic of ``tests.conftest.WORDS``, text ``i`` of
    ``words_in(rng, i)`` words drawn from its topic's."""
    import csv

    from tests.conftest import WORDS

    rng = np.random.default_rng(seed)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        for label, words in WORDS.items():
            for i in range(per_class):
                writer.writerow([" ".join(rng.choice(words, size=words_in(rng, i))), label])
    return path


def test_a_new_length_runs_only_the_texts_that_an_earlier_one_cut(tiny_bert_dir, tmp_path) -> None:
    """Features at a second ``max_length``: a text that fits in both lengths takes the first one's cached
    features, only the others run through the trunk, and the result is a whole extraction's."""
    from lepton_automl.interfaces import build_seeded

    path = _texts(tmp_path / "texts.csv", 60, lambda rng, i: 40 if i % 6 == 0 else int(rng.integers(2, 9)), seed=2)
    modality = TextModality()

    def extract(runner, length: int):
        card = runner.registry.get("tiny")
        params = {"backbone": "tiny", "data__max_length": length, "train__mode": "probe", "prune__method": "none",
                  "quant__mode": "none"}
        prep = runner._preprocessing([card], params)
        parts = lambda: build_seeded(modality, card, runner.registry, params=params, finetune_blocks=0,  # noqa: E731
                                     pretrained=True, seed=0)
        return prep, runner.features(card, parts, prep, TrialConfig.from_params(params))

    runner = _tiny_text_runner(modality, path, tiny_bert_dir, tmp_path / "one")
    ran: dict[str, int] = {}
    runner.progress = lambda desc, done, total: ran.__setitem__(desc, total)
    every = [e for split in ("train", "validation", "test") for e in getattr(runner.splits, split).examples]
    extract(runner, 64)
    assert sum(ran.values()) == len(every)
    ran.clear()
    prep, reused = extract(runner, 32)
    cut = sum(len(modality.encode([e], preprocessing={**prep, "max_length": 512})["input_ids"][0]) > 32 for e in every)
    assert 0 < cut < len(every) / 4 and sum(ran.values()) == cut  # the long texts alone ran at 32
    assert not reused.hit
    _, whole = extract(_tiny_text_runner(modality, path, tiny_bert_dir, tmp_path / "two"), 32)
    for split in ("train", "validation", "test"):
        np.testing.assert_allclose(reused.arrays[split][0], whole.arrays[split][0], atol=1e-5)
