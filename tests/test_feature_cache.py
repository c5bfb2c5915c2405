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
