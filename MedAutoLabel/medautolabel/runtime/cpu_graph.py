"""The fastest checked form of a network for float32 inference on the CPU, built once per window shape.

In order of preference (``MEDAUTOLABEL_CPU_RUNTIME`` = ``auto``, ``openvino``, ``torchscript`` or
``pytorch`` picks one):

- ``openvino``: the network compiled by OpenVINO, cached on disk (openvino_graph.py);
- ``torchscript-frozen``: ``torch.jit.trace`` + ``freeze`` + ``optimize_for_inference`` fold the
  weights into the graph and let oneDNN pre-pack the convolution weights once instead of at every
  call, which makes each window cheaper than the eager network (docs/benchmarks.md);
- ``pytorch``: the network itself.

Each compiled form is checked against the eager network on one random window before it is used;
one that cannot be built, or disagrees, gives way to the next. Results are cached per network
object and window shape.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
import weakref
from typing import Callable, Dict, Optional, Tuple

import torch

from medautolabel.runtime.device import float32_arithmetic
from medautolabel.runtime.network import first_output

log = logging.getLogger("medautolabel")

Shape = Tuple[int, ...]
Runner = Callable[[torch.Tensor], torch.Tensor]
RUNTIME_ENV = "MEDAUTOLABEL_CPU_RUNTIME"
RUNTIMES = ("auto", "openvino", "torchscript", "pytorch")
compiled_graphs: weakref.WeakKeyDictionary[torch.nn.Module, Dict[Shape, Tuple[Runner, str]]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()
TOLERANCE = 1e-3  # largest |graph - eager| accepted on the check window (network outputs are logits)


def requested_runtime() -> str:
    value = os.environ.get(RUNTIME_ENV, "auto").strip().lower() or "auto"
    if value not in RUNTIMES:
        log.warning("%s=%r is not one of %s; using auto", RUNTIME_ENV, value, ", ".join(RUNTIMES))
        return "auto"
    return value


def build_graph(network: torch.nn.Module, shape: Shape) -> Optional[torch.jit.ScriptModule]:
    """The frozen, inference-optimised TorchScript graph of ``network`` for inputs of ``shape``; None if that fails."""
    generator = torch.Generator().manual_seed(0)
    example = torch.rand(shape, generator=generator)
    try:
        with torch.no_grad(), warnings.catch_warnings(), float32_arithmetic():
            warnings.simplefilter("ignore")  # tracer and TorchScript deprecation warnings
            traced = torch.jit.trace(network.eval(), example, check_trace=False)
            graph = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
            expected, got = first_output(network(example)), first_output(graph(example))
    except Exception as e:  # noqa: BLE001 - any network the tracer cannot handle simply runs eagerly
        log.debug("no frozen CPU graph for %s: %s", type(network).__name__, e)
        return None
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=0, atol=TOLERANCE):
        log.debug("frozen CPU graph for %s disagrees with the eager network; running eagerly", type(network).__name__)
        return None
    return graph


def _build(network: torch.nn.Module, shape: Shape, runtime: str) -> Tuple[Runner, str]:
    if runtime in ("auto", "openvino"):
        from medautolabel.runtime.openvino_graph import compiled_for_cpu

        compiled = compiled_for_cpu(network, shape)
        if compiled is not None:
            return compiled, "openvino"
    if runtime in ("auto", "openvino", "torchscript"):
        graph = build_graph(network, shape)
        if graph is not None:
            return graph, "torchscript-frozen"
    return network, "pytorch"


def frozen_for_cpu(network: torch.nn.Module, shape: Shape) -> Tuple[Runner, str]:
    """The fastest checked runner of ``network`` for windows of ``shape`` (built once) and its runtime's name."""
    shape = tuple(int(s) for s in shape)
    runtime = requested_runtime()
    key = shape + (runtime,)
    with _lock:
        per_shape = compiled_graphs.setdefault(network, {})
        if key in per_shape:
            return per_shape[key]
    built = _build(network, shape, runtime)
    with _lock:
        compiled_graphs[network][key] = built
    return built
