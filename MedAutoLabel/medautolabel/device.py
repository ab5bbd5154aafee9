"""Where the network runs: device choice, mixed precision (float16 on CUDA, bfloat16 on CPUs that
compute it natively), and out-of-memory detection."""

from __future__ import annotations

import contextlib
from typing import ContextManager, Optional, Union

import torch

from .errors import MedAutoLabelError

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "float32", "bfloat16", "float16")


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


def cpu_has_native_bfloat16() -> bool:
    """True when the CPU computes bfloat16 in hardware (x86 AVX512-BF16 or AMX), where it is about twice as
    fast as float32 for 3D convolutions; elsewhere bfloat16 is emulated and slower."""
    try:
        if not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
    except (AttributeError, RuntimeError):
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(device: torch.device, requested: str = "auto") -> str:
    """The precision the network runs in: ``auto`` is float16 on CUDA, bfloat16 on a CPU with native
    bfloat16, float32 otherwise; an explicit choice is kept (float16 only on CUDA)."""
    key = str(requested).strip().lower()
    if key not in PRECISIONS:
        raise MedAutoLabelError(f"unknown precision {requested!r}: expected one of {', '.join(PRECISIONS)}")
    if key == "auto":
        if device.type == "cuda":
            return "float16"
        return "bfloat16" if device.type == "cpu" and cpu_has_native_bfloat16() else "float32"
    if key == "float16" and device.type != "cuda":
        raise MedAutoLabelError(f"float16 runs only on a CUDA GPU, not on {device.type}: use bfloat16 or float32")
    if key == "bfloat16" and device.type not in ("cpu", "cuda"):
        return "float32"
    return key


def autocast(device: torch.device, precision: Optional[str] = None) -> ContextManager:
    """Mixed precision for ``precision`` (None: float16 on CUDA, float32 elsewhere, as in training)."""
    if precision is None:
        precision = "float16" if device.type == "cuda" else "float32"
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if precision == "float16" else torch.bfloat16)


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
