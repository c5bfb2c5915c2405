"""Backbone cards and the registry that holds them (after timm's ``_registry`` and ``PretrainedCfg``).

A ``BackboneCard`` is frozen metadata: what the backbone is, which modality and tasks it serves, its
size, its preprocessing, and where its weights come from. A card's ``ref`` names the backbone with
an explicit scheme: ``timm:efficientnet_lite0``, ``hf-hub:org/name``, ``local-dir:/path``, or
``build-fn:module:function`` for a user's own model. How a scheme is loaded is a
``BackboneSource``, found by entry point (``lepton_automl.sources``).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

from lepton_automl.exceptions import BackboneNotFoundError, ConfigError, PluginError, did_you_mean
from lepton_automl.log import get_logger
from lepton_automl.names import check_name
from lepton_automl.plugins import BACKBONES, SOURCES, PluginRegistry

logger = get_logger(__name__)

SCHEMES = ("timm", "hf-hub", "local-dir", "build-fn", "lexical")


@dataclass(frozen=True)
class BackboneCard:
    """What one backbone is and where it comes from. Change it with ``dataclasses.replace``."""

    name: str
    ref: str
    modality: str
    tasks: tuple[str, ...] = ("classification",)
    params_m: float | None = None  # millions of parameters of the feature extractor
    gmacs: float | None = None  # at input_size / max_length, for the card listing only
    input_size: tuple[int, int, int] | None = None  # (C, H, W) the weights were trained at
    max_length: int | None = None  # text: the longest sequence the weights know
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    weights: str | None = None  # "pip:module/file", "pip-dir:module/sub", "hub", "local", None
    license: str = "unknown"
    description: str = ""
    build_kwargs: Mapping[str, Any] = field(default_factory=dict)
    # Its architecture's Python code ships with its weights (transformers' ``trust_remote_code``): it
    # loads only from a registry the user allowed to run such code (``--trust-remote-code``).
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        check_name(self.name, what="Backbone card")
        scheme, sep, rest = self.ref.partition(":")
        if not sep or scheme not in SCHEMES or not rest:
            raise ConfigError(
                f"Backbone ref {self.ref!r} of card {self.name!r} has no valid scheme. Write it as "
                f"one of {', '.join(s + ':NAME' for s in SCHEMES)}, e.g. 'timm:efficientnet_lite0'."
            )
        object.__setattr__(self, "build_kwargs", MappingProxyType(dict(self.build_kwargs)))
        object.__setattr__(self, "tasks", tuple(self.tasks))

    @property
    def scheme(self) -> str:
        return self.ref.partition(":")[0]

    @property
    def target(self) -> str:
        return self.ref.partition(":")[2]

    @property
    def pretrained(self) -> bool:
        return self.weights is not None


@runtime_checkable
class BackboneSource(Protocol):
    """Loads the backbones of one ref scheme. A source returns a bare ``nn.Module``."""

    def available(self, card: BackboneCard) -> bool:
        """True when ``card``'s weights can be loaded here without the network."""

    def load(self, card: BackboneCard, *, pretrained: bool = True) -> Any:
        """Build the backbone; raise ``WeightsUnavailableError`` naming the fix if it cannot."""


