"""Reading labelled text tables: CSV, TSV, JSONL, Parquet, and ``datasets`` objects.

Text and label columns are detected by name (``text``/``sentence``/``content``... and
``label``/``labels``/``class``/``category``...) or given explicitly; an error lists the columns found.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from collections import Counter

import numpy as np

from lepton_automl.data.dataset import LabelledData
from lepton_automl.data.findings import Findings
from lepton_automl.exceptions import DataError
from lepton_automl.log import get_logger

logger = get_logger(__name__)

TABLE_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
TEXT_NAMES = ("text", "sentence", "content", "document", "body", "review", "description", "input")
LABEL_NAMES = ("label", "labels", "class", "category", "target", "section", "y")


def is_table(source: Any) -> bool:
    return isinstance(source, (str, Path)) and Path(source).suffix.lower() in TABLE_SUFFIXES


def read_table(path: str | Path, findings: Findings | None = None) -> Any:
    """Read a table file into a ``datasets.Dataset``; bytes that are not UTF-8 are replaced (and counted)."""
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
    source = path
    tmp = None
    if kind in ("csv", "json"):
        raw = path.read_bytes()
        lines = [line for line in raw.splitlines() if line.strip()]
        undecodable = sum(1 for line in lines if not _is_utf8(line))
        nul = b"\x00" in raw
        if nul or undecodable > max(1, len(lines) // 2):
            raise DataError(f"Data file {str(path)!r} is not a text table: {undecodable} of its {len(lines)} lines "
                            f"are not valid UTF-8 text{' and it holds NUL bytes' if nul else ''} (a binary "
                            "file?). Export the table as UTF-8 CSV, TSV or JSONL.")
        if kind == "csv" and len(lines) <= 1:
            raise DataError(f"Data file {str(path)!r} has a header but no rows. Add labelled rows.")
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            bad_lines = sum(1 for line in raw.splitlines() if not _is_utf8(line))
            if findings is not None:
                findings.fixed("non-utf8", bad_lines, f"replaced bytes that are not UTF-8 on {bad_lines} lines "
                               "(re-save the file as UTF-8 to keep the original characters)")
            import tempfile

            tmp = tempfile.TemporaryDirectory(prefix="lepton-utf8-")
            source = Path(tmp.name) / path.name
            source.write_text(raw.decode("utf-8", errors="replace"), encoding="utf-8")
    # datasets' "Generating train split" bars and its own error lines are noise here: the error below
    # says what went wrong. Both settings are put back as they were.
    shown, verbosity = datasets.utils.logging.is_progress_bar_enabled(), datasets.utils.logging.get_verbosity()
    datasets.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity(datasets.utils.logging.CRITICAL)
    try:
        ds = datasets.load_dataset(kind, data_files=str(source), split="train", **kwargs)
    except Exception as exc:  # the builders raise many types; name the file and the cause
        hint = _TABLE_HINTS.get(path.suffix.lower().lstrip("."), "")
        where = _bad_json_line(source) if path.suffix.lower() == ".jsonl" else None
        if where is None:
            root = _root_cause(exc)
            where = f"{type(root).__name__}: {str(root).strip().rstrip('.')[:500]}"
        raise DataError(f"Could not read {str(path)!r} as {kind}: {where}.{' ' + hint if hint else ''}") from exc
    finally:
        datasets.utils.logging.set_verbosity(verbosity)
        if shown:
            datasets.utils.logging.enable_progress_bar()
        if tmp is not None:  # load_dataset has copied the rows into its Arrow cache by now
            tmp.cleanup()
    return ds


def _is_utf8(line: bytes) -> bool:
    try:
        line.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


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
    ds: Any,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    name: str = "data",
    findings: Findings | None = None,
) -> LabelledData:
    """Turn a ``datasets.Dataset`` (or a ``DatasetDict`` of train/validation/test) with a text and a
    label column into ``LabelledData``, cleaning it on the way (see ``lepton data check``)."""
    from lepton_automl.data.checks import assemble

    findings = findings or Findings(name)
    if hasattr(ds, "column_names") and isinstance(ds.column_names, dict):  # DatasetDict
        parts = []
        for split, part in ds.items():
            key = {"val": "validation", "valid": "validation", "dev": "validation"}.get(split, split)
            if key not in ("train", "validation", "test"):
                raise DataError(f"Split {split!r} of {name!r} is not train, validation or test; rename it.")
            parts.append((key, part))
    else:
        parts = [("", ds)]
    texts: list[str] = []
    labels: list[str] = []
    split_of: list[str] = []
    dropped = Counter()
    for split, part in parts:
        columns = list(part.column_names)
        tcol = _pick(columns, text_column, TEXT_NAMES, "text", "--text-column")
        lcol = _pick([c for c in columns if c != tcol], label_column, LABEL_NAMES, "label", "--label-column")
        label_names = getattr(part.features.get(lcol), "names", None)
        for row, (text, label) in enumerate(zip(part[tcol], part[lcol])):
            if label_names is not None and label is not None:
                label = label_names[label] if 0 <= label < len(label_names) else None
            if label is None or (isinstance(label, float) and np.isnan(label)) or str(label).strip() == "":
                dropped["missing label"] += 1
                continue
            if isinstance(label, float):
                if not float(label).is_integer():
                    raise DataError(
                        f"Label column {lcol!r} holds non-integer floats (row {row + 1}: {label}); a "
                        "classifier needs discrete labels. Use a column of class names or integers."
                    )
                label = int(label)
            if text is None or not str(text).strip():
                dropped["empty text"] += 1
                continue
            texts.append(str(text))
            labels.append(str(label))
            split_of.append(split)
    if not texts and not dropped:
        raise DataError(f"{name!r} has a header but no rows. Add labelled rows.")
    findings.fixed("missing-label", dropped["missing label"], f"dropped {dropped['missing label']} rows without a label")
    findings.fixed("empty-text", dropped["empty text"], f"dropped {dropped['empty text']} rows with empty or blank text")
    return assemble(examples=texts, labels=labels, keys=[t.strip() for t in texts], findings=findings, name=name,
                    split_of=split_of if parts[0][0] else ())


_TABLE_HINTS = {
    "csv": "Every row needs as many fields as the header; quote fields that hold commas or line breaks "
           "(\"like, this\") and double the quotes inside them.",
    "tsv": "Every row needs as many tab-separated fields as the header.",
    "jsonl": "JSONL holds one complete JSON object per line, such as {\"text\": \"...\", \"label\": \"...\"}.",
}


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost error: ``datasets`` wraps the parser's own message (which line, which field) in a
    generic ``DatasetGenerationError``."""
    seen = {id(exc)}
    while (inner := exc.__cause__ or exc.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        exc = inner
    return exc


def _bad_json_line(path: Path) -> str | None:
    """Where a JSONL file stops being one JSON object per line: "line N is ...", or None."""
    import json

    with open(path, encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                return f"line {number} is not valid JSON ({exc.msg} at column {exc.colno})"
            if not isinstance(value, dict):
                return f"line {number} is a JSON {type(value).__name__}, not an object"
    return None
