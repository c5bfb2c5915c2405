"""Crash safety and several workers, with real processes: a search killed with SIGKILL mid-trial and rerun,
and four workers on one study in a real PostgreSQL server."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from lepton_automl.exceptions import ExportError
from lepton_automl.export.artifact import load_metadata
from lepton_automl.search.repeats import was_not_run
from lepton_automl.search.workers import SURPLUS_ATTR, counted_trials, worker_seed
from tests.conftest import make_image_folder

SEARCH = [sys.executable, "-m", "lepton_automl.cli", "search"]


# Every trial runs to its end: early stopping ends an int8 twin timed no faster than fp32, which on a
# tiny network depends on this CPU's int8 kernels, and the crash test counts completed trials.
NO_STOPS = ("--no-early-stopping",)


def _search_args(data: Path, run_dir: Path, n_trials: int, *extra: str) -> list[str]:
    return [*SEARCH, "--data", str(data), "--run-dir", str(run_dir), "--n-trials", str(n_trials), "--backbone",
            "efficientnet_lite0", "--timeout", "900", "--study-name", "crash", *extra]


def _study(url: str) -> optuna.Study:
    return optuna.load_study(study_name="crash", storage=url)


def test_worker_seeds_differ_and_the_first_keeps_the_users() -> None:
    assert worker_seed(7, 0) == 7
    assert len({worker_seed(7, w) for w in range(8)}) == 8
    assert worker_seed(7, 3) == worker_seed(7, 3) != worker_seed(8, 3)


def test_a_search_killed_mid_trial_resumes_with_nothing_lost(tmp_path) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    data = make_image_folder(tmp_path / "shapes")
    run_dir = tmp_path / "runs"
    url = f"sqlite:///{run_dir / 'lepton.db'}"
    # Its temporary folders (int8 quantization's) live under tmp_path: SIGKILL leaves them behind.
    (tmp_path / "tmp").mkdir()
    process = subprocess.Popen(_search_args(data, run_dir, 3, *NO_STOPS), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env={**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp_path / "tmp")})
    killed_number = None
    deadline = time.time() + 300
    try:
        while time.time() < deadline and process.poll() is None:
            time.sleep(0.2)
            if not (run_dir / "lepton.db").is_file():
                continue
            try:
                trials = _study(url).get_trials(deepcopy=False)
            except (KeyError, Exception):
                continue
            if not (any(t.state == TrialState.COMPLETE for t in trials)
                    and any(t.state == TrialState.RUNNING for t in trials)):
                continue
            # Frozen, the search cannot finish the running trial between this read and the kill (a
            # probe takes about a second; the trial read as running had sometimes completed by then).
            process.send_signal(signal.SIGSTOP)
            try:
                running = [t.number for t in _study(url).get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
            except Exception:  # the frozen process may hold the database's write lock: try again later
                running = []
            if running:
                killed_number = running[0]
                process.send_signal(signal.SIGKILL)
                break
            process.send_signal(signal.SIGCONT)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    assert killed_number is not None, f"the search never reached its second trial: {process.stderr.read()[-2000:]}"
    assert _study(url).trials[killed_number].state == TrialState.RUNNING  # what SIGKILL leaves behind

    rerun = subprocess.run(_search_args(data, run_dir, 3, *NO_STOPS), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    trials = _study(url).trials
    states = [t.state for t in trials]
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states
    killed = trials[killed_number]
    assert killed.state == TrialState.FAIL and "died mid-trial" in killed.user_attrs["fail_reason"]
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed_number]
    # The same configuration runs again: the one it drew, or the warm-start one it was handed.
    expected = killed.params or killed.system_attrs["fixed_params"]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert {k: retries[0].params[k] for k in expected} == expected
    assert counted_trials(_study(url)) == 3 and states.count(TrialState.COMPLETE) == 3
    # The killed trial's folder (if it got one) is not a model that loads.
    folder = run_dir / "crash" / f"trial-{killed_number:04d}"
    if folder.exists():
        with pytest.raises(ExportError):
            load_metadata(folder)


# -- PostgreSQL ---------------------------------------------------------------------------------
def _pg_bin(name: str) -> str | None:
    for root in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (root / name).is_file():
            return str(root / name)
    return shutil.which(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def postgres_url(tmp_path_factory):
    """A real PostgreSQL server on loopback for this module (Debian's package; `.ci/run` installs it)."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL server binaries not found: `apt-get install postgresql` (`.ci/run` does)")
    pytest.importorskip("psycopg2", reason="pip install psycopg2-binary (install.sh --test does)")
    # Outside pytest's private (0700) temporary tree: the server runs as its own user.
    root = Path(tempfile.mkdtemp(prefix="lepton-pg-"))
    data, sockets = root / "data", root / "sock"
    sockets.mkdir()
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        shutil.chown(root, "postgres")
        shutil.chown(sockets, "postgres")
        os.chmod(root, 0o755)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    for command in ([initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                    [pg_ctl, "-D", str(data), "-w", "-l", str(root / "server.log"), "-o",
                     f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c max_connections=100", "start"]):
        done = subprocess.run([*as_user, *command], capture_output=True, text=True)
        assert done.returncode == 0, f"{command[0]} failed: {done.stdout[-1500:]} {done.stderr[-1500:]}"
    try:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
        conn.autocommit = True
        conn.cursor().execute("CREATE DATABASE lepton")
        conn.close()
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/lepton"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_four_workers_on_one_postgresql_study_run_exactly_the_trials_asked(postgres_url, tmp_path) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    data = make_image_folder(tmp_path / "shapes")
    run_dir = tmp_path / "runs"
    n_trials = 8
    args = _search_args(data, run_dir, n_trials, "--storage", postgres_url)
    workers = [subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    for w in workers:
        _, err = w.communicate(timeout=900)
        assert w.returncode == 0, err[-3000:]
    study = _study(postgres_url)
    trials = study.trials
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING, TrialState.FAIL)]
    counted = [t for t in trials if not t.user_attrs.get(SURPLUS_ATTR) and not was_not_run(t)]  # repeats, retired
    assert counted_trials(study) == len(counted) == n_trials
    # Every worker ran trials, and no configuration ran to completion twice.
    assert len({t.user_attrs["worker"] for t in counted}) >= 2
    configs = [str(sorted(t.user_attrs["config"].items())) for t in trials if t.state == TrialState.COMPLETE]
    assert len(configs) == len(set(configs))


_SLEEPER = """
import sys, time
import optuna
from lepton_automl.search.workers import make_storage
optuna.logging.set_verbosity(optuna.logging.ERROR)
study = optuna.load_study(study_name="beats", storage=make_storage(sys.argv[1], heartbeat_s=1, grace_s=int(sys.argv[2])))
study.optimize(lambda trial: time.sleep(600) or trial.suggest_float("x", 0.0, 1.0), n_trials=1)
"""


def test_a_trial_of_a_worker_that_died_elsewhere_fails_after_the_grace_period_and_runs_once_more(tmp_path) -> None:
    """A worker on another machine (no local process to check) stops beating: its trial stays RUNNING
    through the grace period, then the next trial any worker starts fails it and runs its parameters again."""
    from lepton_automl.search.workers import make_storage

    url, grace = f"sqlite:///{tmp_path / 'beats.db'}", 8
    study = optuna.create_study(study_name="beats", storage=make_storage(url, heartbeat_s=1, grace_s=grace))
    study.enqueue_trial({"x": 0.25})
    worker = subprocess.Popen([sys.executable, "-c", _SLEEPER, url, str(grace)])
    try:
        deadline = time.time() + 120
        while not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(2.5)  # it has beaten
        os.kill(worker.pid, signal.SIGKILL)
    finally:
        worker.wait(timeout=30)
    killed = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    assert len(killed) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # within the grace period: still RUNNING
    assert study.trials[killed[0].number].state == TrialState.RUNNING
    time.sleep(grace + 2)
    study.optimize(lambda trial: trial.suggest_float("x", 0.0, 1.0), n_trials=1)
    states = [t.state for t in study.trials]
    assert states[killed[0].number] == TrialState.FAIL
    (rerun,) = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    assert rerun.params == {"x": 0.25}  # the dead worker's configuration, run again
    assert optuna.storages.RetryFailedTrialCallback.retried_trial_number(rerun) == killed[0].number
    assert TrialState.RUNNING not in states
