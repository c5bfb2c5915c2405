"""The one-standard-error rule between validation-scored trials and the cross-validated incumbent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pytest

from lepton_automl.export.card import render_model_card
from lepton_automl.search.blend import BLEND_ATTR, PREDICTIONS_ATTR, load_predictions, save_predictions
from lepton_automl.search.engine import search
from lepton_automl.search.lead import Incumbent, judge_lead

N = 400


def _correct(right: int, *, offset: int = 0) -> np.ndarray:
    """``right`` examples of N right, starting at ``offset`` (wrapping around)."""
    out = np.zeros(N, dtype=bool)
    out[(offset + np.arange(right)) % N] = True
    return out


def test_a_lead_under_one_standard_error_drops_below_the_incumbent() -> None:
    # The incumbent: 0.70 cross-validated, 280 of 400 out of fold on the validation split (also 0.70).
    incumbent = Incumbent(trial=3, accuracy=0.70, correct=_correct(280))
    # A trial right on 284: 26 the incumbent misses, 22 it gets. Lead 4/400, error sqrt(48)/400 (z 0.58).
    trial = np.zeros(N, dtype=bool)
    trial[22:280] = True  # 258 shared
    trial[280:306] = True  # 26 only the trial gets
    assert int(trial.sum()) == 284 and int((~trial & incumbent.correct).sum()) == 22
    error = np.sqrt(48) / N
    lead = judge_lead(0.71, trial, incumbent)
    assert lead.lead == pytest.approx(4 / N) and lead.error == pytest.approx(error)
    assert lead.z == pytest.approx(4 / np.sqrt(48))
    # on the incumbent's scale, less one error: 0.70 + 4/400 - error, below the incumbent's 0.70
    assert lead.accuracy == pytest.approx(0.70 + 4 / N - error) and lead.accuracy < incumbent.accuracy
    assert lead.attrs(0.71) == {"accuracy_before_lead_rule": 0.71, "lead_incumbent": 3,
                                "lead_over_incumbent": pytest.approx(4 / N), "lead_error": pytest.approx(error)}
    # an objective already below its validation accuracy (a kept epoch's luck taken off) is shifted as much
    assert judge_lead(0.705, trial, incumbent).accuracy == pytest.approx(0.70 + 4 / N - 0.005 - error)
    # at or below the incumbent a trial claims no lead: its accuracy stands
    assert judge_lead(0.70, trial, incumbent).accuracy == 0.70
    assert judge_lead(0.65, trial, incumbent).accuracy == 0.65
    # the model card says what the rule did
    card = render_model_card({"name": "m", "backbone": {"name": "b", "ref": "timm:b"}, "modality": "image", "runtime_file": "model.onnx",
                              "classes": ["a", "b"], "metrics": {"accuracy": lead.accuracy, **lead.attrs(0.71)}})
    assert "0.7100 before the one-standard-error rule" in card and "(trial 3) by 0.0100" in card


def test_a_proven_lead_keeps_the_trials_own_accuracy() -> None:
    incumbent = Incumbent(trial=0, accuracy=0.70, correct=_correct(280))
    trial = _correct(280) | _correct(40, offset=280)  # 40 more right, none fewer: lead 0.1, error sqrt(40)/400
    lead = judge_lead(0.80, trial, incumbent)
    assert lead.z == pytest.approx(np.sqrt(40)) and lead.accuracy == pytest.approx(0.80)
    # never raised: the validation split harder for the incumbent (0.70 there) than across folds (0.78)
    harder = Incumbent(trial=0, accuracy=0.78, correct=_correct(280))
    assert judge_lead(0.80, trial, harder).accuracy == pytest.approx(0.80)
    with pytest.raises(ValueError, match="not of the same examples"):
        judge_lead(0.8, trial[:-1], incumbent)


def test_the_incumbent_is_the_most_accurate_cross_validated_trial_with_kept_logits(tmp_path) -> None:
    labels = np.arange(N) % 4
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'lead.db'}",
                                directions=["maximize", "minimize", "minimize"])
    rng = np.random.default_rng(0)

    def add(number: int, accuracy: float, **attrs) -> None:
        path = save_predictions(tmp_path, number, {"validation": rng.standard_normal((N, 4)),
                                                   "test": rng.standard_normal((10, 4))})
        study.add_trial(optuna.trial.create_trial(values=[accuracy, 1.0, 0.1],
                                                  user_attrs={PREDICTIONS_ATTR: str(path), **attrs}))

    assert Incumbent.from_study(study, labels) is None
    add(0, 0.80, cv_accuracy=0.80)
    add(1, 0.90)  # validation-scored: not an incumbent
    add(2, 0.95, cv_accuracy=0.95, **{BLEND_ATTR: [0, 1]})  # a blend: not one either
    add(3, 0.85, cv_accuracy=0.85)
    add(4, 0.99, cv_accuracy=0.99)
    Path(study.trials[4].user_attrs[PREDICTIONS_ATTR]).unlink()  # its logits are gone: skipped
    found = Incumbent.from_study(study, labels)
    assert found is not None and found.trial == 3 and found.accuracy == 0.85
    stored = load_predictions(study.trials[3].user_attrs[PREDICTIONS_ATTR])["validation"]
    np.testing.assert_array_equal(found.correct, stored.argmax(1) == labels)
    assert Incumbent.from_study(study, labels[:-1]) is None  # another split's rows


def test_a_fine_tune_in_a_real_search_is_judged_against_the_probe_before_it(image_folder, tmp_path) -> None:
    storage = f"sqlite:///{tmp_path / 'lead.db'}"
    study = optuna.create_study(storage=storage, study_name="lead", directions=["maximize", "minimize", "minimize"])
    common = {"backbone": "efficientnet_lite0", "data__image_size": 64, "optim__weight_decay": 1e-4,
              "prune__method": "none", "quant__mode": "none"}
    study.enqueue_trial({**common, "train__mode": "probe"})
    study.enqueue_trial({**common, "train__mode": "full", "train__epochs": 1, "optim__lr": 1e-4})
    outcome = search(image_folder, backbones=["efficientnet_lite0"], storage=storage, study_name="lead",
                     n_trials=2, run_root=tmp_path, warm_start=False, early_stopping=None)
    probe, tuned = outcome.study.trials[:2]
    assert probe.state == tuned.state == optuna.trial.TrialState.COMPLETE
    assert "lead_incumbent" not in probe.user_attrs  # cross-validated itself
    attrs = tuned.user_attrs
    assert attrs["lead_incumbent"] == probe.number and attrs["lead_error"] >= 0
    # its objective is what the rule makes of its accuracy, against the probe's stored predictions
    labels = outcome.splits.validation.labels
    mine = load_predictions(attrs[PREDICTIONS_ATTR])["validation"].argmax(1) == labels
    theirs = load_predictions(probe.user_attrs[PREDICTIONS_ATTR])["validation"].argmax(1) == labels
    expected = judge_lead(attrs["accuracy_before_lead_rule"], mine,
                          Incumbent(trial=probe.number, accuracy=probe.values[0], correct=theirs))
    assert tuned.values[0] == pytest.approx(expected.accuracy)
    assert tuned.values[0] <= attrs["accuracy_before_lead_rule"]
    assert attrs["lead_over_incumbent"] == pytest.approx(float(mine.mean() - theirs.mean()))
