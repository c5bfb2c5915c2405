"""Options retired once they have not paid (search/retired.py), on real Optuna studies: the evidence
each rule needs, and a real TrialRunner skipping a retired draw before building anything."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from lepton_automl.backbones import BackboneRegistry
from lepton_automl.cost.hardware import CostModel, load_profiles
from lepton_automl.data.split import split_data
from lepton_automl.search.engine import DIRECTIONS
from lepton_automl.search.objective import TrialRunner
from lepton_automl.search.repeats import REPEAT_ATTR, repeats_in_a_row, skip_repeat, was_not_run
from lepton_automl.search.retired import (
    MIN_EVIDENCE, RAN_INSTEAD_ATTR, RETIRED_ATTR, STOPPED_FP32_ATTR, STOPPED_SLOWER_ATTR, is_retired, retirement)
from lepton_automl.search.space import SearchSpace
from lepton_automl.search.workers import counted_trials
from lepton_automl.training.cache import FeatureCache
from lepton_image import ImageModality

CHOICES = ("none", "structured")
PROBE = {"backbone": "b", "train__mode": "probe", "prune__method": "none", "quant__mode": "none"}
PRUNED = {"backbone": "b", "train__mode": "full", "prune__method": "structured", "prune__amount": 0.5,
          "quant__mode": "none"}


def _study() -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(directions=list(DIRECTIONS))


def _add(study: optuna.Study, config: dict, *, accuracy: float, latency_ms: float,
         state: TrialState = TrialState.COMPLETE, **attrs) -> None:
    values = [accuracy, latency_ms, latency_ms * 1e-3] if state == TrialState.COMPLETE else None
    study.add_trial(create_trial(state=state, values=values, user_attrs={"config": config, **attrs}))


def test_structured_pruning_is_retired_once_its_trials_ended_off_the_front() -> None:
    study = _study()
    _add(study, PROBE, accuracy=0.80, latency_ms=1.0)
    assert retirement(study, PRUNED, prune_choices=CHOICES) is None  # no evidence yet
    _add(study, PRUNED, accuracy=0.40, latency_ms=1.5)  # dominated by the probe
    assert retirement(study, PRUNED, prune_choices=CHOICES) is None  # one trial is not enough
    _add(study, PRUNED, accuracy=0.35, latency_ms=1.2, state=TrialState.PRUNED,
         early_stop_reason="pruning recovery epoch 1: cannot reach the front")  # stopped early: evidence
    retired = retirement(study, PRUNED, prune_choices=CHOICES)
    assert retired is not None and retired.option == "structured pruning" and not retired.instead
    assert "#1, 2" in retired.reason and MIN_EVIDENCE == 2
    # other draws still run; and a user who asked for structured pruning alone gets it
    assert retirement(study, PROBE, prune_choices=CHOICES) is None
    assert retirement(study, {**PRUNED, "prune__method": "unstructured"}, prune_choices=("none", "unstructured")) is None
    assert retirement(study, PRUNED, prune_choices=("structured",)) is None


def test_a_structured_trial_on_the_front_keeps_it_in_the_search() -> None:
    study = _study()
    _add(study, PROBE, accuracy=0.80, latency_ms=1.0)
    _add(study, PRUNED, accuracy=0.40, latency_ms=1.5)
    _add(study, PRUNED, accuracy=0.70, latency_ms=0.4)  # faster than the probe: on the front
    _add(study, PRUNED, accuracy=0.30, latency_ms=2.0)
    assert {t.number for t in study.best_trials} == {0, 2}
    assert retirement(study, PRUNED, prune_choices=CHOICES) is None


def test_only_trials_that_ran_are_evidence() -> None:
    """Repeats, earlier retired draws and trials ended unrun (the study's trial count) prove nothing."""
    study = _study()
    _add(study, PROBE, accuracy=0.80, latency_ms=1.0)
    _add(study, PRUNED, accuracy=0.40, latency_ms=1.5)
    _add(study, PRUNED, accuracy=0.0, latency_ms=0.0, state=TrialState.PRUNED)  # no early-stop reason
    _add(study, PRUNED, accuracy=0.0, latency_ms=0.0, state=TrialState.PRUNED, repeat_of=1, not_run=True,
         early_stop_reason="same configuration as trial 1")
    _add(study, PRUNED, accuracy=0.0, latency_ms=0.0, state=TrialState.PRUNED, not_run=True,
         early_stop_reason="retired", **{RETIRED_ATTR: "retired"})
    assert retirement(study, PRUNED, prune_choices=CHOICES) is None


def test_int8_is_retired_where_it_is_not_faster_than_its_fp32_twin() -> None:
    """Int8 exists for speed: where a completed int8 trial's fp32 twin (the same configuration
    otherwise) ran as fast, this hardware gains nothing from it, unless the search has a size limit."""
    study = _study()
    int8 = {**PROBE, "quant__mode": "int8"}
    _add(study, {**int8, "backbone": "c"}, accuracy=0.7, latency_ms=1.0)  # no fp32 twin: no evidence
    assert retirement(study, int8) is None
    _add(study, PROBE, accuracy=0.80, latency_ms=13.3)
    _add(study, int8, accuracy=0.44, latency_ms=15.7)  # slower than its twin (the AVX2 machine)
    retired = retirement(study, {**int8, "backbone": "d"})
    assert retired is not None and retired.option == "int8 quantization"
    assert "trial 2 ran in 15.70 ms" in retired.reason and "trial 1, in 13.30 ms" in retired.reason
    assert dict(retired.instead) == {"quant__mode": "none"}  # the draw runs as its fp32 twin
    assert retirement(study, PROBE) is None  # fp32 draws still run
    assert retirement(study, int8, size_limited=True) is None  # a smaller file may be what is feasible
    assert retirement(study, int8, quant_choices=("int8",)) is None
    # a pair where int8 is more than 10% faster shows it pays here: nothing is retired
    _add(study, {**PROBE, "backbone": "e"}, accuracy=0.8, latency_ms=7.6)
    _add(study, {**int8, "backbone": "e"}, accuracy=0.78, latency_ms=2.9)
    assert retirement(study, int8) is None


def test_an_int8_probe_stopped_as_no_faster_than_its_fp32_twin_retires_int8() -> None:
    """An int8 probe that early stopping ended once its trunk was timed (no faster than its fp32
    twin's, ``search/probe_trial.py``) is the same evidence as a completed, slower pair."""
    study = _study()
    int8 = {**PROBE, "quant__mode": "int8"}
    _add(study, PROBE, accuracy=0.80, latency_ms=13.3)
    _add(study, int8, accuracy=0.0, latency_ms=0.0, state=TrialState.PRUNED)  # stopped for another reason
    assert retirement(study, int8) is None
    _add(study, int8, accuracy=0.0, latency_ms=0.0, state=TrialState.PRUNED, early_stop_reason="no faster",
         **{STOPPED_SLOWER_ATTR: 20.8, STOPPED_FP32_ATTR: 15.3})
    retired = retirement(study, {**int8, "backbone": "d"})
    assert retired is not None and retired.option == "int8 quantization"
    assert "trial 2 ran in 20.80 ms, its fp32 twin in 15.30 ms" in retired.reason
    assert retirement(study, int8, size_limited=True) is None


@pytest.fixture(scope="module")
def runner(image_folder, tmp_path_factory) -> TrialRunner:
    modality = ImageModality()
    profiles = load_profiles()
    tmp = tmp_path_factory.mktemp("retired")
    return TrialRunner(modality=modality, registry=BackboneRegistry(),
                       splits=split_data(modality.load(image_folder), seed=0),
                       space=SearchSpace.from_options(backbones=("efficientnet_lite0",)),
                       cache=FeatureCache(tmp / "cache"), run_dir=tmp / "run",
                       cost=CostModel(train=profiles["local-cpu"], serve=profiles["local-cpu"]))


def test_the_search_skips_a_retired_draw_unrun_and_uncounted(runner) -> None:
    """Two finished structured-pruning trials off the front, then the sampler draws structured pruning
    again: the runner records it as retired and builds nothing; it does not count towards --n-trials,
    and it counts in the run of draws not run that ends a used-up search."""
    study = _study()
    probe = {"backbone": "efficientnet_lite0", "data__image_size": 64, "train__mode": "probe",
             "prune__method": "none", "quant__mode": "none"}
    pruned = {"backbone": "efficientnet_lite0", "data__image_size": 64, "train__mode": "full",
              "train__epochs": 1, "optim__lr": 1e-4, "optim__weight_decay": 1e-4, "prune__method": "structured",
              "prune__amount": 0.5, "prune__recovery_epochs": 1, "quant__mode": "none"}
    _add(study, probe, accuracy=0.9, latency_ms=1.0)
    _add(study, {**pruned, "prune__amount": 0.3}, accuracy=0.5, latency_ms=1.1)
    _add(study, {**pruned, "prune__amount": 0.4}, accuracy=0.4, latency_ms=1.2)
    study.enqueue_trial(pruned)
    study.optimize(runner, n_trials=1)
    trial = study.trials[-1]
    assert trial.state == TrialState.PRUNED and is_retired(trial)
    assert "structured pruning retired" in trial.user_attrs["early_stop_reason"]
    assert not (runner.run_dir / f"trial-{trial.number:04d}").exists()  # nothing was built
    assert counted_trials(study) == 3
    assert repeats_in_a_row(study) == 1

    def repeat(t: optuna.Trial) -> float:  # a repeat after it extends the same run
        skip_repeat(t, 0)
        return 0.0

    study.optimize(repeat, n_trials=1)
    assert repeats_in_a_row(study) == 2


def test_a_retired_int8_draw_runs_as_its_fp32_twin(runner) -> None:
    """Int8 retired (its pair ran no faster than fp32): an int8 probe drawn at another input size runs
    in fp32, really (a trunk exported and timed, a counted trial whose recorded configuration is what
    ran); the same draw again is then a repeat of it, not run."""
    study = _study()
    probe = {"backbone": "efficientnet_lite0", "data__image_size": 96, "train__mode": "probe",
             "prune__method": "none", "quant__mode": "none"}
    _add(study, probe, accuracy=0.9, latency_ms=1.0)
    _add(study, {**probe, "quant__mode": "int8"}, accuracy=0.8, latency_ms=1.05)
    int8_draw = {**probe, "data__image_size": 64, "quant__mode": "int8"}
    study.enqueue_trial(int8_draw)
    study.optimize(runner, n_trials=1)
    ran = study.trials[-1]
    assert ran.state == TrialState.COMPLETE, ran.user_attrs
    assert ran.params["quant__mode"] == "int8"  # what the sampler drew
    assert ran.user_attrs["config"] == {**int8_draw, "quant__mode": "none"}  # what ran
    assert "int8 quantization retired" in ran.user_attrs[RAN_INSTEAD_ATTR] and not was_not_run(ran)
    assert ran.user_attrs["size_mb"] > 8  # lite0 in fp32 (13 MB; its int8 file is about 4 MB)
    assert counted_trials(study) == 3
    study.enqueue_trial(int8_draw)
    study.optimize(runner, n_trials=1)
    again = study.trials[-1]
    assert again.state == TrialState.PRUNED and again.user_attrs[REPEAT_ATTR] == ran.number
    assert counted_trials(study) == 3
