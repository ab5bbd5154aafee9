"""Sliding-window inference with progress, cancellation, AMP on CUDA and out-of-memory fallback."""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from medautolabel.catalog.modelcard import InferenceSpec
from medautolabel.errors import Cancelled, MedAutoLabelError
from medautolabel.runtime.device import autocast, empty_cache, is_out_of_memory, resolve_precision
from medautolabel.runtime.network import first_output

ProgressFn = Callable[[float], None]
CancelFn = Callable[[], bool]
WarnFn = Callable[[str], None]


def window_count(image_size: Sequence[int], roi_size: Sequence[int], overlap: float) -> int:
    """How many windows MONAI's ``sliding_window_inference`` visits (for progress reporting)."""
    from medautolabel.labelling.cpu_sliding_window import window_slices

    size = [max(int(s), int(r)) for s, r in zip(image_size, roi_size)]
    return len(window_slices(size, [int(r) for r in roi_size], overlap))


def tta_flips(mode: str) -> List[Tuple[int, ...]]:
    """Spatial dims (of a (B, C, z, y, x) batch) to flip for each extra pass of ``mode``."""
    if mode == "flip":
        return [(2,), (3,), (4,)]
    if mode == "flip-all":
        return [(2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
    return []


FROZEN_GRAPH_MIN_WINDOWS = 8  # below this, building and checking the frozen CPU graph costs more than it saves


SAMPLE_STEP = 1009  # a prime: the sample does not line up with the window's rows


def constant_value(window: torch.Tensor) -> Optional[Tuple[float, ...]]:
    """The per-channel values of a (C, *spatial) window that is constant in every channel, else None."""
    flat = window.reshape(window.shape[0], -1)
    sample = flat[:, ::SAMPLE_STEP]  # a window with anatomy differs within a sparse sample: no full pass
    if not bool(torch.equal(sample.amin(dim=1), sample.amax(dim=1))):
        return None
    low, high = flat.amin(dim=1), flat.amax(dim=1)  # separate passes: cheaper on the CPU than torch.aminmax
    if not bool(torch.equal(low, high)):
        return None
    return tuple(float(v) for v in low.tolist())


def sliding_window(network: torch.nn.Module, tensor: torch.Tensor, spec: InferenceSpec,
                   device: torch.device, sw_batch_size: Optional[int] = None,
                   output_device: Optional[torch.device] = None, progress: Optional[ProgressFn] = None,
                   cancel: Optional[CancelFn] = None, precision: Optional[str] = None,
                   optimise: bool = False, stats: Optional[Dict[str, Any]] = None) -> torch.Tensor:
    """One sliding-window pass: (1, C_in, *spatial) -> (C_out, *spatial) float32 on ``output_device``.

    ``precision`` (see device.resolve_precision; None: float16 on CUDA, float32 elsewhere) is the
    network's; windows are always blended in float32.
    ``cancel`` is checked before every window batch (raises Cancelled); ``progress`` gets the
    fraction of window batches done, ending at 1.0.
    ``optimise`` (for real networks, not for modules with side effects): windows that are constant in
    every channel (air, padding) are computed once per constant and reused, which gives exactly
    the same output; in float32 on the CPU the network runs compiled (cpu_graph.py: OpenVINO or a
    frozen TorchScript graph) when there are enough windows to pay for building it, and the windows
    are blended by cpu_sliding_window.py (MONAI's windows and weights, one pass per window;
    elsewhere MONAI's ``sliding_window_inference`` blends them). ``stats`` (a
    dict) gets ``network_runtime`` ("openvino", "torchscript-frozen" or "pytorch"), ``windows`` and
    ``windows_reused``.
    """
    from monai.inferers import sliding_window_inference

    from medautolabel.labelling.cpu_sliding_window import sliding_window_cpu

    batch = int(sw_batch_size or spec.sw_batch_size)
    roi = [int(r) for r in spec.roi_size]
    windows_total = window_count(tensor.shape[2:], roi, spec.overlap)
    total = max(math.ceil(windows_total / batch), 1)
    done = [0]

    flips = tta_flips(spec.tta)
    run, runtime = network, "pytorch"
    if optimise and device.type == "cpu" and precision in (None, "float32") and windows_total >= FROZEN_GRAPH_MIN_WINDOWS:
        from medautolabel.runtime.cpu_graph import frozen_for_cpu

        run, runtime = frozen_for_cpu(network, (batch, int(tensor.shape[1]), *roi))
    constant_outputs: Dict[Tuple[float, ...], torch.Tensor] = {}
    reused = [0]

    shared = getattr(run, "shared", None)  # a compiled network's output buffer, valid until its next call
    fast_blend = optimise and device.type == "cpu" and (output_device is None or output_device.type == "cpu")

    def forward(windows: torch.Tensor, transient: bool = False) -> torch.Tensor:
        """The network's output for ``windows``; ``transient``: may be a buffer the next call overwrites."""
        fn = run if windows.shape[0] == batch else network  # the graph was traced for full batches
        if transient and fast_blend and shared is not None and fn is run:
            return shared(windows)
        with autocast(device, precision):
            out = first_output(fn(windows))  # deep-supervision networks return several heads
        return out.float()

    def predict(windows: torch.Tensor) -> torch.Tensor:
        out = forward(windows, transient=not flips)
        for dims in flips:  # test-time augmentation: the mean of the flipped passes, flipped back
            out += torch.flip(forward(torch.flip(windows, dims), transient=True), dims)
        return out / (1 + len(flips)) if flips else out

    def predict_reusing_constant_windows(windows: torch.Tensor) -> torch.Tensor:
        keys = [constant_value(w) for w in windows]
        todo = [n for n, k in enumerate(keys) if k not in constant_outputs]  # None (not constant) is never a key
        if len(todo) == len(keys):
            out = predict(windows)
        else:
            computed = dict(zip(todo, predict(windows[todo]))) if todo else {}
            out = torch.stack([computed[n] if n in computed else constant_outputs[k] for n, k in enumerate(keys)])
            reused[0] += len(keys) - len(todo)
        for k, window_out in zip(keys, out):
            if k is not None and k not in constant_outputs:
                constant_outputs[k] = window_out.clone()
        return out

    def predictor(windows: torch.Tensor) -> torch.Tensor:
        if cancel is not None and cancel():
            raise Cancelled()
        if optimise:  # MONAI passes a single window as a strided view: copied once here, not in every check
            out = predict_reusing_constant_windows(windows.contiguous())
        else:
            out = predict(windows)
        done[0] += 1
        if progress is not None:
            progress(min(done[0] / total, 1.0))
        return out

    with torch.inference_mode():
        if fast_blend:
            out = sliding_window_cpu(tensor.float(), roi, batch, predictor, overlap=spec.overlap, mode=spec.blend)
        else:
            out = sliding_window_inference(
                tensor, roi, batch, predictor, overlap=spec.overlap, mode=spec.blend,
                sw_device=device, device=output_device or device)
    if stats is not None:
        stats.update(network_runtime=runtime, windows=windows_total,
                     windows_reused=reused[0])
    return out[0].float()


def infer(network: torch.nn.Module, tensor: torch.Tensor, spec: InferenceSpec, device: torch.device,
          progress: Optional[ProgressFn] = None, cancel: Optional[CancelFn] = None,
          warn: Optional[WarnFn] = None,
          load_on: Optional[Callable[[torch.device], torch.nn.Module]] = None,
          precision: str = "auto", optimise: bool = False,
          stats: Optional[Dict[str, Any]] = None) -> Tuple[torch.Tensor, str, str]:
    """Run the sliding window, retrying after a GPU out-of-memory error (``optimise``, ``stats``: see sliding_window).

    Fallback order: halve the window batch down to 1, then keep the stitched output on the CPU,
    then run entirely on the CPU (``load_on(cpu)`` gives the network there). Each step is
    announced through ``warn``. Returns the (C, *spatial) float32 CPU tensor, the device used and the
    precision the network ran in (``precision`` resolved for that device).
    """
    plans: List[Tuple[torch.device, int, torch.device]] = []
    batch = spec.sw_batch_size
    while True:
        plans.append((device, batch, device))
        if batch == 1:
            break
        batch = max(batch // 2, 1)
    if device.type != "cpu":
        cpu = torch.device("cpu")
        plans += [(device, 1, cpu), (cpu, spec.sw_batch_size, cpu)]
    net = network
    for n, (sw_dev, batch, out_dev) in enumerate(plans):
        if sw_dev.type == "cpu" and device.type != "cpu":
            net = load_on(sw_dev) if load_on is not None else network.to(sw_dev)
        try:
            used = resolve_precision(sw_dev, precision)
            out = sliding_window(net, tensor, spec, sw_dev, batch, out_dev, progress, cancel, used, optimise, stats)
            return out.cpu(), str(sw_dev), used
        except Exception as e:  # only out-of-memory errors are retried
            if not is_out_of_memory(e) or n == len(plans) - 1:
                if is_out_of_memory(e):
                    raise MedAutoLabelError("out of memory even with the smallest window batch on the CPU; "
                                            "close other programs or use a smaller image") from None
                raise
            empty_cache(sw_dev)
            nxt = plans[n + 1]
            if warn is not None:
                where = "the CPU" if nxt[0].type == "cpu" else f"{nxt[0]} (output kept on {nxt[2]})"
                warn(f"out of memory on {sw_dev} with {batch} window(s) per batch; "
                     f"retrying with {nxt[1]} on {where}")
    raise AssertionError("unreachable")
