"""Datasets: one in-memory type (``SequenceDataset``) and loaders that produce it.

``load_dataset(path_or_spec)`` is the entry point every CLI uses; it detects the format.
"""

from model.data.benchmark import load_benchmark, write_benchmark
from model.data.dataset import DataFormatError, EvalSplit, SequenceDataset
from model.data.loading import detect_format, load_dataset
from model.data.synthetic import generate_synthetic

__all__ = [
    "DataFormatError",
    "EvalSplit",
    "SequenceDataset",
    "detect_format",
    "generate_synthetic",
    "load_benchmark",
    "load_dataset",
    "write_benchmark",
]
