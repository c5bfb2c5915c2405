"""Lepton's built-in backbone catalogue and weight sources.

Registered through the ``lepton_automl.backbones`` and ``lepton_automl.sources`` entry points, the
same way a third-party catalogue would be. The cards live in ``cards.toml`` beside this file.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]

from lepton_automl.backbones import BackboneCard
from lepton_automl.exceptions import ConfigError, did_you_mean
from lepton_registry.sources import hub_offline, transformers_path

__all__ = ["builtin_cards", "card_from_mapping", "cards_from_file", "hub_offline", "transformers_path"]

CARDS_FILE = Path(__file__).with_name("cards.toml")
_FIELDS = set(BackboneCard.__dataclass_fields__)


def card_from_mapping(name: str, data: dict[str, Any], *, origin: str = "<mapping>") -> BackboneCard:
    """Build a card from a TOML/YAML table; unknown keys are errors, never dropped."""
    unknown = set(data) - _FIELDS
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(
            f"Unknown key {key!r} in backbone card {name!r} ({origin}).{did_you_mean(key, _FIELDS)} "
            f"Valid keys: {', '.join(sorted(_FIELDS - {'name'}))}."
        )
    fields = dict(data)
    for key in ("input_size", "mean", "std", "tasks"):
        if key in fields and fields[key] is not None:
            fields[key] = tuple(fields[key])
    return BackboneCard(name=name, **fields)


def cards_from_file(path: str | Path) -> Iterator[BackboneCard]:
    """Read cards from a TOML file (``.toml``) or a YAML file (``.yaml``/``.yml``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Registry file {str(path)!r} does not exist. Check the path.")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        tables = yaml.safe_load(path.read_text()) or {}
    else:
        tables = tomllib.loads(path.read_text())
    for name, data in tables.items():
        yield card_from_mapping(name, data, origin=str(path))


def builtin_cards() -> Iterable[BackboneCard]:
    return list(cards_from_file(CARDS_FILE))
