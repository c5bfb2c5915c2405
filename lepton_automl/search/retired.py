"""Structured pruning retired once it has not paid: later draws of it are not run and not counted.

A structured-pruning trial fine-tunes a network, cuts its channels (or heads and MLP width), then
fine-tunes again to recover: the most expensive kind of trial, and on data unlike the backbone's
pretraining the least likely to reach the front. Over 17 stored 600-s searches on the glyph and
man-page benchmarks it took 92-299 s of each search (about 30%) and never gave a front point there:
its fastest models were near chance, below the usefulness floor. On digits it did pay (three fast
front points at 0.93-0.96). So the evidence is the study's own: once ``MIN_EVIDENCE`` structured-pruning
trials have ended (completed, or stopped early because they could not reach the front) and none of
them is on the study's front, a later draw of structured pruning is retired: recorded as pruned with
``RETIRED_ATTR`` and the reason, not run, not counted towards ``--n-trials`` (like a repeated
configuration, ``search/repeats.py``), and the sampler draws again. The rule only applies when the
space offers ``prune__method="none"`` as well: a user who asked for structured pruning alone gets it.
A retirement is final for the study; a resumed or shared study (many workers) sees the same evidence.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optuna
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from lepton_automl.log import get_logger
from lepton_automl.search.repeats import skip_draw, was_not_run

logger = get_logger(__name__)

RETIRED_ATTR = "retired"  # why this draw was not run: its option had not paid in this study
MIN_EVIDENCE = 2  # structured-pruning trials that must end off the front before the option is retired
RETIRABLE = ("structured",)


def is_retired(trial: FrozenTrial) -> bool:
    return RETIRED_ATTR in trial.user_attrs


def retirement(study: Study, config: Mapping[str, Any], choices: tuple[str, ...]) -> str | None:
    """Why ``config`` should not run in ``study`` (its pruning method has not paid), or None to run it.
    ``choices`` are the space's ``prune__method`` values."""
    method = config.get("prune__method", "none")
    if method not in RETIRABLE or "none" not in choices:
        return None
    front = {t.number for t in study.best_trials}
    ended = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        ran = (t.user_attrs.get("config") or {}).get("prune__method") == method
        if not ran or was_not_run(t):
            continue
        if t.state == TrialState.PRUNED and "early_stop_reason" not in t.user_attrs:
            continue  # stopped for another reason (the study's trial count): no evidence
        if t.number in front:
            return None
        ended.append(t.number)
    if len(ended) < MIN_EVIDENCE:
        return None
    shown = ", ".join(str(n) for n in ended[:6]) + (", ..." if len(ended) > 6 else "")
    return (f"{method} pruning retired: its {len(ended)} trials in this study (#{shown}) all ended off "
            f"the front")


def skip_retired(trial: optuna.trial.Trial, reason: str) -> None:
    """Record ``trial`` as a draw of a retired option and end it, unrun (``repeats.skip_draw``)."""
    if not any(is_retired(t) for t in trial.study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))):
        logger.info("%s; later draws of it are not run and not counted", reason)
    skip_draw(trial, attr=RETIRED_ATTR, value=reason, reason=reason)
