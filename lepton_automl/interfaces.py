"""The contracts between Lepton's core and its plugins.

``Modality`` is the one a plugin author implements. The core calls its methods in this order for
a search: ``load`` (ingest and validate, once), then per trial ``suggest`` (modality parameters),
``build`` (backbone -> trunk and tail), ``encode`` (raw examples -> model inputs, batch by batch),
and for export ``input_names``/``dynamic_axes``/``preprocessing``. ``predict`` reverses it:
``read_inputs`` turns user files or strings into examples, then ``encode`` with the saved
preprocessing. A modality must never modify the ``LabelledData`` it is given, nor global state
(the torch seed, logging handlers).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from lepton_automl.backbones import BackboneCard, BackboneRegistry
from lepton_automl.data.dataset import LabelledData


# -- the model parts every modality and every stage agree on ---------------------------------
class TupleOut(nn.Module):
    """Wrap a module so that it returns a 1-tuple (the trunk contract of ``ModelParts``)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.module(*inputs),)


class ExportModel(nn.Module):
    """trunk -> tail -> head as one module: raw model inputs in, logits out."""

    def __init__(self, trunk: nn.Module, tail: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.trunk, self.tail, self.head = trunk, tail, head

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.tail(*self.trunk(*inputs)))


class Standardize(nn.Module):
    """Fixed per-feature standardisation, stored as buffers so that it exports with the head."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("std", std.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std



ENSEMBLE_SEP = "+"  # "efficientnet_lite0+efficientnet_lite1": one head on both backbones' features


def ensemble_members(backbone: str) -> list[str]:
    """The card names of a backbone parameter: one name, or several joined by ``ENSEMBLE_SEP``."""
    return backbone.split(ENSEMBLE_SEP)


class ConcatTrunk(nn.Module):
    """Several trunks on the same inputs, their pooled features side by side: one linear probe over all
    of them is an ensemble at the price of running every member (measured on the artifact). A full
    fine-tuning trains them together under that head (``search.space.trains_as_one``). Each member must
    return a 1-tuple of ``(batch, features)`` (a trunk cut with ``finetune_blocks=0``)."""

    def __init__(self, trunks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(trunks)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor]:
        return (torch.cat([member(*inputs)[0] for member in self.members], dim=1),)


def build_seeded(modality: Modality, card: BackboneCard, registry: BackboneRegistry, *, params: Mapping[str, Any],
                 finetune_blocks: int, pretrained: bool, seed: int) -> ModelParts:
    """``modality.build`` with torch's generator forked and seeded: layers without pretrained weights (an
    untrained backbone, a ``build_fn``'s new layers) come out the same in every trial, so features cached
    from one build are the features of the next."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return modality.build(card, registry, params=params, finetune_blocks=finetune_blocks, pretrained=pretrained)


@dataclass(frozen=True)
class Structure:
    """What structured pruning changed in a backbone's architecture, for ``build`` to re-apply to the
    freshly loaded backbone before cutting it (``Modality.apply_structure``). Only modalities whose
    ``structured_pruning`` is "layers" have one: ``keep_layers``, the fraction of layers kept (the first
    ones; depth pruning, decided before features are cached), and ``heads``, the attention heads width
    pruning removed, per layer index (recorded after training, re-applied when an export is rebuilt)."""

    keep_layers: float = 1.0
    heads: tuple[tuple[int, tuple[int, ...]], ...] = ()

    @classmethod
    def from_params(cls, params: Mapping[str, Any], *, kind: str) -> Structure:
        """Read it from a trial's parameters (``prune__method``, ``prune__target``, ``prune__amount``,
        ``prune__heads``); ``kind`` is the modality's ``structured_pruning``. The one place that decides
        what these parameters mean for a backbone's layers."""
        if kind != "layers":
            return cls()
        keep = 1.0
        if params.get("prune__method") == "structured" and params.get("prune__target", "layers") == "layers":
            keep = 1.0 - float(params["prune__amount"])
        heads = tuple(sorted((int(layer), tuple(sorted(int(h) for h in removed)))
                             for layer, removed in dict(params.get("prune__heads") or {}).items()))
        return cls(keep_layers=keep, heads=heads)

    def layers_kept(self, total: int) -> int:
        """Of ``total`` layers, how many ``keep_layers`` keeps (at least one)."""
        return max(1, int(round(total * self.keep_layers)))