def _natural_key(text: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


class BackboneRegistry:
    """The cards known to one process or one search; built-in cards arrive by entry point.

    ``BackboneRegistry()`` starts from every installed ``lepton_automl.backbones`` entry point;
    ``BackboneRegistry(cards=[...], autoload=False)`` starts from exactly the given cards. Cards whose
    code ships with their weights (``trust_remote_code``) load only when ``trust_remote_code`` is set here.
    """

    def __init__(self, *, cards: Iterable[BackboneCard] = (), autoload: bool | None = None,
                 trust_remote_code: bool = False) -> None:
        self.trust_remote_code = bool(trust_remote_code)
        self._cards: dict[str, BackboneCard] = {}
        self._providers = PluginRegistry(BACKBONES, autoload=autoload)
        self._sources = PluginRegistry(SOURCES, autoload=autoload)
        self._source_objects: dict[str, BackboneSource] = {}
        self._build_fns: dict[str, Callable[..., Any]] = {}
        self._autoloaded = False
        for card in cards:
            self.register(card)

    def _ensure_loaded(self) -> None:
        if self._autoloaded:
            return
        self._autoloaded = True
        for name, provider in self._providers.load_all().items():
            for card in provider():
                if card.name in self._cards:
                    raise PluginError(
                        f"Backbone {card.name!r} from plugin {name!r} is already registered. "
                        "Rename one of the cards."
                    )
                self._cards[card.name] = card

    # -- registration ----------------------------------------------------------------------
    def register(self, card: BackboneCard, *, overwrite: bool = False) -> BackboneCard:
        self._ensure_loaded()
        if card.name in self._cards and not overwrite:
            raise ConfigError(
                f"Backbone {card.name!r} is already registered ({self._cards[card.name].ref}). "
                "Pick another name or pass overwrite=True."
            )
        self._cards[card.name] = card
        return card

    def register_build_fn(
        self, name: str, build_fn: Callable[..., Any], *, modality: str, **card_fields: Any
    ) -> BackboneCard:
        """Register a user's ``build_fn() -> nn.Module`` (features out) as a backbone."""
        self._build_fns[name] = build_fn
        card = BackboneCard(name=name, ref=f"build-fn:{name}", modality=modality, **card_fields)
        return self.register(card, overwrite=True)

    def build_fn(self, name: str) -> Callable[..., Any]:
        return self._build_fns[name]

    # -- lookup ----------------------------------------------------------------------------
    def get(self, name: str) -> BackboneCard:
        self._ensure_loaded()
        if name in self._cards:
            return self._cards[name]
        by_ref = [c for c in self._cards.values() if c.ref == name]
        if by_ref:
            return by_ref[0]
        if ":" in name:
            scheme = name.partition(":")[0]
            if scheme in ("hf-hub", "local-dir", "timm"):
                raise BackboneNotFoundError(
                    f"No card has ref {name!r}. Register one first, e.g. "
                    f"`lepton search --registry-file cards.toml`, or use a listed name."
                )
        raise BackboneNotFoundError(
            f"Unknown backbone {name!r}.{did_you_mean(name, self._cards)} "
            "List them with `lepton registry list`."
        )

    def __contains__(self, name: object) -> bool:
        self._ensure_loaded()
        return name in self._cards

    def list(
        self,
        pattern: str | None = None,
        *,
        modality: str | None = None,
        task: str | None = None,
        pretrained: bool | None = None,
        available: bool | None = None,
    ) -> list[BackboneCard]:
        """Cards matching a shell-style ``pattern`` and filters, in natural sort order."""
        self._ensure_loaded()
        out = []
        for card in self._cards.values():
            if pattern and not fnmatch.fnmatch(card.name, pattern):
                continue
            if modality and card.modality != modality:
                continue
            if task and task not in card.tasks:
                continue
            if pretrained is not None and card.pretrained != pretrained:
                continue
            if available is not None and self.available(card) != available:
                continue
            out.append(card)
        return sorted(out, key=lambda c: _natural_key(c.name))

    # -- sources ---------------------------------------------------------------------------
    def source(self, scheme: str) -> BackboneSource:
        if scheme == "build-fn":
            return _BuildFnSource(self)
        if scheme not in self._source_objects:
            self._source_objects[scheme] = self._sources.load(scheme)()
        return self._source_objects[scheme]

    def available(self, card: BackboneCard) -> bool:
        try:
            return bool(self.source(card.scheme).available(card))
        except PluginError as exc:
            logger.warning("%s", exc)
            return False

    def load(self, card: BackboneCard | str, *, pretrained: bool = True) -> Any:
        card = self.get(card) if isinstance(card, str) else card
        if card.trust_remote_code and not self.trust_remote_code:
            raise ConfigError(
                f"Backbone {card.name!r} ({card.ref}) runs Python code that ships with its weights "
                "(trust_remote_code). Read that code first; then pass --trust-remote-code (in Python: a "
                "BackboneRegistry with trust_remote_code set) to allow it, or pick another backbone."
            )
        return self.source(card.scheme).load(card, pretrained=pretrained)


class _BuildFnSource:
    def __init__(self, registry: BackboneRegistry) -> None:
        self._registry = registry

    def available(self, card: BackboneCard) -> bool:
        return card.target in self._registry._build_fns

    def load(self, card: BackboneCard, *, pretrained: bool = True) -> Any:
        return self._registry.build_fn(card.target)()
