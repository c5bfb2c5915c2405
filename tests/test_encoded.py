"""Examples decoded once (``data.encoded.EncodedExamples``): the same arrays as ``encode``, kept rows
served without reading their files again, the byte budget held, texts encoded as before."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from lepton_image import ImageModality
from lepton_text import TextModality

from lepton_automl.backbones import BackboneRegistry
from lepton_automl.data.encoded import EncodedExamples
from tests.conftest import make_image_folder, make_text_rows


def _images(tmp_path: Path) -> tuple[ImageModality, list[str]]:
    modality = ImageModality()
    data = modality.load(make_image_folder(tmp_path / "shapes", per_class=8, size=40))
    return modality, list(data.examples)


def _prep(modality: ImageModality, size: int) -> dict:
    registry = BackboneRegistry()
    return modality.preprocessing(registry.get("efficientnet_lite0"), registry, params={"data__image_size": size})


def test_kept_examples_are_served_as_encode_computes_them_without_their_files(tmp_path) -> None:
    modality, examples = _images(tmp_path)
    keep, other = examples[:12], examples[12:]
    encoded = EncodedExamples(modality, keep)
    prep = _prep(modality, 64)
    encode = encoded.encoder(prep)
    mixed = [keep[3], other[0], keep[0], keep[3], other[5]]  # kept, not kept, a repeat in one batch
    want = modality.encode(mixed, preprocessing=prep)["pixel_values"]
    got = encode(mixed)["pixel_values"]
    assert got.dtype == want.dtype and np.array_equal(got, want)
    assert encoded.nbytes == 2 * 3 * 64 * 64  # the two kept examples, as uint8 pixels

    everything = modality.encode(keep, preprocessing=prep)["pixel_values"]
    encode(keep)
    for path in keep:  # decoded once: their files are not read again
        Path(path).unlink()
    assert np.array_equal(encode(keep[::-1])["pixel_values"], everything[::-1])
    assert np.array_equal(encode([keep[3], keep[0]])["pixel_values"], want[[0, 2]])
    with pytest.raises(OSError):  # another preprocessing is another entry, decoded from the files
        encoded.encoder(_prep(modality, 48))([keep[0]])
    with pytest.raises(OSError):  # examples not kept are read every time
        Path(other[0]).unlink()
        encode([other[0]])


def test_the_byte_budget_drops_the_least_recently_used_preprocessing(tmp_path) -> None:
    modality, examples = _images(tmp_path)
    one = 3 * 64 * 64  # bytes per example at 64 px
    encoded = EncodedExamples(modality, examples, max_bytes=9 * one)
    big, small = _prep(modality, 64), _prep(modality, 32)
    encoded.encoder(big)(examples[:8])
    assert encoded.nbytes == 8 * one
    encoded.encoder(small)(examples[:8])  # 8 x 3 x 32 x 32 more: the 64-px entry is dropped to fit it
    assert encoded.nbytes == 8 * 3 * 32 * 32
    encoded.encoder(big)(examples)  # 24 examples at 64 px do not fit: what fits is kept
    assert 8 * 3 * 32 * 32 < encoded.nbytes <= 9 * one
    want = modality.encode(examples, preprocessing=big)["pixel_values"]
    assert np.array_equal(encoded.encoder(big)(examples)["pixel_values"], want)


def test_texts_are_encoded_as_before_and_not_kept(tiny_bert_dir) -> None:
    """A text batch is padded to its longest row, so rows do not stand alone: nothing is kept."""
    modality = TextModality()
    texts = [text for text, _ in make_text_rows(per_class=4)]
    encoded = EncodedExamples(modality, texts)
    prep = {"max_length": 64, "tokenizer": str(tiny_bert_dir)}
    for batch in (texts[:5], texts[3:9]):
        got, want = encoded.encoder(prep)(batch), modality.encode(batch, preprocessing=prep)
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    assert encoded.nbytes == 0
