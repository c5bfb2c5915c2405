"""Options retired once the study's own trials show they do not pay: later draws run without them, or not at all.

Two options cost much and pay only on some data or hardware, and the study can tell which:

- **Structured pruning** fine-tunes a network, cuts its channels (or heads and MLP width), then
  fine-tunes again to recover: the most expensive kind of trial, and on data unlike the backbone's
  pretraining the least likely to reach the front. Over 17 stored 600-s searches on the glyph and
  man-page benchmarks it took 92-299 s of each search (about 30%) and never gave a front point there:
  its fastest models were near chance, below the usefulness floor. On digits it did pay (three fast
  front points at 0.93-0.96). It is retired once ``MIN_EVIDENCE`` of its trials have ended (completed,
  or stopped early: by dominance, or because its next stage could not fit the time the trial had
  left) and none of them is on the study's front.
- **Int8 quantization** exists to make a model faster (the file's size aside). On an x86 CPU without
  VNNI it may not: on an AMD EPYC (Zen 1, AVX2) the lite0 glyph probe at 224 px ran in 15.7 ms in
  int8 and 13.3 ms in fp32, and the search still spent 160 of its 600 s on int8 trials. It is
  retired once a completed int8 trial has a completed fp32 twin (the same configuration otherwise:
  the warm start runs one such pair first), or an int8 probe was stopped because its timed trunk
  was no faster than its fp32 twin's (``search/early_stopping.py``), and no int8 trial with a twin
  was at least ``INT8_MIN_SPEEDUP`` faster than it. Not with a size limit, where int8's smaller file
  may be what makes a model feasible.

A retired structured-pruning draw is recorded as pruned with ``RETIRED_ATTR`` and the reason, not
run, not counted towards ``--n-trials`` (like a repeated configuration, ``search/repeats.py``), and the
sampler draws again. A retired int8 draw runs as its fp32 twin instead (``Retirement.instead``;
``RAN_INSTEAD_ATTR`` records why), or, where that twin ran already, is skipped as its repeat: the
rest of its configuration (a backbone at a small input size, say) is still worth a trial, and on such
hardware the fp32 model is the faster one. A rule applies only when the space offers the option's
alternative (``prune__method="none"``, ``quant__mode="none"``): a user who asked for the option alone
gets it. A retirement holds for the
rest of the study; a resumed or shared study (many workers) sees the same evidence.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from lepton_automl.log import get_logger
from lepton_automl.search.repeats import skip_draw, was_not_run

logger = get_logger(__name__)

RETIRED_ATTR = "retired"  # why this draw was not run: its option had not paid in this study
RAN_INSTEAD_ATTR = "ran_instead"  # why this draw ran without the option it drew (Retirement.instead)
MIN_EVIDENCE = 2  # structured-pruning trials that must end off the front before the option is retired
INT8_MIN_SPEEDUP = 1.1  # fp32 twin's latency / int8 latency that shows int8 pays on this hardware
# An int8 probe stopped once timed, no faster than its fp32 twin (search/probe_trial.py): both latencies
STOPPED_SLOWER_ATTR = "compressed_latency_ms"
STOPPED_FP32_ATTR = "uncompressed_latency_ms"


@dataclass(frozen=True)
class Retirement:
    """An option of a drawn configuration that has not paid in the study."""

    option: str  # "structured pruning", "int8 quantization"
    reason: str  # what the study showed, for the log and the trial's record
    instead: Mapping[str, Any] = field(default_factory=dict)  # what to run in its place; empty: run nothing


def is_retired(trial: FrozenTrial) -> bool:
    return RETIRED_ATTR in trial.user_attrs


def retirement(study: Study, config: Mapping[str, Any], *, prune_choices: tuple[str, ...] = ("none", "structured"),
               quant_choices: tuple[str, ...] = ("none", "int8"), size_limited: bool = False) -> Retirement | None:
    """The option of ``config`` that has not paid in ``study``, or None to run ``config`` as drawn.
    ``prune_choices`` and ``quant_choices`` are the space's; ``size_limited``: the search has a size limit."""
    ran = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
           if t.user_attrs.get("config") and not was_not_run(t)]
    if config.get("prune__method") == "structured" and "none" in prune_choices:
        reason = _pruning_retired(study, ran)
        if reason:
            return Retirement("structured pruning", reason)
    if config.get("quant__mode") == "int8" and "none" in quant_choices and not size_limited:
        reason = _int8_retired(ran)
        if reason:
            return Retirement("int8 quantization", reason, instead={"quant__mode": "none"})
    return None


