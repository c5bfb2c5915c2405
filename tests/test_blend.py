"""Blends of finished trials: ensemble selection on stored logits, a blend trial on the study whose
latency and cost are its members' summed, and an export folder that predicts, serves and refuses what
only one network can do."""

from __future__ import annotations

import base64
import json
import logging
import shutil

import numpy as np
import optuna
import pytest
from fastapi.testclient import TestClient
from rich.console import Console
from typer.testing import CliRunner

from lepton_automl.backbones import BackboneRegistry
from lepton_automl.cli import app
from lepton_automl.cli._app import _front_table
from lepton_automl.cost.hardware import CostModel, load_profiles
from lepton_automl.data.split import split_data
from lepton_automl.exceptions import ExportError
from lepton_automl.export.artifact import Predictor, load_metadata, rebuild_model, softmax
from lepton_automl.report import write_html_report
from lepton_automl.search.blend import (
    PREDICTIONS_ATTR,
    BlendChoice,
    BlendMember,
    Blender,
    blend_probabilities,
    choose_blend,
    fit_temperature,
    is_blend_trial,
    load_predictions,
)
from lepton_automl.search.engine import search
from lepton_automl.search.front import FrontRow, front_rows
from lepton_automl.search.objective import Limits
from lepton_automl.search.probe_export import RECIPE, can_materialize, is_recipe
from lepton_automl.search.repeats import was_not_run
from lepton_automl.search.workers import counted_trials
from lepton_automl.serving.app import create_app
from lepton_image import ImageModality

def _noisy_logits(labels: np.ndarray, *, classes: int, skill: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(len(labels), classes))
    z[np.arange(len(labels)), labels] += skill
    return z


def test_models_with_different_errors_are_blended_and_beat_each_alone() -> None:
    labels = np.random.default_rng(0).integers(6, size=2000)
    a, b = (_noisy_logits(labels, classes=6, skill=1.5, seed=s) for s in (1, 2))
    weak = _noisy_logits(labels, classes=6, skill=0.3, seed=3)
    accuracy = {n: float((z.argmax(1) == labels).mean()) for n, z in enumerate((a, b, weak))}
    choice = choose_blend({0: a, 1: b, 2: weak}, labels, accuracy=accuracy)
    assert choice is not None
    assert {m.trial for m in choice.members} >= {0, 1}
    assert sum(m.weight for m in choice.members) == pytest.approx(1.0)
    # Independent noise averages out: the blend is well above either good model.
    assert choice.validation_accuracy > max(accuracy.values()) + 0.03
    assert choice.best_single_accuracy == max(accuracy.values())
    assert choice.objective == pytest.approx(choice.validation_accuracy)  # the best's objective is its accuracy here
    # Its validation accuracy is cross-fitted (chosen on each half, scored on the other): below what the
    # blend chosen on every example reads there, which saw them.
    blended = blend_probabilities([{0: a, 1: b, 2: weak}[m.trial] for m in choice.members], choice.members)
    assert float((blended.argmax(1) == labels).mean()) >= choice.validation_accuracy - 0.01


def test_a_blend_joins_when_it_beats_the_best_trial_cross_fitted_by_half_its_noise() -> None:
    # Two independent models on 120 examples: cross-fitted, the blend gets about 5 points more right than
    # the better one, which passes at half its noise (the default) but not a 5% test (1.645).
    labels = np.random.default_rng(0).integers(5, size=120)
    a, b = _noisy_logits(labels, classes=5, skill=1.5, seed=10), _noisy_logits(labels, classes=5, skill=1.2, seed=20)
    accuracy = {n: float((z.argmax(1) == labels).mean()) for n, z in enumerate((a, b))}
    choice = choose_blend({0: a, 1: b}, labels, accuracy=accuracy)
    assert choice is not None and choice.validation_accuracy > choice.best_single_accuracy + 0.02
    assert choose_blend({0: a, 1: b}, labels, accuracy=accuracy, z=1.645) is None
    # Its objective is the best trial's objective plus that gain: on the best trial's scale, whatever it
    # is (a probe's is cross-validated over train+validation, not read on the validation split).
    gain = choice.validation_accuracy - choice.best_single_accuracy
    assert choice.objective == pytest.approx(accuracy[0] + gain)
    shifted = choose_blend({0: a, 1: b}, labels, accuracy={0: accuracy[0] + 0.05, 1: accuracy[1]})
    assert shifted is not None and shifted.objective == pytest.approx(choice.objective + 0.05)
    # A copy of the best model, nudged, makes the same errors: no blend, whatever the threshold.
    nudged = a + np.random.default_rng(2).normal(scale=0.05, size=a.shape)
    assert choose_blend({0: a, 1: nudged}, labels, accuracy={0: 0.7, 1: 0.7}, z=0.0) is None


