"""A trial's configuration, typed: parsed once from the Optuna parameters, never read with ``.get``.

The Optuna parameter names carry their component's prefix (``optim__lr``, ``prune__amount``); each
prefix is one frozen sub-configuration here. An unknown or misspelt key is a ``ConfigError`` with a
did-you-mean, never a silent default: ``quant_mode="int8"`` used to mean "no quantization".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from lepton_automl.exceptions import ConfigError, did_you_mean
from lepton_automl.interfaces import Structure

TRAIN_MODES = ("probe", "finetune", "full")
PRUNE_METHODS = ("none", "structured", "unstructured")
PRUNE_TARGETS = ("layers", "width")
QUANT_MODES = ("none", "int8")


@dataclass(frozen=True)
class TrainConfig:
    mode: str = "probe"  # probe | finetune (last ``blocks`` on cached trunk outputs) | full (every layer)
    blocks: int = 0
    epochs: int = 0


@dataclass(frozen=True)
class OptimConfig:
    lr: float | None = None  # AdamW, when training more than a probe
    weight_decay: float | None = None


@dataclass(frozen=True)
class PruneConfig:
    method: str = "none"
    amount: float = 0.0
    target: str = "layers"  # transformers only: whole layers, or attention heads + MLP width
    recovery_epochs: int = 0
    heads: Mapping[str, Any] | None = None  # heads removed by width pruning, for a rebuild


@dataclass(frozen=True)
class QuantConfig:
    mode: str = "none"


_SECTIONS = {"train": TrainConfig, "optim": OptimConfig, "prune": PruneConfig, "quant": QuantConfig}
KNOWN_KEYS = ("backbone", *(f"{prefix}__{f.name}" for prefix, cls in _SECTIONS.items() for f in fields(cls)))


@dataclass(frozen=True)
class TrialConfig:
    backbone: str
    data: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))  # the modality's own
    train: TrainConfig = TrainConfig()
    optim: OptimConfig = OptimConfig()
    prune: PruneConfig = PruneConfig()
    quant: QuantConfig = QuantConfig()

    @classmethod
    def from_params(cls, params: Mapping[str, Any], *, data_keys: tuple[str, ...] | None = None) -> TrialConfig:
        """Parse Optuna-style parameters. ``data_keys`` (the modality's ``data__*`` names) are checked
        too when given."""
        known = set(KNOWN_KEYS) | {f"data__{k}" for k in (data_keys or ())}
        for key in params:
            if key in known or (data_keys is None and key.startswith("data__")):
                continue
            raise ConfigError(f"Unknown trial parameter {key!r}.{did_you_mean(key, sorted(known))} "
                              f"Valid: {', '.join(sorted(known))}.")
        if "backbone" not in params:
            raise ConfigError("A trial configuration needs a 'backbone' (a registry card name).")
        parts: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
        data = {}
        for key, value in params.items():
            prefix, _, name = key.partition("__")
            if prefix == "data":
                data[key] = value
            elif prefix in parts:
                parts[prefix][name] = value
        config = cls(backbone=str(params["backbone"]), data=MappingProxyType(data),
                     **{name: _SECTIONS[name](**values) for name, values in parts.items()})
        config._check()
        return config

    def _check(self) -> None:
        for value, valid, key in ((self.train.mode, TRAIN_MODES, "train__mode"),
                                  (self.prune.method, PRUNE_METHODS, "prune__method"),
                                  (self.prune.target, PRUNE_TARGETS, "prune__target"),
                                  (self.quant.mode, QUANT_MODES, "quant__mode")):
            if value not in valid:
                raise ConfigError(f"{key}={value!r} is not valid.{did_you_mean(str(value), valid)} "
                                  f"Use one of: {', '.join(valid)}.")
        if self.train.mode in ("finetune", "full") and (self.train.epochs < 1 or self.optim.lr is None):
            raise ConfigError(f"train__mode={self.train.mode!r} needs train__epochs >= 1 and optim__lr.")
        if self.train.mode == "finetune" and self.train.blocks < 1:
            raise ConfigError("train__mode='finetune' needs train__blocks >= 1 (or use 'full' for every layer).")
        if len(self.members) > 1 and (self.train.mode == "finetune" or self.prune.method != "none"):
            raise ConfigError(f"Backbone {self.backbone!r} is an ensemble: it takes train__mode='probe' or "
                              "'full' (every layer of every member, from the probe), and prune__method='none'.")
        if self.prune.method != "none" and not 0.0 < float(self.prune.amount) < 1.0:
            raise ConfigError(f"prune__amount must be in (0, 1) when pruning; got {self.prune.amount}.")

    # -- what the stages ask --------------------------------------------------------------
    @property
    def members(self) -> list[str]:
        """Card names: one, or the members of a concatenated-features ensemble."""
        return self.backbone.split("+")

    @property
    def finetune_blocks(self) -> int:
        """Blocks the trunk hands to the tail (trained on cached trunk outputs)."""
        return int(self.train.blocks) if self.train.mode == "finetune" else 0

    def drops_layers(self, structured_pruning: str) -> bool:
        """Transformer layer dropping: ``build`` re-applies it (``Modality.apply_structure`` and the
        modality's ``drop_layers`` hook), before features are cached."""
        return Structure.from_params(self.to_params(), kind=structured_pruning).keep_layers < 1.0

    def probe_only(self, structured_pruning: str) -> bool:
        """A linear head on cached features, nothing trained or pruned after it (layer dropping aside)."""
        return self.train.mode == "probe" and (self.prune.method == "none" or self.drops_layers(structured_pruning))

    def to_params(self) -> dict[str, Any]:
        out: dict[str, Any] = {"backbone": self.backbone, **self.data}
        for prefix in _SECTIONS:
            section = getattr(self, prefix)
            for f in fields(section):
                value = getattr(section, f.name)
                if value is not None:
                    out[f"{prefix}__{f.name}"] = dict(value) if isinstance(value, Mapping) else value
        return out
