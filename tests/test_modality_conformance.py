"""Every registered modality runs the conformance suite shipped in ``lepton_automl.testing``."""

from __future__ import annotations

import pytest

from lepton_automl.backbones import BackboneCard, BackboneRegistry
from lepton_automl.testing import ModalityCase, ModalityTestCase
from lepton_image import ImageModality
from lepton_text import TextModality


class TestImageModality(ModalityTestCase):
    @pytest.fixture
    def case(self, image_folder) -> ModalityCase:
        first = next((image_folder / "disc").glob("*.png"))
        return ModalityCase(modality=ImageModality(), source=image_folder, backbone="efficientnet_lite0",
                            predict_inputs=[str(first)])


class TestTextModality(ModalityTestCase):
    @pytest.fixture
    def case(self, text_csv, tiny_bert_dir) -> ModalityCase:
        registry = BackboneRegistry()
        registry.register(BackboneCard(name="tiny", ref=f"local-dir:{tiny_bert_dir}", modality="text",
                                       weights="local", max_length=64))
        return ModalityCase(modality=TextModality(), source=text_csv, backbone="tiny", registry=registry,
                            predict_inputs=["a kernel thread", "bake the flour"])


class TestTextModalityOnADatasetsObject(ModalityTestCase):
    @pytest.fixture
    def case(self, tiny_bert_dir) -> ModalityCase:
        import datasets

        from tests.conftest import make_text_rows

        rows = make_text_rows(per_class=5)
        ds = datasets.Dataset.from_dict({"text": [r[0] for r in rows], "label": [r[1] for r in rows]})
        registry = BackboneRegistry()
        registry.register(BackboneCard(name="tiny", ref=f"local-dir:{tiny_bert_dir}", modality="text",
                                       weights="local", max_length=64))
        return ModalityCase(modality=TextModality(), source=ds, backbone="tiny", registry=registry,
                            predict_inputs=["a goal for the team"])


def test_every_registered_modality_has_a_conformance_class() -> None:
    from lepton_automl.plugins import MODALITIES, PluginRegistry

    covered = {cls.__name__ for cls in ModalityTestCase.__subclasses__()}
    for name in PluginRegistry(MODALITIES):
        assert any(name.lower() in c.lower() for c in covered), f"modality {name!r} has no conformance test"
