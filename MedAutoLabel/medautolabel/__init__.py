"""MedAutoLabel engine: automatic labelling of medical images (no Slicer imports here)."""

from medautolabel._version import __version__

__all__ = ["__version__"]
