"""Cross-fitted accuracy: how well a choice made on the validation split does on examples it did not see.

A choice made by looking at the validation split (which epoch of a fine-tune to keep, which trials to
blend) reads too well on that same split: the best of several noisy scores is biased upwards (the
winner's curse). Cross-fitting removes that bias: the choice is made on one stratified half of the
split and scored on the other, and the other way round, so every example is scored by a choice it took
no part in. Repeating over several random halvings lowers the estimate's variance.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

HALVINGS = 16  # random halvings a cross-fitted estimate is averaged over (epochs here, blends in search/blend.py)


def stratified_halves(labels: np.ndarray, seed: int) -> np.ndarray:
    """A stratified split of the examples in two: 0 or 1 per example, each class shared evenly."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    half = np.zeros(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        rng.shuffle(idx)
        half[idx[int(rng.integers(2))::2]] = 1
    return half


def random_halvings(labels: np.ndarray, *, halvings: int = HALVINGS, seed: int = 0) -> Iterator[np.ndarray]:
    """``halvings`` stratified halvings of the examples (``stratified_halves``), drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    for _ in range(halvings):
        yield stratified_halves(labels, int(rng.integers(2**31)))


def chosen_epoch_accuracy(correct: Sequence[np.ndarray], labels: np.ndarray, *, halvings: int = HALVINGS,
                          seed: int = 0) -> float:
    """The cross-fitted accuracy of "keep the epoch with the best validation accuracy" (the earliest on
    a tie, as ``training.finetune`` keeps it): ``correct[e]`` says which validation examples epoch
    ``e`` got right. The epoch is chosen on one half of the split and scored on the other, both ways,
    averaged over ``halvings`` random stratified halvings (``seed``). With one epoch, or when one epoch
    is best on every half, it equals that epoch's accuracy; it is never above the best epoch's."""
    right = np.asarray(correct, dtype=bool)  # (epochs, examples)
    if right.ndim != 2 or not right.size:
        raise ValueError(f"correct must hold one row of per-example results per epoch; got shape {right.shape}")
    labels = np.asarray(labels)
    if right.shape[1] != len(labels):
        raise ValueError(f"correct has {right.shape[1]} examples per epoch but labels has {len(labels)}")
    if len(right) == 1:
        return float(right[0].mean())
    total = 0.0
    for half in random_halvings(labels, halvings=halvings, seed=seed):
        hits = 0
        for h in (0, 1):
            chosen = int(np.argmax(right[:, half != h].sum(axis=1)))  # argmax: the earliest of the best
            hits += int(right[chosen, half == h].sum())
        total += hits / len(labels)
    return total / halvings
