"""A small exception hierarchy; every message says what was wrong and what to type instead."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LeptonError(Exception):
    """Base class of every error Lepton raises on purpose."""


class ConfigError(LeptonError, ValueError):
    """An option, parameter or name given by the user is not valid."""


class DataError(LeptonError, ValueError):
    """The dataset cannot be used as given; the message names the file or row and the fix."""


class BackboneNotFoundError(ConfigError, KeyError):
    """No backbone card has that name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class WeightsUnavailableError(LeptonError):
    """A backbone's weights cannot be loaded here (offline, not installed, not cached)."""


class PluginError(LeptonError):
    """A plugin is missing, broken or registered twice."""


class ExportError(LeptonError):
    """A model could not be exported or reloaded."""


class InputError(LeptonError, ValueError):
    """One input sent for prediction is malformed or too large; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def did_you_mean(name: str, choices: Iterable[str], *, n: int = 3) -> str:
    """Return ``" Did you mean 'x'?"`` (or an empty string) for the nearest of ``choices``."""
    choices = list(choices)
    # A bare name whose prefixed form exists ('lr' for 'optim__lr') is the likeliest slip; difflib
    # alone rates such pairs too far apart.
    bare = name.rpartition("__")[2].replace("_", "")
    close = [c for c in choices if c.rpartition("__")[2].replace("_", "") == bare and c != name][:n]
    close = close or difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    if not close:
        return ""
    quoted = " or ".join(repr(c) for c in close)
    return f" Did you mean {quoted}?"
