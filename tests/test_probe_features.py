"""What a probe is fit on: pooled mid-level features of image and text trunks, scaled block by block."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lepton_automl.backbones import BackboneCard, BackboneRegistry
from lepton_automl.cost.hardware import CostModel, load_profiles
from lepton_automl.data.split import split_data
from lepton_automl.interfaces import TupleOut
from lepton_automl.search.config import TrialConfig
from lepton_automl.search.objective import TrialRunner
from lepton_automl.search.space import SearchSpace
from lepton_automl.training.cache import FeatureCache
from lepton_automl.training.trainer import SPARSE_BLOCK_WEIGHT, feature_scale, select_probe, sparse_blocks
from lepton_image import ImageModality
from lepton_text import TextModality


def _bags(n: int, *, seed: int, vocabulary: int = 2000, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Sparse log-count rows (L2-normalised, like hashed n-grams): each class draws its words mostly
    from its own rare slice of the vocabulary, plus common words every class uses."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n)
    x = np.zeros((n, vocabulary), dtype=np.float32)
    own = 40  # each class's own words, at the low-count end of the vocabulary
    for i, label in enumerate(labels):
        common = rng.integers(0, 50, size=8)
        rare = label * own + 50 + rng.integers(0, own, size=3)
        np.add.at(x[i], np.concatenate([common, rare]), 1.0)
    x = np.log1p(x)
    return x / np.linalg.norm(x, axis=1, keepdims=True), labels


def test_a_sparse_block_gets_idf_weights_and_one_scale_and_a_dense_block_one_per_feature() -> None:
    rng = np.random.default_rng(0)
    dense = rng.normal(0, 1, size=(500, 40)).astype(np.float32) * rng.uniform(0.1, 50, size=40).astype(np.float32)
    sparse, _ = _bags(500, seed=1)
    x = np.concatenate([dense, sparse], axis=1)
    mean, scale = feature_scale(x, [40, sparse.shape[1]])
    z = (x - mean) / scale
    # each dense feature standardised, its scale floored at the block's median (dead features stay small)
    spread = dense.std(0)
    np.testing.assert_allclose(z[:, :40].std(0)[spread >= np.median(spread)], 1.0, rtol=1e-3)
    assert (z[:, :40].std(0) <= 1.0 + 1e-3).all()
    # the sparse block: each word weighted by its inverse document frequency, then one scale for all
    idf = np.log((1.0 + len(sparse)) / (1.0 + (sparse != 0).sum(0))) + 1.0
    np.testing.assert_allclose(scale[40:] * idf, scale[40] * idf[0], rtol=1e-4)
    assert (mean[40:] == 0).all()  # counts are not centred (the bias absorbs it): the block stays sparse
    # rare words weigh more, by their idf (at most ln(1 + n) + 1), never by 1 / their tiny spread
    assert 1.0 < scale[40:].max() / scale[40:].min() <= np.log(1.0 + len(sparse)) + 1.0
    weight = float(((z[:, 40:]) ** 2).sum(1).mean())
    assert weight == pytest.approx(min(SPARSE_BLOCK_WEIGHT, sparse.shape[1]), rel=1e-3)
    # sparsity is found from the data: the block alone, without widths, is weighted the same way
    alone = feature_scale(sparse)[1]
    np.testing.assert_allclose(alone * idf, alone[0] * idf[0], rtol=1e-4)
    with pytest.raises(ValueError, match="cover 40 columns"):
        feature_scale(x, [40])


def test_pooled_relu_features_with_most_values_zero_are_dense_not_counts() -> None:
    # a pooled ReLU layer of an image trunk at a small input size: 62% exact zeros (lite0 at 64 px on
    # the glyph set: 55%), every column a feature of its own, not a word
    rng = np.random.default_rng(0)
    relu = np.maximum(rng.normal(-0.3, 1.0, size=(500, 64)), 0).astype(np.float32) * rng.uniform(0.1, 50, size=64).astype(np.float32)
    assert 0.55 < float((relu == 0).mean()) < 0.7
    words, _ = _bags(500, seed=1)
    assert sparse_blocks(np.concatenate([relu, words], axis=1), [64, words.shape[1]]) == [False, True]
    mean, scale = feature_scale(relu)
    z = (relu - mean) / scale
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-4)  # centred, as dense features are
    spread = relu.std(0)
    np.testing.assert_allclose(z.std(0)[spread >= np.median(spread)], 1.0, rtol=1e-3)  # each on its own scale


@pytest.mark.parametrize("layout", ["dense, sparse", "sparse, dense, sparse"])
def test_a_probe_on_sparse_counts_beside_noisy_dense_features_generalises(layout) -> None:
    """Dense and sparse blocks in any order (an ensemble's members side by side): the sparse columns,
    in runs, make one sparse part and the dense ones one dense part, mapped back to their columns."""
    def data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        words, labels = _bags(n, seed=seed)
        noise = np.random.default_rng(seed + 100).normal(0, 30, size=(n, 64)).astype(np.float32)
        if layout == "dense, sparse":
            return np.concatenate([noise, words], axis=1), labels
        return np.concatenate([words[:, :100], noise, words[:, 100:]], axis=1), labels

    x, y = data(300, 0)
    blocks = [64, x.shape[1] - 64] if layout == "dense, sparse" else [100, 64, x.shape[1] - 164]
    assert sparse_blocks(x, blocks) == ([False, True] if layout == "dense, sparse" else [True, False, True])
    fit = select_probe(x, y, 3, seed=0, blocks=blocks)
    x_test, y_test = data(3000, 1)
    with torch.no_grad():
        accuracy = float((fit.head(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
    # three rare class words among eight common ones per row; chance is 0.33
    assert accuracy >= 0.85
    assert abs(accuracy - fit.cv_accuracy) < 0.08
    # The dense and sparse parts are fit apart and put back in column order: the fold heads, read in
    # the features' order through the head's scaling, score every example as the cross-validation did.
    assert fit.out_of_fold_accuracy(x, y, np.arange(len(y))) == pytest.approx(fit.cv_accuracy, abs=1e-9)
    # the head fit on everything is that same model at the chosen strength, on all the rows
    with torch.no_grad():
        assert float((fit.head(torch.from_numpy(x)).argmax(1).numpy() == y).mean()) >= fit.cv_accuracy


def test_the_image_trunk_pools_its_last_stages_beside_the_head() -> None:
    modality, registry = ImageModality(), BackboneRegistry()
    card = registry.get("efficientnet_lite0")
    parts = modality.build(card, registry, params={"data__image_size": 64}, finetune_blocks=0, pretrained=False)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        (features,) = parts.trunk(x)
        (head_only,) = TupleOut(parts.trunk.module)(x)
    stage_widths = [stage[-1].conv_pwl.out_channels for stage in parts.trunk.module.blocks[-4:]]
    assert features.shape == (2, parts.feature_dim) == (2, sum(stage_widths) + head_only.shape[1])
    torch.testing.assert_close(features[:, -head_only.shape[1]:], head_only)  # the pooled head is unchanged
    # partial fine-tuning cuts the same model: its head still sees the pooled head alone
    cut = modality.build(card, registry, params={"data__image_size": 64}, finetune_blocks=1, pretrained=False)
    assert cut.feature_dim == head_only.shape[1]


def test_the_text_trunk_pools_its_last_layers(text_csv, tiny_bert_dir) -> None:
    modality, registry = TextModality(), BackboneRegistry()
    card = BackboneCard(name="tiny", ref=f"local-dir:{tiny_bert_dir}", modality="text", weights="local")
    registry.register(card)
    params = {"data__max_length": 16}
    prep = modality.preprocessing(card, registry, params=params)
    feeds = modality.encode(["alpha beta gamma", "delta"], preprocessing=prep)
    inputs = [torch.from_numpy(feeds[n]) for n in modality.input_names()]
    whole = modality.build(card, registry, params=params, finetune_blocks=0)
    cut = modality.build(card, registry, params=params, finetune_blocks=1)  # trunk: 1 layer, tail: the last
    with torch.no_grad():
        (features,) = whole.trunk(*inputs)
        last = cut.tail(*cut.trunk(*inputs))
    assert whole.feature_dim == 2 * 32 == features.shape[1]  # both layers of the 2-layer model
    assert cut.feature_dim == 32
    torch.testing.assert_close(features[:, 32:], last)  # the last layer's mean pool, as the tail computes it
    dropped = modality.build(card, registry, params={**params, "prune__method": "structured",
                                                     "prune__amount": 0.5}, finetune_blocks=0)
    assert dropped.feature_dim == 32  # one layer kept, one pooled


def test_a_new_features_version_misses_the_feature_cache(image_folder, tmp_path) -> None:
    modality, registry = ImageModality(), BackboneRegistry()
    profiles = load_profiles()
    runner = TrialRunner(modality=modality, registry=registry, splits=split_data(modality.load(image_folder), seed=0),
                         space=SearchSpace(backbones=("efficientnet_lite0",)), cache=FeatureCache(tmp_path / "cache"),
                         cost=CostModel(train=profiles["local-cpu"], serve=profiles["local-cpu"]), run_dir=tmp_path)
    card = registry.get("efficientnet_lite0")
    config = TrialConfig.from_params({"backbone": card.name, "data__image_size": 64, "train__mode": "probe",
                                      "prune__method": "none", "quant__mode": "none"})
    prep = runner.modality.preprocessing(card, runner.registry, params={"data__image_size": 64})
    before = runner.feature_key(card, prep, config)
    runner.modality.features_version += 1  # an instance attribute: the class is left alone
    try:
        assert runner.feature_key(card, prep, config) != before
    finally:
        del runner.modality.features_version
    assert runner.feature_key(card, prep, config) == before


def test_structure_reads_layer_dropping_and_heads_only_for_layer_modalities() -> None:
    from lepton_automl.interfaces import Structure

    params = {"prune__method": "structured", "prune__amount": 0.5, "prune__heads": {"1": [3, 0]}}
    assert Structure.from_params(params, kind="channels") == Structure()  # channels are pruned on built models
    layers = Structure.from_params(params, kind="layers")
    assert layers.keep_layers == 0.5 and layers.heads == ((1, (0, 3)),)
    assert [layers.layers_kept(n) for n in (6, 2, 1)] == [3, 1, 1]
    width = Structure.from_params({**params, "prune__target": "width"}, kind="layers")
    assert width.keep_layers == 1.0 and width.heads == ((1, (0, 3)),)  # width pruning keeps every layer
