"""End-to-end searches on tiny data: real Optuna + SQLite, real torch, real ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from lepton_automl.backbones import BackboneCard, BackboneRegistry
from lepton_automl.exceptions import ConfigError
from lepton_automl.export.artifact import Predictor
from lepton_automl.search.engine import search
from lepton_automl.search.front import pick
from lepton_automl.search.objective import Limits
from lepton_automl.search.repeats import was_not_run
from lepton_automl.search.retired import STOPPED_SLOWER_ATTR
from lepton_automl.search.workers import counted_trials
from lepton_automl.training.trainer import PROBE_L2_GRID


@pytest.fixture(scope="module")
def image_outcome(image_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    outcome = search(image_folder, backbones=["efficientnet_lite0"], n_trials=3, run_root=root, seed=0)
    return outcome, root


def test_image_search_records_three_objectives(image_outcome) -> None:
    outcome, root = image_outcome
    study = outcome.study
    assert (root / "lepton.db").is_file()
    assert study.metric_names == ["accuracy", "latency_ms", "cost_usd"]
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE", "MINIMIZE"]
    done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    # three counted trials: the warm start's fp32 probe, its int8 twin, and its next int8 draw. An int8
    # trunk no faster than fp32 on this CPU is stopped once timed; int8 is then retired, and the next
    # draw runs in fp32. Either way two of them complete.
    assert counted_trials(study) == 3 and len(done) >= 2
    for t in done:
        acc, latency, cost = t.values
        assert 0.0 <= acc <= 1.0 and latency > 0 and cost > 0
        assert {"backbone", "train__mode", "quant__mode", "data__image_size"} <= set(t.params)
        if t.params["train__mode"] == "probe" and t.params["prune__method"] == "none":
            assert t.user_attrs["probe_l2"] in PROBE_L2_GRID  # chosen by cross-validation, not sampled
        assert t.user_attrs["size_mb"] > 0 and t.user_attrs["latency_runs"] >= 5
    # Warm start: the first trial is the fp32 linear probe at full size, the second its int8 twin.
    first, twin = study.trials[:2]
    assert first.state == optuna.trial.TrialState.COMPLETE and first.params["quant__mode"] == "none"
    assert twin.params["quant__mode"] == "int8"
    assert twin.state == optuna.trial.TrialState.COMPLETE or STOPPED_SLOWER_ATTR in twin.user_attrs
    assert outcome.front and all(r.number in {t.number for t in done} for r in outcome.front)
    front = {r.number for r in outcome.front}
    for t in done:  # only the front keeps its model files
        assert (Path(t.user_attrs["artifact"]).is_dir()) == (t.number in front)
    best = max(r.accuracy for r in outcome.front)
    assert best >= 0.8, "three clearly different shapes must be learnable from ImageNet features"


def test_export_reloads_and_reproduces_measured_accuracy(image_outcome) -> None:
    outcome, _ = image_outcome
    row, why = pick(outcome.front, rule="accuracy")
    assert "highest" in why
    predictor = Predictor.load(row.artifact)
    test = outcome.splits.test
    predicted = predictor.predict(list(test.examples))
    accuracy = sum(p == test.classes[y] for p, y in zip(predicted, test.labels)) / len(test)
    assert accuracy == pytest.approx(row.test_accuracy)
    for name in ("model.safetensors", "model.onnx", "lepton.json", "README.md"):
        assert (predictor.directory / name).is_file()


def test_rerun_resumes_instead_of_starting_over(image_folder, image_outcome) -> None:
    outcome, root = image_outcome
    again = search(image_folder, backbones=["efficientnet_lite0"], n_trials=3, run_root=root, seed=0)
    assert len(again.study.trials) == len(outcome.study.trials)
    more = search(image_folder, backbones=["efficientnet_lite0"], n_trials=4, run_root=root, seed=0)
    # one more trial, whatever its outcome (complete, or stopped early by dominance); nothing left running.
    # Draws not run (a repeat, or a retired option's: search/retired.py) are not counted.
    ran = [t for t in more.study.trials if not was_not_run(t)]
    assert counted_trials(more.study) == 4 and len(ran) == 4
    assert {t.state for t in more.study.trials} <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}


def test_same_study_on_other_data_is_refused(image_outcome, text_csv, tiny_bert_dir) -> None:
    _, root = image_outcome
    registry = BackboneRegistry()
    registry.register(BackboneCard(name="tiny", ref=f"local-dir:{tiny_bert_dir}", modality="text", weights="local"))
    with pytest.raises(ConfigError, match="different data"):
        search(text_csv, registry=registry, backbones=["tiny"], n_trials=1, run_root=root,
               study_name="image-shapes")


def test_failing_trials_are_recorded_and_the_study_goes_on(image_folder, tmp_path) -> None:
    registry = BackboneRegistry()

    def broken_build_fn():
        raise RuntimeError("this backbone cannot be built")

    registry.register_build_fn("broken", broken_build_fn, modality="image", params_m=1.0)
    outcome = search(image_folder, registry=registry, backbones=["broken"], n_trials=2, run_root=tmp_path,
                     untrained=True, warm_start=False)
    assert len(outcome.failed) == 2
    assert all("cannot be built" in reason for _, reason in outcome.failed)
    assert outcome.front == []


def test_infeasible_trials_never_enter_the_front(image_folder, tmp_path) -> None:
    # without early stopping, which may end an int8 twin no faster than fp32 on this CPU
    outcome = search(image_folder, backbones=["efficientnet_lite0"], n_trials=2, run_root=tmp_path,
                     limits=Limits(max_latency_ms=1e-6), timeout=600, early_stopping=None)
    done = outcome.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(done) == 2
    assert all(t.constraints["latency_ms"] > 0 for t in done)
    assert outcome.front == []


def test_text_search_end_to_end_with_a_local_model(text_csv, tiny_bert_dir, tmp_path) -> None:
    registry = BackboneRegistry()
    registry.register(BackboneCard(name="tiny", ref=f"local-dir:{tiny_bert_dir}", modality="text",
                                   weights="local", max_length=64))
    outcome = search(text_csv, registry=registry, backbones=["tiny"], n_trials=2, run_root=tmp_path)
    assert outcome.study.user_attrs["modality"] == "text"
    assert outcome.front
    row = outcome.front[0]
    predictor = Predictor.load(row.artifact)
    assert (predictor.directory / "tokenizer").is_dir()
    labels = predictor.predict(["kernel compiler thread cache", "recipe oven flour sauce"])
    assert all(label in outcome.splits.classes for label in labels)
    # The folder is portable: no local path in lepton.json, and a copy elsewhere predicts the same.
    import shutil

    assert str(tmp_path) not in (predictor.directory / "lepton.json").read_text()
    moved = shutil.copytree(predictor.directory, tmp_path.parent / f"{tmp_path.name}-moved")
    shutil.rmtree(predictor.directory)
    assert Predictor.load(moved).predict(["kernel compiler thread cache", "recipe oven flour sauce"]) == labels


def _row(number: int, accuracy: float, latency: float):
    from lepton_automl.search.front import FrontRow

    return FrontRow(number=number, accuracy=accuracy, latency_ms=latency, cost_usd=latency / 100,
                    test_accuracy=None, latency_p90_ms=None, size_mb=None, params_m=None, gmacs=None,
                    params={}, artifact=None)


def test_pick_rules_on_a_known_front() -> None:
    rows = [_row(0, 0.80, 1.0), _row(1, 0.95, 2.0), _row(2, 0.96, 10.0), _row(3, 0.965, 40.0)]
    assert pick(rows, rule="accuracy")[0].number == 3
    assert pick(rows, rule="latency")[0].number == 0
    assert pick(rows, rule="balanced")[0].number == 2  # fastest within 1 point of 0.965
    row, why = pick(rows, rule="knee")
    assert row.number == 1 and "knee" in why
    with pytest.raises(ConfigError, match="knee"):
        pick(rows, rule="fastest")


def test_macs_are_counted_beside_latency(image_outcome) -> None:
    outcome, _ = image_outcome
    for row in outcome.front:
        size = row.params["data__image_size"]
        # efficientnet_lite0 is 0.39 GMACs at 224 px and scales with the pixel count.
        assert row.gmacs == pytest.approx(0.384 * (size / 224) ** 2, rel=0.15)


def test_trial_timeout_fails_the_trial_with_its_reason(image_folder, tmp_path) -> None:
    outcome = search(image_folder, backbones=["efficientnet_lite0"], n_trials=1, run_root=tmp_path,
                     trial_timeout=1e-3)
    assert len(outcome.failed) == 1 and "per-trial limit" in outcome.failed[0][1]


def test_warm_start_from_another_study(image_folder, image_outcome, tmp_path) -> None:
    outcome, root = image_outcome
    again = search(image_folder, backbones=["efficientnet_lite0"], n_trials=1, run_root=root,
                   study_name="second", warm_start_from="image-shapes")
    first = again.study.trials[0]
    source = optuna.load_study(study_name="image-shapes", storage=f"sqlite:///{root / 'lepton.db'}")
    # what ran there (a retired int8 draw runs in fp32: its configuration, not its draw, is on the front)
    assert first.user_attrs["config"] in [t.user_attrs["config"] for t in source.best_trials]
    with pytest.raises(ConfigError, match="No study 'image-shapez'.*Did you mean 'image-shapes'"):
        search(image_folder, backbones=["efficientnet_lite0"], n_trials=1, run_root=root,
               study_name="third", warm_start_from="image-shapez")


def test_a_users_build_fn_takes_part_like_a_registry_backbone(image_folder, tmp_path) -> None:
    import torch

    registry = BackboneRegistry()

    def tiny_cnn() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(),
                                   torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())

    registry.register_build_fn("tiny_cnn", tiny_cnn, modality="image", params_m=0.0003)
    outcome = search(image_folder, registry=registry, backbones=["tiny_cnn"], n_trials=2, run_root=tmp_path,
                     untrained=True)
    assert outcome.failed == [] and outcome.front
    assert all(r.params["backbone"] == "tiny_cnn" for r in outcome.front)


def test_a_model_at_chance_never_enters_the_front(image_outcome) -> None:
    import numpy as np

    from lepton_automl.search.front import front_rows
    from lepton_automl.search.objective import usefulness_floor

    assert usefulness_floor(np.array([0, 0, 0, 1])) == pytest.approx(0.75 + 0.025)
    outcome, _ = image_outcome
    floor = usefulness_floor(outcome.splits.train.labels)
    done = outcome.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    for t in done:  # each trial's constraint is the floor minus its measured accuracy
        assert t.constraints["above_chance"] == pytest.approx(floor - t.values[0])
    # A collapsed model: far faster and cheaper than every real trial, at chance accuracy.
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    for t in done:
        study.add_trial(t)
    chance = optuna.trial.create_trial(params=done[0].params, distributions=done[0].distributions,
                                       values=[1 / 3, 1e-3, 1e-9], user_attrs=done[0].user_attrs,
                                       constraints={"above_chance": floor - 1 / 3})
    study.add_trial(chance)
    rows = front_rows(study)
    assert rows and all(r.accuracy > floor for r in rows)
    assert not any(r.latency_ms == pytest.approx(1e-3) for r in rows)



def test_hypervolume_of_a_known_front() -> None:
    import pytest

    from lepton_automl.search.front import hypervolume

    assert hypervolume([], ref_latency_ms=100.0) == 0.0
    assert hypervolume([(0.9, 1.0)], ref_latency_ms=100.0) == pytest.approx(0.9 * 2)
    # (0.5 at 1 ms, 2 decades) and (0.9 at 10 ms, 1 decade): 0.5*2 + 0.4*1 = 1.4; a dominated point adds nothing
    front = [(0.5, 1.0), (0.9, 10.0)]
    assert hypervolume(front, ref_latency_ms=100.0) == pytest.approx(1.4)
    assert hypervolume(front + [(0.4, 5.0), (0.95, 200.0)], ref_latency_ms=100.0) == pytest.approx(1.4)


def test_a_finished_configuration_is_not_run_again(image_folder, tmp_path) -> None:
    kwargs = dict(backbones=["efficientnet_lite0"], run_root=tmp_path, warm_start=False, seed=0,
                  space_options={"train__mode": ("probe",), "prune__method": ("none",), "quant__mode": ("none",)})
    first = search(image_folder, n_trials=1, **kwargs)
    done = first.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))[0]
    first.study.enqueue_trial(dict(done.params))
    again = search(image_folder, n_trials=2, **kwargs)
    repeat = again.study.trials[done.number + 1]  # the enqueued one
    assert repeat.state == optuna.trial.TrialState.PRUNED
    assert repeat.user_attrs["early_stop_reason"] == f"same configuration as trial {done.number}"
    # not run and not counted: the study went on to a second trial that ran; not listed as stopped early
    assert again.repeats >= 1 and again.stopped == []
    assert counted_trials(again.study) == 2
    assert len(again.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 2


def test_a_gpu_serving_profile_is_priced_on_cpu_throughput_and_says_so(image_folder, tmp_path, caplog) -> None:
    import logging

    from lepton_automl.cost.hardware import get_profile, load_profiles

    with caplog.at_level(logging.WARNING, logger="lepton_automl"):
        outcome = search(image_folder, backbones=["efficientnet_lite0"], n_trials=1, run_root=tmp_path, seed=0,
                         serve_profile="aws-g5.xlarge", predictions_per_month=1e6)
    warned = [r.getMessage() for r in caplog.records if "aws-g5.xlarge" in r.getMessage()]
    assert len(warned) == 1 and "CPU" in warned[0] and "--serve-hardware aws-c7i.large" in warned[0]
    (trial,) = [t for t in outcome.study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    ua, g5 = trial.user_attrs, get_profile("aws-g5.xlarge", load_profiles())
    # what the warning says: the GPU's hourly price times the throughput measured here
    serve_usd = 1e6 / ua["throughput_per_s"] * g5.usd_per_hour / 3600.0
    assert trial.values[2] == pytest.approx(serve_usd + ua["train_seconds"] * get_profile(
        "local-cpu", load_profiles()).usd_per_hour / 3600.0, rel=1e-6)


def test_unstructured_pruning_is_searched_only_under_a_size_limit(image_folder, tmp_path) -> None:
    # It shrinks the gzip file and changes no objective: without --max-size-mb it is not drawn.
    spaces = {}
    for name, limits in (("free", None), ("sized", Limits(max_size_mb=50.0))):
        # the trials fail at their first deadline check, after their parameters were drawn
        outcome = search(image_folder, backbones=["efficientnet_lite0"], n_trials=2, run_root=tmp_path / name,
                         warm_start=False, limits=limits, trial_timeout=1e-3, ensembles=False)
        spaces[name] = {t.distributions["prune__method"].choices for t in outcome.study.trials}
    assert spaces == {"free": {("none", "structured")}, "sized": {("none", "structured", "unstructured")}}
