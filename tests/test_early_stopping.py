"""Early stopping in a multi-objective study: the dominance rule, and a real search that stops a trial."""

from __future__ import annotations

import time

import optuna
import pytest

from lepton_automl.search.early_stopping import EarlyStopping, FrontPoint, StopCheck, TrialStopped, points_from_study
from lepton_automl.search.engine import search

FAST_GOOD = FrontPoint(number=0, accuracy=0.95, latency_ms=1.0, gmacs=0.1, backbone="a", quant="none")


def _check(points, *, rule=EarlyStopping(), quant="none", backbone="a") -> StopCheck:
    return StopCheck(rule=rule, points=lambda: points, backbone=backbone, quant=quant)


def test_a_slower_trial_that_cannot_catch_up_is_stopped_with_its_reason() -> None:
    check = _check([FAST_GOOD])
    # 0.80 + 0.01 noise + 2 epochs x 0.02 = 0.85 < 0.95, and 0.3 GMACs x 10 ms/GMAC = 3 ms > 1 ms
    with pytest.raises(TrialStopped, match=r"trial 0 has 0.9500 at 1 ms"):
        check(stage="fine-tuning", epoch=1, epochs_left=2, accuracy=0.80, gmacs=0.3)
    assert check.curve == [("fine-tuning", 1, 0.8)]


def test_a_trial_that_could_still_reach_the_front_goes_on() -> None:
    check = _check([FAST_GOOD])
    check(stage="fine-tuning", epoch=1, epochs_left=5, accuracy=0.86, gmacs=0.3)  # optimistic 0.97
    check(stage="fine-tuning", epoch=1, epochs_left=1, accuracy=0.80, gmacs=0.05)  # faster than the front
    check(stage="fine-tuning", epoch=3, epochs_left=0, accuracy=0.10, gmacs=0.3)  # last epoch: never judged
    assert check.would_stop is None and len(check.curve) == 3


def test_latency_is_predicted_only_from_trials_of_the_same_quantization() -> None:
    check = _check([FAST_GOOD], quant="int8")  # no int8 trial finished: nothing to compare with
    check(stage="fine-tuning", epoch=0, epochs_left=1, accuracy=0.1, gmacs=10.0)
    assert check.would_stop is None
    # pruning still to come: 0.3 GMACs x (1 - 0.5)^2 x 10 ms/GMAC = 0.75 ms, faster than the front
    check = _check([FAST_GOOD])
    check(stage="fine-tuning", epoch=0, epochs_left=3, accuracy=0.1, gmacs=0.3, macs_ratio=0.25)
    assert check.would_stop is None


def test_a_trial_that_cannot_reach_the_usefulness_floor_is_stopped_however_fast() -> None:
    # Faster than anything on the front (it would join it), but 0.15 + 0.01 + 2 x 0.02 = 0.20 stays
    # under the floor: below it the trial is infeasible (the "above_chance" constraint).
    check = StopCheck(rule=EarlyStopping(), points=lambda: [FAST_GOOD], backbone="a", quant="none", floor=0.2125)
    with pytest.raises(TrialStopped, match=r"at best 0.2000 after 2 more epochs\) cannot reach 0.2125"):
        check(stage="pruning recovery", epoch=1, epochs_left=2, accuracy=0.15, gmacs=0.01)
    # No finished trial to compare with is no reason to go on below the floor either.
    with pytest.raises(TrialStopped, match="cannot reach 0.2125"):
        StopCheck(rule=EarlyStopping(), points=lambda: [], backbone="a", quant="none", floor=0.2125)(
            stage="fine-tuning", epoch=1, epochs_left=1, accuracy=0.1, gmacs=0.01)
    going = StopCheck(rule=EarlyStopping(), points=lambda: [FAST_GOOD], backbone="a", quant="none", floor=0.2125)
    going(stage="pruning recovery", epoch=1, epochs_left=3, accuracy=0.15, gmacs=0.01)  # 0.22: it may still
    assert going.would_stop is None


def test_dry_run_records_when_it_would_stop_without_stopping() -> None:
    before = time.perf_counter()
    check = _check([FAST_GOOD], rule=EarlyStopping(dry_run=True))
    check(stage="pruning recovery", epoch=1, epochs_left=1, accuracy=0.5, gmacs=1.0)
    seconds, reason = check.would_stop
    assert 0 <= seconds <= time.perf_counter() - before and "pruning recovery epoch 1" in reason


def test_infeasible_trials_do_not_count_as_the_front() -> None:
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])

    def objective(trial: optuna.Trial) -> tuple[float, float, float]:
        trial.suggest_categorical("backbone", ["a"])
        trial.set_user_attr("gmacs", 0.1)
        trial.set_constraint("latency_ms", 1.0 if trial.number == 0 else -1.0)
        return 0.9, 1.0, 0.1

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(objective, n_trials=2)
    assert [p.number for p in points_from_study(study)] == [1]


def test_a_hopeless_trial_is_stopped_in_a_real_search(image_folder, tmp_path) -> None:
    """A linear probe at 64 px finishes first; a fine-tuning trial of the same backbone at 128 px
    (4x the MACs) whose starting accuracy plus headroom cannot beat it is stopped before training."""
    storage = f"sqlite:///{tmp_path / 'es.db'}"
    study = optuna.create_study(storage=storage, study_name="es", directions=["maximize", "minimize", "minimize"])
    common = {"backbone": "efficientnet_lite0", "optim__weight_decay": 1e-4, "prune__method": "none",
              "quant__mode": "none"}
    study.enqueue_trial({**common, "data__image_size": 64, "train__mode": "probe"})
    study.enqueue_trial({**common, "data__image_size": 128, "train__mode": "finetune", "train__blocks": 1,
                         "train__epochs": 2, "optim__lr": 1e-5})
    outcome = search(image_folder, backbones=["efficientnet_lite0"], storage=storage, study_name="es",
                     n_trials=2, run_root=tmp_path, warm_start=False,
                     early_stopping=EarlyStopping(headroom_per_epoch=0.0, noise=0.0))
    first, second = outcome.study.trials
    assert first.state == optuna.trial.TrialState.COMPLETE
    assert first.values[0] >= 0.99  # the shapes are easy: the probe is perfect, so nothing can beat it
    assert second.state == optuna.trial.TrialState.PRUNED
    assert "cannot reach the front" in second.user_attrs["early_stop_reason"]
    assert [c[:2] for c in second.user_attrs["curve"]] == [["fine-tuning", 0]]
    assert outcome.stopped == [(1, second.user_attrs["early_stop_reason"])]
    assert not (tmp_path / "es" / "trial-0001" / "model.onnx").exists()  # stopped before export
    # where the stopped trial's time went: features, then training, where it was stopped
    seconds = second.user_attrs["stage_seconds"]
    assert list(seconds) == ["features", "training"] and all(v >= 0 for v in seconds.values())
    elapsed = (second.datetime_complete - second.datetime_start).total_seconds()
    assert 0.5 * elapsed <= sum(seconds.values()) <= elapsed + 0.1
