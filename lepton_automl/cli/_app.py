"""The ``lepton`` application, its shared helpers, and the search, export, compress, data, registry and
plugins commands. The ``lepton_automl.cli`` package is the only code that writes to the terminal or
configures log handlers."""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from lepton_automl.accel import DEVICE_HELP, resolve_device
from lepton_automl.exceptions import LeptonError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Lepton AutoML: transfer-learning search over accuracy, latency and cost.")
registry_app = typer.Typer(no_args_is_help=True, help="The backbone registry.")
plugins_app = typer.Typer(no_args_is_help=True, help="Installed modality plugins.")
data_app = typer.Typer(no_args_is_help=True, help="Check datasets before searching.")
app.add_typer(registry_app, name="registry")
app.add_typer(plugins_app, name="plugins")
app.add_typer(data_app, name="data")

# A wide console when the output is a file or a pipe, so that the front's table is never truncated.
console = Console(width=None if sys.stdout.isatty() else 180)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 180)


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    from lepton_automl.log import set_verbosity

    logger = logging.getLogger("lepton_automl")
    if not any(isinstance(h, RichHandler) for h in logger.handlers):
        handler = RichHandler(console=err, show_path=False, markup=False, log_time_format="%H:%M:%S")
        logger.addHandler(handler)
    set_verbosity(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False


def _fail(exc: Exception) -> None:
    err.print(f"[bold red]error:[/] {exc}", highlight=False)
    raise typer.Exit(code=2)


def _registry(registry_file: Optional[Path], *, trust_remote_code: bool = False) -> Any:
    from lepton_automl.backbones import BackboneRegistry

    registry = BackboneRegistry(trust_remote_code=trust_remote_code)
    if registry_file is not None:
        from lepton_registry import cards_from_file

        for card in cards_from_file(registry_file):
            registry.register(card, overwrite=True)
    return registry


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _front_table(front: list[Any], recommended: int | None) -> Table:
    table = Table(title="Pareto front (feasible trials; accuracy up, latency and cost down)")
    for col in ("trial", "val acc", "test acc", "latency ms", "p90 ms", "cost USD", "gz MB", "params M",
                "GMACs", "backbone", "input", "training", "compression"):
        table.add_column(col, justify="right" if col not in ("backbone", "training", "compression") else "left")
    for r in front:
        p = r.params
        mark = " *" if r.number == recommended else ""
        measured = (f"{r.number}{mark}", f"{r.accuracy:.4f}", _fmt(r.test_accuracy, ".4f"), f"{r.latency_ms:.3f}",
                    _fmt(r.latency_p90_ms, ".3f"), f"{r.cost_usd:.5f}", _fmt(r.size_mb, ".2f"), _fmt(r.params_m, ".2f"),
                    _fmt(r.gmacs, ".3f"))
        if p.get("blend"):  # search/blend.py: its members' averaged probabilities
            members = " + ".join(f"trial {n} x{w:.2f}" for n, w in zip(p["blend"], p["weights"]))
            table.add_row(*measured, f"blend of {members}", "-", "members'", "members'")
            continue
        data = p.get("data__image_size") or p.get("data__max_length")
        train = p.get("train__mode", "probe")
        if train == "finetune":
            train += f" last {p.get('train__blocks')} x{p.get('train__epochs')}ep"
        table.add_row(*measured, str(p.get("backbone")), str(data), train, _compression(p))
    return table


def _compression(params: dict[str, Any]) -> str:
    parts = []
    if params.get("prune__method", "none") != "none":
        target = {"layers": " (layers)", "width": " (heads+MLP)"}.get(params.get("prune__target", ""), "")
        parts.append(f"{params['prune__method']} prune {float(params['prune__amount']):.0%}{target}")
    if params.get("quant__mode", "none") != "none":
        parts.append(str(params["quant__mode"]))
    return ", ".join(parts) or "none"


class _RichProgress:
    """Trials and feature extraction shown as rich progress bars."""

    def __init__(self, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=err, transient=False)
        self.trials = self.progress.add_task("trials", total=total)
        self._tasks: dict[str, Any] = {}

    def features(self, desc: str, done: int, total: int) -> None:
        if desc not in self._tasks:
            self._tasks[desc] = self.progress.add_task(f"features {desc}", total=total)
        self.progress.update(self._tasks[desc], completed=done)
        if done >= total:
            self.progress.remove_task(self._tasks.pop(desc))

    def trial_done(self, study: Any, trial: Any) -> None:
        self.progress.advance(self.trials)


@app.command()
def search(
    data: str = typer.Option("demo:digits", help="Image folder, text table (.csv/.tsv/.jsonl/.parquet) or demo:digits."),
    modality: Optional[str] = typer.Option(None, help="Modality plugin (default: detected from the data)."),
    text_column: Optional[str] = typer.Option(None, help="Text column of a table."),
    label_column: Optional[str] = typer.Option(None, help="Label column of a table."),
    strict: bool = typer.Option(False, "--strict", help="Treat every data fix as an error."),
    backbone: Optional[list[str]] = typer.Option(None, help="Restrict to these backbones (repeatable)."),
    n_trials: int = typer.Option(30, help="Finished trials the study should hold (a rerun resumes)."),
    timeout: Optional[float] = typer.Option(360.0, help="Search budget in seconds: no trial starts after it, a "
                                            "running one is stopped a minute past it, and no trial may use "
                                            "more than a quarter of it."),
    storage: Optional[str] = typer.Option(None, help="Optuna storage URL (default: sqlite in --run-dir); "
                                          "postgresql://USER@HOST/DB for workers on several machines."),
    worker: Optional[int] = typer.Option(None, help="This process's index when several share one study (its "
                                         "sampler seed derives from it; default: the next free index)."),
    study_name: Optional[str] = typer.Option(None, help="Study name (default: MODALITY-DATANAME)."),
    sampler: str = typer.Option("tpe", help="tpe, nsga2 or random."),
    seed: int = typer.Option(0, help="Seed of the split, the sampler and training."),
    run_dir: Path = typer.Option(Path("lepton_runs"), help="Where studies, trial artifacts and caches go."),
    warm_start: bool = typer.Option(True, help="Enqueue known-good configurations first."),
    warm_start_from: Optional[str] = typer.Option(None, help="Enqueue the Pareto front of this other study first."),
    trial_timeout: Optional[float] = typer.Option(None, help="Fail a trial that runs longer than this (seconds)."),
    class_weights: bool = typer.Option(False, help="Weight the loss by inverse class frequency (imbalanced data)."),
    early_stopping: bool = typer.Option(True, help="Stop trials that even with more training cannot reach the front."),
    untrained: bool = typer.Option(False, help="Allow backbones without offline weights (random init)."),
    max_latency_ms: Optional[float] = typer.Option(None, help="Hard limit on batch-1 latency."),
    max_size_mb: Optional[float] = typer.Option(None, help="Hard limit on the gzip-compressed model file (MB); with it the search also tries unstructured pruning, which shrinks only that file."),
    max_cost_usd: Optional[float] = typer.Option(None, help="Hard limit on the cost objective."),
    max_params: Optional[float] = typer.Option(None, help="Hard limit on parameters, in millions."),
    min_accuracy: Optional[float] = typer.Option(None, help="Hard floor on validation accuracy."),
    train_hardware: str = typer.Option("local-cpu", help="Price profile of the training machine."),
    serve_hardware: str = typer.Option("local-cpu", help="Price profile of the serving machine."),
    predictions_per_month: float = typer.Option(1_000_000.0, help="Expected predictions, for the cost objective."),
    serving_batch: int = typer.Option(32, help="Batch size served in production: its throughput prices inference."),
    hardware_file: Optional[Path] = typer.Option(None, help="TOML file of extra hardware profiles."),
    registry_file: Optional[Path] = typer.Option(None, help="TOML/YAML file of extra backbone cards."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow backbones whose cards say "
                                           "their Python code ships with their weights (read that code first)."),
    pick: str = typer.Option("balanced", help="How to choose the exported model: balanced, accuracy, latency or knee."),
    keep_all_artifacts: bool = typer.Option(False, help="Keep the model files of trials off the front too."),
    blend: bool = typer.Option(True, help="When the trials are done, add a blend of the most accurate ones "
                               "(their averaged probabilities) if, cross-fitted on validation, it beats the best by half its noise or more."),
    export_dir: Optional[Path] = typer.Option(None, help="Where to export the pick (default: RUN_DIR/STUDY/best)."),
    png: bool = typer.Option(False, "--png", help="Also draw the front and the history as PNG files."),
    device: str = typer.Option("auto", help=f"Where to extract features and train: {DEVICE_HELP}."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Search backbones, training, and quantization; print the Pareto front and export the pick."""
    _setup_logging(verbose)
    try:
        from lepton_automl.search.early_stopping import EarlyStopping
        from lepton_automl.search.engine import quiet_optuna
        from lepton_automl.search.engine import search as run_search
        from lepton_automl.search.front import pick as pick_row
        from lepton_automl.search.objective import Limits

        quiet_optuna()
        accel = resolve_device(device)  # a missing GPU is reported before any work starts
        limits = Limits(max_latency_ms=max_latency_ms, max_size_mb=max_size_mb, max_cost_usd=max_cost_usd,
                        max_params_m=max_params, min_accuracy=min_accuracy)
        progress = _RichProgress(total=n_trials)
        with progress.progress:
            outcome = run_search(
                data, modality=modality, data_options={"text_column": text_column, "label_column": label_column,
                                                   "strict": strict},
                registry=_registry(registry_file, trust_remote_code=trust_remote_code), backbones=backbone, storage=storage, study_name=study_name,
                n_trials=n_trials, timeout=timeout, sampler=sampler, seed=seed, run_root=run_dir,
                warm_start=warm_start, untrained=untrained, limits=limits, train_profile=train_hardware,
                serve_profile=serve_hardware, predictions_per_month=predictions_per_month, serving_batch=serving_batch,
                hardware_file=hardware_file, keep_all_artifacts=keep_all_artifacts, trial_timeout=trial_timeout, class_weights=class_weights,
                warm_start_from=warm_start_from, early_stopping=EarlyStopping() if early_stopping else None,
                progress=progress.features, callbacks=[progress.trial_done], worker=worker, device=accel,
                blends=blend,
            )
        for number, reason in outcome.failed:
            err.print(f"[yellow]trial {number} failed:[/] {reason}", highlight=False)
        for number, reason in outcome.stopped:
            err.print(f"[cyan]trial {number} stopped early:[/] {reason}", highlight=False)
        if outcome.repeats:
            err.print(f"[cyan]{outcome.repeats} draws repeated a finished configuration[/] (not run, not counted)",
                      highlight=False)
        if outcome.retired:
            err.print(f"[cyan]{outcome.retired} draws of a retired option were not run[/] (structured pruning "
                      "that had not paid in this study; not counted)", highlight=False)
        if outcome.ran_instead:
            err.print(f"[cyan]{outcome.ran_instead} int8 draws ran in fp32[/] (int8 was no faster than fp32 on this "
                      "hardware)", highlight=False)
        if not outcome.front:
            _fail(LeptonError("No feasible trial finished. Run more trials (--n-trials) or relax the --max-* limits."))
        row, why = pick_row(outcome.front, rule=pick)
        console.print(_front_table(outcome.front, row.number))
        console.print(f"[bold]Recommended:[/] trial {row.number} ({pick}): {why}.", highlight=False)
        target = export_dir or outcome.run_dir / "best"
        _copy_export(Path(row.artifact), target)
        from lepton_automl.report import Recommendation, write_html_report, write_pngs

        recommendation = Recommendation(row.number, f"{pick}: {why}")
        report = write_html_report(outcome.run_dir / "report.html", outcome.study, outcome.front,
                                   title=f"Lepton search {outcome.study.study_name}", recommended=recommendation)
        if png:
            for file in write_pngs(outcome.run_dir, outcome.study, outcome.front, recommended=recommendation):
                console.print(f"Plot: {file}", highlight=False)
        console.print(f"Exported to [bold]{target}[/] (safetensors + ONNX + model card).", highlight=False)
        console.print(f"Report: {report}", highlight=False)
        console.print(f"Study '{outcome.study.study_name}' is stored in {outcome.storage}; rerun the same "
                      "command to resume, or add trials with a larger --n-trials.", highlight=False)
        console.print(f"Try it: lepton predict {target} {outcome.splits.test.examples[0]}", highlight=False)
    except LeptonError as exc:
        _fail(exc)


def _copy_export(source: Path, target: Path) -> None:
    """Copy an export folder to ``target``, replacing an earlier export there but nothing else: a
    folder that is not a Lepton export (no lepton.json) and not empty is refused, never deleted."""
    if target.is_symlink() or target.is_file():
        raise LeptonError(f"{str(target)!r} is a file or a link; give --out a folder path that does not exist yet.")
    if target.exists() and any(target.iterdir()):
        if not (target / "lepton.json").is_file():
            raise LeptonError(f"{str(target)!r} exists and is not a Lepton export; it was left as it is. "
                              "Give --out a new folder (or an earlier export to replace).")
    tmp = target.with_name(f".{target.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)


@app.command()
def export(
    study_name: str = typer.Option(..., "--study", help="Study name."),
    out: Path = typer.Option(..., help="Folder to write."),
    trial: Optional[int] = typer.Option(None, help="Trial number (default: the pick rule on the front)."),
    pick: str = typer.Option("balanced", help="balanced, accuracy, latency or knee (when --trial is not given)."),
    storage: Optional[str] = typer.Option(None, help="Optuna storage URL (default: sqlite in --run-dir)."),
    run_dir: Path = typer.Option(Path("lepton_runs")),
) -> None:
    """Write one trial's model as safetensors + ONNX + model card."""
    _setup_logging(False)
    try:
        import optuna

        from lepton_automl.search.engine import default_storage, quiet_optuna
        from lepton_automl.search.front import front_rows
        from lepton_automl.search.front import pick as pick_row

        quiet_optuna()
        study = optuna.load_study(study_name=study_name, storage=storage or default_storage(run_dir))
        if trial is None:
            row, why = pick_row(front_rows(study), rule=pick)
            console.print(f"Trial {row.number}: {why}.", highlight=False)
            artifact = row.artifact
        else:
            match = [t for t in study.trials if t.number == trial]
            if not match or match[0].state != optuna.trial.TrialState.COMPLETE:
                raise LeptonError(f"Trial {trial} of {study_name!r} did not complete; pick one shown by `lepton search`.")
            artifact = match[0].user_attrs.get("artifact")
        if not artifact or not Path(artifact).is_dir():
            raise LeptonError(f"The trial's files ({artifact}) are gone; rerun the search to recreate them.")
        from lepton_automl.search.probe_export import materialize

        _copy_export(materialize(artifact), out)
        console.print(f"Exported to {out}", highlight=False)
    except (LeptonError, KeyError) as exc:
        _fail(exc if isinstance(exc, LeptonError) else LeptonError(str(exc)))


@app.command()
def compress(
    model_dir: Path = typer.Argument(..., help="An export folder (from `lepton search` or `lepton export`)."),
    data: str = typer.Option(..., help="The labelled data: recovery fine-tune, calibration, and validation."),
    out: Optional[Path] = typer.Option(None, help="Folder to write (default: MODEL_DIR-compressed)."),
    prune: float = typer.Option(0.0, help="Fraction of channels (CNN) or heads and MLP width (transformer) to remove."),
    quant: str = typer.Option("none", help="none, int8 (static for convolutions, dynamic MatMul otherwise), "
                              "int8-static, int8-dynamic, torch-int8, torch-fp16 or torch-bf16 (GPU)."),
    recovery_epochs: int = typer.Option(2, help="Fine-tuning epochs after pruning."),
    recovery_lr: Optional[float] = typer.Option(None, help="Recovery learning rate (default: 1e-3 for CNNs, 5e-5 for transformers)."),
    seed: int = typer.Option(0, help="Split seed: use the search's so that validation is the same split."),
    serving_batch: int = typer.Option(32, help="Batch size for the throughput measurement."),
    text_column: Optional[str] = typer.Option(None, help="Text column of a table."),
    label_column: Optional[str] = typer.Option(None, help="Label column of a table."),
    device: str = typer.Option("auto", help=f"Where recovery trains and both models are measured: {DEVICE_HELP}."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Prune and/or quantize an exported model; measure it before and after on the same data."""
    _setup_logging(verbose)
    try:
        from lepton_automl.compression.compress import compress_export

        target = out or model_dir.with_name(model_dir.name + "-compressed")
        result = compress_export(model_dir, data=data, out=target, prune=prune, quant=quant,
                                 recovery_epochs=recovery_epochs, recovery_lr=recovery_lr, seed=seed,
                                 serving_batch=serving_batch, device=device,
                                 data_options={"text_column": text_column, "label_column": label_column})
        table = Table(title=f"{model_dir} -> {target} ({result.seconds:.0f} s)")
        for column in ("", "runtime", "val acc", "latency ms (b1)", "p90 ms", f"b{serving_batch} ms", "file MB",
                       "params M"):
            table.add_column(column, justify="right")
        for name, m in (("before", result.before), ("after", result.after)):
            table.add_row(name, m.runtime, f"{m.accuracy:.4f}", f"{m.latency_ms:.3f}", f"{m.latency_p90_ms:.3f}",
                          f"{m.latency_serving_batch_ms:.2f}", f"{m.size_mb:.2f}", f"{m.params_m:.2f}")
        console.print(table)
        console.print(result.summary(), highlight=False)
        console.print(f"Try it: lepton predict {target} ...", highlight=False)
    except LeptonError as exc:
        _fail(exc)


@data_app.command("check")
def data_check(
    data: str = typer.Argument(..., help="Image folder, text table, save_to_disk folder, hf-hub:NAME or demo:digits."),
    modality: Optional[str] = typer.Option(None, help="Modality plugin (default: detected from the data)."),
    text_column: Optional[str] = typer.Option(None, help="Text column of a table."),
    label_column: Optional[str] = typer.Option(None, help="Label column of a table."),
    strict: bool = typer.Option(False, "--strict", help="Treat every fix as an error."),
) -> None:
    """Validate and clean a dataset; print what was found and what was done about it."""
    try:
        from lepton_automl.search.engine import resolve_modality

        mod = resolve_modality(data, modality)
        labelled = mod.load(data, options={"text_column": text_column, "label_column": label_column,
                                           "strict": strict})
        table = Table(title=f"{data} ({mod.name}): {len(labelled)} usable examples, {labelled.num_classes} classes")
        table.add_column("finding")
        from rich.text import Text

        for line in labelled.report or ("[ok] no problems found",):
            table.add_row(Text(line))  # Text: the "[fixed]" tags are not markup
        console.print(table)
        counts = Table(title="examples per class")
        counts.add_column("class")
        counts.add_column("examples", justify="right")
        for cls, n in labelled.class_counts().items():
            counts.add_row(cls, str(n))
        console.print(counts)
        if labelled.split_of:
            from collections import Counter

            console.print(f"user splits: {dict(Counter(labelled.split_of))}", highlight=False)
    except LeptonError as exc:
        _fail(exc)


@registry_app.command("list")
def registry_list(
    pattern: Optional[str] = typer.Argument(None, help="Shell-style pattern, e.g. 'efficientnet*'."),
    modality: Optional[str] = typer.Option(None, help="Only this modality."),
    pretrained: bool = typer.Option(False, "--pretrained", help="Only backbones whose weights load offline."),
    registry_file: Optional[Path] = typer.Option(None, help="TOML/YAML file of extra backbone cards."),
) -> None:
    """List backbone cards."""
    try:
        registry = _registry(registry_file)
        cards = registry.list(pattern, modality=modality, available=True if pretrained else None)
        table = Table(title="Backbones")
        for col in ("name", "ref", "modality", "params M", "input", "weights offline", "license"):
            table.add_column(col, no_wrap=col in ("name", "ref"))
        for c in cards:
            size = f"{c.input_size[-1]}px" if c.input_size else (f"{c.max_length} tok" if c.max_length else "-")
            table.add_row(c.name, c.ref, c.modality, _fmt(c.params_m, ".2f"), size,
                          "yes" if registry.available(c) else "no", c.license)
        console.print(table)
    except LeptonError as exc:
        _fail(exc)


@plugins_app.command("list")
def plugins_list() -> None:
    """List modality plugins found by entry point."""
    from lepton_automl.plugins import MODALITIES, PluginRegistry, autoload_disabled

    registry = PluginRegistry(MODALITIES)
    table = Table(title="Modality plugins" + (" (autoload disabled)" if autoload_disabled() else ""))
    for col in ("name", "distribution", "version", "tasks", "target"):
        table.add_column(col)
    for name in registry:
        spec = registry[name]
        try:
            tasks = ", ".join(registry.load(name).tasks)
        except LeptonError as exc:
            tasks = f"[red]broken: {exc}[/]"
        table.add_row(name, spec.distribution, spec.version, tasks, spec.target)
    console.print(table)
