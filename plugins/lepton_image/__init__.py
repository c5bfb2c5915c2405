"""The image modality: image folders (one subfolder per class) fed to timm backbones.

Registered by the ``lepton_automl.modalities`` entry point ``image``, like any third-party plugin.
"""

from lepton_image.modality import ImageModality

__all__ = ["ImageModality"]
