"""Ingest, cleaning and splits."""

from __future__ import annotations

import numpy as np
import pytest

from lepton_automl.data.dataset import LabelledData
from lepton_automl.data.split import stratified_split
from lepton_automl.exceptions import DataError
from lepton_image import ImageModality
from lepton_text import TextModality


def _data(n_per_class=(20, 10, 6)) -> LabelledData:
    labels = np.concatenate([np.full(n, i) for i, n in enumerate(n_per_class)])
    return LabelledData(examples=tuple(f"x{i}" for i in range(len(labels))), labels=labels, classes=("a", "b", "c"))


def test_split_is_stratified_disjoint_and_reproducible() -> None:
    data = _data()
    s1 = stratified_split(data, seed=3)
    s2 = stratified_split(data, seed=3)
    s3 = stratified_split(data, seed=4)
    assert s1.train.examples == s2.train.examples and s1.test.examples == s2.test.examples
    assert s1.train.examples != s3.train.examples
    parts = [set(s.examples) for s in (s1.train, s1.validation, s1.test)]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert sum(len(p) for p in parts) == len(data)
    for split in (s1.train, s1.validation, s1.test):
        assert set(split.labels.tolist()) == {0, 1, 2}


def test_split_refuses_classes_too_small() -> None:
    with pytest.raises(DataError, match="fewer than 3"):
        stratified_split(_data((20, 10, 2)))


def test_image_folder_ingest_skips_unreadable_with_count(image_folder, tmp_path) -> None:
    import shutil

    root = tmp_path / "imgs"
    shutil.copytree(image_folder, root)
    (root / "disc" / "broken.png").write_bytes(b"not a png")
    data = ImageModality().load(root)
    assert data.classes == ("disc", "horizontal", "vertical")
    assert len(data) == 36
    assert any("skipped 1 unreadable" in line for line in data.report)


def test_image_folder_without_classes_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(DataError, match="no class subfolders"):
        ImageModality().load(tmp_path)


def test_text_table_detects_columns_and_cleans(tmp_path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("sentence,category\nhello world,a\n  ,a\nhello world,a\nfoo bar,b\nbaz,b\n"
                    "good day,a\nnice one,a\nqux,b\n")
    data = TextModality().load(path)
    assert data.classes == ("a", "b")
    assert data.examples == ("hello world", "foo bar", "baz", "good day", "nice one", "qux")
    assert any("empty or blank text" in line for line in data.report)
    assert any("duplicate" in line for line in data.report)


def test_text_table_without_label_column_lists_columns(tmp_path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("body,stars_given\nhello,1\nworld,2\nthree,1\nfour,2\nfive,1\nsix,2\n")
    with pytest.raises(DataError) as info:
        TextModality().load(path)
    assert "['stars_given']" in str(info.value) and "--label-column" in str(info.value)
    data = TextModality().load(path, options={"label_column": "stars_given"})
    assert data.num_classes == 2


def test_float_labels_are_refused(tmp_path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("text,label\nhello,0.5\nworld,1.5\n")
    with pytest.raises(DataError, match="non-integer floats"):
        TextModality().load(path)


def test_datasets_object_is_accepted() -> None:
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["a b", "c d", "e f", "g h", "i j", "k l"], "label": [0, 1, 0, 1, 0, 1]})
    data = TextModality().load(ds)
    assert len(data) == 6 and data.classes == ("0", "1")


def test_fingerprint_changes_with_content(tmp_path) -> None:
    a = _data()
    b = LabelledData(examples=a.examples, labels=a.labels[::-1].copy(), classes=a.classes)
    assert a.fingerprint() == _data().fingerprint()
    assert a.fingerprint() != b.fingerprint()
