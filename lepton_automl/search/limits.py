"""What bounds a trial: the user's hard limits (Optuna constraints), the usefulness floor, and time."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from lepton_automl.exceptions import LeptonError
from lepton_automl.interfaces import TrialResult


class TrialTimeout(LeptonError):
    """A trial ran past the per-trial time limit."""


class StageClock:
    """Wall seconds per stage of a trial (``stage_seconds``), each stage timed from the previous one's end.
    ``plan`` names the stages in the order they run, so that a trial stopped or failed midway still says
    where its time went (``so_far``): early-stopped fine-tunes took most of a search's time."""

    def __init__(self, start: float) -> None:
        self.last, self.seconds = start, {}
        self.order: tuple[str, ...] = ()

    def plan(self, *order: str) -> None:
        self.order = order

    def done(self, stage: str) -> str:
        now = time.perf_counter()
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + now - self.last, 3)
        self.last = now
        return stage

    def so_far(self) -> dict[str, float]:
        """The seconds of the stages done, and the time since under the stage that was running: the
        first planned stage not done yet ("unfinished" when none is left)."""
        running = next((stage for stage in self.order if stage not in self.seconds), "unfinished")
        seconds = dict(self.seconds)
        seconds[running] = round(seconds.get(running, 0.0) + time.perf_counter() - self.last, 3)
        return seconds


@dataclass(frozen=True)
class Deadline:
    start: float
    limit: float | None
    search_ends_at: float | None = None  # time.perf_counter() value after which no trial may go on

    def check(self, stage: str) -> None:
        now = time.perf_counter()
        if self.limit is not None and now - self.start > self.limit:
            raise TrialTimeout(f"trial passed the per-trial limit of {self.limit:.0f} s during {stage} "
                               "(raise --trial-timeout, or narrow the space)")
        if self.search_ends_at is not None and now > self.search_ends_at:
            raise TrialTimeout(f"the search's --timeout ran out during {stage}; the trial was stopped")

    def remaining(self) -> float:
        """Seconds this trial may still run (inf without limits)."""
        now = time.perf_counter()
        left = [math.inf]
        if self.limit is not None:
            left.append(self.start + self.limit - now)
        if self.search_ends_at is not None:
            left.append(self.search_ends_at - now)
        return min(left)


@dataclass(frozen=True)
class Limits:
    """Hard limits; a trial over any of them is infeasible and never enters the front.

    ``max_size_mb`` applies to the gzip-compressed runtime file (what is shipped): that is where
    unstructured pruning pays off, since dense kernels gain nothing from zeros. Up to 16 MiB it is the
    sum over 1 MiB pieces (within 0.02% of one stream); above, estimated from 128 evenly spaced
    pieces (``cost.measurement.gzip_size``).
    """

    max_latency_ms: float | None = None
    max_size_mb: float | None = None
    max_cost_usd: float | None = None
    max_params_m: float | None = None
    min_accuracy: float | None = None

    def constraints(self, result: TrialResult) -> dict[str, float]:
        """Optuna constraint values: <= 0 is feasible."""
        out = {}
        if self.min_accuracy is not None:
            out["min_accuracy"] = float(self.min_accuracy - result.accuracy)
        pairs = {
            "latency_ms": (result.latency_ms, self.max_latency_ms),
            "size_gz_mb": (result.size_gz_mb, self.max_size_mb),
            "cost_usd": (result.cost_usd, self.max_cost_usd),
            "params_m": (result.params_m, self.max_params_m),
        }
        out.update({k: float(v - lim) for k, (v, lim) in pairs.items() if lim is not None and v is not None})
        return out


def usefulness_floor(labels: np.ndarray) -> float:
    """The least accuracy a recommendable model needs: a tenth of the way from always predicting the
    most common class to perfect. A pruned model that collapsed to guessing is fast, cheap and
    therefore Pareto-optimal, but useless; this keeps it off the front."""
    majority = float(np.bincount(labels).max() / max(1, len(labels)))
    return majority + 0.1 * (1.0 - majority)
