"""Conformance suites shipped with the package, so that every implementation runs the same tests.

A plugin author's test is a subclass and one fixture::

    from lepton_automl.testing import ModalityCase, ModalityTestCase

    class TestMyModality(ModalityTestCase):
        @pytest.fixture
        def case(self, tmp_path):
            return ModalityCase(modality=MyModality(), source=make_data(tmp_path), backbone="efficientnet_lite0")
"""

from lepton_automl.testing.modality import ModalityCase, ModalityTestCase

__all__ = ["ModalityCase", "ModalityTestCase"]
