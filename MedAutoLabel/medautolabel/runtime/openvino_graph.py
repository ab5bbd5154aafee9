"""A network compiled by OpenVINO for float32 inference on the CPU, its model cached on disk.

OpenVINO fuses each convolution with the normalisation and activation after it, which oneDNN
through PyTorch does not, and that makes a window faster on the CPU than the frozen TorchScript
graph (with the layer rewrites of graph_rewrites.py; figures in docs/benchmarks.md). Converting a
network (tracing and conversion) costs far more than reading a converted one, so the converted
model is kept in the cache folder (``MEDAUTOLABEL_CACHE``, default
``~/.cache/medautolabel``) under a key made of the network's class, structure, weights and window
shape, the rewrites' version and the torch, MONAI and OpenVINO versions, where a later run reads
it. A model is checked against the eager network on one random window when it is built
(RELATIVE_TOLERANCE) and not cached when they disagree. The cache holds weights only, never image
data.

OpenVINO's Python package sends usage events to Google Analytics when it is imported and when it
converts a model, unless a consent file in the user's home says no (openvino_telemetry, opt-out).
MedAutoLabel promises to work offline and to send nothing: ``import_openvino`` makes
``openvino_telemetry`` unimportable before OpenVINO's first import in the process, so OpenVINO
falls back to its own no-op stub; if OpenVINO was imported earlier by someone else with telemetry
live, networks are not converted here (cached models, which need only the runtime, are still used).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Callable, Optional, Tuple

import numpy as np
import torch

from medautolabel.io.atomic import TEMP_PREFIX
from medautolabel.runtime import graph_rewrites
from medautolabel.runtime.device import float32_arithmetic
from medautolabel.runtime.network import first_output

log = logging.getLogger("medautolabel")

CACHE_ENV = "MEDAUTOLABEL_CACHE"
# |compiled - eager| <= this x (1 + the largest |eager| output). OpenVINO orders its sums differently
# (blocked and Winograd convolutions), so on the built-in UNet it differs from eager PyTorch by a
# small fraction of this bound (docs/benchmarks.md). A wrongly converted operation errs by the
# outputs' own scale.
RELATIVE_TOLERANCE = 1e-3

Shape = Tuple[int, ...]


def import_openvino():
    """``openvino``, imported with its usage telemetry replaced by OpenVINO's own no-op stub (see above)."""
    if "openvino" not in sys.modules:
        sys.modules.setdefault("openvino_telemetry", None)  # None in sys.modules: "import" raises ImportError
    import openvino

    return openvino


def telemetry_is_off() -> bool:
    """True when OpenVINO's conversion tools in this process use the no-op telemetry stub."""
    try:
        from openvino.tools.ovc import telemetry_utils
    except Exception:  # noqa: BLE001 - no conversion tools at all: nothing to send with
        return True
    return getattr(telemetry_utils, "tm", None) is None or telemetry_utils.tm.__name__.endswith("telemetry_stub")


def available() -> bool:
    try:
        import_openvino()
    except Exception:  # noqa: BLE001 - not installed, or a broken install: both mean "not available"
        return False
    return True


def cache_root() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medautolabel"
    return Path(os.environ.get(CACHE_ENV) or default)


