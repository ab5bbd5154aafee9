"""The version is written once (medautolabel/_version.py) and every reader agrees with it."""

from importlib import metadata
from pathlib import Path

import pytest

import medautolabel

ROOT = Path(__file__).resolve().parent.parent


def test_version_is_the_installed_distributions():
    assert medautolabel.__version__ == metadata.version("medautolabel")


def test_pyproject_reads_the_version_from_the_package():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "medautolabel._version.__version__"}
    read_configuration = pytest.importorskip("setuptools.config.pyprojecttoml").read_configuration
    assert read_configuration(ROOT / "pyproject.toml", expand=True)["project"]["version"] == medautolabel.__version__
