"""``lepton predict`` and ``lepton serve``: using an export folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lepton_automl.accel import DEVICE_HELP
from lepton_automl.cli._app import _fail, _setup_logging, app, console, err
from lepton_automl.exceptions import LeptonError


@app.command()
def predict(
    model_dir: Path = typer.Argument(..., help="An export folder."),
    inputs: list[str] = typer.Argument(..., help="Image files or folders; texts, or a .csv/.jsonl/.parquet of texts."),
    out: Optional[Path] = typer.Option(None, help="Write a CSV (input, label, probability per class) here."),
    batch_size: int = typer.Option(64, help="Examples per model call."),
    device: str = typer.Option("cpu", help=f"Where the model runs: {DEVICE_HELP}."),
) -> None:
    """Predict with an exported model: labels on stdout, or every class's probability in a CSV (--out)."""
    try:
        import csv

        import numpy as np

        from lepton_automl.export.artifact import Predictor, softmax

        predictor = Predictor.load(model_dir, device=device)
        examples = predictor.modality.read_inputs(list(inputs))
        if out is None:
            for item, label in zip(examples, predictor.predict_examples(examples)):
                typer.echo(f"{item}\t{label}")
            return
        from rich.progress import Progress

        logits = []
        with Progress(console=err, transient=True) as bar:
            task = bar.add_task("predicting", total=len(examples))
            for start in range(0, len(examples), batch_size):
                logits.append(predictor.logits(examples[start : start + batch_size], batch_size=batch_size))
                bar.advance(task, len(logits[-1]))
        scores = np.concatenate(logits) if logits else np.zeros((0, len(predictor.classes)))
        probs = softmax(scores)
        target = out
        with open(target, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["input", "label", *(f"p_{c}" for c in predictor.classes)])
            for item, row in zip(examples, probs):
                writer.writerow([item, predictor.classes[int(row.argmax())], *(f"{p:.6f}" for p in row)])
        console.print(f"Wrote {len(examples)} predictions to {target}", highlight=False)
    except LeptonError as exc:
        _fail(exc)


@app.command()
def serve(
    model_dir: Path = typer.Argument(..., help="An export folder."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0 for every one)."),
    port: int = typer.Option(8000, help="TCP port."),
    max_batch: int = typer.Option(32, help="Most examples run as one batch (1 turns batching off)."),
    max_wait_ms: float = typer.Option(5.0, help="How long a request waits for others to batch with."),
    max_request_mb: float = typer.Option(8.0, help="Largest request body accepted."),
    max_inputs: int = typer.Option(64, help="Most inputs in one request."),
    max_pixels: int = typer.Option(40_000_000, help="Largest image accepted, in pixels (before decoding)."),
    max_text_chars: int = typer.Option(20_000, help="Longest text accepted, in characters."),
    threads: Optional[int] = typer.Option(None, help="ONNX Runtime threads (default: ONNX Runtime's choice)."),
    device: str = typer.Option("cpu", help=f"Where the model runs: {DEVICE_HELP}."),
) -> None:
    """Serve an export folder over HTTP: POST /predict, GET /health, GET /metadata (docs at /docs)."""
    _setup_logging(False)
    try:
        import uvicorn

        from lepton_automl.interfaces import InputLimits
        from lepton_automl.serving.app import ServeLimits, create_app

        limits = ServeLimits(max_request_bytes=int(max_request_mb * 2**20), max_inputs=max_inputs,
                             inputs=InputLimits(max_pixels=max_pixels, max_text_chars=max_text_chars))
        application = create_app(model_dir, max_batch=max_batch, max_wait_ms=max_wait_ms, limits=limits,
                                 threads=threads, device=device)
        console.print(f"Serving {model_dir} on http://{host}:{port} (POST /predict; docs at /docs)", highlight=False)
        uvicorn.run(application, host=host, port=port, log_level="warning", h11_max_incomplete_event_size=64 * 1024)
    except LeptonError as exc:
        _fail(exc)