def network_key(network: torch.nn.Module, shape: Shape) -> str:
    """A digest of everything the converted model depends on: code versions, structure, weights, shape."""
    from importlib import metadata

    h = hashlib.sha256()
    for dist in ("torch", "monai", "openvino"):
        try:
            h.update(f"{dist}={metadata.version(dist)};".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{dist}=none;".encode())
    h.update(f"rewrites={graph_rewrites.VERSION};".encode())
    cls = type(network)
    h.update(f"{cls.__module__}.{cls.__qualname__};{repr(network)};{tuple(shape)};".encode())
    for name, tensor in network.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


def convert_network(network: torch.nn.Module, example: torch.Tensor):
    """The OpenVINO model of ``network`` traced on ``example`` (refused while OpenVINO's telemetry is on)."""
    ov = import_openvino()
    if not telemetry_is_off():
        raise RuntimeError("OpenVINO was imported with its telemetry on; not converting here")

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings
        traced = torch.jit.trace(graph_rewrites.for_openvino(network.eval()), example, check_trace=False)
        # a static input shape (the window's) lets the CPU plugin plan every layer, which makes each window faster
        model = ov.convert_model(traced, example_input=example, input=[tuple(example.shape)])
    return graph_rewrites.rewrite_openvino_model(model)


PRECISION_HINT = "f32"


def compile_model(model, threads: int):
    """``model`` compiled for this CPU in float32, whatever the CPU offers.

    OpenVINO computes in bfloat16 on CPUs with AMX unless told otherwise, so the precision is always
    given (``PRECISION_HINT``). Denormals are flushed to zero: values below 1e-38 cannot move a label.
    """
    ov = import_openvino()
    config = {"INFERENCE_PRECISION_HINT": PRECISION_HINT, "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_NUM_THREADS": int(threads), "CPU_DENORMALS_OPTIMIZATION": True}
    return ov.Core().compile_model(model, "CPU", config)


class CompiledNetwork:
    """Calls an OpenVINO compiled model like the network: (B, C, *roi) float32 tensor -> first output.

    Each thread has its own infer request (OpenVINO runs several at once), so calls from several
    threads neither wait for nor overwrite each other.
    """

    def __init__(self, compiled, shape: Shape) -> None:
        self.shape = tuple(shape)
        self._compiled = compiled
        self._local = threading.local()

    @property
    def precision(self) -> str:
        """The precision OpenVINO computes in (``f32``, ``bf16``, ...), as the compiled model reports it."""
        hint = self._compiled.get_property("INFERENCE_PRECISION_HINT")
        return hint.to_string() if hasattr(hint, "to_string") else str(hint)

    def _infer(self, x: torch.Tensor) -> np.ndarray:
        if tuple(x.shape) != self.shape:
            raise ValueError(f"compiled for windows of shape {self.shape}, got {tuple(x.shape)}")
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        data = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)  # no copy when already so
        # shared: OpenVINO reads ``data`` in place and leaves its output in the request's own buffer
        request.infer({0: data}, share_inputs=True, share_outputs=True)
        return request.get_output_tensor(0).data

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.array(self._infer(x), copy=True))

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        """The output without a copy: the request's buffer, overwritten by this thread's next call."""
        return torch.from_numpy(self._infer(x))


def _agrees(got: torch.Tensor, expected: torch.Tensor) -> bool:
    if got.shape != expected.shape:
        return False
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    return bool((got - expected).abs().max() <= RELATIVE_TOLERANCE * (1.0 + scale))


def _save(model, folder: Path) -> None:
    """Write ``model`` as ``folder``/model.xml + .bin, all or nothing (a temporary folder renamed).

    A cache that cannot be written (read-only home, full disk, another process first) is not an
    error: the compiled network is used all the same, and the next run converts it again.
    """
    ov = import_openvino()
    tmp: Optional[Path] = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        # a folder written whole: atomic_output handles files, so the entry is a temp folder renamed into place
        tmp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, suffix="-" + folder.name, dir=str(folder.parent)))
        ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
        os.replace(tmp, folder)
    except (OSError, RuntimeError) as e:  # RuntimeError: OpenVINO's own write errors
        log.debug("OpenVINO model not cached in %s: %s", folder, e)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def compiled_for_cpu(network: torch.nn.Module, shape: Shape,
                     threads: Optional[int] = None) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """``network`` compiled by OpenVINO for inputs of ``shape`` (from the cache when there), or None.

    None when OpenVINO is missing, cannot convert the network, or disagrees with it on the check window.
    """
    if not available():
        return None
    ov = import_openvino()

    threads = threads or torch.get_num_threads()
    folder = cache_root() / "openvino" / network_key(network, shape)
    if (folder / "model.xml").is_file():
        try:
            return CompiledNetwork(compile_model(ov.Core().read_model(str(folder / "model.xml")), threads), shape)
        except Exception as e:  # noqa: BLE001 - a damaged cache entry is rebuilt
            log.debug("cached OpenVINO model %s unreadable (%s); rebuilding", folder, e)
            shutil.rmtree(folder, ignore_errors=True)
    example = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    try:
        model = convert_network(network, example)
        compiled = CompiledNetwork(compile_model(model, threads), shape)
        with torch.no_grad(), float32_arithmetic():
            expected = first_output(network(example))
        agrees = _agrees(compiled(example), expected)
    except Exception as e:  # noqa: BLE001 - any network OpenVINO cannot take runs another way
        log.debug("no OpenVINO model for %s: %s", type(network).__name__, e)
        return None
    if not agrees:
        log.debug("OpenVINO model of %s disagrees with the eager network", type(network).__name__)
        return None
    _save(model, folder)
    return compiled
