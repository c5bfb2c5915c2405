"""The search report on a real study: content, PNG plots, and the page rendered in headless Chromium
without console errors (Debian's chromium package; `.ci/run` installs it)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from typer.testing import CliRunner

from lepton_automl.cli import app
from lepton_automl.report import Recommendation, describe_config, write_html_report
from lepton_automl.search.engine import search
from lepton_automl.search.front import pick
from lepton_automl.search.limits import Limits


@pytest.fixture(scope="module")
def searched(image_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    outcome = search(image_folder, run_root=root, n_trials=4, backbones=["efficientnet_lite0"], seed=0,
                     limits=Limits(max_latency_ms=1000.0), timeout=600)
    return root, outcome


def test_the_report_shows_front_history_importances_and_every_trial(searched) -> None:
    root, outcome = searched
    row, why = pick(outcome.front, rule="balanced")
    page = write_html_report(root / "r.html", outcome.study, outcome.front, title="t",
                             recommended=Recommendation(row.number, why)).read_text()
    for section in ('id="front-plot"', 'id="history-plot"', 'id="trials"', 'id="recommendation"'):
        assert section in page
    assert "Parameter importances" in page  # a chart, or the reason there is none
    assert f"<b>Trial {row.number}</b>" in page and f"recommended (trial {row.number})" in page
    assert "--max-latency-ms" in page  # the limit is drawn
    trials = outcome.study.trials
    assert len(re.findall(r"<tr class=", page)) == len(trials)
    for t in trials:
        assert describe_config(t.user_attrs.get("config") or t.params) in page.replace("&#x27;", "'")
    tables = page[page.index("<h2>Pareto front</h2>"):page.index('id="history-plot"')] + page[page.index('id="trials"'):]
    assert "{'data__" not in page and "data__" not in tables  # configurations in words, not raw parameter dicts
    assert describe_config({"backbone": "b", "data__image_size": 96, "train__mode": "full", "train__epochs": 2,
                            "optim__lr": 1e-4, "prune__method": "structured", "prune__amount": 0.3,
                            "quant__mode": "int8"}) == \
        "b, 96 px, full fine-tune, 2 epochs, lr 1.0e-04, structured pruning 30%, int8"


def test_lepton_report_writes_html_and_pngs(searched, tmp_path) -> None:
    root, outcome = searched
    out = tmp_path / "report.html"
    result = CliRunner().invoke(app, ["report", outcome.study.study_name, "--run-dir", str(root), "--out", str(out),
                                      "--png"])
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 100_000  # plotly inlined: works offline
    for name in ("front.png", "history.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    typo = CliRunner().invoke(app, ["report", outcome.study.study_name + "x", "--run-dir", str(root)])
    assert typo.exit_code != 0 and "Did you mean" in typo.output


def test_the_report_renders_in_headless_chromium_without_console_errors(searched, tmp_path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Debian's chromium is not installed (`apt-get install chromium`; .ci/run does)")
    root, outcome = searched
    page = write_html_report(tmp_path / "report.html", outcome.study, outcome.front, title="t")
    flags = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
             "--window-size=1400,3000", "--virtual-time-budget=5000"]
    shot = tmp_path / "report.png"
    run = subprocess.run([*flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    console = [line for line in run.stderr.splitlines() if "CONSOLE" in line]
    assert not [line for line in console if "Uncaught" in line or "Error" in line], console
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    # plotly drew its SVG into both plot divs (a script error would leave them empty)
    assert dom.count('class="main-svg"') >= 4


def test_optuna_dashboard_reads_the_study_with_its_metric_names_and_attributes(searched) -> None:
    """The study is readable by optuna-dashboard (its own WSGI app, requests made in-process)."""
    import json
    from wsgiref.util import setup_testing_defaults

    import optuna_dashboard

    from lepton_automl.search.engine import METRIC_NAMES

    root, outcome = searched
    app = optuna_dashboard.wsgi(outcome.study._storage)

    def get(path: str) -> tuple[str, bytes]:
        environ: dict = {}
        setup_testing_defaults(environ)
        environ["PATH_INFO"], _, environ["QUERY_STRING"] = path.partition("?")
        status: list[str] = []
        body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
        return status[0], body

    status, body = get("/api/studies")
    assert status.startswith("200")
    summary = next(s for s in json.loads(body)["study_summaries"] if s["study_name"] == outcome.study.study_name)
    assert {a["key"] for a in summary["user_attrs"]} >= {"modality", "classes", "limits"}
    status, body = get(f"/api/studies/{summary['study_id']}?after=0")
    study = json.loads(body)
    assert status.startswith("200") and study["objective_names"] == METRIC_NAMES
    assert len(study["trials"]) == len(outcome.study.trials)
    sortable = {a["key"] for a in study["union_user_attrs"] if a["sortable"]}
    assert {"test_accuracy", "latency_p90_ms", "size_gz_mb"} <= sortable  # numbers the dashboard can sort by
    complete = [t for t in study["trials"] if t["state"] == "Complete"]
    assert complete and all({"config", "test_accuracy"} <= {a["key"] for a in t["user_attrs"]} for t in complete)
    status, page = get("/dashboard")
    assert status.startswith("200") and b"<html" in page.lower()
