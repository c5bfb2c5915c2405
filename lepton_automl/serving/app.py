"""``lepton serve``: an export folder behind an HTTP API (FastAPI on uvicorn).

- ``POST /predict``: JSON ``{"inputs": [...], "top_k": 3}`` (texts, or base64 images; ``"input"`` for one),
  or ``multipart/form-data`` with one or more files (any field name). Answers the top-k labels with
  probabilities per input.
- ``GET /health``, ``GET /metadata`` (classes, metrics, runtime, latency as measured, limits).

The model is loaded once (``Predictor``: the export's runtime file in ONNX Runtime, or its torch runtime);
inputs of concurrent requests are batched (``MicroBatcher``). Every error is JSON
``{"error": {"status", "message"}}`` naming the problem, never a traceback: request size, number of
inputs, image pixels, text length, content type, unknown fields and malformed inputs each have one.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Request  # at module level: FastAPI resolves the handlers' annotations here

from lepton_automl.exceptions import InputError
from lepton_automl.interfaces import InputLimits
from lepton_automl.log import get_logger
from lepton_automl.serving.batcher import MicroBatcher

logger = get_logger(__name__)

JSON_FIELDS = ("inputs", "input", "top_k")
SHOWN_METRICS = ("accuracy", "holdout_accuracy", "test_accuracy", "latency_ms", "latency_p90_ms",
                 "latency_serving_batch_ms", "serving_batch", "throughput_per_s", "latency_threads",
                 "latency_device", "size_mb", "params_m", "gmacs")


@dataclass(frozen=True)
class ServeLimits:
    max_request_bytes: int = 8 * 2**20
    max_inputs: int = 64  # per request
    inputs: InputLimits = field(default_factory=InputLimits)


def _error(status: int, message: str) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"status": status, "message": message}}, status_code=status)


async def _read_body(request: Any, limit: int) -> bytes:
    """The request body, refused (``InputError`` 413) as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InputError("the Content-Length header is not a number")
        if int(declared) > limit:
            raise InputError(f"the request is {int(declared):,} bytes; the limit is {limit:,} "
                             "(lepton serve --max-request-mb)", status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise InputError(f"the request is over the limit of {limit:,} bytes (lepton serve --max-request-mb)",
                             status=413)
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(model_dir: str | Path, *, max_batch: int = 32, max_wait_ms: float = 5.0,
               limits: ServeLimits = ServeLimits(), threads: int | None = None, device: str = "cpu") -> Any:
    """The FastAPI application serving ``model_dir``; run it with uvicorn (``lepton serve``)."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from lepton_automl.export.artifact import Predictor, softmax

    predictor = Predictor(model_dir, threads=threads, device=device)
    classes = predictor.classes
    batcher = MicroBatcher(lambda examples: predictor.logits(examples, batch_size=max(64, max_batch)),
                           max_batch=max_batch, max_wait_ms=max_wait_ms)
    meta = predictor.meta
    metadata = {
        "name": meta.get("name"), "modality": meta["modality"], "classes": classes,
        "runtime": predictor.runtime_used, "runtime_file": meta.get("runtime_file"),
        "backbone": meta["backbone"]["name"], "params": meta.get("params", {}),
        "metrics": {k: meta.get("metrics", {}).get(k) for k in SHOWN_METRICS},
        "limits": {**asdict(limits), "max_top_k": len(classes)},
        "batching": {"max_batch": max_batch, "max_wait_ms": max_wait_ms},
    }

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        await batcher.start()
        logger.info("serving %s (%d classes)", model_dir, len(classes))
        yield
        await batcher.stop()

    app = FastAPI(title=f"Lepton: {meta.get('name', 'model')}", lifespan=lifespan, docs_url="/docs",
                  redoc_url=None)

    @app.exception_handler(InputError)
    async def _input_error(request: Request, exc: InputError) -> Any:
        return _error(exc.status, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Any:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Any:
        return _error(422, f"invalid request: {exc.errors()[:3]}")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Any:
        logger.exception("request failed")
        return _error(500, f"the model failed on this request ({type(exc).__name__}); the server log has details")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "batches": batcher.batches, "examples": batcher.examples}

    @app.get("/metadata")
    async def get_metadata() -> dict[str, Any]:
        return metadata

    @app.post("/predict")
    async def predict(request: Request) -> Any:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in ("application/json", "multipart/form-data"):
            raise InputError(f"content type {ctype or 'none'!r} is not accepted; send application/json "
                             '({"inputs": [...]}) or multipart/form-data (files)', status=415)
        body = await _read_body(request, limits.max_request_bytes)
        if ctype == "application/json":
            raw, top_k = _parse_json(body)
        else:
            raw, top_k = await _parse_multipart(request, body)
        if not raw:
            raise InputError("no inputs: send {\"inputs\": [...]} or at least one file")
        if len(raw) > limits.max_inputs:
            raise InputError(f"{len(raw)} inputs in one request; the limit is {limits.max_inputs} "
                             "(lepton serve --max-inputs)", status=413)
        examples = []
        for i, value in enumerate(raw):
            try:
                examples.append(predictor.modality.decode_input(value, limits=limits.inputs))
            except InputError as exc:
                raise InputError(f"input {i}: {exc}", status=exc.status) from None
        probs = softmax(await batcher.submit(examples))
        k = min(top_k, len(classes))
        out = []
        for row in probs:
            order = np.argsort(-row)[:k]
            out.append({"label": classes[int(order[0])],
                        "top_k": [{"label": classes[int(j)], "probability": round(float(row[j]), 6)} for j in order]})
        return {"predictions": out}

    def _parse_json(body: bytes) -> tuple[list[Any], int]:
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"the body is not valid JSON ({exc})") from None
        if not isinstance(payload, Mapping):
            raise InputError('the JSON body must be an object: {"inputs": [...], "top_k": 3}')
        unknown = sorted(set(payload) - set(JSON_FIELDS))
        if unknown:
            raise InputError(f"unknown field(s) {unknown}; the fields are {list(JSON_FIELDS)}", status=422)
        if "inputs" in payload and "input" in payload:
            raise InputError('send either "input" (one) or "inputs" (a list), not both', status=422)
        raw = payload.get("inputs", [payload["input"]] if "input" in payload else [])
        if not isinstance(raw, list):
            raise InputError('"inputs" must be a list', status=422)
        if any(not isinstance(v, str) for v in raw):
            raise InputError("every input must be a string (a text, or a base64 image)", status=422)
        return raw, _top_k(payload.get("top_k", 3))

    async def _parse_multipart(request: Request, body: bytes) -> tuple[list[Any], int]:
        from starlette.datastructures import UploadFile

        request._body = body  # Starlette's form parser reads the cached body  # noqa: SLF001
        try:
            form = await request.form(max_files=limits.max_inputs, max_fields=8)
        except Exception as exc:
            raise InputError(f"malformed multipart body ({type(exc).__name__}: {str(exc)[:200]})") from None
        files, top_k = [], 3
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                files.append(await value.read())
            elif key == "top_k":
                top_k = _top_k(value)
            elif key in ("input", "inputs"):
                files.append(str(value))
            else:
                raise InputError(f"unknown form field {key!r}; send files, 'input' texts and 'top_k'", status=422)
        return files, top_k

    def _top_k(value: Any) -> int:
        try:
            k = int(value)
        except (TypeError, ValueError):
            raise InputError(f"top_k must be a whole number, not {value!r}", status=422) from None
        if isinstance(value, bool) or not 1 <= k <= len(classes):
            raise InputError(f"top_k must be between 1 and {len(classes)} (the number of classes)", status=422)
        return k

    app.state.batcher = batcher
    app.state.predictor = predictor
    return app
