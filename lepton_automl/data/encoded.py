"""Examples decoded once per preprocessing and kept in their compact form, for the passes that read the
same examples again.

A search runs its validation and test examples through many files: the int8 trunk of every probe, the
exported file of every trained network. Each pass decoded every image again: for 640 glyphs at 224 px,
0.45 s of decoding in a 2-s pass. ``EncodedExamples`` keeps ``Modality.encode_compact``'s rows (uint8
pixels, a quarter of the float bytes) of the examples it is told to keep, by preprocessing, up to a
byte budget (the preprocessing used least recently is dropped first), and ``expand``s each batch back
into ``encode``'s form. It only serves a modality whose compact form differs from ``encode``'s and whose
rows stand alone: a text batch is padded to its longest row, so texts are encoded as before.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from lepton_automl.interfaces import Modality

Encoder = Callable[[Sequence[Any]], dict[str, np.ndarray]]

DEFAULT_MAX_BYTES = 256 * 2**20  # all sizes' validation + test of the 1,600-glyph set: about 265 MB


class EncodedExamples:
    """``encoder(preprocessing)``: an ``encode`` for batches of examples, the ones in ``keep`` decoded once."""

    def __init__(self, modality: Modality, keep: Iterable[Any], *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.modality = modality
        self.max_bytes = int(max_bytes)
        self._stores: OrderedDict[str, dict[Any, dict[str, np.ndarray]]] = OrderedDict()
        self._sizes: dict[str, int] = {}
        compact = type(modality).encode_compact is not Modality.encode_compact
        self._keep = frozenset(_hashable(keep)) if compact else frozenset()

    @property
    def nbytes(self) -> int:
        return sum(self._sizes.values())

    def encoder(self, preprocessing: Mapping[str, Any]) -> Encoder:
        """``modality.encode`` at ``preprocessing``, the same arrays, from kept rows where it can."""
        if not self._keep:
            return lambda examples: self.modality.encode(examples, preprocessing=preprocessing)
        key = json.dumps(preprocessing, sort_keys=True, default=str)
        return lambda examples: self._encode(examples, preprocessing, key)

    def _encode(self, examples: Sequence[Any], preprocessing: Mapping[str, Any], key: str) -> dict[str, np.ndarray]:
        if key in self._stores:
            self._stores.move_to_end(key)
        store = self._stores.get(key, {})
        ids = [_id(e) for e in examples]
        missing = [p for p, i in enumerate(ids) if i is None or i not in store]
        fresh: dict[int, dict[str, np.ndarray]] = {}
        if missing:
            decoded = self.modality.encode_compact([examples[p] for p in missing], preprocessing=preprocessing)
            for row, p in enumerate(missing):
                fresh[p] = {name: np.array(v[row]) for name, v in decoded.items()}
            self._remember(key, store, [(ids[p], fresh[p]) for p in missing if ids[p] in self._keep])
        rows = [fresh[p] if p in fresh else store[i] for p, i in enumerate(ids)]
        stacked = {name: torch.from_numpy(np.stack([r[name] for r in rows])) for name in rows[0]}
        return {name: t.numpy() for name, t in self.modality.expand(stacked, preprocessing=preprocessing).items()}

    def _remember(self, key: str, store: dict[Any, dict[str, np.ndarray]],
                  rows: list[tuple[Any, dict[str, np.ndarray]]]) -> None:
        for i, row in rows:
            if i in store:  # a repeat within the batch
                continue
            size = sum(v.nbytes for v in row.values())
            while self.nbytes + size > self.max_bytes and any(k != key for k in self._stores):
                dropped = next(k for k in self._stores if k != key)
                del self._stores[dropped]
                self._sizes.pop(dropped, None)
            if self.nbytes + size > self.max_bytes:
                return
            store[i] = row
            self._sizes[key] = self._sizes.get(key, 0) + size
            if key not in self._stores:
                self._stores[key] = store


def _id(example: Any) -> Any:
    """The example's own value where it can key a dict (a file path, a string); None otherwise."""
    try:
        hash(example)
    except TypeError:
        return None
    return example


def _hashable(examples: Iterable[Any]) -> Iterable[Any]:
    return (e for e in examples if _id(e) is not None)