def test_a_copy_of_the_best_model_is_no_blend_and_limits_keep_members_out() -> None:
    labels = np.random.default_rng(0).integers(4, size=1000)
    a = _noisy_logits(labels, classes=4, skill=1.5, seed=1)
    assert choose_blend({0: a, 1: a.copy()}, labels, accuracy={0: 0.8, 1: 0.8}) is None
    b, c = (_noisy_logits(labels, classes=4, skill=1.5, seed=s) for s in (2, 3))
    choice = choose_blend({0: a, 1: b, 2: c}, labels, accuracy={0: 0.8, 1: 0.7, 2: 0.7},
                          allowed=lambda members: 1 not in members)
    assert choice is not None and {m.trial for m in choice.members} == {0, 2}
    assert choose_blend({0: a, 1: b, 2: c}, labels, accuracy={0: 0.8, 1: 0.7, 2: 0.7}, max_members=1) is None


def test_the_temperature_undoes_overconfident_logits() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(scale=2.0, size=(4000, 5))
    labels = np.array([rng.choice(5, p=p) for p in softmax(z)])  # calibrated at temperature 1
    assert 0.7 < fit_temperature(z, labels) < 1.4
    assert 2.8 < fit_temperature(4.0 * z, labels) < 5.6


@pytest.fixture(scope="module")
def probes(image_folder, tmp_path_factory):
    """A real search of three counted trials (the first two the warm start's probes), without a blend.
    Without early stopping: it stops an int8 twin timed no faster than fp32, which on a tiny network
    is a coin toss, and the tests below need two completed trials."""
    root = tmp_path_factory.mktemp("blend-search")
    outcome = search(image_folder, backbones=["efficientnet_lite0"], n_trials=3, run_root=root, seed=0,
                     blends=False, keep_all_artifacts=True, early_stopping=None)
    return root, outcome


def test_every_trial_stores_its_artifacts_logits(probes) -> None:
    _, outcome = probes
    done = outcome.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    # the warm start's fp32 probe and int8 twin complete (no early stopping)
    assert counted_trials(outcome.study) == 3 and len(done) >= 2 and not any(is_blend_trial(t) for t in done)
    for t in done:
        z = load_predictions(t.user_attrs[PREDICTIONS_ATTR])
        assert z["validation"].shape == (len(outcome.splits.validation), len(outcome.splits.classes))
        assert z["test"].shape == (len(outcome.splits.test), len(outcome.splits.classes))
        assert float((z["test"].argmax(1) == outcome.splits.test.labels).mean()) == t.user_attrs["test_accuracy"]


def test_a_probe_whose_trunk_store_is_gone_cannot_join_a_blend(probes, tmp_path) -> None:
    _, outcome = probes
    probe = next(t for t in outcome.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
                 if is_recipe(t.user_attrs["artifact"]))
    copy = tmp_path / "trial"
    shutil.copytree(probe.user_attrs["artifact"], copy)
    assert can_materialize(copy)
    recipe = json.loads((copy / RECIPE).read_text())
    (copy / RECIPE).write_text(json.dumps({**recipe, "trunk": str(tmp_path / "removed-store")}))
    assert not can_materialize(copy) and not can_materialize(tmp_path / "nothing")


def _blender(outcome, root, image_folder) -> Blender:
    profiles = load_profiles()
    modality = ImageModality()
    splits = split_data(modality.load(image_folder), seed=0)
    return Blender(study=outcome.study, run_dir=outcome.run_dir,
                   labels={"validation": splits.validation.labels, "test": splits.test.labels},
                   cost=CostModel(train=profiles["local-cpu"], serve=profiles["local-cpu"]), limits=Limits(),
                   modality=modality, registry=BackboneRegistry(), name="tiny images classifier")


