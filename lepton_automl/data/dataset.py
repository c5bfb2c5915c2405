"""The labelled-data container every modality produces and every trainer consumes."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def _example_digest(example: Any) -> bytes:
    if isinstance(example, np.ndarray):
        return example.tobytes()
    if isinstance(example, (str, os.PathLike)) and os.path.isfile(example):
        st = os.stat(example)
        # Path + size + mtime: cheap, and changes whenever the file is rewritten.
        return f"{os.fspath(example)}|{st.st_size}|{st.st_mtime_ns}".encode()
    return repr(example).encode()


@dataclass(frozen=True)
class LabelledData:
    """Examples (paths, strings or arrays), integer labels, and the class names they index.

    Frozen and treated as read-only: components derive new objects with ``subset``.
    """

    examples: tuple[Any, ...]
    labels: np.ndarray
    classes: tuple[str, ...]
    name: str = "data"
    report: tuple[str, ...] = field(default=(), compare=False)
    # Per-example split names ("train", "validation", "test") when the user supplied the splits.
    split_of: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        labels = np.asarray(self.labels, dtype=np.int64)
        labels.setflags(write=False)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "examples", tuple(self.examples))
        if len(self.examples) != len(labels):
            raise ValueError(f"{len(self.examples)} examples but {len(labels)} labels")
        object.__setattr__(self, "split_of", tuple(self.split_of))
        if self.split_of and len(self.split_of) != len(labels):
            raise ValueError(f"{len(self.split_of)} split tags for {len(labels)} examples")

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, indices: Sequence[int] | np.ndarray, *, name: str | None = None) -> LabelledData:
        idx = np.asarray(indices, dtype=np.int64)
        return LabelledData(
            examples=tuple(self.examples[i] for i in idx),
            labels=self.labels[idx],
            classes=self.classes,
            name=name or self.name,
            report=self.report,
            split_of=tuple(self.split_of[i] for i in idx) if self.split_of else (),
        )

    def fingerprint(self) -> str:
        """A digest of examples, labels and classes: the feature cache's data key."""
        h = hashlib.sha256()
        h.update("\x1f".join(self.classes).encode())
        h.update(self.labels.tobytes())
        for example in self.examples:
            h.update(_example_digest(example))
        return h.hexdigest()[:20]

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=self.num_classes)
        return {c: int(n) for c, n in zip(self.classes, counts)}


@dataclass(frozen=True)
class Splits:
    """Train, validation and test subsets of one dataset."""

    train: LabelledData
    validation: LabelledData
    test: LabelledData

    @property
    def classes(self) -> tuple[str, ...]:
        return self.train.classes

    def fingerprint(self) -> str:
        return hashlib.sha256(
            "|".join(s.fingerprint() for s in (self.train, self.validation, self.test)).encode()
        ).hexdigest()[:20]
