"""Reading labelled text tables: CSV, TSV, JSONL, Parquet, and ``datasets`` objects.

Text and label columns are detected by name (``text``/``sentence``/``content``... and
``label``/``labels``/``class``/``category``...) or given explicitly; an error lists the columns found.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lepton_automl.data.dataset import LabelledData
from lepton_automl.exceptions import DataError
from lepton_automl.log import get_logger

logger = get_logger(__name__)

TABLE_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
TEXT_NAMES = ("text", "sentence", "content", "document", "body", "review", "description", "input")
LABEL_NAMES = ("label", "labels", "class", "category", "target", "section", "y")


def is_table(source: Any) -> bool:
    return isinstance(source, (str, Path)) and Path(source).suffix.lower() in TABLE_SUFFIXES


def read_table(path: str | Path) -> Any:
    """Read a table file into a ``datasets.Dataset``."""
    import datasets

    path = Path(path)
    if not path.is_file():
        raise DataError(f"Data file {str(path)!r} does not exist. Check the path.")
    if path.stat().st_size == 0:
        raise DataError(f"Data file {str(path)!r} is empty. Give a file with a header and rows.")
    kind = TABLE_SUFFIXES[path.suffix.lower()]
    kwargs: dict[str, Any] = {}
    if kind == "tsv":
        kind, kwargs = "csv", {"sep": "\t"}
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train", **kwargs)
    except Exception as exc:  # the builders raise many types; name the file and the cause
        raise DataError(f"Could not read {str(path)!r} as {kind}: {type(exc).__name__}: {exc}") from exc
    return ds


def _pick(columns: list[str], wanted: str | None, names: tuple[str, ...], what: str, option: str) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise DataError(f"No {what} column {wanted!r}. Columns found: {columns}. Pass {option} NAME.")
        return wanted
    lowered = {c.lower(): c for c in columns}
    for name in names:
        if name in lowered:
            return lowered[name]
    raise DataError(
        f"Could not find the {what} column among {columns}. Name it with {option} NAME."
    )


def text_data_from_dataset(
    ds: Any, *, text_column: str | None = None, label_column: str | None = None, name: str = "data"
) -> LabelledData:
    """Turn a ``datasets.Dataset`` with a text and a label column into ``LabelledData``."""
    columns = list(ds.column_names)
    tcol = _pick(columns, text_column, TEXT_NAMES, "text", "--text-column")
    lcol = _pick([c for c in columns if c != tcol], label_column, LABEL_NAMES, "label", "--label-column")
    if len(ds) == 0:
        raise DataError(f"{name!r} has a header but no rows. Add labelled rows.")
    label_feature = ds.features.get(lcol)
    names = getattr(label_feature, "names", None)
    texts = ds[tcol]
    raw_labels = ds[lcol]
    if names is not None:
        raw_labels = [names[i] if i is not None and i >= 0 else None for i in raw_labels]
    kept_texts: list[str] = []
    kept_labels: list[str] = []
    dropped = {"empty text": 0, "missing label": 0, "duplicate": 0}
    seen: set[tuple[str, str]] = set()
    for text, label in zip(texts, raw_labels):
        if label is None or (isinstance(label, float) and np.isnan(label)):
            dropped["missing label"] += 1
            continue
        if isinstance(label, float):
            if not float(label).is_integer():
                raise DataError(
                    f"Label column {lcol!r} holds non-integer floats (e.g. {label}); a classifier "
                    "needs discrete labels. Use a column of class names or integers."
                )
            label = int(label)
        if text is None or not str(text).strip():
            dropped["empty text"] += 1
            continue
        key = (str(text), str(label))
        if key in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(key)
        kept_texts.append(str(text))
        kept_labels.append(str(label))
    report = tuple(f"dropped {n} rows: {why}" for why, n in dropped.items() if n)
    for line in report:
        logger.info("%s: %s", name, line)
    if not kept_texts:
        raise DataError(f"{name!r} has no usable rows after cleaning ({', '.join(report)}).")
    classes = tuple(sorted(set(kept_labels), key=_label_sort_key))
    if len(classes) < 2:
        raise DataError(f"{name!r} has a single class {classes}; classification needs at least two.")
    index = {c: i for i, c in enumerate(classes)}
    return LabelledData(
        examples=tuple(kept_texts),
        labels=np.array([index[c] for c in kept_labels]),
        classes=classes,
        name=name,
        report=report,
    )


def _label_sort_key(label: str) -> tuple[int, Any]:
    return (0, int(label)) if label.lstrip("-").isdigit() else (1, label)


def options_get(options: Mapping[str, Any] | None, key: str) -> Any:
    return (options or {}).get(key)
