"""``TextModality``: CSV/TSV/JSONL/Parquet or ``datasets`` text, tokenised per backbone card.

Sentence features are the attention-masked mean of the last hidden states, as sentence-transformers
computes them for all-MiniLM-L6-v2 (its ``1_Pooling/config.json`` sets ``pooling_mode_mean_tokens``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lepton_automl.backbones import BackboneCard, BackboneRegistry
from lepton_automl.data.dataset import LabelledData
from lepton_text.tables import is_table, read_table, text_data_from_dataset
from lepton_automl.exceptions import DataError, InputError
from lepton_automl.interfaces import InputLimits, Modality, ModelParts
from lepton_automl.log import get_logger

logger = get_logger(__name__)

MAX_LENGTHS = (32, 64, 128, 256)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


# Layers whose mean-pooled outputs make the frozen features, counted from the last one.
POOLED_LAYERS = 3


class _Trunk(nn.Module):
    """Embeddings and the first layers; returns (hidden, mask) or, uncut, the pooled features: the
    mean-pooled outputs of the last ``POOLED_LAYERS`` layers, concatenated. Lower layers keep more of the
    wording, which a probe on the last layer alone loses: MiniLM at 128 tokens on the man-page set,
    cross-validated probe 0.716 (last layer) -> 0.750 (last three), test 0.699 -> 0.741."""

    def __init__(self, model: nn.Module, n_layers: int, *, pooled: bool) -> None:
        super().__init__()
        self.embeddings = model.embeddings
        self.layers = nn.ModuleList(list(model.encoder.layer)[:n_layers])
        self.pooled = pooled

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hidden = self.embeddings(input_ids=input_ids)
        ext = _extended_mask(attention_mask, hidden.dtype)
        outputs = []
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=ext)[0]
            outputs.append(hidden)
        if self.pooled:
            last = outputs[-POOLED_LAYERS:] or [hidden]
            return (torch.cat([mean_pool(h, attention_mask) for h in last], dim=1),)
        return (hidden, attention_mask)


class _Tail(nn.Module):
    def __init__(self, model: nn.Module, first: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(list(model.encoder.layer)[first:])

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        ext = _extended_mask(attention_mask, hidden.dtype)
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=ext)[0]
        return mean_pool(hidden, attention_mask)


def _extended_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # BERT's additive mask: 0 where attended, a large negative where padded; shape (B, 1, 1, L).
    ext = mask[:, None, None, :].to(dtype)
    return (1.0 - ext) * torch.finfo(dtype).min


def _is_datasets_object(source: Any) -> bool:
    return type(source).__module__.startswith("datasets")


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file())


def _load_hub_dataset(name: str) -> Any:
    """The real ``load_dataset`` path; offline, one line naming the switch and the local options."""
    import os

    import datasets

    try:
        return datasets.load_dataset(name)
    except Exception as exc:
        offline = os.environ.get("HF_DATASETS_OFFLINE", "") in ("1", "true", "TRUE", "yes")
        raise DataError(
            f"Cannot load dataset {name!r} from the hub ({'HF_DATASETS_OFFLINE=1 is set' if offline else 'no network'}"
            f": {type(exc).__name__}). Use a local file (CSV/TSV/JSONL/Parquet), a folder written by "
            "save_to_disk, or a datasets object; or unset HF_DATASETS_OFFLINE where the hub is reachable."
        ) from exc


class TextModality(Modality):
    name = "text"
    tasks = ("classification",)
    description = "Text tables (CSV/TSV/JSONL/Parquet, datasets) with transformers encoders"
    structured_pruning = "layers"  # transformer: drop whole layers (keep the first), or heads + MLP width
    finetune_lr = (2e-5, 1.5e-4)  # the usual BERT fine-tuning range (Devlin et al., 2019, appendix A.3)
    features_version = 1  # 1: mean-pooled outputs of the last POOLED_LAYERS layers

    def __init__(self) -> None:
        self._tokenizers: dict[tuple[str, bool], Any] = {}
        self._token_counts: dict[tuple[str, bool, str], np.ndarray] = {}

    # -- ingest ----------------------------------------------------------------------------
    def can_load(self, source: Any) -> bool:
        if _is_datasets_object(source) or is_table(source):
            return True
        if isinstance(source, str) and source.startswith("hf-hub:"):
            return True
        return isinstance(source, (str, Path)) and _is_saved_dataset(Path(source))

    def load(self, source: Any, *, options: Mapping[str, Any] | None = None) -> LabelledData:
        """Read a table file, a ``datasets`` object, a ``save_to_disk`` folder or ``hf-hub:NAME``."""
        from lepton_automl.data.findings import Findings

        options = dict(options or {})
        name = getattr(source, "info", None) and getattr(source.info, "dataset_name", None) or "dataset"
        findings = Findings(str(source) if isinstance(source, (str, Path)) else name,
                            strict=bool(options.get("strict")))
        if _is_datasets_object(source):
            ds = source
        elif isinstance(source, str) and source.startswith("hf-hub:"):
            ds, name = _load_hub_dataset(source.partition(":")[2]), source.partition(":")[2].replace("/", "_")
        elif isinstance(source, (str, Path)) and _is_saved_dataset(Path(source)):
            import datasets

            ds, name = datasets.load_from_disk(str(source)), Path(source).name
        elif is_table(source):
            ds, name = read_table(source, findings), Path(source).stem
        else:
            raise DataError(
                f"Cannot read text data from {source!r}. Give a .csv, .tsv, .jsonl or .parquet file, a "
                "datasets.Dataset or DatasetDict, a folder written by save_to_disk, or hf-hub:NAME."
            )
        return text_data_from_dataset(ds, text_column=options.get("text_column"),
                                      label_column=options.get("label_column"), name=name, findings=findings)

    # -- search space ----------------------------------------------------------------------
    def suggest(self, trial: Any, card: BackboneCard) -> dict[str, Any]:
        return {"data__max_length": trial.suggest_categorical("data__max_length", list(MAX_LENGTHS))}

    def default_params(self, card: BackboneCard) -> dict[str, Any]:
        return {"data__max_length": 128}

    def equivalent_params(self, card: BackboneCard, registry: BackboneRegistry, params: Mapping[str, Any], *,
                          examples: Sequence[Any]) -> dict[str, Any]:
        """A ``max_length`` beyond the longest text of ``examples`` (in tokens) truncates nothing, and
        batches are padded to their longest text: every length from the shortest choice that holds
        them all up gives the same inputs, features and model. On Debian package descriptions (26
        tokens at most) 32, 64, 128 and 256 are one configuration, not four feature extractions."""
        out = dict(params)
        if "data__max_length" not in out:
            return out
        holding = [n for n in MAX_LENGTHS if n >= self._longest(self.preprocessing(card, registry, params=out),
                                                                [str(e) for e in examples])]
        if holding and int(out["data__max_length"]) > holding[0]:
            out["data__max_length"] = holding[0]
        return out

    def full_finetune_variant(self, card: BackboneCard) -> dict[str, Any]:
        # A training step costs about 3x more at 128 tokens than at 64 on 2 CPU cores (MiniLM, batch 32:
        # 2.1 s against 0.65 s); 64 covers most short texts.
        return {"data__max_length": 64}

    def warm_start_variants(self, card: BackboneCard) -> list[dict[str, Any]]:
        return [{"data__max_length": 128}, {"data__max_length": 64}]

    # -- model -----------------------------------------------------------------------------
    def max_finetune_blocks(self, card: BackboneCard) -> int:
        return 2 if self.can_fine_tune(card) else 0

    def can_fine_tune(self, card: BackboneCard) -> bool:
        return card.scheme != "lexical"  # fixed n-gram features: nothing to train, prune or cut

    def build(
        self,
        card: BackboneCard,
        registry: BackboneRegistry,
        *,
        params: Mapping[str, Any],
        finetune_blocks: int = 0,
        pretrained: bool = True,
    ) -> ModelParts:
        model = registry.load(card, pretrained=pretrained)
        model.eval()
        if not self.can_fine_tune(card):
            return ModelParts(trunk=model, tail=nn.Identity(), feature_dim=int(model.buckets))
        model = self.apply_structure(model, params)
        n = len(model.encoder.layer)
        k = max(0, min(finetune_blocks, n))
        dim = int(model.config.hidden_size)
        if k == 0:
            return ModelParts(trunk=_Trunk(model, n, pooled=True), tail=nn.Identity(),
                              feature_dim=dim * max(1, min(POOLED_LAYERS, n)))
        return ModelParts(trunk=_Trunk(model, n - k, pooled=False), tail=_Tail(model, n - k), feature_dim=dim)

    # Structured pruning by layers (``Modality.apply_structure`` calls these). Keeping the first layers:
    # the embeddings and lower layers carry most of what a linear probe uses, and it gives a single
    # backbone a range of latencies.
    def layer_count(self, backbone: nn.Module) -> int:
        return len(backbone.encoder.layer)

    def drop_layers(self, backbone: nn.Module, *, keep: int) -> nn.Module:
        backbone.encoder.layer = backbone.encoder.layer[:keep]
        return backbone

    def remove_heads(self, backbone: nn.Module, heads: Mapping[int, Sequence[int]]) -> nn.Module:
        for index, removed in heads.items():  # attention heads removed by width pruning
            backbone.encoder.layer[int(index)].attention.prune_heads([int(h) for h in removed])
        return backbone

    # -- preprocessing ---------------------------------------------------------------------
    def preprocessing(
        self, card: BackboneCard, registry: BackboneRegistry, *, params: Mapping[str, Any]
    ) -> dict[str, Any]:
        from lepton_registry import transformers_path

        length = int(params.get("data__max_length") or self.default_params(card)["data__max_length"])
        if card.max_length:
            length = min(length, card.max_length)
        prep: dict[str, Any] = {"max_length": length, "tokenizer": transformers_path(card)}
        if card.trust_remote_code:  # its tokenizer's code ships with it too; the registry checked the user allows it
            prep["trust_remote_code"] = True
        return prep

    def _longest(self, preprocessing: Mapping[str, Any], texts: list[str]) -> int:
        """The most tokens any of ``texts`` takes, untruncated."""
        counts = self._tokens(preprocessing, texts)
        return int(counts.max()) if len(counts) else 0

    def _tokens(self, preprocessing: Mapping[str, Any], texts: list[str]) -> np.ndarray:
        """How many tokens each of ``texts`` takes, untruncated (special tokens included, as ``max_length``
        counts them); counted once per tokenizer and data (a search asks for every length and backbone,
        and tokenizing 100k texts takes seconds)."""
        digest = hashlib.sha1("\0".join(texts).encode("utf-8", "surrogatepass")).hexdigest()
        key = (str(preprocessing["tokenizer"]), bool(preprocessing.get("trust_remote_code", False)), digest)
        if key not in self._token_counts:
            encoded = self._tokenizer(preprocessing)(texts, verbose=False)
            self._token_counts[key] = np.fromiter((len(ids) for ids in encoded["input_ids"]), dtype=np.int64,
                                                  count=len(texts))
        return self._token_counts[key]

    def same_inputs(self, examples: Sequence[Any],
                    preprocessing: Mapping[str, Any]) -> list[tuple[dict[str, Any], np.ndarray]]:
        """Every other ``max_length`` the search draws, with the texts it encodes as ``preprocessing``
        does: those that fit in both lengths, which neither truncates (a batch is padded to its longest
        text, and attention masks the padding). Man-page summaries run to 256 tokens, but their median
        is 9: most of a new length's features are an earlier length's."""
        counts = self._tokens(preprocessing, [str(e) for e in examples])
        length = int(preprocessing["max_length"])
        return [({**preprocessing, "max_length": other}, counts <= min(length, other))
                for other in MAX_LENGTHS if other != length]

    def _tokenizer(self, preprocessing: Mapping[str, Any]) -> Any:
        where, trust = str(preprocessing["tokenizer"]), bool(preprocessing.get("trust_remote_code", False))
        if (where, trust) not in self._tokenizers:
            from transformers import AutoTokenizer

            from lepton_registry import hub_offline

            self._tokenizers[where, trust] = AutoTokenizer.from_pretrained(
                where, local_files_only=hub_offline(), trust_remote_code=trust)
        return self._tokenizers[where, trust]

    def batch_order(self, examples: Sequence[Any]) -> np.ndarray:
        """Shortest texts first (characters stand in for tokens): each batch is padded to its longest
        text, and man-page summaries (median 9 tokens, up to 256) ran through MiniLM 3.5x faster
        sorted than as given, with the same features."""
        return np.argsort(np.fromiter((len(str(e)) for e in examples), dtype=np.int64, count=len(examples)),
                          kind="stable")

    def encode(
        self, examples: Sequence[Any], *, preprocessing: Mapping[str, Any]
    ) -> dict[str, np.ndarray]:
        tok = self._tokenizer(preprocessing)
        # Pad to the longest text of the batch, not to max_length: Debian package descriptions are
        # about 10 tokens, and padding them to 128 made MiniLM feature extraction ~10x slower.
        enc = tok(
            [str(e) for e in examples],
            padding="longest",
            truncation=True,
            max_length=int(preprocessing["max_length"]),
            return_tensors="np",
        )
        return {
            "input_ids": enc["input_ids"].astype(np.int64),
            "attention_mask": enc["attention_mask"].astype(np.int64),
        }

    def input_names(self) -> tuple[str, ...]:
        return ("input_ids", "attention_mask")

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {name: {0: "batch", 1: "sequence"} for name in self.input_names()}

    def read_inputs(self, items: Sequence[str]) -> list[Any]:
        """Texts as given; a table file (.csv/.tsv/.jsonl/.parquet) stands for its text column
        (``text``, or the only string column)."""
        out: list[Any] = []
        for item in items:
            if is_table(item) and Path(item).is_file():
                table = read_table(item)
                strings = [c for c in table.column_names
                           if str(table.features[c]).startswith("Value('string')") or
                           getattr(table.features[c], "dtype", "") == "string"]
                column = "text" if "text" in table.column_names else (strings[0] if len(strings) == 1 else None)
                if column is None:
                    raise DataError(f"{item!r} has no 'text' column and {len(strings)} string columns "
                                    f"({strings}); rename the column to predict on to 'text'.")
                out.extend("" if v is None else str(v) for v in table[column])
            else:
                out.append(item)
        return out

    def decode_input(self, value: bytes | str, *, limits: InputLimits) -> str:
        """A JSON string, or an uploaded UTF-8 text file."""
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(f"an uploaded text must be UTF-8 ({exc})") from None
        if not isinstance(value, str):
            raise InputError(f"a text input must be a string, not {type(value).__name__}")
        if len(value) > limits.max_text_chars:
            raise InputError(f"a text of {len(value):,} characters is over the limit of {limits.max_text_chars:,}",
                             status=413)
        if not value.strip():
            raise InputError("a text input is empty")
        return value

    def save_assets(self, directory: Any, *, preprocessing: Mapping[str, Any]) -> None:
        self._tokenizer(preprocessing).save_pretrained(Path(directory) / "tokenizer")

    def portable(self, preprocessing: Mapping[str, Any]) -> dict[str, Any]:
        return {**preprocessing, "tokenizer": "tokenizer"}  # saved beside the model by save_assets

    def prepare(self, preprocessing: Mapping[str, Any], directory: Any) -> dict[str, Any]:
        out = dict(preprocessing)
        out["tokenizer"] = str(Path(directory) / "tokenizer")
        return out
