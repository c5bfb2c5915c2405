"""``lexical:`` backbones: features computed from token ids by a fixed function, no learned weights.

``hashed-ngrams`` counts the unigrams and bigrams of a text's token ids into ``buckets`` hashed slots,
takes log(1 + count) and L2-normalises: the lexical signal of TF-IDF with sublinear tf (Salton &
Buckley, 1988), in a module that exports to ONNX beside a transformer. The idf factor is data's, so the
probe's standardisation applies it (``training.trainer.feature_scale`` weights a sparse block's columns
by their inverse document frequency in the training data, inside the exported head). Its errors differ from
a sentence encoder's: on the held-out descriptions, TF-IDF alone scored 0.805 and concatenated with
MiniLM 0.843, where MiniLM alone scored 0.81-0.83. The card names a tokenizer (its ``weights``), so it
shares a transformer's inputs and joins it in one concatenated-features ensemble.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lepton_automl.backbones import BackboneCard
from lepton_automl.exceptions import ConfigError

_PRIME = 1_000_003  # spreads consecutive ids over the slots; products stay far below 2**63


class HashedNgrams(nn.Module):
    """(input_ids, attention_mask) -> (features,) of shape (batch, buckets)."""

    def __init__(self, buckets: int = 8192) -> None:
        super().__init__()
        self.buckets = int(buckets)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor]:
        mask = attention_mask.to(torch.float32)
        unigram = (input_ids * _PRIME) % self.buckets
        bigram = ((input_ids[:, :-1] * 40_009 + input_ids[:, 1:]) * _PRIME) % self.buckets
        counts = torch.zeros(input_ids.shape[0], self.buckets, dtype=torch.float32, device=input_ids.device)
        counts = counts.scatter_add(1, unigram, mask)
        counts = counts.scatter_add(1, bigram, mask[:, :-1] * mask[:, 1:])
        tf = torch.log1p(counts)
        return (tf / tf.norm(dim=1, keepdim=True).clamp(min=1e-6),)


KINDS = {"hashed-ngrams": HashedNgrams}


class LexicalSource:
    """Builds ``lexical:KIND`` modules; they have no weights, so they are always available."""

    def available(self, card: BackboneCard) -> bool:
        return card.target in KINDS

    def load(self, card: BackboneCard, *, pretrained: bool = True) -> Any:
        if card.target not in KINDS:
            raise ConfigError(f"Unknown lexical backbone {card.ref!r}. Known: "
                              f"{', '.join('lexical:' + k for k in KINDS)}.")
        return KINDS[card.target](**card.build_kwargs)
