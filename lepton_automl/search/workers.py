"""Several workers on one study, and nothing lost when one dies: all through Optuna's own storage.

- Storage: Optuna's ``RDBStorage`` (SQLite by default, PostgreSQL for many machines) with heartbeats.
  A trial whose worker stopped beating for ``GRACE_S`` becomes FAIL when any worker next starts a
  trial, and ``RetryHeartbeatStaleTrialCallback`` queues it again, once.
- On one machine a rerun need not wait for the grace period: trials left RUNNING by a process of this
  host that no longer exists are failed (with the reason) and queued again at start.
- Each worker's sampler has its own seed, derived from the user's seed and the worker's index
  (worker 0 keeps the user's seed, so one worker reproduces a one-process search).
- ``--n-trials`` counts for the study, not per worker: a trial that would go past it (counting the
  finished ones and the running ones started before it) is not run, and its worker stops.
"""

from __future__ import annotations

import os
import random
import socket
import time
import warnings
from typing import Any

import numpy as np
import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from lepton_automl.log import get_logger
from lepton_automl.search.repeats import was_not_run

logger = get_logger(__name__)

HEARTBEAT_S = 20
GRACE_S = 90  # > the longest pause between heartbeats under load (a busy 2-core machine)
WORKER_ATTR = "worker"  # "host:pid" of the process that runs the trial
SURPLUS_ATTR = "surplus"  # a trial started after the study had its --n-trials; not run, not counted
BLEND_ATTR = "blend"  # a blend of finished trials (search/blend.py), added after them: not counted


def make_storage(url: str, *, heartbeat_s: int = HEARTBEAT_S, grace_s: int = GRACE_S) -> RDBStorage:
    """``RDBStorage`` for a SQLAlchemy URL, with heartbeats and one retry of a dead worker's trial: a
    RUNNING trial whose last heartbeat is older than ``grace_s`` is failed, and queued again once, when
    any worker next starts a trial."""
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        engine_kwargs = {"connect_args": {"timeout": 120}}  # several local workers wait for the lock
    else:
        engine_kwargs = {"pool_pre_ping": True}
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    for attempt in range(5):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since 2.8
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=int(heartbeat_s),
                                  grace_period=int(grace_s),
                                  heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
        except (IntegrityError, OperationalError, ProgrammingError):
            # Workers started together race to create the tables; the loser finds them made.
            if attempt == 4:
                raise
            time.sleep(0.5 + random.Random(os.getpid() + attempt).random())
    raise AssertionError("unreachable")


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def worker_seed(seed: int, worker: int) -> int:
    if worker == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(worker)]).generate_state(1)[0])


def live_workers(study: optuna.Study) -> set[str]:
    """Workers with a trial RUNNING now (their process may have died; see ``fail_dead_local_trials``)."""
    return {str(t.user_attrs.get(WORKER_ATTR)) for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t.user_attrs.get(WORKER_ATTR)}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_dead_local_trials(study: optuna.Study) -> list[int]:
    """Fail the RUNNING trials of processes of this host that no longer exist, and queue them again
    (once, as the heartbeat would after its grace period). Returns their numbers."""
    host = socket.gethostname()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=1)
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = str(t.user_attrs.get(WORKER_ATTR, ""))
        owner_host, _, pid = owner.rpartition(":")
        if owner_host != host or not pid.isdigit() or _alive(int(pid)) or int(pid) == os.getpid():
            continue
        reason = f"its worker {owner} died mid-trial; queued again"
        try:
            study._storage.set_trial_user_attr(t._trial_id, "fail_reason", reason)
            if not study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker got there first
        retry(study, study._storage.get_trial(t._trial_id))
        failed.append(t.number)
        logger.warning("trial %d: %s", t.number, reason)
    return failed


def retried_numbers(study: optuna.Study) -> set[int]:
    """Numbers of failed trials that were queued again (their retry carries ``failed_trial``)."""
    out: set[int] = set()
    for t in study.get_trials(deepcopy=False):
        out.update(int(n) for n in t.system_attrs.get("retry_history", []))
    return out


def counted_trials(study: optuna.Study) -> int:
    """Trials that count towards ``--n-trials``: complete, stopped early, or failed and not retried; not
    a draw that never ran (a repeated configuration, ``search/repeats.py``, or a retired option,
    ``search/retired.py``), nor a blend of finished trials."""
    retried = retried_numbers(study)
    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)):
        if (t.user_attrs.get(SURPLUS_ATTR) or t.user_attrs.get(BLEND_ATTR) or was_not_run(t)
                or (t.state == TrialState.FAIL and t.number in retried)):
            continue
        n += 1
    return n


class StopWhenCounted:
    """Optuna callback: stop once the study holds ``n_trials`` counted trials. ``study.optimize``'s own
    ``n_trials`` would count every trial, repeated configurations included (``search/repeats.py``)."""

    def __init__(self, n_trials: int) -> None:
        self.n_trials = int(n_trials)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if counted_trials(study) >= self.n_trials:
            study.stop()


def is_surplus(trial: optuna.trial.BaseTrial, n_trials: int | None) -> bool:
    """Whether ``trial`` would go past the study's ``n_trials``: the counted trials plus those running that
    started before it already fill it. Ties between workers go to the lower trial number."""
    if n_trials is None:
        return False
    study = trial.study
    earlier = sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if t.number < trial.number)
    return counted_trials(study) + earlier >= n_trials
