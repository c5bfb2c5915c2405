"""The text modality: labelled text tables fed to transformers encoders with mean pooling.

Registered by the ``lepton_automl.modalities`` entry point ``text``, like any third-party plugin.
"""

from lepton_text.modality import TextModality

__all__ = ["TextModality"]
