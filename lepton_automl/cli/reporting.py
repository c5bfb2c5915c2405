"""``lepton report``: a study's HTML report (and PNG plots)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lepton_automl.cli._app import _fail, _setup_logging, app, console
from lepton_automl.exceptions import LeptonError, did_you_mean


@app.command()
def report(
    study_name: str = typer.Argument(..., help="Study name (as `lepton search` printed it)."),
    storage: Optional[str] = typer.Option(None, help="Optuna storage URL (default: sqlite in --run-dir)."),
    run_dir: Path = typer.Option(Path("lepton_runs")),
    out: Optional[Path] = typer.Option(None, help="HTML file to write (default: RUN_DIR/STUDY/report.html)."),
    pick: str = typer.Option("balanced", help="balanced, accuracy, latency or knee: the trial marked as recommended."),
    png: bool = typer.Option(False, "--png", help="Also draw the front and the history as PNG files."),
) -> None:
    """Write a study's HTML report: the front, the history, parameter importances, every trial."""
    _setup_logging(False)
    try:
        import optuna

        from lepton_automl.report import Recommendation, write_html_report, write_pngs
        from lepton_automl.search.engine import default_storage, quiet_optuna
        from lepton_automl.search.front import front_rows
        from lepton_automl.search.front import pick as pick_row

        quiet_optuna()
        try:
            study = optuna.load_study(study_name=study_name, storage=storage or default_storage(run_dir))
        except KeyError:
            names = [s.study_name for s in optuna.get_all_study_summaries(storage or default_storage(run_dir))]
            raise LeptonError(f"No study {study_name!r}.{did_you_mean(study_name, names)} "
                              f"Studies: {names or 'none'}.") from None
        front = front_rows(study)
        recommendation = None
        if front:
            row, why = pick_row(front, rule=pick)
            recommendation = Recommendation(row.number, f"{pick}: {why}")
        target = out or run_dir / study_name / "report.html"
        page = write_html_report(target, study, front, title=f"Lepton search {study_name}", recommended=recommendation)
        console.print(f"Report: {page}", highlight=False)
        if png:
            for file in write_pngs(target.parent, study, front, recommended=recommendation):
                console.print(f"Plot: {file}", highlight=False)
    except LeptonError as exc:
        _fail(exc)
