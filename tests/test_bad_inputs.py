"""Every kind of bad input ends in a fix with a count or a clear DataError, never a traceback.

Each case builds its own bad data, loads it through the modality (what `lepton data check` and
`lepton search` do first), and asserts the outcome: the finding's check name and count for a fix,
or the words of the error that name the problem and the way out.
"""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lepton_automl.data.split import split_data
from lepton_automl.exceptions import DataError
from lepton_image import ImageModality
from lepton_text import TextModality

IMAGE = ImageModality()
TEXT = TextModality()


def _folder(tmp_path: Path, image_folder: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(image_folder, root)
    return root


def _finding(data, check: str):
    found = [line for line in data.report if f"] {check}:" in line]
    assert found, f"no {check!r} finding in {data.report}"
    return found[0]


def _rgb(seed: int, size: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)


# -- images: fixed with a count -----------------------------------------------------------------
def test_unreadable_and_truncated_images_are_skipped(tmp_path, image_folder) -> None:
    root = _folder(tmp_path, image_folder)
    (root / "disc" / "garbage.png").write_bytes(b"this is not an image")
    whole = (root / "vertical" / "000.png").read_bytes()
    (root / "vertical" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    data = IMAGE.load(root)
    assert "skipped 2 unreadable or truncated images" in _finding(data, "unreadable")
    assert len(data) == 36


def test_image_modes_are_converted_with_counts(tmp_path, image_folder) -> None:
    root = _folder(tmp_path, image_folder)
    rgb = _rgb(1)
    Image.fromarray(rgb).convert("L").save(root / "disc" / "gray.png")
    Image.fromarray(rgb).convert("P").save(root / "disc" / "palette.png")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)]), "RGBA").save(root / "disc" / "alpha.png")
    Image.fromarray(rgb).convert("CMYK").save(root / "disc" / "cmyk.jpg")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(root / "disc" / "deep.png")
    data = IMAGE.load(root)
    line = _finding(data, "converted")
    assert "converted 5 images" in line and "CMYK: 1" in line and "RGBA: 1" in line and "P: 1" in line
    from lepton_image.modality import load_rgb

    for name in ("gray.png", "palette.png", "alpha.png", "cmyk.jpg", "deep.png"):
        arr = load_rgb(str(root / "disc" / name), 32)
        assert arr.shape == (32, 32, 3) and np.isfinite(arr).all()


def _png_header_only(path: Path, width: int, height: int) -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_decompression_bomb_header_is_refused(tmp_path, image_folder) -> None:
    root = _folder(tmp_path, image_folder)
    _png_header_only(root / "disc" / "bomb.png", 50_000, 50_000)
    data = IMAGE.load(root)
    assert "refused 1 images over the decompression-bomb limit" in _finding(data, "oversized")


def test_exact_duplicates_are_dropped(tmp_path, image_folder) -> None:
    root = _folder(tmp_path, image_folder)
    shutil.copy(root / "disc" / "000.png", root / "disc" / "copy.png")
    data = IMAGE.load(root)
    assert "dropped 1 exact duplicates" in _finding(data, "duplicate")


def test_same_image_under_two_labels_is_dropped(tmp_path, image_folder) -> None:
    root = _folder(tmp_path, image_folder)
    shutil.copy(root / "disc" / "000.png", root / "vertical" / "disc-by-mistake.png")
    data = IMAGE.load(root)
    assert "dropped 2 examples that appear with different labels" in _finding(data, "conflicting-labels")


def test_leak_between_user_splits_is_removed(tmp_path, image_folder) -> None:
    root = tmp_path / "split"
    shutil.copytree(image_folder, root / "train")
    for seed, cls in enumerate(("disc", "horizontal", "vertical"), start=101):
        (root / "test" / cls).mkdir(parents=True)
        # Fixed, distinct seeds: str hashes change per process, and two equal images under two
        # labels would (rightly) both be dropped as conflicting.
        Image.fromarray(_rgb(seed)).save(root / "test" / cls / "own.png")
    shutil.copy(root / "train" / "disc" / "000.png", root / "test" / "disc" / "leaked.png")
    data = IMAGE.load(root)
    assert "dropped 1 validation/test examples that also appear in an earlier split" in _finding(data, "split-leak")
    splits = split_data(data, seed=0)
    assert len(splits.test) == 3 and all("own.png" in e for e in splits.test.examples)
    assert len(splits.validation) > 0  # carved from train, since the user gave none


def test_symlink_loop_is_not_followed(tmp_path, image_folder) -> None:
    root = _folder(tmp_path, image_folder)
    os.symlink(root / "disc", root / "disc" / "loop")
    data = IMAGE.load(root)
    assert "did not follow 1 symlink loops" in _finding(data, "symlink-loop")
    assert len(data) == 36


def test_non_image_files_are_ignored_with_a_count(tmp_path, image_folder) -> None:
    root = _folder(tmp_path, image_folder)
    (root / "disc" / "notes.txt").write_text("hello")
    assert "ignored 1 files that are not images" in _finding(IMAGE.load(root), "not-an-image")


