"""An on-disk cache of frozen-trunk outputs, keyed by everything that changes them.

Key parts: the backbone ref and weights, the card's build options, the preprocessing (size,
mean/std or tokenizer and max length), the cut point, and the data fingerprint. Any change gives
a new key, so stale entries are never read; old entries are evicted least-recently-used first once
the cache passes ``max_bytes``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lepton_automl.log import get_logger

logger = get_logger(__name__)

FORMAT_VERSION = 2  # 2: the test split is cached too


@dataclass(frozen=True)
class CachedArrays:
    arrays: dict[str, tuple[np.ndarray, ...]]  # split name -> trunk outputs
    seconds: float  # what computing them cost, charged to every trial that uses them
    hit: bool


def cache_key(parts: Mapping[str, Any]) -> str:
    blob = json.dumps({"v": FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class FeatureCache:
    """Trunk outputs on disk under ``root/<key>/``; ``max_bytes`` bounds the total size."""

    def __init__(self, root: str | Path, *, max_bytes: int = 4 * 2**30) -> None:
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self.hits = 0
        self.misses = 0

    def _dir(self, key: str) -> Path:
        return self.root / key

    def contains(self, key: str) -> bool:
        """Whether ``key`` is cached (without counting a hit or a miss)."""
        return (self._dir(key) / "meta.json").is_file()

    def get(self, key: str) -> CachedArrays | None:
        folder = self._dir(key)
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            self.misses += 1
            return None
        meta = json.loads(meta_path.read_text())
        arrays = {
            split: tuple(np.load(folder / f"{split}_{i}.npy", mmap_mode="r") for i in range(n))
            for split, n in meta["splits"].items()
        }
        os.utime(meta_path)  # recency for LRU eviction
        self.hits += 1
        logger.info("feature cache hit %s (%s)", key, meta.get("label", ""))
        return CachedArrays(arrays=arrays, seconds=float(meta["seconds"]), hit=True)

    def put(
        self, key: str, arrays: Mapping[str, tuple[np.ndarray, ...]], *, seconds: float, label: str = ""
    ) -> CachedArrays:
        folder = self._dir(key)
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for split, outs in arrays.items():
            for i, arr in enumerate(outs):
                np.save(tmp / f"{split}_{i}.npy", np.ascontiguousarray(arr))
        meta = {"splits": {s: len(o) for s, o in arrays.items()}, "seconds": seconds, "label": label,
                "created": time.time()}
        (tmp / "meta.json").write_text(json.dumps(meta))
        if folder.exists():  # another worker finished first; theirs is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, folder)
        self._evict()
        return CachedArrays(arrays={k: tuple(v) for k, v in arrays.items()}, seconds=seconds, hit=False)

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file()) if self.root.exists() else 0

    def _evict(self) -> None:
        if not self.root.exists():
            return
        entries = []
        for folder in self.root.iterdir():
            meta = folder / "meta.json"
            if meta.is_file():
                size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
                entries.append((meta.stat().st_mtime, size, folder))
        total = sum(e[1] for e in entries)
        for _, size, folder in sorted(entries):
            if total <= self.max_bytes:
                break
            shutil.rmtree(folder, ignore_errors=True)
            total -= size
            logger.info("feature cache evicted %s (%.1f MB)", folder.name, size / 2**20)