def _pruning_retired(study: Study, ran: list[FrozenTrial]) -> str | None:
    front = {t.number for t in study.best_trials}
    ended = []
    for t in ran:
        if t.user_attrs["config"].get("prune__method") != "structured":
            continue
        if t.state == TrialState.PRUNED and "early_stop_reason" not in t.user_attrs:
            continue  # stopped for another reason (the study's trial count): no evidence
        if t.number in front:
            return None
        ended.append(t.number)
    if len(ended) < MIN_EVIDENCE:
        return None
    return f"its {len(ended)} trials in this study (#{_numbers(ended)}) all ended off the front"


def _int8_retired(ran: list[FrozenTrial]) -> str | None:
    fp32 = {_frozen({**t.user_attrs["config"], "quant__mode": "none"}): t for t in ran
            if t.state == TrialState.COMPLETE and t.user_attrs["config"].get("quant__mode", "none") == "none"}
    pairs = []  # (int8 trial, its latency, its fp32 twin's trial or None, the twin's latency)
    for t in ran:
        if t.user_attrs["config"].get("quant__mode") != "int8":
            continue
        if t.state == TrialState.PRUNED and STOPPED_SLOWER_ATTR in t.user_attrs:
            # stopped once timed: its trunk was no faster than its fp32 twin's (search/probe_trial.py)
            pairs.append((t, float(t.user_attrs[STOPPED_SLOWER_ATTR]), None, float(t.user_attrs[STOPPED_FP32_ATTR])))
            continue
        twin = fp32.get(_frozen({**t.user_attrs["config"], "quant__mode": "none"}))
        if twin is not None and t.state == TrialState.COMPLETE:
            pairs.append((t, t.values[1], twin, twin.values[1]))
    if not pairs or any(twin_ms >= INT8_MIN_SPEEDUP * ms for _, ms, _, twin_ms in pairs):
        return None
    t, ms, twin, twin_ms = pairs[0]
    return (f"on this hardware it was not faster than fp32 (trial {t.number} ran in {ms:.2f} ms, its fp32 twin"
            + (f", trial {twin.number}," if twin is not None else "") + f" in {twin_ms:.2f} ms"
            + (f"; {len(pairs)} such pairs" if len(pairs) > 1 else "") + ")")


def _frozen(config: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, repr(v)) for k, v in config.items()))


def _numbers(numbers: list[int]) -> str:
    return ", ".join(str(n) for n in numbers[:6]) + (", ..." if len(numbers) > 6 else "")


def _first_of(trial: optuna.trial.Trial, retired: Retirement, attr: str) -> bool:
    """Whether no earlier trial of the study recorded ``retired``'s option under ``attr``."""
    prefix = f"{retired.option} retired"
    return not any(str(t.user_attrs.get(attr, "")).startswith(prefix)
                   for t in trial.study.get_trials(deepcopy=False) if t.number != trial.number)


def skip_retired(trial: optuna.trial.Trial, retired: Retirement) -> None:
    """Record ``trial`` as a draw of a retired option and end it, unrun (``repeats.skip_draw``)."""
    reason = f"{retired.option} retired: {retired.reason}"
    if _first_of(trial, retired, RETIRED_ATTR):
        logger.info("%s; later draws of it are not run and not counted", reason)
    skip_draw(trial, attr=RETIRED_ATTR, value=reason, reason=reason)


def run_instead(trial: optuna.trial.Trial, retired: Retirement, params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` with ``retired.instead`` in place of the retired option; recorded on ``trial``."""
    reason = f"{retired.option} retired: {retired.reason}"
    if _first_of(trial, retired, RAN_INSTEAD_ATTR):
        logger.info("%s; later draws of it run %s instead", reason, ", ".join(f"{k}={v}" for k, v in retired.instead.items()))
    trial.set_user_attr(RAN_INSTEAD_ATTR, reason)
    return {**params, **retired.instead}
