"""The strong hand-written baseline of the search-quality benchmark, written outside Lepton's trial code.

Images: the pooled features of every pretrained image backbone (EfficientNet-Lite0/1/2 at their
native resolution), each standardised, concatenated. Text: MiniLM's mean-pooled sentence embedding
(256 tokens) standardised, concatenated with TF-IDF word 1-2-grams (sublinear tf). Then scikit-learn's
LogisticRegression with C picked on the validation split from a fine grid, refit on train, scored on
test. Lepton's registry only supplies the weights and Lepton's ``split_data`` the same 60/20/20 split
(seed 0) the search uses, so both are judged on the same test examples.

    python benchmarks/hand_probe.py --data benchmarks/data/glyphs --out benchmarks/results/hand_probe_glyphs.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

C_GRID = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


@torch.no_grad()
def image_features(registry, name: str, paths: list[str]) -> np.ndarray:
    from PIL import Image

    card = registry.get(name)
    model = registry.load(card, pretrained=True).eval()
    size = card.input_size[-1]
    mean, std = np.asarray(card.mean, np.float32), np.asarray(card.std, np.float32)
    out = []
    for start in range(0, len(paths), 64):
        batch = np.stack([np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BICUBIC),
                                     np.float32) / 255.0 for p in paths[start:start + 64]])
        x = torch.from_numpy(((batch - mean) / std).transpose(0, 3, 1, 2).copy())
        out.append(model(x).numpy())
    return np.concatenate(out)


@torch.no_grad()
def minilm_features(registry, texts: list[str]) -> np.ndarray:
    card = registry.get("all-MiniLM-L6-v2")
    model = registry.load(card, pretrained=True).eval()
    tok = registry.source(card.scheme).load_tokenizer(card)
    out = []
    for start in range(0, len(texts), 64):
        enc = tok(texts[start:start + 64], padding=True, truncation=True, max_length=256, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        out.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)).numpy())
    return np.concatenate(out)


def content_digest(splits) -> str:
    """A digest of the split's contents (file bytes, not paths and times, for images; the text for text)
    and labels: the search-quality benchmark holds a search's split against the hand probe's with it,
    since the sets are rebuilt from each machine's Debian files (one rebuild held 2,155 man pages where
    the hand probe had run on 2,147)."""
    import hashlib
    import os

    h = hashlib.sha256()
    for name in ("train", "validation", "test"):
        split = getattr(splits, name)
        h.update(name.encode() + split.labels.astype(np.int64).tobytes())
        for example in split.examples:
            is_file = isinstance(example, (str, os.PathLike)) and os.path.isfile(example)
            h.update(Path(example).read_bytes() if is_file else str(example).encode())
            h.update(b"\x1f")
    return h.hexdigest()[:20]


def standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mean, std = train.mean(0), train.std(0) + 1e-6
    return [(a - mean) / std for a in (train, *others)]


def main() -> None:
    from scipy import sparse
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from lepton_automl.backbones import BackboneRegistry
    from lepton_automl.data.split import split_data
    from lepton_image import ImageModality
    from lepton_text import TextModality

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--modality", choices=("image", "text"), default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    modality = args.modality or ("text" if args.data.endswith((".csv", ".jsonl", ".tsv", ".parquet")) else "image")
    mod = ImageModality() if modality == "image" else TextModality()
    splits = split_data(mod.load(args.data), validation=0.2, test=0.2, seed=0)
    registry = BackboneRegistry()
    start = time.perf_counter()
    parts = {"train": [], "validation": [], "test": []}
    if modality == "image":
        for name in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"):
            feats = [image_features(registry, name, list(getattr(splits, s).examples)) for s in parts]
            for s, f in zip(parts, standardise(*feats)):
                parts[s].append(f)
        x = {s: np.concatenate(v, axis=1) for s, v in parts.items()}
    else:
        texts = {s: [str(e) for e in getattr(splits, s).examples] for s in parts}
        dense = standardise(*[minilm_features(registry, texts[s]) for s in parts])
        tfidf = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1).fit(texts["train"])
        # TF-IDF rows are L2-normalised; scale them to weigh like the standardised dense block.
        scale = np.sqrt(dense[0].shape[1])
        x = {s: sparse.hstack([sparse.csr_matrix(d), tfidf.transform(texts[s]) * scale]).tocsr()
             for s, d in zip(parts, dense)}
    features_s = time.perf_counter() - start
    y = {s: getattr(splits, s).labels for s in parts}
    scores = {}
    for c in C_GRID:
        clf = LogisticRegression(C=c, max_iter=2000).fit(x["train"], y["train"])
        scores[c] = float((clf.predict(x["validation"]) == y["validation"]).mean())
    best_c = max(C_GRID, key=lambda c: (scores[c], -c))
    clf = LogisticRegression(C=best_c, max_iter=2000).fit(x["train"], y["train"])
    result = {"data": args.data, "modality": modality, "C": best_c, "validation_by_C": scores,
              "val_accuracy": scores[best_c],
              "test_accuracy": float((clf.predict(x["test"]) == y["test"]).mean()),
              "features_s": round(features_s, 1), "total_s": round(time.perf_counter() - start, 1),
              "sizes": {s: len(y[s]) for s in parts}, "data_digest": content_digest(splits)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