@dataclass(frozen=True)
class InputLimits:
    """What one served input may be: images up to ``max_pixels`` (decompression bombs are refused
    before decoding), texts up to ``max_text_chars`` characters."""

    max_pixels: int = 40_000_000
    max_text_chars: int = 20_000


@dataclass(frozen=True)
class ModelParts:
    """A backbone cut in two: ``trunk`` stays frozen, ``tail`` may be fine-tuned.

    ``trunk(*inputs)`` returns a tuple of tensors; ``tail(*that_tuple)`` returns features of shape
    ``(batch, feature_dim)``. With ``finetune_blocks=0`` the tail is a plain pooling step, so the
    trunk output is the frozen feature vector a linear probe trains on.
    """

    trunk: nn.Module
    tail: nn.Module
    feature_dim: int


class Modality(ABC):
    """How one kind of data becomes inputs for a backbone. Subclass it and register it by entry point."""

    name: ClassVar[str]
    tasks: ClassVar[tuple[str, ...]] = ("classification",)
    description: ClassVar[str] = ""
    # Which registry cards this modality's backbones come from; the audio example plugin feeds
    # spectrograms to "image" backbones. None means the modality's own name.
    backbone_modality: ClassVar[str | None] = None
    # How structured pruning applies: "channels" (the core prunes conv channels after training,
    # then fine-tunes to recover) or "layers", for transformers: with ``params["prune__target"]``
    # "layers" (the default), the backbone keeps its first layers, before features are extracted;
    # with "width" the core removes attention heads and MLP width after training, then recovers.
    # A "layers" modality implements ``drop_layers`` and ``remove_heads``, and its ``build`` calls
    # ``apply_structure`` on the loaded backbone before cutting it.
    structured_pruning: ClassVar[str] = "channels"
    # AdamW learning rates searched for full fine-tuning (``train__mode="full"``), log scale.
    # Conv nets from a probe, batch norm frozen: 1e-3 diverged on the glyph set (chance after one epoch),
    # 1e-4 and 3e-4 reached 0.51 and 0.56 from a 0.49 probe in 4 epochs at 96 px.
    finetune_lr: ClassVar[tuple[float, float]] = (1e-4, 6e-4)
    # Part of the feature cache's key: raise it when ``build`` changes what a trunk outputs, so that
    # features cached by an earlier version are not reused.
    features_version: ClassVar[int] = 0

    @classmethod
    def backbones_from(cls) -> str:
        return cls.backbone_modality or cls.name

    @abstractmethod
    def can_load(self, source: Any) -> bool:
        """True when ``source`` (a path, a URL-like string or an object) looks like this modality's data."""

    @abstractmethod
    def load(self, source: Any, *, options: Mapping[str, Any] | None = None) -> LabelledData:
        """Ingest, validate and clean ``source``; errors name the file or row and the fix."""

    @abstractmethod
    def suggest(self, trial: Any, card: BackboneCard) -> dict[str, Any]:
        """Suggest this modality's parameters on an Optuna ``trial`` (names prefixed ``data__``)."""

    @abstractmethod
    def default_params(self, card: BackboneCard) -> dict[str, Any]:
        """Sensible modality parameters for ``card`` (warm-start probes, ensembles, rebuilding)."""

    @abstractmethod
    def build(
        self,
        card: BackboneCard,
        registry: BackboneRegistry,
        *,
        params: Mapping[str, Any],
        finetune_blocks: int = 0,
        pretrained: bool = True,
    ) -> ModelParts:
        """Load the backbone and cut it so that its last ``finetune_blocks`` blocks are trainable."""

    # -- structured pruning by layers (modalities whose ``structured_pruning`` is "layers") ----
    def drop_layers(self, backbone: nn.Module, *, keep: int) -> nn.Module:
        """``backbone`` (as the registry loaded it) with only its first ``keep`` layers."""
        raise NotImplementedError(f"the {self.name} modality does not drop layers")

    def layer_count(self, backbone: nn.Module) -> int:
        """How many layers ``drop_layers`` chooses from."""
        raise NotImplementedError(f"the {self.name} modality does not drop layers")

    def remove_heads(self, backbone: nn.Module, heads: Mapping[int, Sequence[int]]) -> nn.Module:
        """``backbone`` without the attention heads ``heads`` names (layer index -> original head indices)."""
        raise NotImplementedError(f"the {self.name} modality does not remove attention heads")

    def apply_structure(self, backbone: nn.Module, params: Mapping[str, Any]) -> nn.Module:
        """Re-apply the structured pruning ``params`` record (``Structure.from_params``) to a freshly
        loaded backbone, through the hooks above. ``build`` calls it before cutting; a no-op for
        "channels" modalities, whose pruning the core applies to built models."""
        structure = Structure.from_params(params, kind=self.structured_pruning)
        if structure.keep_layers < 1.0:
            backbone = self.drop_layers(backbone, keep=structure.layers_kept(self.layer_count(backbone)))
        if structure.heads:
            backbone = self.remove_heads(backbone, dict(structure.heads))
        return backbone

    @abstractmethod
    def max_finetune_blocks(self, card: BackboneCard) -> int:
        """How many trailing blocks ``build`` can hand to the tail."""

    @abstractmethod
    def encode(
        self, examples: Sequence[Any], *, preprocessing: Mapping[str, Any]
    ) -> dict[str, np.ndarray]:
        """Turn raw examples into model inputs (name -> array with a leading batch axis)."""

    def encode_compact(
        self, examples: Sequence[Any], *, preprocessing: Mapping[str, Any]
    ) -> dict[str, np.ndarray]:
        """``encode``'s inputs in a more compact form (uint8 pixels, say), for decoding workers to hand to
        a GPU; ``expand`` finishes them there. Optional: by default, ``encode`` itself."""
        return self.encode(examples, preprocessing=preprocessing)

    def expand(self, inputs: Mapping[str, torch.Tensor], *, preprocessing: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """``encode_compact``'s tensors, on whatever device they are, as ``encode``'s. Optional: as they are."""
        return dict(inputs)

    @abstractmethod
    def preprocessing(
        self, card: BackboneCard, registry: BackboneRegistry, *, params: Mapping[str, Any]
    ) -> dict[str, Any]:
        """A JSON-serialisable description of ``encode``'s settings, saved with every export."""

    @abstractmethod
    def input_names(self) -> tuple[str, ...]:
        """Names of the model inputs, in ``forward`` order (also the ONNX input names)."""

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {name: {0: "batch"} for name in self.input_names()}

    def batch_order(self, examples: Sequence[Any]) -> np.ndarray | None:
        """An order of ``examples`` that batches alike ones together (texts by length: ``encode`` pads a
        batch to its longest); None keeps them as given (optional hook). Inference over many examples
        runs in this order; fine-tuning still draws its batches at random, then sorts each run of
        ``LENGTH_GROUP_BATCHES`` batches by it (``training.finetune.length_grouped``)."""
        return None

    def same_inputs(self, examples: Sequence[Any],
                    preprocessing: Mapping[str, Any]) -> list[tuple[dict[str, Any], np.ndarray]]:
        """Other preprocessings, each with a mask of the ``examples`` that it encodes exactly as
        ``preprocessing`` does (a text that fits in two ``max_length`` choices): their frozen features
        are the same, so a search computes only the rest (optional hook; by default none)."""
        return []

    def warm_start_variants(self, card: BackboneCard) -> list[dict[str, Any]]:
        """Modality parameters for the warm-start trials, best accuracy first (optional hook)."""
        return [self.default_params(card)]

    def equivalent_params(self, card: BackboneCard, registry: BackboneRegistry, params: Mapping[str, Any], *,
                          examples: Sequence[Any]) -> dict[str, Any]:
        """``params`` with each data parameter that cannot change anything on ``examples`` set to the
        least value that gives the same inputs (a tokenizer's ``max_length`` beyond the longest text),
        so that configurations building the same model on this data are recognised as one (optional
        hook; by default nothing is equivalent)."""
        return dict(params)

    def can_fine_tune(self, card: BackboneCard) -> bool:
        """False for backbones with nothing to train or prune (fixed feature functions): probes only."""
        return True

    def full_finetune_variant(self, card: BackboneCard) -> dict[str, Any]:
        """Modality parameters of the warm-start full fine-tuning trial (optional hook)."""
        return self.default_params(card)

    def read_inputs(self, items: Sequence[str]) -> list[Any]:
        """Turn what a user passes to ``lepton predict`` into examples ``encode`` accepts."""
        return list(items)

    def decode_input(self, value: bytes | str, *, limits: InputLimits) -> Any:
        """One input sent to ``lepton serve`` (an upload's bytes, or a string from JSON) as an example
        ``encode`` accepts. Raise ``lepton_automl.exceptions.InputError`` naming what is wrong."""
        from lepton_automl.exceptions import InputError

        raise InputError(f"the {self.name} modality does not take served inputs", status=415)

    def save_assets(self, directory: Any, *, preprocessing: Mapping[str, Any]) -> None:
        """Write files ``encode`` needs at predict time (a tokenizer, ...). Optional."""

    def portable(self, preprocessing: Mapping[str, Any]) -> dict[str, Any]:
        """``preprocessing`` as saved in an export: paths relative to the folder (optional hook)."""
        return dict(preprocessing)

    def prepare(self, preprocessing: Mapping[str, Any], directory: Any) -> dict[str, Any]:
        """Adjust saved ``preprocessing`` to an export folder at load time (optional hook)."""
        return dict(preprocessing)


@dataclass(frozen=True)
class TrialResult:
    """What one trial measured: the three objectives and everything reported beside them."""

    accuracy: float
    latency_ms: float
    cost_usd: float
    test_accuracy: float | None = None
    latency_p90_ms: float | None = None
    size_mb: float | None = None  # the runtime file
    size_gz_mb: float | None = None  # the runtime file, gzip-compressed (what --max-size-mb limits)
    params_m: float | None = None
    train_seconds: float | None = None
    artifact: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    # The artifact's logits on the validation split (a probe's out of fold) and on the test split, by
    # split name: what a blend of trials is chosen on (``search/blend.py``). Not a user attribute.
    logits: Mapping[str, Any] | None = None

    # What ``cost.measurement.measure_artifact`` measures that is a field here rather than an extra.
    MEASURED: ClassVar[tuple[str, ...]] = ("latency_ms", "cost_usd", "latency_p90_ms", "size_mb", "size_gz_mb",
                                           "params_m")

    @property
    def values(self) -> tuple[float, float, float]:
        return (self.accuracy, self.latency_ms, self.cost_usd)

    @classmethod
    def from_measured(cls, *, accuracy: float, test_accuracy: float | None, train_seconds: float, artifact: str,
                      extra: Mapping[str, Any], logits: Mapping[str, Any] | None = None) -> TrialResult:
        """The result of a trial whose ``extra`` holds what was measured on its artifact: the fields
        named in ``MEASURED`` are taken out of it."""
        return cls(accuracy=accuracy, test_accuracy=test_accuracy, train_seconds=train_seconds, artifact=artifact,
                   **{k: extra[k] for k in cls.MEASURED},
                   extra={k: v for k, v in extra.items() if k not in cls.MEASURED}, logits=logits)
