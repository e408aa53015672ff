"""fair-export: FAIR checkpoint -> verified, versioned ONNX model bundle (``export.bundle`` is torch-free)."""

__version__ = "0.1.0"
