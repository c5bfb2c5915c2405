"""The search space. Parameter names carry their component's prefix and are the Optuna names.

- ``backbone``: a registry card name, filtered by modality and availability;
- ``data__*``: the modality's own (``data__image_size``, ``data__max_length``);
- ``train__mode``: ``probe`` (linear head on cached frozen features), ``finetune`` (the last
  ``train__blocks`` blocks and the head, on cached trunk outputs, for ``train__epochs``) or ``full``
  (every layer, from the probe, on raw examples, for ``train__epochs``; see ``training/finetune.py``).
  An ensemble is a probe, or a full fine-tuning when only one of its members has weights to train
  (``trains_as_one``); it is never pruned;
- ``optim__lr`` and ``optim__weight_decay`` (log scale): AdamW's, only when fine-tuning. A linear
  probe's L2 strength is not searched: each probe trial picks it by cross-validation
  (``training.trainer.select_probe``), which one trial does in seconds where the sampler needed
  several trials;
- ``prune__method``: ``none``, ``structured`` (conv channels, then ``prune__recovery_epochs`` of
  fine-tuning; for transformers ``prune__target`` picks whole layers, keeping the first ones, or
  attention heads and MLP width, then recovery) or ``unstructured`` (magnitude; a size option only),
  with ``prune__amount``; ``unstructured`` only when the search has a size limit (``from_options``);
- ``quant__mode``: ``none`` or ``int8`` (static for convolutional graphs, dynamic MatMul otherwise).
Conditional parameters (``train__blocks``, ``train__epochs``) are suggested only when they apply.
"""

from __future__ import annotations

import math

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from lepton_automl.backbones import BackboneRegistry
from lepton_automl.exceptions import ConfigError, did_you_mean
from lepton_automl.interfaces import ENSEMBLE_SEP, Modality, ensemble_members
from lepton_automl.search.config import PRUNE_METHODS, QUANT_MODES, TRAIN_MODES


@dataclass(frozen=True)
class SearchSpace:
    """What a search may try. Option names are the Optuna parameter names they bound: a tuple of
    choices for a categorical parameter, a ``(low, high)`` range for a numeric one."""

    backbones: tuple[str, ...]
    train__mode: tuple[str, ...] = TRAIN_MODES
    quant__mode: tuple[str, ...] = QUANT_MODES
    prune__method: tuple[str, ...] = PRUNE_METHODS
    prune__amount: tuple[float, float] = (0.1, 0.6)
    prune__recovery_epochs: tuple[int, int] = (1, 3)
    optim__lr: tuple[float, float] = (1e-5, 1e-3)  # partial fine-tuning; full uses Modality.finetune_lr
    optim__weight_decay: tuple[float, float] = (1e-6, 1e-2)
    train__epochs: tuple[int, int] = (1, 4)
    # Concatenated-features ensembles ("a+b"): probes over several frozen backbones at once.
    ensembles: tuple[str, ...] = ()

    @classmethod
    def from_options(cls, *, backbones: Sequence[str], options: Mapping[str, Any] | None = None,
                     ensembles: Sequence[str] = (), size_limited: bool = False) -> SearchSpace:
        """Build from user options; an unknown option is an error naming the valid ones.

        Unstructured pruning is in the default space only when the search has a size limit
        (``size_limited``: ``Limits.max_size_mb``). It zeroes weights inside dense kernels, which
        shrinks the gzip-compressed file and nothing else: no objective (accuracy, latency, cost)
        can gain from it, so without a size limit it only spends trials on models that are worse
        than their unpruned twins in expectation, and reach the front by a lucky validation score.
        Naming ``prune__method`` in ``options`` overrides this."""
        options = dict(options or {})
        valid = [f.name for f in fields(cls) if f.name not in ("backbones", "ensembles")]
        for key in options:
            if key not in valid:
                raise ConfigError(f"Unknown search-space option {key!r}.{did_you_mean(key, valid)} "
                                  f"Valid: {', '.join(valid)}.")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
        if "prune__method" not in values and not size_limited:
            values["prune__method"] = tuple(m for m in PRUNE_METHODS if m != "unstructured")
        return cls(backbones=tuple(backbones), ensembles=tuple(ensembles), **values)

    def __post_init__(self) -> None:
        if not self.backbones:
            raise ConfigError(
                "No backbone is available for this search. List them with "
                "`lepton registry list --pretrained`, or pass --untrained to allow random weights."
            )
        for name, valid in (("train__mode", TRAIN_MODES), ("quant__mode", QUANT_MODES),
                            ("prune__method", PRUNE_METHODS)):
            bad = set(getattr(self, name)) - set(valid)
            if bad:
                raise ConfigError(f"Unknown {name} choices {sorted(bad)}; valid: {', '.join(valid)}.")


