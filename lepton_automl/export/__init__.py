"""Export: ONNX, safetensors and model card writing, and loading an export to predict."""

from lepton_automl.export.artifact import Predictor, load_metadata, save_artifact

__all__ = ["Predictor", "load_metadata", "save_artifact"]
