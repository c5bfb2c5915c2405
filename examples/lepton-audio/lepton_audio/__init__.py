"""An example third-party Lepton plugin: the ``audio`` modality."""

from lepton_audio.modality import AudioModality

__all__ = ["AudioModality"]
