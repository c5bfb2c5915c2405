"""ONNX Runtime sessions: the one place that configures them.

Bulk work (feature extraction, scoring) and timing want different settings: for bulk work the
worker threads sleep instead of spinning when idle, so a finished extraction does not slow the
latency timing that follows it; timing pins the thread count it reports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def ort_session(path: str | Path | bytes, *, threads: int | None = None, spinning: bool = False) -> Any:
    """A CPU ``InferenceSession`` for ``path`` (or a serialized model's bytes); ``threads`` fixes
    intra-op threads (None: ORT's default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
