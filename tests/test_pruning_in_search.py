"""Pruning inside a trial: structured channels with recovery, unstructured magnitude, text layers."""

from __future__ import annotations

from pathlib import Path

import pytest

from lepton_automl.backbones import BackboneCard, BackboneRegistry
from lepton_automl.cost.hardware import CostModel, load_profiles
from lepton_automl.data.split import split_data
from lepton_automl.export.artifact import Predictor
from lepton_automl.search.objective import TrialRunner
from lepton_automl.search.space import SearchSpace
from lepton_automl.training.cache import FeatureCache
from lepton_image import ImageModality
from lepton_text import TextModality


def _runner(modality, data, registry, tmp_path: Path, backbone: str) -> TrialRunner:
    profiles = load_profiles()
    return TrialRunner(modality=modality, registry=registry, splits=split_data(data, seed=0),
                       space=SearchSpace(backbones=(backbone,)), cache=FeatureCache(tmp_path / "cache"),
                       cost=CostModel(train=profiles["local-cpu"], serve=profiles["local-cpu"]), run_dir=tmp_path)


def _tiny_text_runner(modality, text_csv: Path, tiny_bert_dir: Path, tmp_path: Path) -> TrialRunner:
    registry = BackboneRegistry()
    registry.register(BackboneCard(name="tiny", ref=f"local-dir:{tiny_bert_dir}", modality="text", weights="local"))
    return _runner(modality, modality.load(text_csv), registry, tmp_path, "tiny")


BASE = {"backbone": "efficientnet_lite0", "data__image_size": 64, "train__mode": "probe",
        "optim__weight_decay": 1e-4, "quant__mode": "none"}


@pytest.fixture(scope="module")
def image_runner(image_folder, tmp_path_factory):
    modality = ImageModality()
    return _runner(modality, modality.load(image_folder), BackboneRegistry(), tmp_path_factory.mktemp("p"),
                   "efficientnet_lite0")


def test_structured_pruning_shrinks_the_model_and_is_measured(image_runner, tmp_path) -> None:
    plain = image_runner.evaluate({**BASE, "prune__method": "none"}, trial_dir=tmp_path / "a", seed=0)
    pruned = image_runner.evaluate({**BASE, "prune__method": "structured", "prune__amount": 0.5,
                                    "prune__recovery_epochs": 1}, trial_dir=tmp_path / "b", seed=0)
    assert pruned.params_m < 0.6 * plain.params_m
    assert pruned.extra["gmacs"] < plain.extra["gmacs"]
    assert pruned.size_mb < plain.size_mb
    # measured on the pruned, exported artifact: the served file reproduces the trial's validation accuracy
    predictor = Predictor(tmp_path / "b")
    validation = image_runner.splits.validation
    served = float((predictor.logits(list(validation.examples)).argmax(1) == validation.labels).mean())
    assert served == pytest.approx(pruned.extra["holdout_accuracy"])


def test_unstructured_pruning_is_a_size_option(image_runner, tmp_path) -> None:
    plain = image_runner.evaluate({**BASE, "prune__method": "none"}, trial_dir=tmp_path / "a", seed=0)
    sparse = image_runner.evaluate({**BASE, "prune__method": "unstructured", "prune__amount": 0.6},
                                   trial_dir=tmp_path / "b", seed=0)
    assert sparse.extra["weight_zero_fraction"] > 0.5
    assert sparse.params_m == pytest.approx(plain.params_m)  # same dense shapes
    assert sparse.size_gz_mb < 0.8 * plain.size_gz_mb  # the gzip-compressed file shrinks
    assert sparse.accuracy >= plain.accuracy - 0.15  # the head is refit to the pruned features


def test_text_structured_pruning_drops_layers(text_csv, tiny_bert_dir, tmp_path) -> None:
    modality = TextModality()
    runner = _tiny_text_runner(modality, text_csv, tiny_bert_dir, tmp_path)
    base = {"backbone": "tiny", "data__max_length": 32, "train__mode": "probe", "optim__weight_decay": 1e-4,
            "quant__mode": "none"}
    full = runner.evaluate({**base, "prune__method": "none"}, trial_dir=tmp_path / "a", seed=0)
    half = runner.evaluate({**base, "prune__method": "structured", "prune__amount": 0.5},
                           trial_dir=tmp_path / "b", seed=0)
    assert half.params_m < full.params_m and half.extra["gmacs"] < full.extra["gmacs"]
    assert half.extra["cache_hit"] is False  # a different backbone cut is a different cache entry


