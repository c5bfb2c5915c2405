"""Configurations drawn again: not run, not counted, and the end of the search once nothing new is drawn.

A probe picks its own regularisation, so its configuration is a handful of categorical choices
(backbone, input size, quantization), and a sampler that found a good one draws it again and again:
on the man-page set, 71 of 105 started trials repeated a finished configuration once the probe
configurations were used up. A repeat would measure the same numbers, so it is not run
(``TrialRunner`` records it as pruned with ``REPEAT_ATTR``). Two rules keep repeats from eating
the search:

- a repeat does not count towards ``--n-trials`` (``workers.counted_trials``): 8 of the man-page
  search's first 30 draws were repeats, and with the default ``--n-trials 30`` each used to count
  as a trial;
- ``MAX_REPEATS_IN_A_ROW`` repeats in a row mean the space is used up, and the study stops with a
  message saying so (else a search without ``--timeout`` would never end). A repeat costs
  milliseconds, so the bar is high: the man-page search above had a run of 20 repeats and still
  found new configurations after it.

A draw of an option the study has retired (``search/retired.py``) is skipped the same way, and
counts in the same run of draws not run.

Drawing at random after a repeat (scikit-optimize's rule) was tried and not kept: on small
categorical and conditional spaces, multivariate TPE reached as many or more distinct configurations
in 40 trials without it (17-18 against 14-18).
"""

from __future__ import annotations

import optuna
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from lepton_automl.log import get_logger

logger = get_logger(__name__)

REPEAT_ATTR = "repeat_of"  # the number of the trial whose configuration this one drew again
NOT_RUN_ATTR = "not_run"  # any draw skipped unrun: a repeat, or an option retired (search/retired.py)
MAX_REPEATS_IN_A_ROW = 100


def is_repeat(trial: FrozenTrial) -> bool:
    return REPEAT_ATTR in trial.user_attrs


def was_not_run(trial: FrozenTrial) -> bool:
    """A draw skipped without running anything: a repeat, or a retired option's."""
    return is_repeat(trial) or NOT_RUN_ATTR in trial.user_attrs


def repeats_in_a_row(study: Study) -> int:
    """How many of the study's latest finished trials (by number) were draws not run (repeats, retired
    options), counting back from the last."""
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
    n = 0
    for t in sorted(finished, key=lambda t: t.number, reverse=True):
        if not was_not_run(t):
            break
        n += 1
    return n


def skip_draw(trial: optuna.trial.Trial, *, attr: str, value: object, reason: str) -> None:
    """Record ``trial`` as not run (``attr`` = ``value``, and the reason) and end it (``optuna.TrialPruned``);
    stop the study once ``MAX_REPEATS_IN_A_ROW`` draws in a row were not run."""
    trial.set_user_attr(attr, value)
    trial.set_user_attr(NOT_RUN_ATTR, True)
    trial.set_user_attr("early_stop_reason", reason)
    if repeats_in_a_row(trial.study) + 1 >= MAX_REPEATS_IN_A_ROW:
        logger.warning(
            "the last %d configurations drawn had all run already (or use an option retired in this study): "
            "the search space is used up, so the search stops here. Allow more backbones (--backbone, or a "
            "--registry-file of cards) to search on.", MAX_REPEATS_IN_A_ROW)
        trial.study.stop()
    raise optuna.TrialPruned(reason)


def skip_repeat(trial: optuna.trial.Trial, of: int) -> None:
    """Record ``trial`` as a repeat of trial ``of`` and end it (``skip_draw``)."""
    skip_draw(trial, attr=REPEAT_ATTR, value=of, reason=f"same configuration as trial {of}")
