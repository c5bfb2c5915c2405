"""An ensemble probe queues its members' own probes, which then run on its cached features and trunks."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from lepton_automl.search.engine import DIRECTIONS, search
from lepton_automl.search.follow_ups import enqueue_member_probes

ENSEMBLE = "efficientnet_lite0+efficientnet_lite1"
CONFIG = {"backbone": ENSEMBLE, "data__image_size": 64, "prune__method": "none", "quant__mode": "none",
          "train__mode": "probe"}


def test_an_ensemble_probe_is_followed_by_its_members_probes_on_its_cached_features(image_folder, tmp_path) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'lepton.db'}", study_name="follow",
                                directions=list(DIRECTIONS))
    study.enqueue_trial(CONFIG)  # the first trial: the ensemble, extracting both members' features at 64 px
    outcome = search(image_folder, backbones=["efficientnet_lite0", "efficientnet_lite1"], n_trials=3,
                     run_root=tmp_path, study_name="follow", seed=0, blends=False)
    done = sorted(outcome.study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.number)
    assert [t.user_attrs["config"] for t in done] == [
        CONFIG, {**CONFIG, "backbone": "efficientnet_lite0"}, {**CONFIG, "backbone": "efficientnet_lite1"}]
    assert not done[0].user_attrs["cache_hit"] and done[0].user_attrs["trunk_built"]
    for member in done[1:]:
        # Its features were cached and its trunk exported, checked and timed by the ensemble's trial:
        # what ran is a probe fit and its scoring.
        assert member.user_attrs["cache_hit"] and member.user_attrs["trunk_built"] is False
        assert not {"export", "quantization", "measurement"} & set(member.user_attrs["stage_seconds"])
        assert 0.0 <= member.values[0] <= 1.0


def test_members_already_run_or_queued_are_not_queued_again() -> None:
    study = optuna.create_study(directions=list(DIRECTIONS))
    ran = optuna.trial.create_trial(
        params={}, distributions={}, values=[0.9, 1.0, 1.0],
        user_attrs={"config": {**CONFIG, "backbone": "efficientnet_lite0"}})
    study.add_trial(ran)
    assert enqueue_member_probes(study, CONFIG) == [{**CONFIG, "backbone": "efficientnet_lite1"}]
    assert enqueue_member_probes(study, CONFIG) == []  # lite1 is waiting now
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert [t.system_attrs["fixed_params"]["backbone"] for t in waiting] == ["efficientnet_lite1"]
    # At another size, or pruned, or a single backbone: nothing to follow up.
    assert len(enqueue_member_probes(study, {**CONFIG, "data__image_size": 96})) == 2
    assert enqueue_member_probes(study, {**CONFIG, "prune__method": "unstructured"}) == []
    assert enqueue_member_probes(study, {**CONFIG, "backbone": "efficientnet_lite0"}) == []
