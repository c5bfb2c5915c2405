"""The on-disk feature cache: hits, invalidation on every key part, and the size bound."""

from __future__ import annotations

import numpy as np

from lepton_automl.training.cache import FeatureCache, cache_key

BASE = {"ref": "timm:efficientnet_lite0", "weights": "pip:x", "prep": {"image_size": 96}, "blocks": 0,
        "data": "abc123"}


def test_hit_after_put_and_miss_when_any_key_part_changes(tmp_path) -> None:
    cache = FeatureCache(tmp_path)
    key = cache_key(BASE)
    assert cache.get(key) is None
    arrays = {"train": (np.arange(6, dtype=np.float32).reshape(2, 3),)}
    cache.put(key, arrays, seconds=1.5)
    hit = cache.get(key)
    assert hit is not None and hit.hit and hit.seconds == 1.5
    np.testing.assert_array_equal(hit.arrays["train"][0], arrays["train"][0])
    for part, value in (("ref", "timm:efficientnet_lite1"), ("weights", "pip:y"), ("prep", {"image_size": 128}),
                        ("blocks", 1), ("data", "changed-data")):
        other = cache_key({**BASE, part: value})
        assert other != key and cache.get(other) is None
    assert cache.hits == 1


def test_cache_stays_under_its_size_bound(tmp_path) -> None:
    cache = FeatureCache(tmp_path, max_bytes=3 * 80_000)
    for i in range(6):
        cache.put(cache_key({**BASE, "data": str(i)}), {"train": (np.zeros(20_000, np.float32),)}, seconds=0.1)
    assert cache.size_bytes() <= 3 * 80_000 + 4096
    assert cache.get(cache_key({**BASE, "data": "5"})) is not None  # the newest entry survives
    assert cache.get(cache_key({**BASE, "data": "0"})) is None  # the oldest was evicted


def test_every_split_runs_through_one_export_of_the_trunk(image_folder, monkeypatch) -> None:
    # Exporting a trunk costs 0.7-1.7 s on 2 cores (efficientnet_lite0-2 at 224 px): a feature
    # extraction exports once for all its splits, and each split's outputs are torch's.
    import lepton_automl.export.trunk as trunk_module
    from lepton_automl.backbones import BackboneRegistry
    from lepton_automl.data.split import split_data
    from lepton_image import ImageModality

    modality, registry = ImageModality(), BackboneRegistry()
    splits = split_data(modality.load(image_folder), seed=0)
    card = registry.get("efficientnet_lite0")
    prep = modality.preprocessing(card, registry, params={"data__image_size": 64})
    trunk = modality.build(card, registry, params={}, finetune_blocks=0).trunk
    exports = []
    real = trunk_module.export_onnx
    monkeypatch.setattr(trunk_module, "export_onnx", lambda *a, **k: exports.append(a) or real(*a, **k))
    named = {split: list(getattr(splits, split).examples) for split in ("train", "validation", "test")}
    outputs = trunk_module.run_trunk_splits(trunk, modality, named, preprocessing=prep)
    assert len(exports) == 1 and list(outputs) == list(named)
    for split, examples in named.items():
        (want,) = trunk_module.run_trunk(trunk, modality, examples, preprocessing=prep)
        assert outputs[split][0].shape == want.shape == (len(examples), want.shape[1])
        np.testing.assert_allclose(outputs[split][0], want, rtol=1e-3, atol=1e-4)
