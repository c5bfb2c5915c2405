"""Shared fixtures: small datasets and a tiny transformers model, all created locally (no network)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# Nothing in the test suite may reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEPTON_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "lepton-cache"))


def make_image_folder(root: Path, *, per_class: int = 12, size: int = 24, seed: int = 0) -> Path:
    """Three visually distinct classes: horizontal bars, vertical bars, and a filled disc."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    for cls in ("horizontal", "vertical", "disc"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = np.zeros((size, size, 3), np.float32)
            period = int(rng.integers(4, 7))
            phase = int(rng.integers(0, period))
            if cls == "horizontal":
                img[((yy + phase) // (period // 2 + 1)) % 2 == 0] = 1.0
            elif cls == "vertical":
                img[((xx + phase) // (period // 2 + 1)) % 2 == 0] = 1.0
            else:
                cy, cx = rng.integers(8, size - 8, size=2)
                img[(yy - cy) ** 2 + (xx - cx) ** 2 < int(rng.integers(16, 40))] = 1.0
            img = img * rng.uniform(0.6, 1.0, size=3) + rng.normal(0, 0.05, img.shape)
            Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(root / cls / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images") / "shapes")


WORDS = {
    "sports": ["match", "goal", "team", "score", "league", "coach", "player", "season"],
    "cooking": ["recipe", "oven", "flour", "sauce", "bake", "salt", "onion", "pan"],
    "computing": ["kernel", "compiler", "memory", "thread", "socket", "cache", "binary", "disk"],
}


def make_text_rows(*, per_class: int = 16, seed: int = 0) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    rows = []
    for label, words in WORDS.items():
        for _ in range(per_class):
            n = int(rng.integers(4, 9))
            rows.append((" ".join(rng.choice(words, size=n)), label))
    return rows


@pytest.fixture(scope="session")
def text_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import csv

    path = tmp_path_factory.mktemp("text") / "topics.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(make_text_rows())
    return path


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide BERT with a word-level vocabulary, saved with save_pretrained."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted({w for ws in WORDS.values() for w in ws})
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(root / "vocab.txt"), do_lower_case=True)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    with torch.random.fork_rng():  # a fixed model without touching the suite's global RNG state
        torch.manual_seed(0)
        model = BertModel(config)
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root
