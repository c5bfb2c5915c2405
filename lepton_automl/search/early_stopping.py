"""Early stopping for a multi-objective study.

Optuna's pruners assume one objective: ``Trial.report`` refuses multi-objective studies (optuna
issue 3450). Lepton stops a trial by dominance instead. While a trial trains (fine-tuning epochs,
pruning-recovery epochs) it measures its validation accuracy after each epoch; once its
architecture is fixed its latency is predictable from its MACs. The trial is stopped when a
completed, feasible trial of the study is at least as fast as the trial's *optimistic* latency and
at least as accurate as its *optimistic* accuracy: no amount of further training could put it on
the front. A trial is also stopped when its optimistic accuracy cannot reach the usefulness floor
(``limits.usefulness_floor``): below it a trial is infeasible, never on the front however fast it is.
Both estimates lean towards keeping a trial:

- optimistic accuracy = measured accuracy + ``noise`` + ``headroom_per_epoch`` x epochs still to run
  (including any pruning-recovery epochs that follow fine-tuning), capped at 1;
- optimistic latency = the trial's MACs x the lowest milliseconds-per-GMAC measured on a completed
  trial with the same quantization (the same backbone when one exists), times the MACs ratio that
  any structured pruning still to come would reach at best, (1 - amount)^2.

A probe's int8 trunk is judged before it runs over the validation and test splits: quantized and timed
with its head, an int8 trunk no faster than its fp32 twin's (at batch 1 and at the serving batch) is
stopped there. Its accuracy is the fp32 features' less what quantization costs, so it cannot reach the
front (``search/probe_trial.py``; ``search/retired.py`` counts it as int8 not paying).

The cost objective is not consulted: at a fixed prediction volume it grows with latency, and a
stopped trial's training cost is what it already spent. A stopped trial is recorded as PRUNED with
the reason in its ``early_stop_reason`` user attribute; the accuracy curve of every trial is kept in
``curve`` so the rule can be audited. With ``dry_run=True`` nothing is stopped: the trial records when
and why it would have been (``early_stop_would_stop_s``), which measures the saving on a paired run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lepton_automl.exceptions import ConfigError
from lepton_automl.log import get_logger

logger = get_logger(__name__)


@dataclass(frozen=True)
class EarlyStopping:
    """The stopping rule's settings (see the module docstring)."""

    headroom_per_epoch: float = 0.02
    noise: float = 0.01
    dry_run: bool = False

    def __post_init__(self) -> None:
        if self.headroom_per_epoch < 0 or self.noise < 0:
            raise ConfigError("EarlyStopping headroom_per_epoch and noise must be >= 0.")


@dataclass(frozen=True)
class FrontPoint:
    """A completed, feasible trial as early stopping sees it."""

    number: int
    accuracy: float
    latency_ms: float
    gmacs: float | None
    backbone: str
    quant: str


def points_from_study(study: Any) -> list[FrontPoint]:
    """Completed trials whose constraints all hold (infeasible trials cannot dominate anyone)."""
    import optuna

    out = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if any(c > 0 for c in t.constraints.values()) or t.values is None:
            continue
        ran = t.user_attrs.get("config") or t.params  # what ran, after overrides (search/objective.py)
        out.append(FrontPoint(number=t.number, accuracy=float(t.values[0]), latency_ms=float(t.values[1]),
                              gmacs=t.user_attrs.get("gmacs"), backbone=str(ran.get("backbone")),
                              quant=str(ran.get("quant__mode", "none"))))
    return out


class TrialStopped(Exception):
    """Raised inside a trial that early stopping ends; carries the reason."""


@dataclass
class StopCheck:
    """The early-stopping judge of one trial. Call it after each epoch with the measured accuracy."""

    rule: EarlyStopping
    points: Callable[[], Sequence[FrontPoint]]
    backbone: str
    quant: str
    # The accuracy a trial needs to be feasible at all (``limits.usefulness_floor``, the "above_chance"
    # constraint): one whose optimistic accuracy stays below it can never reach the front, however fast.
    floor: float | None = None
    started: float = field(default_factory=time.perf_counter)
    curve: list[tuple[str, int, float]] = field(default_factory=list)
    would_stop: tuple[float, str] | None = None
    record: dict[str, Any] = field(default_factory=dict)  # facts behind a stop (``stop``), for the trial's attributes

    def latency_estimate(self, gmacs: float, points: Sequence[FrontPoint], macs_ratio: float = 1.0) -> float | None:
        same_quant = [p for p in points if p.quant == self.quant and p.gmacs]
        same_backbone = [p for p in same_quant if p.backbone == self.backbone]
        pool = same_backbone or same_quant
        if not pool:
            return None
        return gmacs * macs_ratio * min(p.latency_ms / p.gmacs for p in pool)  # type: ignore[operator]

    def __call__(self, *, stage: str, epoch: int, epochs_left: int, accuracy: float, gmacs: float,
                 macs_ratio: float = 1.0) -> None:
        self.curve.append((stage, epoch, round(float(accuracy), 5)))
        if epochs_left <= 0 or self.would_stop is not None:
            return
        optimistic = min(1.0, accuracy + self.rule.noise + self.rule.headroom_per_epoch * epochs_left)
        at_best = f"validation accuracy {accuracy:.4f} (at best {optimistic:.4f} after {epochs_left} more epochs)"
        if self.floor is not None and optimistic < self.floor:
            reason = (f"{stage} epoch {epoch}: {at_best} cannot reach {self.floor:.4f}, the least accuracy a "
                      "recommendable model needs on this data (a tenth of the way from always predicting "
                      "the most common class to perfect)")
        else:
            points = list(self.points())
            latency = self.latency_estimate(gmacs, points, macs_ratio)
            if latency is None:
                return
            better = [p for p in points if p.latency_ms <= latency and p.accuracy >= optimistic]
            if not better:
                return
            best = max(better, key=lambda p: p.accuracy)
            reason = (f"{stage} epoch {epoch}: {at_best} at about {latency:.3g} ms cannot reach the front: "
                      f"trial {best.number} has {best.accuracy:.4f} at {best.latency_ms:.3g} ms")
        self.stop(reason)

    def stop(self, reason: str, **record: Any) -> None:
        """End the trial for ``reason`` (``TrialStopped``), or, in a dry run, log that it would have.
        ``record``: facts behind the reason, kept on the trial as user attributes either way."""
        self.would_stop = (time.perf_counter() - self.started, reason)
        self.record.update(record)
        if self.rule.dry_run:
            logger.info("early stopping (dry run) would stop here: %s", reason)
            return
        raise TrialStopped(reason)
