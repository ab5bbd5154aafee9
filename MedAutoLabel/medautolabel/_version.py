"""The version of medautolabel, written here and nowhere else.

pyproject.toml reads it (``[tool.setuptools.dynamic]``) when the package is built, and
``medautolabel.__version__`` imports it, so an installed package and a source tree that Slicer loads
from the extension folder (where there is no dist-info) report the same version.
"""

__version__ = "0.1.0"
