"""Imports run one way (see ../shared/STYLE.md, "Layers"): every import in the package and the built-in
plugins, at module level or inside a function, is checked against the layer it may not reach."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UPPER = ("lepton_automl.search", "lepton_automl.facade", "lepton_automl.cli", "lepton_automl.report")
# module prefix (as a path under the repo) -> imported module prefixes it must not use
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "lepton_automl/export": ("lepton_automl.compression", "lepton_automl.training", *UPPER),
    "lepton_automl/training": ("lepton_automl.export", "lepton_automl.compression", *UPPER),
    "lepton_automl/compression": UPPER,
    "lepton_automl/cost": ("lepton_automl.export", "lepton_automl.training", "lepton_automl.compression", *UPPER),
    "lepton_automl/data": ("lepton_automl.export", "lepton_automl.training", "lepton_automl.compression",
                           "lepton_automl.cost", *UPPER),
    "lepton_automl/interfaces.py": ("lepton_automl.export", "lepton_automl.training", "lepton_automl.compression",
                                    "lepton_automl.cost", *UPPER),
    "lepton_automl/sessions.py": ("lepton_automl.",),
    "plugins": ("lepton_automl.export", "lepton_automl.training", "lepton_automl.compression",
                "lepton_automl.cost", *UPPER),
    "registry": ("lepton_automl.export", "lepton_automl.training", "lepton_automl.compression",
                 "lepton_automl.cost", *UPPER),
}


def imports_of(source: str) -> list[tuple[int, str, list[str]]]:
    """(line, module, imported names) for every import statement, nested ones included."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module, [alias.name for alias in node.names]))
    return found


def violations(rel: str, source: str) -> list[str]:
    out = []
    for prefix, banned in FORBIDDEN.items():
        if not rel.startswith(prefix):
            continue
        for line, module, names in imports_of(source):
            if any(module == b.rstrip(".") or module.startswith(b.rstrip(".") + ".") or
                   (b.endswith(".") and module.startswith(b)) for b in banned):
                out.append(f"{rel}:{line} imports {module}")
    if rel.startswith("plugins/"):
        own = rel.split("/")[1]
        for line, module, names in imports_of(source):
            private = [n for n in names if n.startswith("_")]
            private_module = any(part.startswith("_") and not part.startswith("__") for part in module.split("."))
            if not module.startswith(own) and (private or private_module):
                out.append(f"{rel}:{line} imports private {module}.{','.join(private) or ''}")
    return out


def test_the_checker_catches_what_it_is_for() -> None:
    assert violations("lepton_automl/export/x.py", "def f():\n    from lepton_automl.compression.pruning import a\n")
    assert violations("lepton_automl/training/x.py", "import lepton_automl.export.onnx\n")
    assert violations("plugins/lepton_text/m.py", "from lepton_registry.sources import _transformers_path\n")
    assert violations("plugins/lepton_text/m.py", "from lepton_automl.training.trainer import TupleOut\n")
    assert not violations("plugins/lepton_text/m.py", "from lepton_automl.interfaces import TupleOut\n")
    assert not violations("lepton_automl/search/x.py", "from lepton_automl.export.trunk import run_trunk_fast\n")


FILES = sorted(p for top in ("lepton_automl", "plugins", "registry") for p in (ROOT / top).rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_one_way(path: Path) -> None:
    rel = str(path.relative_to(ROOT))
    assert violations(rel, path.read_text()) == []