def test_a_blend_trial_sums_its_members_and_its_folder_predicts_what_was_scored(probes, image_folder, tmp_path) -> None:
    root, outcome = probes
    study = outcome.study
    members = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))[:2]
    blender = _blender(outcome, root, image_folder)
    logits = blender.logits([t.number for t in members])
    choice = BlendChoice(members=(BlendMember(members[0].number, 0.75, 1.5), BlendMember(members[1].number, 0.25, 0.8)),
                         validation_accuracy=0.5, validation_log_loss=1.0, best_single_accuracy=0.4,
                         objective=0.55)
    counted = counted_trials(study)
    blend = blender.add(choice)
    assert blend is not None and is_blend_trial(blend) and blend.state == optuna.trial.TrialState.COMPLETE
    assert counted_trials(study) == counted  # a blend is not one of the --n-trials
    assert blender.add(choice) is None  # the same blend is added once
    assert blend.values[0] == 0.55 and blend.user_attrs["holdout_accuracy"] == 0.5  # objective; cross-fitted
    assert blend.values[1] == pytest.approx(sum(t.values[1] for t in members))
    assert blend.user_attrs["size_mb"] == pytest.approx(sum(t.user_attrs["size_mb"] for t in members))
    throughput = 1.0 / sum(1.0 / t.user_attrs["throughput_per_s"] for t in members)
    assert blend.user_attrs["throughput_per_s"] == pytest.approx(throughput)
    train = sum(t.user_attrs["train_seconds"] for t in members)
    assert blend.values[2] == pytest.approx(blender.cost.total_usd(train_seconds=train, latency_ms=1000.0 / throughput))

    folder = blend.user_attrs["artifact"]
    meta = load_metadata(folder)
    assert meta["kind"] == "blend" and [e["trial"] for e in meta["blend"]] == [t.number for t in members]
    predictor = Predictor(folder)
    splits = outcome.splits
    got = predictor.logits(list(splits.test.examples))
    # The folder's members, run through ONNX Runtime, blended: what the stored test logits predicted.
    stored = blend_probabilities([logits[t.number]["test"] for t in members], choice.members)
    assert float((got.argmax(1) == stored.argmax(1)).mean()) >= 0.95
    assert blend.user_attrs["test_accuracy"] == float((stored.argmax(1) == splits.test.labels).mean())
    each = [Predictor(f"{folder}/{e['path']}").logits(list(splits.test.examples)) for e in meta["blend"]]
    expected = 0.75 * softmax(each[0] / 1.5) + 0.25 * softmax(each[1] / 0.8)
    np.testing.assert_allclose(softmax(got), expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(ExportError, match="blend of 2 models.*member-"):
        rebuild_model(folder)
    # The report and the CLI's front table name its members.
    rows = [*front_rows(study), FrontRow(
        number=blend.number, accuracy=blend.values[0], latency_ms=blend.values[1], cost_usd=blend.values[2],
        test_accuracy=None, latency_p90_ms=None, size_mb=None, params_m=None, gmacs=None,
        params=blend.user_attrs["config"], artifact=folder)]
    html = write_html_report(tmp_path / "report.html", study, rows, title="blend").read_text()
    assert f"blend of trial {members[0].number} x0.75" in html
    console = Console(record=True, width=250)
    console.print(_front_table(rows, blend.number))
    assert f"blend of trial {members[0].number} x0.75 + trial {members[1].number} x0.25" in console.export_text()

    # Served as one model: the probabilities it answers with are the blend's.
    with TestClient(create_app(folder)) as client:
        assert client.get("/metadata").json()["runtime"].startswith("blend of ")
        files = [str(p) for p in splits.test.examples[:4]]
        answer = client.post("/predict", json={"inputs": [base64.b64encode(open(f, "rb").read()).decode()
                                                          for f in files], "top_k": 1}).json()
        assert [p["label"] for p in answer["predictions"]] == predictor.predict(files)
        top = softmax(predictor.logits(predictor.modality.read_inputs(files))).max(1)
        np.testing.assert_allclose([p["top_k"][0]["probability"] for p in answer["predictions"]], top, rtol=1e-4)

    runner = CliRunner()
    result = runner.invoke(app, ["predict", folder, *map(str, splits.test.examples[:3])])
    assert result.exit_code == 0, result.output
    assert [line.split("\t")[1] for line in result.output.strip().splitlines()] == \
        predictor.predict_examples(splits.test.examples[:3])
    out = tmp_path / "exported"
    result = runner.invoke(app, ["export", "--study", study.study_name, "--trial", str(blend.number), "--out", str(out),
                                 "--run-dir", str(root)])
    assert result.exit_code == 0, result.output
    assert Predictor(out).predict_examples(splits.test.examples[:5]) == predictor.predict_examples(splits.test.examples[:5])
    assert "blend of 2 models" in (out / "README.md").read_text()


def test_a_blend_in_the_study_leaves_resuming_and_sampling_alone(probes, image_folder) -> None:
    root, outcome = probes
    if not any(is_blend_trial(t) for t in outcome.study.get_trials()):
        blender = _blender(outcome, root, image_folder)
        first, second = outcome.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))[:2]
        blender.add(BlendChoice(members=(BlendMember(first.number, 0.5, 1.0), BlendMember(second.number, 0.5, 1.0)),
                                validation_accuracy=0.5, validation_log_loss=1.0, best_single_accuracy=0.4,
                         objective=0.55))
    # The same --n-trials: nothing to run (the blend is not counted); one more: TPE samples beside it.
    again = search(image_folder, backbones=["efficientnet_lite0"], n_trials=3, run_root=root, seed=0, blends=False,
                   keep_all_artifacts=True)
    assert len(again.study.trials) == len(outcome.study.trials)
    before = len(outcome.study.trials)
    more = search(image_folder, backbones=["efficientnet_lite0"], n_trials=4, run_root=root, seed=0, blends=False,
                  keep_all_artifacts=True)
    assert counted_trials(more.study) == 4
    # exactly one new trial ran (completed, or stopped early: the draw decides), after any draws not run
    ran = [t for t in more.study.trials[before:] if not was_not_run(t) and not is_blend_trial(t)]
    assert len(ran) == 1 and ran[0].state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    assert ran[0].state == optuna.trial.TrialState.COMPLETE or "early_stop_reason" in ran[0].user_attrs