def _xpm(rgb: np.ndarray) -> str:
    """``rgb`` (H, W, 3 uint8, few colours) as XPM text: Pillow reads XPM but does not write it."""
    colours = sorted({tuple(int(v) for v in px) for px in rgb.reshape(-1, 3)})
    code = {c: chr(ord("a") + i) for i, c in enumerate(colours)}
    rows = ["".join(code[tuple(int(v) for v in px)] for px in row) for row in rgb]
    lines = [f"{rgb.shape[1]} {rgb.shape[0]} {len(colours)} 1",
             *(f"{code[c]} c #{c[0]:02x}{c[1]:02x}{c[2]:02x}" for c in colours), *rows]
    return "/* XPM */\nstatic char *img[] = {\n" + ",\n".join(f'"{line}"' for line in lines) + "};\n"


def test_every_raster_format_pillow_reads_is_loaded_and_vector_images_are_named(tmp_path) -> None:
    root = tmp_path / "formats"
    rng = np.random.default_rng(0)
    formats = (".png", ".tif", ".ico", ".ppm", ".tga", ".bmp", ".xpm")
    for cls, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        (root / cls).mkdir(parents=True)
        for i, suffix in enumerate(formats):
            pixels = np.full((32, 32, 3), 255, np.uint8)
            x, y = rng.integers(0, 16, size=2)
            pixels[y : y + 12 + i, x : x + 12] = colour  # distinct images: no duplicates to drop
            path = root / cls / f"{i}{suffix}"
            if suffix == ".xpm":
                path.write_text(_xpm(pixels))
            else:
                Image.fromarray(pixels).save(path)
        (root / cls / "logo.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    data = IMAGE.load(root)
    assert sorted(Path(e).suffix for e in data.examples) == sorted(formats * 2)
    assert "ignored 2 vector images" in _finding(data, "vector-image")
    assert "rsvg-convert" in _finding(data, "vector-image")
    prep = {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"}
    pixels = IMAGE.encode_compact(list(data.examples), preprocessing=prep)["pixel_values"]
    # decoded as drawn: the class colour in the red or blue channel, white around it
    labels = [data.classes[y] for y in data.labels]
    dominant = pixels.reshape(len(labels), 3, -1).min(axis=2).argmax(axis=1)  # the channel kept at 200
    assert [("red", "blue")[int(d == 2)] for d in dominant] == labels


def test_a_folder_of_vector_images_only_says_how_to_rasterise_them(tmp_path) -> None:
    for cls in ("a", "b"):
        (tmp_path / "svgs" / cls).mkdir(parents=True)
        (tmp_path / "svgs" / cls / "x.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    assert IMAGE.can_load(tmp_path / "svgs")
    with pytest.raises(DataError, match="no readable images.*rasterise them first"):
        IMAGE.load(tmp_path / "svgs")


def test_extreme_imbalance_is_a_warning(tmp_path, image_folder) -> None:
    root = _folder(tmp_path, image_folder)
    for i in range(120):
        Image.fromarray(_rgb(100 + i)).save(root / "horizontal" / f"extra{i:03d}.png")
    assert "[warning]" in _finding(IMAGE.load(root), "imbalance")


def test_strict_turns_fixes_into_errors(tmp_path, image_folder) -> None:
    root = _folder(tmp_path, image_folder)
    shutil.copy(root / "disc" / "000.png", root / "disc" / "copy.png")
    with pytest.raises(DataError, match="strict mode"):
        IMAGE.load(root, options={"strict": True})


# -- images: clear errors ------------------------------------------------------------------------
def test_directory_without_images(tmp_path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "readme.txt").write_text("no images")
    with pytest.raises(DataError, match="holds no readable images"):
        IMAGE.load(tmp_path)


def test_single_class_folder(tmp_path, image_folder) -> None:
    shutil.copytree(image_folder / "disc", tmp_path / "only" / "disc")
    with pytest.raises(DataError, match="only one class"):
        IMAGE.load(tmp_path / "only")


def test_class_too_small_to_split(tmp_path, image_folder) -> None:
    root = _folder(tmp_path, image_folder)
    (root / "rare").mkdir()
    Image.fromarray(_rgb(7)).save(root / "rare" / "one.png")
    with pytest.raises(DataError, match=r"classes \['rare'\] have fewer than 3 examples"):
        IMAGE.load(root)


def test_unknown_label_in_user_test_split(tmp_path, image_folder) -> None:
    root = tmp_path / "split"
    shutil.copytree(image_folder, root / "train")
    (root / "test" / "martian").mkdir(parents=True)
    Image.fromarray(_rgb(3)).save(root / "test" / "martian" / "x.png")
    with pytest.raises(DataError, match=r"\['martian'\] appear in validation/test but never in train"):
        IMAGE.load(root)


def test_missing_image_folder(tmp_path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        IMAGE.load(tmp_path / "nowhere")


# -- text: fixed with a count --------------------------------------------------------------------
def _rows(n: int = 4) -> str:
    return "".join(f"sports text {i},sports\ncooking text {i},cooking\n" for i in range(n))


def test_empty_and_blank_texts_and_missing_labels_are_dropped(tmp_path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("text,label\n" + _rows() + "   ,sports\n,cooking\norphan text,\n")
    data = TEXT.load(path)
    assert "dropped 2 rows with empty or blank text" in _finding(data, "empty-text")
    assert "dropped 1 rows without a label" in _finding(data, "missing-label")


def test_non_utf8_bytes_are_replaced_with_a_count(tmp_path) -> None:
    path = tmp_path / "t.csv"
    path.write_bytes(b"text,label\n" + _rows().encode() + b"caf\xe9 au lait,cooking\nna\xefve fan,sports\n")
    data = TEXT.load(path)
    assert "on 2 lines" in _finding(data, "non-utf8")
    assert any("caf\ufffd" in e for e in data.examples)


def test_text_duplicates_and_conflicts(tmp_path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("text,label\n" + _rows() + "sports text 0,sports\nsame words,sports\nsame words,cooking\n")
    data = TEXT.load(path)
    assert "dropped 1 exact duplicates" in _finding(data, "duplicate")
    assert "dropped 2 examples that appear with different labels" in _finding(data, "conflicting-labels")


def test_datasetdict_splits_are_respected_and_leaks_removed() -> None:
    import datasets

    train = {"text": [f"word{i} sports" for i in range(6)] + [f"word{i} food" for i in range(6)],
             "label": ["sports"] * 6 + ["food"] * 6}
    test = {"text": ["word0 sports", "fresh food talk", "new sports talk"], "label": ["sports", "food", "sports"]}
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict(train), "test": datasets.Dataset.from_dict(test)})
    data = TEXT.load(dd)
    assert "dropped 1 validation/test examples" in _finding(data, "split-leak")
    splits = split_data(data, seed=0)
    assert set(splits.test.examples) == {"fresh food talk", "new sports talk"}


def test_save_to_disk_folder_is_read(tmp_path) -> None:
    import datasets

    ds = datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(8)], "label": ["a", "b"] * 4})
    ds.save_to_disk(str(tmp_path / "saved"))
    assert TEXT.can_load(tmp_path / "saved")
    assert len(TEXT.load(tmp_path / "saved")) == 8


# -- text: clear errors --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "is empty"),
        (b"text,label\n", "header but no rows"),
        (b"text,label\n" + b"".join(f"t{i},only\n".encode() for i in range(6)), "only one class"),
        (b"text,label\nhello,0.5\nworld,1.5\n", "non-integer floats"),
        (b"body,stars\nhello,1\n", "Could not find the label column among \\['stars'\\]"),
        (b"text,label\n" + b"".join(f"t{i},big\n".encode() for i in range(6)) + b"lonely,small\n",
         r"classes \['small'\] have fewer than 3 examples"),
    ],
    ids=["empty-file", "header-only", "single-class", "float-labels", "no-label-column", "class-too-small"],
)
def test_text_errors_name_the_problem(tmp_path, content: bytes, expected: str) -> None:
    path = tmp_path / "t.csv"
    path.write_bytes(content)
    with pytest.raises(DataError, match=expected):
        TEXT.load(path)


