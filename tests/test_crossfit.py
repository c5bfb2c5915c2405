"""Cross-fitted accuracy of a choice made on the validation split (search/crossfit.py)."""

from __future__ import annotations

import numpy as np
import pytest

from lepton_automl.search.crossfit import chosen_epoch_accuracy, stratified_halves


def _labels(n: int, classes: int = 5) -> np.ndarray:
    return np.arange(n) % classes


def test_halves_share_every_class_evenly_and_depend_on_the_seed() -> None:
    labels = np.repeat(np.arange(4), [10, 11, 7, 30])
    half = stratified_halves(labels, seed=3)
    for label in range(4):
        ones = int(half[labels == label].sum())
        assert abs(2 * ones - int((labels == label).sum())) <= 1
    assert np.array_equal(half, stratified_halves(labels, seed=3))
    assert not np.array_equal(half, stratified_halves(labels, seed=4))


def test_one_epoch_or_one_dominant_epoch_costs_nothing() -> None:
    rng = np.random.default_rng(0)
    labels = _labels(400)
    only = rng.random(400) < 0.7
    assert chosen_epoch_accuracy([only], labels) == pytest.approx(only.mean())
    # The last epoch gets right everything the first did and more: it is chosen on every half.
    better = only | (rng.random(400) < 0.5)
    assert chosen_epoch_accuracy([only, better], labels) == pytest.approx(better.mean())


def test_the_best_of_equally_good_epochs_is_scored_at_their_level_not_at_their_maximum() -> None:
    """Twenty epochs of the same true accuracy (0.7) on 1,000 examples: the best reads about two
    standard errors above the rest on the split it was chosen on; cross-fitted, that luck is gone."""
    rng = np.random.default_rng(1)
    labels = _labels(1000)
    epochs = rng.random((20, 1000)) < 0.7
    scores = epochs.mean(axis=1)
    honest = chosen_epoch_accuracy(list(epochs), labels, seed=0)
    assert scores.max() - honest > 0.015
    assert abs(honest - scores.mean()) < 0.01


def test_a_real_improvement_survives_cross_fitting() -> None:
    rng = np.random.default_rng(2)
    labels = _labels(600)
    first, second = rng.random(600) < 0.6, rng.random(600) < 0.8  # 20 points apart: never confused
    assert chosen_epoch_accuracy([first, second], labels) == pytest.approx(second.mean())


def test_never_above_the_best_epoch_on_the_whole_split() -> None:
    rng = np.random.default_rng(3)
    for _ in range(50):
        n = int(rng.integers(20, 200))
        labels = rng.integers(0, 4, n)
        epochs = rng.random((int(rng.integers(2, 6)), n)) < rng.uniform(0.3, 0.9)
        assert chosen_epoch_accuracy(list(epochs), labels, seed=int(rng.integers(100))) <= epochs.mean(axis=1).max() + 1e-12


def test_mismatched_inputs_are_refused_with_their_shapes() -> None:
    with pytest.raises(ValueError, match="5 examples per epoch but labels has 4"):
        chosen_epoch_accuracy([np.ones(5, bool), np.ones(5, bool)], _labels(4))
    with pytest.raises(ValueError, match="one row of per-example results per epoch"):
        chosen_epoch_accuracy([], _labels(4))