def test_a_search_blends_its_trials_when_it_ends(image_folder, tmp_path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="lepton_automl"):
        outcome = search(image_folder, backbones=["efficientnet_lite0"], n_trials=3, run_root=tmp_path, seed=0)
    blends = [t for t in outcome.study.trials if is_blend_trial(t)]
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith(("blend of", "blend: no blend"))]
    assert len(said) == 1 and len(blends) == (1 if said[0].startswith("blend of") else 0)
    for blend in blends:  # its objective: the most accurate member's plus a cross-fitted gain
        members = [outcome.study.trials[m] for m in blend.user_attrs["blend"]]
        assert blend.values[0] > max(m.values[0] for m in members)
        if blend.number in {r.number for r in front_rows(outcome.study)}:
            assert Predictor(blend.user_attrs["artifact"]).predict_examples(outcome.splits.test.examples[:2])


def test_a_text_blend_predicts_from_its_own_folder_wherever_it_goes(text_csv, tiny_bert_dir, tmp_path) -> None:
    from lepton_automl.backbones import BackboneCard
    from lepton_text import TextModality

    registry = BackboneRegistry()
    registry.register(BackboneCard(name="tiny", ref=f"local-dir:{tiny_bert_dir}", modality="text", weights="local",
                                   max_length=64))
    # two completed probes: without early stopping, which stops an int8 twin no faster than fp32 (a coin
    # toss on a tiny network)
    outcome = search(text_csv, registry=registry, backbones=["tiny"], n_trials=2, run_root=tmp_path / "runs",
                     blends=False, keep_all_artifacts=True, space_options={"train__mode": ["probe"]},
                     early_stopping=None)
    done = outcome.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    profiles = load_profiles()
    splits = outcome.splits
    blender = Blender(study=outcome.study, run_dir=outcome.run_dir,
                      labels={"validation": splits.validation.labels, "test": splits.test.labels},
                      cost=CostModel(train=profiles["local-cpu"], serve=profiles["local-cpu"]), limits=Limits(),
                      modality=TextModality(), registry=registry, name="tiny texts classifier")
    blend = blender.add(BlendChoice(members=(BlendMember(done[0].number, 0.6, 1.0), BlendMember(done[1].number, 0.4, 2.0)),
                                    validation_accuracy=0.5, validation_log_loss=1.0, best_single_accuracy=0.4,
                         objective=0.55))
    texts = ["kernel compiler thread cache", "recipe oven flour sauce", "goal match striker referee"]
    folder = blend.user_attrs["artifact"]
    each = [Predictor(f"{folder}/{e['path']}").logits(texts) for e in load_metadata(folder)["blend"]]
    expected = 0.6 * softmax(each[0]) + 0.4 * softmax(each[1] / 2.0)
    moved = shutil.copytree(folder, tmp_path / "moved")
    shutil.rmtree(outcome.run_dir)  # the folder carries everything it needs
    np.testing.assert_allclose(softmax(Predictor(moved).logits(texts)), expected, rtol=1e-4, atol=1e-6)
    result = CliRunner().invoke(app, ["predict", str(moved), *texts])
    assert result.exit_code == 0, result.output
    assert [line.split("\t")[1] for line in result.output.strip().splitlines()] == \
        [splits.classes[i] for i in expected.argmax(1)]
