"""Time a trial may spend: predicted epoch times and the number of epochs that fit.

A fine-tuning or recovery epoch's wall time is predicted from one timed training step on the model
about to train (``training.finetune.time_training_step``, on a batch of typical length:
``typical_batch``) times the steps, scaled by what the study's finished trials measured against their
predictions (``train_cost_ratio``). Stages that cannot finish
inside the trial's limit are cut short or not started, so a trial does not run into the limit
mid-epoch when the prediction is right.
"""

from __future__ import annotations

import math
import time

from lepton_automl.log import get_logger
from lepton_automl.search.early_stopping import TrialStopped
from lepton_automl.search.limits import Deadline

logger = get_logger(__name__)

AFTER_TRAINING_S = 15.0  # what export, scoring and measurement take after the last epoch, at most
PLANNED_SHARE = 0.9  # of the time left, what epochs may be planned into


def epochs_that_fit(wanted: int, per_epoch: float, deadline: Deadline, *, what: str, reserve: float = 0.0,
                    basis: str = "") -> int:
    """How many of ``wanted`` epochs of ``per_epoch`` predicted seconds fit in the trial's remaining time,
    keeping ``reserve`` seconds for what follows; a stage that cannot run one is not started (``basis``:
    how the prediction was made, for the message)."""
    # Export, quantization, scoring and latency timing follow training: keep them inside the limit too
    # (on the glyph benchmark a full fine-tuning planned to the limit finished 4 s past it).
    left = deadline.remaining() - reserve - AFTER_TRAINING_S
    if math.isinf(left):
        return wanted
    usable = PLANNED_SHARE * left  # predictions are off by up to a tenth
    fits = min(wanted, int(usable // max(per_epoch, 1e-9)))
    if fits < 1:
        raise TrialStopped(f"predicted {per_epoch:.0f} s per {what} epoch{basis}, more than the "
                           f"{max(usable, 0.0):.0f} s this trial can plan for it ({PLANNED_SHARE:.0%} of the "
                           f"{max(left, 0.0):.0f} s it has left after what follows); not started")
    if fits < wanted:
        logger.info("%s: %d of %d epochs (predicted %.0f s each, %.0f s left)", what, fits, wanted, per_epoch, left)
    return fits


def another_epoch_fits(epoch_seconds: float, deadline: Deadline, *, reserve: float = 0.0) -> bool:
    """Whether one more epoch at the pace measured so far (``epoch_seconds``, training and validation)
    still finishes inside the trial's time, keeping ``reserve`` and what follows training. The plan
    (``epochs_that_fit``) is made from a prediction; this is the check against the epochs that ran: in
    the man-page benchmark a full fine-tuning planned for three epochs ran them 1.8x slower than its
    twin before it, and the trial passed its limit during export, losing its trained model."""
    left = deadline.remaining() - reserve - AFTER_TRAINING_S
    return math.isinf(left) or epoch_seconds <= left


class EpochPacer:
    """Keeps a training loop inside the trial's time, from the pace it measures. ``after_batch``
    checks the trial's limit after every step and, after the first ``first_steps``, stops a trial
    whose first epoch would not finish (for loops with no prediction of their own: partial fine-tuning
    on cached trunk outputs, whose epoch cost varies 100-fold with the blocks trained and the input
    length); ``ends_after(epoch)`` says whether to end training after that epoch because another would
    not finish beside what follows it in the trial (``reserve_epochs`` epochs at the pace measured and
    ``reserve_s`` seconds). In the man-page benchmark one partial fine-tuning (MiniLM, 2 blocks at 256
    tokens) was only checked between epochs and ran to 209 s against a 150-s limit, then failed with
    nothing to show."""

    def __init__(self, deadline: Deadline, *, what: str, steps_per_epoch: int, first_steps: int = 3,
                 start: float | None = None, reserve_epochs: float = 0.0, reserve_s: float = 0.0) -> None:
        """``start``: the ``time.perf_counter()`` value training began at (now by default)."""
        self.deadline, self.what = deadline, what
        self.steps_per_epoch, self.first_steps = max(1, steps_per_epoch), first_steps
        self.start, self.steps = time.perf_counter() if start is None else start, 0
        self.reserve_epochs, self.reserve_s = reserve_epochs, reserve_s

    def after_batch(self, epoch: int) -> None:
        self.deadline.check(f"{self.what} epoch {epoch}")
        self.steps += 1
        if self.steps == min(self.first_steps, self.steps_per_epoch):
            per_epoch = (time.perf_counter() - self.start) / self.steps * self.steps_per_epoch
            left = per_epoch * (1.0 - self.steps / self.steps_per_epoch)  # of the first epoch
            epochs_that_fit(1, left, self.deadline, what=self.what,
                            basis=f" (the rest of the first, from its first {self.steps} steps)")

    def pace(self, epoch: int) -> float:
        """Seconds per epoch so far, after ``epoch`` epochs."""
        return (time.perf_counter() - self.start) / max(1, epoch)

    def ends_after(self, epoch: int) -> bool:
        pace = self.pace(epoch)
        if another_epoch_fits(pace, self.deadline, reserve=pace * self.reserve_epochs + self.reserve_s):
            return False
        logger.info("%s: epochs took %.0f s; another would not finish in the trial's time, so it ends after "
                    "epoch %d", self.what, pace, epoch)
        return True
