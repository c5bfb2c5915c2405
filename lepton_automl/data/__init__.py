"""Datasets: the labelled-data container, ingest helpers, validation and splits."""

from lepton_automl.data.dataset import LabelledData, Splits
from lepton_automl.data.split import split_data, stratified_split

__all__ = ["LabelledData", "Splits", "split_data", "stratified_split"]
