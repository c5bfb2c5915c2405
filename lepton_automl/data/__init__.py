"""Datasets: the labelled-data container, ingest helpers, validation and splits."""

from lepton_automl.data.dataset import LabelledData, Splits
from lepton_automl.data.split import stratified_split

__all__ = ["LabelledData", "Splits", "stratified_split"]
