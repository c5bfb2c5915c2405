"""The search space. Parameter names carry their component's prefix and are the Optuna names.

- ``backbone``: a registry card name, filtered by modality and availability;
- ``data__*``: the modality's own (``data__image_size``, ``data__max_length``);
- ``train__mode``: ``probe`` (linear head on cached frozen features) or ``finetune`` (the last
  ``train__blocks`` blocks and the head, on cached trunk outputs, for ``train__epochs``);
- ``optim__weight_decay`` (log scale): the L2 strength of the head (and AdamW's decay when
  fine-tuning); ``optim__lr`` (log scale) only when fine-tuning, since the probe is solved by L-BFGS;
- ``prune__method``: ``none``, ``structured`` (conv channels, then ``prune__recovery_epochs`` of
  fine-tuning; for transformers ``prune__target`` picks whole layers, keeping the first ones, or
  attention heads and MLP width, then recovery) or ``unstructured`` (magnitude; a size option only),
  with ``prune__amount``;
- ``quant__mode``: ``none`` or ``int8`` (static for convolutional graphs, dynamic MatMul otherwise).
Conditional parameters (``train__blocks``, ``train__epochs``) are suggested only when they apply.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lepton_automl.backbones import BackboneRegistry
from lepton_automl.exceptions import ConfigError
from lepton_automl.interfaces import Modality

TRAIN_MODES = ("probe", "finetune")
PRUNE_METHODS = ("none", "structured", "unstructured")
QUANT_MODES = ("none", "int8")


@dataclass(frozen=True)
class SearchSpace:
    backbones: tuple[str, ...]
    train_modes: tuple[str, ...] = TRAIN_MODES
    quant_modes: tuple[str, ...] = QUANT_MODES
    prune_methods: tuple[str, ...] = PRUNE_METHODS
    prune_amount: tuple[float, float] = (0.1, 0.6)
    max_recovery_epochs: int = 3
    lr: tuple[float, float] = (1e-5, 1e-3)
    weight_decay: tuple[float, float] = (1e-6, 1e-2)
    max_epochs: int = 4

    def __post_init__(self) -> None:
        if not self.backbones:
            raise ConfigError(
                "No backbone is available for this search. List them with "
                "`lepton registry list --pretrained`, or pass --untrained to allow random weights."
            )
        bad = set(self.train_modes) - set(TRAIN_MODES)
        if bad:
            raise ConfigError(f"Unknown train modes {sorted(bad)}; valid: {TRAIN_MODES}.")
        bad = set(self.quant_modes) - set(QUANT_MODES)
        if bad:
            raise ConfigError(f"Unknown quantization modes {sorted(bad)}; valid: {QUANT_MODES}.")


def suggest(trial: Any, space: SearchSpace, modality: Modality, registry: BackboneRegistry) -> dict[str, Any]:
    """Draw one configuration from ``space`` on ``trial``."""
    params: dict[str, Any] = {"backbone": trial.suggest_categorical("backbone", list(space.backbones))}
    card = registry.get(params["backbone"])
    params.update(modality.suggest(trial, card))
    modes = list(space.train_modes) if modality.max_finetune_blocks(card) > 0 else ["probe"]
    params["train__mode"] = trial.suggest_categorical("train__mode", list(space.train_modes))
    if params["train__mode"] not in modes:
        params["train__mode"] = "probe"
    if params["train__mode"] == "finetune":
        params["train__blocks"] = trial.suggest_int("train__blocks", 1, modality.max_finetune_blocks(card))
        params["train__epochs"] = trial.suggest_int("train__epochs", 1, space.max_epochs)
        params["optim__lr"] = trial.suggest_float("optim__lr", *space.lr, log=True)
    params["optim__weight_decay"] = trial.suggest_float("optim__weight_decay", *space.weight_decay, log=True)
    params["prune__method"] = trial.suggest_categorical("prune__method", list(space.prune_methods))
    if params["prune__method"] != "none":
        params["prune__amount"] = trial.suggest_float("prune__amount", *space.prune_amount)
    if params["prune__method"] == "structured" and modality.structured_pruning == "layers":
        # transformers: keep the first layers (no training), or cut heads and MLP width (then recover)
        params["prune__target"] = trial.suggest_categorical("prune__target", ["layers", "width"])
    if params["prune__method"] == "structured" and (modality.structured_pruning == "channels"
                                                    or params.get("prune__target") == "width"):
        params["prune__recovery_epochs"] = trial.suggest_int("prune__recovery_epochs", 1, space.max_recovery_epochs)
    params["quant__mode"] = trial.suggest_categorical("quant__mode", list(space.quant_modes))
    return params


def warm_start_configs(
    space: SearchSpace, modality: Modality, registry: BackboneRegistry, variants: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Known-good first trials: a linear probe on the smallest backbone, fp32 and int8, at a few
    input sizes. A probe on pretrained features is the strongest cheap baseline in transfer learning
    (Kornblith et al., "Do Better ImageNet Models Transfer Better?", CVPR 2019)."""
    cards = sorted((registry.get(b) for b in space.backbones), key=lambda c: c.params_m or 0.0)
    card = cards[0]
    out = []
    for i, variant in enumerate(variants):
        for quant in (("none", "int8") if i == 0 else ("int8",)):
            if quant not in space.quant_modes:
                continue
            out.append(
                {
                    "backbone": card.name,
                    **variant,
                    "train__mode": "probe",
                    "optim__weight_decay": 1e-4,
                    "prune__method": "none",
                    "quant__mode": quant,
                }
            )
    return out
