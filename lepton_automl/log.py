"""The library logger.

Lepton never configures handlers itself (auto-sklearn issue 291 shows why): the library logs to
``logging.getLogger("lepton_automl")`` with a ``NullHandler``, and only the CLI attaches a console
handler. ``set_verbosity`` mirrors ``optuna.logging.set_verbosity``.
"""

from __future__ import annotations

import logging

_ROOT = "lepton_automl"
logging.getLogger(_ROOT).addHandler(logging.NullHandler())


def get_logger(name: str) -> logging.Logger:
    """Return a child of the ``lepton_automl`` logger for module ``name``."""
    if name == _ROOT or name.startswith(_ROOT + "."):
        return logging.getLogger(name)
    return logging.getLogger(f"{_ROOT}.{name}")


def set_verbosity(level: int) -> None:
    """Set the level of every ``lepton_automl`` logger (e.g. ``logging.INFO``)."""
    logging.getLogger(_ROOT).setLevel(level)
