"""The one-standard-error rule between trials scored two ways.

A probe's accuracy is cross-validated over train + validation; a trained network's (fine-tuned,
pruned) rests on the validation split alone, a few hundred examples, and the sampler keeps drawing
configurations near the ones that read well there. On glyphs (320 validation examples), in two of
three benchmark runs, a full fine-tune of lite0 at 160 px read 0.687-0.6875 against the
three-backbone probe's 0.684, beat the probe's out-of-fold predictions on those very examples by 6-7
(one-sided McNemar statistic 0.83 and 0.87), and scored 0.641-0.644 on test against the probe's 0.706.

So a validation-scored trial ranks above the most accurate cross-validated trial (the incumbent) only
by a lead of at least one standard error of the paired difference on the validation examples
(the one-standard-error rule of Breiman et al.: of estimates within one error of each other, keep the
better-determined one). Its bound is

    incumbent's objective + (its accuracy - the incumbent's out-of-fold accuracy on validation) - one error

the paired difference put on the incumbent's scale, less its error. A trial whose objective is above
the incumbent's and whose bound is below it takes the bound; every other trial keeps its own accuracy
(one below the incumbent claims no lead: the fast, less accurate points of the front stay where they
were; one whose bound is above has proven its lead). Replayed on seven stored benchmark studies with
refit fine-tunes (glyphs and man pages, two split seeds), it changed the two picks above and nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from lepton_automl.search.blend import PREDICTIONS_ATTR, is_blend_trial, load_predictions

# The user attribute marking a cross-validated (probe) trial.
CV_ATTR = "cv_accuracy"


@dataclass(frozen=True)
class Incumbent:
    """The most accurate cross-validated trial of a study: ``accuracy``, its objective; ``correct``,
    which validation examples its out-of-fold predictions get right."""

    trial: int
    accuracy: float
    correct: np.ndarray

    @classmethod
    def from_study(cls, study: Any, labels: np.ndarray) -> Incumbent | None:
        """The study's most accurate finished cross-validated trial whose validation logits are kept
        and match ``labels`` (the validation split's); None when there is none."""
        import optuna

        done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        for t in sorted(done, key=lambda t: -t.values[0]):
            path = t.user_attrs.get(PREDICTIONS_ATTR)
            if t.user_attrs.get(CV_ATTR) is None or is_blend_trial(t) or not path:
                continue
            try:
                logits = load_predictions(path)["validation"]
            except (OSError, KeyError, ValueError):
                continue
            if len(logits) == len(labels):
                return cls(trial=t.number, accuracy=float(t.values[0]), correct=logits.argmax(1) == np.asarray(labels))
        return None


@dataclass(frozen=True)
class Lead:
    """A validation-scored trial against the incumbent: ``accuracy``, its objective after the rule."""

    accuracy: float
    incumbent: int
    lead: float  # its validation accuracy minus the incumbent's out-of-fold one, on the same examples
    error: float  # the standard error of that paired difference

    @property
    def z(self) -> float:
        return self.lead / self.error if self.error > 0 else 0.0

    def attrs(self, before: float) -> Mapping[str, float | int]:
        """What the trial keeps: its objective before the rule, the incumbent, the lead and its error."""
        return {"accuracy_before_lead_rule": before, "lead_incumbent": self.incumbent,
                "lead_over_incumbent": self.lead, "lead_error": self.error}


def judge_lead(accuracy: float, correct: np.ndarray, incumbent: Incumbent) -> Lead:
    """Apply the rule to a trial of objective ``accuracy`` whose validation predictions are ``correct``
    (the examples, right or wrong, in the incumbent's order); a trial at or below the incumbent keeps
    its ``accuracy``."""
    correct = np.asarray(correct, dtype=bool)
    if correct.shape != incumbent.correct.shape:
        raise ValueError(f"the trial's validation predictions ({correct.shape[0]}) and the incumbent's "
                         f"({incumbent.correct.shape[0]}) are not of the same examples")
    n = len(correct)
    only_trial = int((correct & ~incumbent.correct).sum())
    only_incumbent = int((~correct & incumbent.correct).sum())
    lead = (only_trial - only_incumbent) / n
    error = float(np.sqrt(only_trial + only_incumbent)) / n
    # The trial's own objective may already sit below its validation accuracy (a kept epoch's luck).
    own_shift = accuracy - float(correct.mean())
    bound = incumbent.accuracy + lead + own_shift - error
    # A proven lead (the bound still at or above the incumbent) keeps the trial's own accuracy.
    judged = float(accuracy) if accuracy <= incumbent.accuracy or bound >= incumbent.accuracy else float(bound)
    return Lead(accuracy=judged, incumbent=incumbent.trial, lead=lead, error=error)
