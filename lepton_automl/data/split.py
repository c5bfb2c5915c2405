"""Stratified, seeded train/validation/test splits. The split owns its own numpy Generator."""

from __future__ import annotations

import numpy as np

from lepton_automl.data.dataset import LabelledData, Splits
from lepton_automl.exceptions import DataError


def stratified_split(
    data: LabelledData,
    *,
    validation: float = 0.2,
    test: float = 0.2,
    seed: int = 0,
) -> Splits:
    """Split ``data`` per class so each subset keeps the class proportions; same seed, same split."""
    if not 0 < validation < 1 or not 0 < test < 1 or validation + test >= 1:
        raise DataError(
            f"Split fractions validation={validation}, test={test} must be in (0, 1) and sum below 1."
        )
    counts = np.bincount(data.labels, minlength=data.num_classes)
    too_small = [data.classes[i] for i, n in enumerate(counts) if n < 3]
    if too_small:
        raise DataError(
            f"Classes {too_small} have fewer than 3 examples, too few for a stratified "
            "train/validation/test split. Add examples or remove those classes."
        )
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {"train": [], "validation": [], "test": []}
    for label in range(data.num_classes):
        idx = np.flatnonzero(data.labels == label)
        rng.shuffle(idx)
        n = len(idx)
        n_test = max(1, int(round(n * test)))
        n_val = max(1, int(round(n * validation)))
        if n - n_test - n_val < 1:
            n_val = n_test = 1
        parts["test"].extend(idx[:n_test])
        parts["validation"].extend(idx[n_test : n_test + n_val])
        parts["train"].extend(idx[n_test + n_val :])
    out = {}
    for key, idx in parts.items():
        idx_arr = np.array(sorted(idx), dtype=np.int64)
        out[key] = data.subset(idx_arr, name=f"{data.name}:{key}")
    return Splits(**out)


def split_data(data: LabelledData, *, validation: float = 0.2, test: float = 0.2, seed: int = 0) -> Splits:
    """Respect the user's splits when ``data`` carries them; otherwise split stratified.

    A missing validation split is carved from train (stratified); a missing test split likewise.
    """
    if not data.split_of:
        return stratified_split(data, validation=validation, test=test, seed=seed)
    tags = np.asarray(data.split_of)
    unknown = sorted(set(tags) - {"train", "validation", "test"})
    if unknown:
        raise DataError(f"Unknown split names {unknown}; use train, validation and test.")
    parts = {name: data.subset(np.flatnonzero(tags == name), name=f"{data.name}:{name}")
             for name in ("train", "validation", "test")}
    if len(parts["train"]) == 0:
        raise DataError(f"{data.name!r} has user splits but no 'train' split. Add one (e.g. a train/ folder).")
    for name, fraction in (("test", test), ("validation", validation)):
        if len(parts[name]) == 0:
            parts["train"], parts[name] = _holdout(parts["train"], fraction, seed=seed, name=name)
    return Splits(**parts)


def _holdout(data: LabelledData, fraction: float, *, seed: int, name: str) -> tuple[LabelledData, LabelledData]:
    """Move ``fraction`` of each class (at least one example of classes with two or more) out of ``data``."""
    rng = np.random.default_rng(seed)
    kept: list[int] = []
    held: list[int] = []
    for label in range(data.num_classes):
        idx = np.flatnonzero(data.labels == label)
        rng.shuffle(idx)
        n = max(1, int(round(len(idx) * fraction))) if len(idx) >= 2 else 0
        held.extend(idx[:n])
        kept.extend(idx[n:])
    base = data.name.rsplit(":", 1)[0]
    return data.subset(sorted(kept), name=data.name), data.subset(sorted(held), name=f"{base}:{name}")
