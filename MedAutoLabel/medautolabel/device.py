"""Where the network runs: device choice, mixed precision on CUDA, and out-of-memory detection."""

from __future__ import annotations

import contextlib
from typing import ContextManager, Union

import torch

from .errors import MedAutoLabelError

DEVICES = ("auto", "cpu", "cuda", "mps")


class DeviceError(MedAutoLabelError):
    """The requested device does not exist on this machine."""


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def select_device(name: Union[str, torch.device] = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; a forced device must exist."""
    if isinstance(name, torch.device):
        name = str(name)
    key = str(name).strip().lower()
    base = key.split(":")[0]
    if base not in DEVICES:
        raise DeviceError(f"unknown device {name!r}: expected one of {', '.join(DEVICES)}")
    if base == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if base == "cuda" and not torch.cuda.is_available():
        raise DeviceError("no CUDA GPU found: use device 'auto' or 'cpu'")
    if base == "mps" and not _mps_available():
        raise DeviceError("no Apple MPS device found: use device 'auto' or 'cpu'")
    return torch.device(key)


def autocast(device: torch.device) -> ContextManager:
    """float16 autocast on CUDA (AMP); a no-op elsewhere (CPU/MPS run float32)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def is_out_of_memory(error: BaseException) -> bool:
    """True for a GPU out-of-memory error (worth retrying with a smaller batch or on the CPU)."""
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(error, oom):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower() and "CUDA" in str(error)


def empty_cache(device: torch.device) -> None:
    """Return cached GPU memory after an out-of-memory error."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
