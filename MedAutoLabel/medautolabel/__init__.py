"""MedAutoLabel engine: automatic labelling of medical images (no Slicer imports here)."""

__version__ = "0.1.0"
