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