def suggest(trial: Any, space: SearchSpace, modality: Modality, registry: BackboneRegistry) -> dict[str, Any]:
    """Draw one configuration from ``space`` on ``trial``."""
    params: dict[str, Any] = {"backbone": trial.suggest_categorical("backbone",
                                                                     [*space.backbones, *space.ensembles])}
    ensemble = ENSEMBLE_SEP in params["backbone"]
    card = registry.get(ensemble_members(params["backbone"])[0])
    params.update(modality.suggest(trial, card))
    modes = list(space.train__mode) if modality.max_finetune_blocks(card) > 0 else ["probe", "full"]
    if ensemble:  # a probe, or full fine-tuning when that costs about one member's (trains_as_one)
        modes = ["probe", "full"] if trains_as_one(params["backbone"], modality, registry) else ["probe"]
    # A probe when there is nothing to train: frozen trunks side by side, or one trunk without weights.
    fixed = modes == ["probe"] if ensemble else not modality.can_fine_tune(card)
    # A parameter that would not change what runs is not drawn: the sampler must not learn from values
    # the trial ignored (and it would draw finished configurations again).
    params["train__mode"] = "probe" if fixed else trial.suggest_categorical("train__mode", list(space.train__mode))
    if params["train__mode"] not in modes:
        params["train__mode"] = "probe"
    if params["train__mode"] == "finetune":
        params["train__blocks"] = trial.suggest_int("train__blocks", 1, modality.max_finetune_blocks(card))
    if params["train__mode"] in ("finetune", "full"):
        params["train__epochs"] = trial.suggest_int("train__epochs", *space.train__epochs)
        lr = space.optim__lr if params["train__mode"] == "finetune" else modality.finetune_lr
        params["optim__lr"] = trial.suggest_float("optim__lr", *lr, log=True)
        params["optim__weight_decay"] = trial.suggest_float("optim__weight_decay", *space.optim__weight_decay,
                                                            log=True)
    params["prune__method"] = "none" if fixed or ensemble else trial.suggest_categorical("prune__method",
                                                                                         list(space.prune__method))
    if params["prune__method"] != "none":
        params["prune__amount"] = trial.suggest_float("prune__amount", *space.prune__amount)
    if params["prune__method"] == "structured" and modality.structured_pruning == "layers":
        # transformers: keep the first layers (no training), or cut heads and MLP width (then recover)
        params["prune__target"] = trial.suggest_categorical("prune__target", ["layers", "width"])
    if params["prune__method"] == "structured" and (modality.structured_pruning == "channels"
                                                    or params.get("prune__target") == "width"):
        params["prune__recovery_epochs"] = trial.suggest_int("prune__recovery_epochs", *space.prune__recovery_epochs)
    params["quant__mode"] = trial.suggest_categorical("quant__mode", list(space.quant__mode))
    return params


