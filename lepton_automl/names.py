"""Names that become parts of paths, keys and ensemble names (backbone cards, hardware profiles): one rule.

A name is letters, digits, ``.``, ``_`` and ``-``, starting with a letter or digit, never ``..``: it
cannot climb out of a folder (``../x``), start at the root (``/etc``), or contain the ensemble
separator ``+``.
"""

from __future__ import annotations

import re

from lepton_automl.exceptions import ConfigError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_name(name: str, *, what: str) -> str:
    """``name`` if it follows the rule; otherwise a ``ConfigError`` naming ``what`` and a valid spelling."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        valid = safe_name(str(name), default="name")
        raise ConfigError(f"{what} name {name!r} may hold only letters, digits, '.', '_' and '-' (starting with a "
                          f"letter or digit, no '..'): it becomes part of file paths. Try {valid!r}.")
    return name


def safe_name(name: str, *, default: str) -> str:
    """A valid name made from ``name`` (a function's ``__name__``, say), or ``default``."""
    cleaned = re.sub(r"\.{2,}", ".", re.sub(r"[^A-Za-z0-9._-]+", "-", name)).strip("-.")
    return cleaned if cleaned and _NAME.fullmatch(cleaned) else default
