"""Dependencies inside Slicer: find what the engine needs and is missing, and install it on request.

torch goes through the PyTorch extension's ``PyTorchUtils`` when it is installed (it picks the CUDA
build that fits the driver), else pip. Packages Slicer ships (numpy, SimpleITK, requests, ...) are
never reinstalled or upgraded.
"""

from __future__ import annotations

import importlib.util
import socket
from typing import Callable, Dict, List, Optional

# import name -> pip requirement (lower bounds only, as Slicer's guidelines ask)
REQUIRED: Dict[str, str] = {
    "torch": "torch>=2.0",
    "monai": "monai>=1.3",
    "nibabel": "nibabel>=5.0",
    "nrrd": "pynrrd>=1.0",
    "pydicom": "pydicom>=2.4",
    "h5py": "h5py>=3.8",
    "tqdm": "tqdm>=4.60",
    "scipy": "scipy>=1.10",
    "PIL": "Pillow>=9.0",
    "openvino": "openvino>=2024.0",
}
SHIPPED_WITH_SLICER = ("numpy", "SimpleITK", "requests", "vtk", "slicer")
INDEX_HOST = ("pypi.org", 443)


class NoNetwork(RuntimeError):
    """pip cannot reach the package index."""


def missing_packages(find_spec: Callable[[str], object] = importlib.util.find_spec) -> List[str]:
    """Requirements of the engine whose import name is not importable here."""
    return [req for name, req in REQUIRED.items() if find_spec(name) is None]


def network_available(host=INDEX_HOST, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection(host, timeout=timeout):
            return True
    except OSError:
        return False


def _pip_install(requirements: List[str]) -> None:
    import slicer

    try:
        from slicer import packaging  # Slicer 5.12+
    except ImportError:  # up to 5.10: pip's default "only-if-needed" leaves satisfied packages alone
        slicer.util.pip_install(requirements)
        return
    packaging.pip_install(requirements, skip_packages=list(SHIPPED_WITH_SLICER))


def install(requirements: List[str], confirm: Optional[Callable[[str], bool]] = None,
            check_network: Callable[[], bool] = network_available) -> bool:
    """Install ``requirements`` after ``confirm(message)`` agrees; returns False when the user declines.

    Raises NoNetwork with a clear message when the package index cannot be reached.
    """
    if not requirements:
        return True
    names = ", ".join(requirements)
    if confirm is not None and not confirm(f"MedAutoLabel needs these Python packages: {names}. Install them now? "
                                           "This can take several minutes (PyTorch is large)."):
        return False
    if not check_network():
        raise NoNetwork(f"Cannot reach {INDEX_HOST[0]} to install {names}: connect to the internet, or install "
                        "them offline with Slicer's pip (PythonSlicer -m pip install <wheel files>).")
    rest = [r for r in requirements if not r.startswith("torch")]
    if len(rest) != len(requirements):
        try:
            import PyTorchUtils  # the PyTorch extension

            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=">=2.0") \
                    is None:
                return False
        except ImportError:
            rest.insert(0, REQUIRED["torch"])
    if rest:
        _pip_install(rest)
    return True