def trains_as_one(backbone: str, modality: Modality, registry: BackboneRegistry) -> bool:
    """Whether fully fine-tuning the ensemble ``backbone`` costs about what its one trainable member's
    does: exactly one member can be fine-tuned, the others are fixed functions (hashed n-grams beside
    a transformer). Trained together from the probe on all their features, the trainable member learns
    what the fixed ones miss. On the man-page set (3 epochs at 64 tokens, lr 5.5e-5, the warm start's):
    MiniLM + hashed n-grams fine-tuned whole scored 0.789 on test, MiniLM fine-tuned alone 0.752, and
    their probe 0.805 (the probe still leads there). In a hand-written check at 128 tokens, MiniLM
    fine-tuned with TF-IDF beside it scored 0.810, the same features' probe 0.766, MiniLM alone 0.770."""
    members = [registry.get(name) for name in ensemble_members(backbone)]
    return len(members) > 1 and sum(modality.can_fine_tune(c) for c in members) == 1


def ensemble_of(names: Sequence[str], modality: Modality, registry: BackboneRegistry) -> list[str]:
    """The concatenated-features ensemble worth offering: every backbone whose preprocessing at its
    default parameters equals the smallest backbone's (one shared input), when there are two or more."""
    cards = sorted((registry.get(n) for n in names), key=lambda c: (not modality.can_fine_tune(c), c.params_m or 0.0))
    if len(cards) < 2:
        return []
    params = modality.default_params(cards[0])
    base = modality.preprocessing(cards[0], registry, params=params)
    same = [c.name for c in cards if modality.preprocessing(c, registry, params=params) == base]
    return [ENSEMBLE_SEP.join(same)] if len(same) >= 2 else []


def warm_start_configs(
    space: SearchSpace, modality: Modality, registry: BackboneRegistry, variants: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Known-good first trials: a linear probe on the smallest backbone, fp32 and int8, at a few input
    sizes (a probe on pretrained features is the strongest cheap baseline in transfer learning:
    Kornblith et al., "Do Better ImageNet Models Transfer Better?", CVPR 2019); every other backbone's
    probe; the concatenated-features ensemble, which reuses the features those probes cached; then one
    full fine-tuning from the probe. The fine-tuning goes last because it costs as much as all the rest
    (125 s of 600 on the glyph benchmark, where the ensemble took 8 s once its members ran) and is the
    least likely to lead: a search stopped early has its most accurate cheap points first."""
    cards = sorted((registry.get(b) for b in space.backbones),
                   key=lambda c: (not modality.can_fine_tune(c), c.params_m or 0.0))
    card = cards[0]  # the smallest trainable backbone
    out = []
    for i, variant in enumerate(variants):
        for quant in (("none", "int8") if i == 0 else ("int8",)):
            if quant not in space.quant__mode:
                continue
            out.append({"backbone": card.name, **variant, "train__mode": "probe", "prune__method": "none",
                        "quant__mode": quant})
    for other in cards[1:]:
        out.append({"backbone": other.name, **modality.default_params(other), "train__mode": "probe",
                    "prune__method": "none", "quant__mode": "none"})
    for name in space.ensembles:
        out.append({"backbone": name, **modality.default_params(card), "train__mode": "probe",
                    "prune__method": "none", "quant__mode": "none"})
    if "full" in space.train__mode and modality.can_fine_tune(card):
        # On data unlike the backbone's pretraining, fine-tuning every layer is what a frozen trunk
        # cannot match; the modality picks an input size that fits a CPU budget. An ensemble that
        # trains at about one member's cost is fine-tuned whole, its fixed members' features beside.
        low, high = modality.finetune_lr
        whole = next((e for e in space.ensembles if ensemble_members(e)[0] == card.name
                      and trains_as_one(e, modality, registry)), card.name)
        out.append({"backbone": whole, **modality.full_finetune_variant(card), "train__mode": "full",
                    "train__epochs": min(3, space.train__epochs[1]), "optim__lr": math.sqrt(low * high),
                    "optim__weight_decay": 0.01, "prune__method": "none", "quant__mode": "none"})
    return out
