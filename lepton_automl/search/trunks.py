"""The trunk store: per trunk signature (backbones, preprocessing, layer dropping, quantization), the
work every linear probe on that trunk shares, done once per search.

An entry is a folder ``root/<key>/`` holding the trunk's ONNX files (``trunk.onnx``, and
``trunk.int8.onnx`` when quantized; ``features`` out), the quantized trunk's outputs on the
validation and test splits (what the shipped file computes, so that a probe on it is scored without
running anything), and what was measured on the trunk with a head of the study's shape appended
(latency, throughput, size, MACs: a head's weights change none of these). Entries are written to a
temporary folder and renamed into place, so concurrent workers never read half an entry.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lepton_automl.log import get_logger

logger = get_logger(__name__)

ENTRY = "entry.json"


@dataclass(frozen=True)
class TrunkEntry:
    folder: Path
    runtime_file: str  # trunk.onnx or trunk.int8.onnx
    quant: str
    features: dict[str, np.ndarray]  # split -> outputs of the runtime trunk (empty when it is the fp32 trunk)
    measured: dict[str, Any]

    @property
    def fp32(self) -> Path:
        return self.folder / "trunk.onnx"

    @property
    def runtime(self) -> Path:
        return self.folder / self.runtime_file


class TrunkStore:
    """Trunk entries under ``root``; kept in memory once read."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._entries: dict[str, TrunkEntry] = {}

    def get(self, key: str) -> TrunkEntry | None:
        if key in self._entries:
            return self._entries[key]
        folder = self.root / key
        if not (folder / ENTRY).is_file():
            return None
        meta = json.loads((folder / ENTRY).read_text())
        features = {split: np.load(folder / f"features_{split}.npy") for split in meta["splits"]}
        entry = TrunkEntry(folder=folder, runtime_file=meta["runtime_file"], quant=meta["quant"],
                           features=features, measured=meta["measured"])
        self._entries[key] = entry
        return entry

    def build(self, key: str, make: Callable[[Path], tuple[str, str, Mapping[str, np.ndarray], Mapping[str, Any]]],
              ) -> TrunkEntry:
        """The entry for ``key``, made by ``make(folder)`` if missing: it writes the ONNX files into
        ``folder`` and returns (runtime file name, quantization, runtime features by split, measurements)."""
        found = self.get(key)
        if found is not None:
            return found
        folder = self.root / key
        tmp = folder.with_name(f"{key}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            runtime_file, quant, features, measured = make(tmp)
            for split, array in features.items():
                np.save(tmp / f"features_{split}.npy", np.ascontiguousarray(array, dtype=np.float32))
            (tmp / ENTRY).write_text(json.dumps({"runtime_file": runtime_file, "quant": quant,
                                                 "splits": sorted(features), "measured": dict(measured)},
                                                default=float))
            try:
                os.replace(tmp, folder)
            except OSError:  # another worker renamed its copy first: use that one
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        entry = self.get(key)
        assert entry is not None
        logger.debug("trunk %s stored (%s)", key, entry.runtime_file)
        return entry

    def remove(self) -> int:
        """Delete every entry (the search's front was written out); returns the bytes freed."""
        if not self.root.is_dir():
            return 0
        freed = sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file())
        shutil.rmtree(self.root, ignore_errors=True)
        self._entries.clear()
        try:
            self.root.parent.rmdir()  # the workers' common folder, once the last store is gone
        except OSError:
            pass  # another worker's store is still there
        return freed
