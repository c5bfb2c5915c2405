"""Repeated configurations (search/repeats.py) on real Optuna studies: recorded, not counted, and a
used-up space ends the study instead of spinning."""

from __future__ import annotations

import optuna

from lepton_automl.search.repeats import MAX_REPEATS_IN_A_ROW, is_repeat, repeats_in_a_row, skip_repeat
from lepton_automl.search.workers import counted_trials

CHOICES = [f"backbone{i}" for i in range(12)]


def _objective(trial: optuna.Trial) -> float:
    """Like TrialRunner: a configuration that already ran is skipped as a repeat. backbone0 is best."""
    choice = trial.suggest_categorical("backbone", CHOICES)
    trial.set_user_attr("config", choice)
    for other in trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if other.user_attrs.get("config") == choice:
            skip_repeat(trial, other.number)
    return float(CHOICES.index(choice))


def _study() -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=3), direction="minimize")


def test_a_repeat_is_recorded_but_not_counted() -> None:
    study = _study()
    study.optimize(_objective, n_trials=25)
    repeats = [t for t in study.trials if is_repeat(t)]
    assert repeats, "a 12-point space drawn 25 times must repeat"
    assert all(t.state == optuna.trial.TrialState.PRUNED for t in repeats)
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert counted_trials(study) == len(complete) == 25 - len(repeats)
    for t in repeats:  # each names a finished trial with the same configuration
        assert study.trials[t.user_attrs["repeat_of"]].user_attrs["config"] == t.user_attrs["config"]
    # the run of repeats at the end, counted back from the last trial
    tail = 0
    for t in reversed(study.trials):
        if not is_repeat(t):
            break
        tail += 1
    assert repeats_in_a_row(study) == tail


def test_a_used_up_space_stops_the_study_instead_of_spinning(caplog) -> None:
    study = _study()
    with caplog.at_level("WARNING", logger="lepton_automl"):
        study.optimize(_objective, n_trials=5000)  # as a search with --n-trials far above the space
    assert counted_trials(study) == len(CHOICES)
    assert len(study.trials) < 5000
    assert repeats_in_a_row(study) == MAX_REPEATS_IN_A_ROW
    assert "search space is used up" in caplog.text


def test_max_lengths_beyond_the_longest_text_are_one_configuration(tiny_bert_dir) -> None:
    """Short texts tokenize the same at 32, 64, 128 or 256 tokens: the text plugin maps each to the
    least length that holds every text, so the search treats them as one configuration."""
    from lepton_automl.backbones import BackboneCard, BackboneRegistry
    from lepton_automl.plugins import MODALITIES, PluginRegistry

    text = PluginRegistry(MODALITIES).load("text")()
    card = BackboneCard(name="tiny", ref=f"local-dir:{tiny_bert_dir}", modality="text", weights="local")
    registry = BackboneRegistry(cards=[card])
    short = ["match goal team", "recipe oven flour sauce"]  # a handful of tokens each
    longer = [*short, " ".join(["kernel"] * 50)]  # 52 tokens with [CLS] and [SEP]
    base = {"backbone": "tiny", "train__mode": "probe"}
    for length in (32, 64, 128, 256):
        params = {**base, "data__max_length": length}
        same = text.equivalent_params(card, registry, params, examples=short)
        assert same == {**base, "data__max_length": 32}
        # and the model they stand for encodes the data identically
        a = text.encode(short, preprocessing=text.preprocessing(card, registry, params=params))
        b = text.encode(short, preprocessing=text.preprocessing(card, registry, params=same))
        assert all((a[k] == b[k]).all() for k in a)
        with_long = text.equivalent_params(card, registry, params, examples=longer)["data__max_length"]
        assert with_long == (32 if length == 32 else 64)  # 32 truncates the long text: a different model


def test_garbage_is_collected_after_the_trials_that_ran_not_after_repeats(monkeypatch) -> None:
    """The search's callback in place of Optuna's gc_after_trial: a full collection (0.25 s with a
    transformer loaded) after every trial that ran, none after a repeat, which built nothing."""
    import gc

    from lepton_automl.search.engine import collect_after_work

    collections, collect = [], gc.collect
    monkeypatch.setattr(gc, "collect", lambda *args: collections.append(1) or collect(*args))
    study = _study()
    study.optimize(_objective, n_trials=25, callbacks=[collect_after_work])
    ran = [t for t in study.trials if not is_repeat(t)]
    assert 0 < len(ran) < 25 and len(collections) == len(ran)
