"""Datasets: one in-memory type (``SequenceDataset``) and loaders that produce it."""

from model.data.dataset import EvalSplit, SequenceDataset

__all__ = ["EvalSplit", "SequenceDataset"]
