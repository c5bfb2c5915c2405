"""Entry-point discovery for plugins, in the manner of fsspec's lazy registry.

Three groups are read, all the same way:

- ``lepton_automl.modalities``: name -> a ``Modality`` subclass (image, text, ...);
- ``lepton_automl.backbones``: name -> a callable returning ``BackboneCard`` objects;
- ``lepton_automl.sources``: ref scheme (``timm``, ``hf-hub``, ``local-dir``) -> a ``BackboneSource``.

Entries are recorded as dotted strings and imported on first use. A name registered by two
distributions is refused, naming both. A plugin that fails to import is reported with its
distribution and error, and does not break the others. ``LEPTON_DISABLE_PLUGIN_AUTOLOAD=1`` turns
entry-point discovery off; plugins can then be registered by hand with ``register``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from lepton_automl.exceptions import PluginError, did_you_mean
from lepton_automl.log import get_logger

logger = get_logger(__name__)

DISABLE_ENV = "LEPTON_DISABLE_PLUGIN_AUTOLOAD"
MODALITIES = "lepton_automl.modalities"
BACKBONES = "lepton_automl.backbones"
SOURCES = "lepton_automl.sources"


@dataclass(frozen=True)
class PluginSpec:
    """Where one plugin comes from: its name, dotted target and the distribution that ships it."""

    group: str
    name: str
    target: str
    distribution: str = "<registered in code>"
    version: str = ""


def autoload_disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def _import_target(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    obj = importlib.import_module(module_name)
    for part in filter(None, attr.split(".")):
        obj = getattr(obj, part)
    return obj


class PluginRegistry(Mapping[str, PluginSpec]):
    """A read-only, lazily-imported view of one entry-point group plus in-code registrations."""

    def __init__(self, group: str, *, autoload: bool | None = None) -> None:
        self.group = group
        self._autoload = (not autoload_disabled()) if autoload is None else autoload
        self._specs: dict[str, PluginSpec] | None = None
        self._loaded: dict[str, Any] = {}
        self.errors: dict[str, str] = {}

    # -- discovery -------------------------------------------------------------------------
    def _discover(self) -> dict[str, PluginSpec]:
        if self._specs is not None:
            return self._specs
        specs: dict[str, PluginSpec] = {}
        if self._autoload:
            for ep in importlib.metadata.entry_points(group=self.group):
                dist = getattr(ep, "dist", None)
                spec = PluginSpec(
                    group=self.group,
                    name=ep.name,
                    target=ep.value,
                    distribution=dist.metadata["Name"] if dist is not None else "<unknown>",
                    version=dist.version if dist is not None else "",
                )
                previous = specs.get(ep.name)
                if previous is not None and previous.target != spec.target:
                    raise PluginError(
                        f"Plugin name {ep.name!r} in group {self.group!r} is registered twice: by "
                        f"{previous.distribution} ({previous.target}) and by {spec.distribution} "
                        f"({spec.target}). Uninstall one of them, e.g. `pip uninstall "
                        f"{spec.distribution}`."
                    )
                specs[ep.name] = spec
        self._specs = specs
        return specs

    def register(self, name: str, target: str | Any, *, overwrite: bool = False) -> None:
        """Register ``target`` (a dotted ``module:attr`` string or the object itself) as ``name``."""
        specs = self._discover()
        if name in specs and not overwrite:
            raise PluginError(
                f"Plugin name {name!r} is already registered in {self.group!r} by "
                f"{specs[name].distribution}. Pass overwrite=True to replace it."
            )
        if isinstance(target, str):
            specs[name] = PluginSpec(self.group, name, target)
            self._loaded.pop(name, None)
        else:
            module = getattr(target, "__module__", "?")
            qual = getattr(target, "__qualname__", type(target).__name__)
            specs[name] = PluginSpec(self.group, name, f"{module}:{qual}")
            self._loaded[name] = target

    # -- Mapping ---------------------------------------------------------------------------
    def __getitem__(self, name: str) -> PluginSpec:
        specs = self._discover()
        if name not in specs:
            raise PluginError(
                f"No plugin named {name!r} in {self.group!r}.{did_you_mean(name, specs)} "
                f"Installed: {sorted(specs) or 'none'}. List them with `lepton plugins list`."
            )
        return specs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._discover()))

    def __len__(self) -> int:
        return len(self._discover())

    # -- loading ---------------------------------------------------------------------------
    def load(self, name: str) -> Any:
        """Import and return the object behind ``name``; import errors become ``PluginError``."""
        if name in self._loaded:
            return self._loaded[name]
        spec = self[name]
        try:
            obj = _import_target(spec.target)
        except Exception as exc:  # a broken plugin must not take the others down
            message = (
                f"Plugin {name!r} from {spec.distribution} ({spec.target}) failed to import: "
                f"{type(exc).__name__}: {exc}. Reinstall it (`pip install --force-reinstall "
                f"{spec.distribution}`) or uninstall it."
            )
            self.errors[name] = message
            raise PluginError(message) from exc
        self._loaded[name] = obj
        return obj

    def load_all(self) -> dict[str, Any]:
        """Load every plugin that imports; broken ones are logged and kept in ``errors``."""
        out: dict[str, Any] = {}
        for name in self:
            try:
                out[name] = self.load(name)
            except PluginError as exc:
                logger.warning("%s", exc)
        return out
