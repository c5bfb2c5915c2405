"""Lepton AutoML: plugin-based transfer-learning search over accuracy, latency and cost."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "Lepton", "search", "BackboneRegistry", "BackboneCard", "Predictor"]


def __getattr__(name: str) -> Any:
    # Lazy: `import lepton_automl` must stay cheap (the CLI's --help should not import torch).
    if name == "Lepton":
        from lepton_automl.facade import Lepton

        return Lepton
    if name == "search":
        from lepton_automl.search.engine import search

        return search
    if name in ("BackboneRegistry", "BackboneCard"):
        from lepton_automl import backbones

        return getattr(backbones, name)
    if name == "Predictor":
        from lepton_automl.export.artifact import Predictor

        return Predictor
    raise AttributeError(f"module 'lepton_automl' has no attribute {name!r}")
