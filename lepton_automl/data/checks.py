"""Checks shared by every modality once examples are read: duplicates, leaks between the user's
splits, conflicting and unknown labels, classes too small to split, and class imbalance."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from lepton_automl.data.dataset import LabelledData
from lepton_automl.data.findings import Findings

SPLIT_ORDER = {"train": 0, "validation": 1, "test": 2}
IMBALANCE_RATIO = 10.0  # warn when the largest class is this many times the smallest


def label_sort_key(label: str) -> tuple[int, Any]:
    return (0, int(label)) if label.lstrip("-").isdigit() else (1, label)


def assemble(
    *,
    examples: Sequence[Any],
    labels: Sequence[str],
    keys: Sequence[Hashable],
    findings: Findings,
    name: str,
    split_of: Sequence[str] = (),
) -> LabelledData:
    """Deduplicate, check labels and classes, and build ``LabelledData`` (or raise ``DataError``)."""
    splits = list(split_of) if split_of else ["train"] * len(examples)
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        groups[key].append(i)
    drop: set[int] = set()
    duplicates = conflicts = leaks = 0
    for members in groups.values():
        if len(members) == 1:
            continue
        if len({labels[i] for i in members}) > 1:
            drop.update(members)  # the same example under two labels: no way to know which is right
            conflicts += len(members)
            continue
        members = sorted(members, key=lambda i: (SPLIT_ORDER.get(splits[i], 9), i))
        for i in members[1:]:
            drop.add(i)
            if splits[i] != splits[members[0]]:
                leaks += 1
            else:
                duplicates += 1
    findings.fixed("duplicate", duplicates, f"dropped {duplicates} exact duplicates")
    findings.fixed("conflicting-labels", conflicts,
                   f"dropped {conflicts} examples that appear with different labels")
    findings.fixed("split-leak", leaks,
                   f"dropped {leaks} validation/test examples that also appear in an earlier split (a leak)")
    keep = [i for i in range(len(examples)) if i not in drop]

    if split_of:
        train_labels = {labels[i] for i in keep if splits[i] == "train"}
        unknown = Counter(labels[i] for i in keep if splits[i] != "train" and labels[i] not in train_labels)
        if unknown:
            label, n = unknown.most_common(1)[0]
            findings.error("unknown-label", f"labels {sorted(unknown)} appear in validation/test but never "
                           f"in train (e.g. {label!r}, {n} examples); add training examples for them or remove "
                           "them", count=sum(unknown.values()))
    classes = tuple(sorted({labels[i] for i in keep}, key=label_sort_key))
    if len(keep) == 0:
        findings.error("empty", "no usable examples remain after cleaning")
    elif len(classes) < 2:
        findings.error("single-class", f"only one class ({classes[0]!r}); classification needs at least two")
    counts = Counter(labels[i] for i in keep)
    if classes and not split_of:
        small = sorted((c for c in classes if counts[c] < 3), key=label_sort_key)
        if small:
            findings.error("class-too-small", f"classes {small} have fewer than 3 examples, too few for a "
                           "stratified train/validation/test split; add examples or remove those classes",
                           count=len(small))
    if len(counts) >= 2:
        most, least = counts.most_common()[0], counts.most_common()[-1]
        if most[1] >= IMBALANCE_RATIO * least[1]:
            findings.warning("imbalance", f"class {most[0]!r} has {most[1]} examples but {least[0]!r} only "
                             f"{least[1]}; expect lower recall on small classes: collect more of them, or "
                             "pass --class-weights to `lepton search` to weight the loss by inverse class frequency")
    findings.raise_errors()
    index = {c: i for i, c in enumerate(classes)}
    return LabelledData(
        examples=tuple(examples[i] for i in keep),
        labels=np.array([index[labels[i]] for i in keep], dtype=np.int64),
        classes=classes,
        name=name,
        report=findings.lines(),
        split_of=tuple(splits[i] for i in keep) if split_of else (),
    )
