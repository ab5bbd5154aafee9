"""Where the network runs: device choice, mixed precision (float16 on CUDA, bfloat16 on CPUs that
compute it natively), float32 that is float32 on every backend, and out-of-memory detection.

Libraries pick a lower precision behind a float32 request when the hardware offers one: cuDNN
convolutions default to TF32 on recent GPUs, and oneDNN may compute float32 convolutions and
products in bfloat16 on CPUs with AMX when told to. ``float32_arithmetic`` pins them to IEEE float32
for the duration of a computation, so "float32" means the same numbers on every machine.
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Dict, Iterator, Optional, Union

import torch

from medautolabel.errors import MedAutoLabelError
from medautolabel.options import DEVICES, PRECISIONS


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
    """True when the CPU computes bfloat16 in hardware (x86 AVX512-BF16 or AMX), where it is faster than
    float32 for 3D convolutions; elsewhere bfloat16 is emulated and slower."""
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


FP32_BACKENDS = ("mkldnn.conv", "mkldnn.matmul", "cudnn.conv", "cuda.matmul")


def fp32_backends() -> Dict[str, Any]:
    """The backends whose float32 arithmetic has a precision setting (``fp32_precision``) in this torch."""
    found = {}
    for name in FP32_BACKENDS:
        backend: Any = torch.backends
        for part in name.split("."):
            backend = getattr(backend, part, None)
        if isinstance(getattr(backend, "fp32_precision", None), str):
            found[name] = backend
    return found


def float32_precisions() -> Dict[str, str]:
    """The float32 precision each backend computes in now (``ieee`` is true float32), for checks and logs."""
    return {name: backend.fp32_precision for name, backend in fp32_backends().items()}


@contextlib.contextmanager
def float32_arithmetic() -> Iterator[None]:
    """Convolutions and matrix products in IEEE float32 on every backend (no TF32, no bfloat16) inside the block.

    The settings are process-wide in torch; they are restored when the block ends. On a torch without
    per-backend settings (before 2.9) the older TF32 switches are turned off instead.
    """
    backends = list(fp32_backends().values())
    if backends:
        saved = [b.fp32_precision for b in backends]
        try:
            for b in backends:
                b.fp32_precision = "ieee"
            yield
        finally:
            for b, value in zip(backends, saved):
                b.fp32_precision = value
        return
    saved_tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved_tf32


def autocast(device: torch.device, precision: Optional[str] = None) -> ContextManager:
    """Arithmetic for ``precision`` (None: float16 on CUDA, float32 elsewhere, as in training): float16 or
    bfloat16 autocast, or ``float32_arithmetic`` for float32."""
    if precision is None:
        precision = "float16" if device.type == "cuda" else "float32"
    if precision == "float32":
        return float32_arithmetic()
    return torch.autocast(device.type, dtype=torch.float16 if precision == "float16" else torch.bfloat16)


def is_out_of_memory(error: BaseException) -> bool:
    """True for a GPU out-of-memory error (worth retrying with a smaller batch or on the CPU)."""
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(error, oom):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower() and "CUDA" in str(error)


def is_host_out_of_memory(error: BaseException) -> bool:
    """True when the machine's own memory ran out: Python's MemoryError or torch's CPU allocator failing."""
    if isinstance(error, MemoryError):
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


def empty_cache(device: torch.device) -> None:
    """Return cached GPU memory after an out-of-memory error."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