def test_hub_dataset_offline_is_one_clear_line(monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError) as info:
        TEXT.load("hf-hub:lepton-test/no-such-dataset")
    message = str(info.value)
    assert "HF_DATASETS_OFFLINE" in message and "save_to_disk" in message and "\n" not in message


@pytest.mark.parametrize(("name", "content", "says"), [
    ("ragged.csv", "text,label\nfine,a\ntoo,many,fields,b\n", ["Expected 2 fields in line 3, saw 4",
                                                                "as many fields as the header"]),
    ("open.csv", 'text,label\n"never closed,a\nnext,b\n', ["EOF inside string", "quote fields"]),
    ("broken.jsonl", '{"text": "a", "label": "x"}\n{"text": \n', ["line 2 is not valid JSON",
                                                                 "one complete JSON object per line"]),
    ("list.jsonl", '{"text": "a", "label": "x"}\n[1, 2]\n', ["line 2 is a JSON list, not an object"]),
])
def test_a_malformed_table_names_the_file_the_parser_error_and_the_fix(tmp_path, name, content, says) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as info:
        TextModality().load(str(path))
    message = str(info.value)
    assert name in message and "DatasetGenerationError" not in message
    for part in says:
        assert part in message


def test_random_bytes_named_csv_are_refused_as_not_text(tmp_path) -> None:
    path = tmp_path / "random.csv"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, size=5000, dtype=np.uint8).tobytes())
    with pytest.raises(DataError, match=r"random.csv' is not a text table: \d+ of its \d+ lines are not valid UTF-8"):
        TextModality().load(str(path))