def test_folding_the_standardisation_keeps_the_logits() -> None:
    import numpy as np
    import torch

    from lepton_automl.training.trainer import TrainConfig, fold_standardize, train_probe

    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (60, 8)).astype(np.float32)
    y = (x[:, 0] > 3).astype(np.int64)
    head = train_probe(x, y, 2, TrainConfig(weight_decay=1e-3))
    before = head(torch.from_numpy(x))
    fold_standardize(head)
    assert isinstance(head[0], torch.nn.Identity)
    assert torch.allclose(head(torch.from_numpy(x)), before, atol=1e-4)


def test_cross_validated_probe_accuracy_tracks_the_truth() -> None:
    import numpy as np

    from lepton_automl.training.trainer import select_probe

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    separable = rng.normal(0, 0.3, (120, 5)).astype(np.float32) + np.eye(3, 5)[y] * 3
    noise = rng.normal(0, 1, (120, 5)).astype(np.float32)
    assert select_probe(separable, y, 3, seed=0).cv_accuracy > 0.95
    assert select_probe(noise, y, 3, seed=0).cv_accuracy < 0.6


def test_probe_trials_report_cross_validated_and_holdout_accuracy(image_runner, tmp_path) -> None:
    result = image_runner.evaluate({**BASE, "prune__method": "none"}, trial_dir=tmp_path / "cv", seed=0)
    assert result.extra["cv_accuracy"] is not None and result.extra["holdout_accuracy"] is not None
    # fp32 artifact: no compression loss, so the objective is the cross-validated accuracy itself.
    assert result.accuracy == pytest.approx(result.extra["cv_accuracy"], abs=0.02)


def test_class_weights_raise_minority_recall() -> None:
    import numpy as np
    import torch

    from lepton_automl.training.trainer import TrainConfig, inverse_frequency_weights, train_probe

    rng = np.random.default_rng(0)
    y = np.array([0] * 400 + [1] * 20)
    x = (rng.normal(0, 1, (420, 2)) + np.where(y[:, None] == 1, 1.2, 0.0)).astype(np.float32)
    weights = inverse_frequency_weights(y, 2)
    assert weights == pytest.approx((420 / 800, 420 / 40))

    def minority_recall(cfg: TrainConfig) -> float:
        head = train_probe(x, y, 2, cfg)
        with torch.no_grad():
            return float((head(torch.from_numpy(x)).argmax(1).numpy()[y == 1] == 1).mean())

    assert minority_recall(TrainConfig(weight_decay=1e-3, class_weights=weights)) > \
        minority_recall(TrainConfig(weight_decay=1e-3)) + 0.3


def test_the_search_timeout_stops_a_running_trial(image_runner, tmp_path) -> None:
    import dataclasses
    import time

    from lepton_automl.search.objective import TrialTimeout

    late = dataclasses.replace(image_runner, search_ends_at=time.perf_counter() - 1.0)
    with pytest.raises(TrialTimeout, match="--timeout ran out"):
        late.evaluate({**BASE, "prune__method": "none"}, trial_dir=tmp_path / "late", seed=0)


def test_text_width_pruning_recovers_and_the_export_rebuilds(text_csv, tiny_bert_dir, tmp_path) -> None:
    import numpy as np
    import torch

    from lepton_automl.export.artifact import Predictor, rebuild_model

    modality = TextModality()
    runner = _tiny_text_runner(modality, text_csv, tiny_bert_dir, tmp_path)
    params = {"backbone": "tiny", "data__max_length": 32, "train__mode": "probe", "optim__weight_decay": 1e-4,
              "prune__method": "structured", "prune__target": "width", "prune__amount": 0.5,
              "prune__recovery_epochs": 1, "quant__mode": "none"}
    result = runner.evaluate(params, trial_dir=tmp_path / "w", seed=0)
    full = runner.evaluate({**params, "prune__method": "none"}, trial_dir=tmp_path / "f", seed=0)
    assert result.params_m < full.params_m and result.extra["gmacs"] < full.extra["gmacs"]
    # the export rebuilds the pruned architecture (1 head of 2, MLP 32 of 64) and serves what it measured
    predictor = Predictor(tmp_path / "w")
    removed = predictor.meta["params"]["prune__heads"]
    assert sorted(removed) == ["0", "1"] and all(len(h) == 1 and h[0] in (0, 1) for h in removed.values())
    examples = list(runner.splits.validation.examples)
    feeds = modality.encode(examples, preprocessing=predictor.preprocessing)
    with torch.no_grad():
        rebuilt = rebuild_model(tmp_path / "w")(*[torch.from_numpy(feeds[n]) for n in modality.input_names()])
    np.testing.assert_allclose(predictor.logits(examples), rebuilt.numpy(), atol=1e-4)
    labels = runner.splits.validation.labels
    assert float((predictor.logits(examples).argmax(1) == labels).mean()) == pytest.approx(result.accuracy)
