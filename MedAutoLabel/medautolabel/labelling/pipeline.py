"""``label_image``: one image through a model -> Result (labelmap, segments, classes, provenance)."""

from __future__ import annotations

import dataclasses
import logging
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import numpy as np

from medautolabel import __version__
from medautolabel.catalog.modelcard import ModelCard
from medautolabel.catalog.registry import resolve_model
from medautolabel.errors import Cancelled, InputError
from medautolabel.image import Image
from medautolabel.labelling.classify import classify, evidence_scores
from medautolabel.labelling.inference import infer
from medautolabel.labelling.postprocess import postprocess as postprocess_output
from medautolabel.labelling.preprocess import preprocess, repair_non_finite
from medautolabel.options import LabelOptions, make_options
from medautolabel.result import Result
from medautolabel.runtime.device import resolve_precision, select_device
from medautolabel.runtime.network import file_sha256, load_classifier, load_network

log = logging.getLogger("medautolabel")

ProgressFn = Callable[[float, str], None]
CancelFn = Callable[[], bool]

# share of the progress bar per stage (inference dominates)
_STAGES = {"loading model": (0.0, 0.05), "preprocessing": (0.05, 0.12), "inference": (0.12, 0.92),
           "postprocessing": (0.92, 1.0)}
_MODALITY_ALIASES = {"CT": "CT", "MR": "MR", "MRI": "MR", "PT": "PT", "PET": "PT", "US": "US", "XA": "XA"}


def check_modality(image: Image, card: ModelCard) -> None:
    """Refuse an image whose modality (``image.meta["modality"]``) contradicts the card; unknown is fine."""
    given = _MODALITY_ALIASES.get(str(image.meta.get("modality") or "").strip().upper())
    if given is None or card.modality == "OTHER" or given == card.modality:
        return
    raise InputError(f"the image is {given}, but model {card.id!r} expects {card.modality}",
                     image.meta.get("source_path"))


def check_is_image(image: Image) -> None:
    """Refuse a segmentation or labelmap given as the image (``io.read_image`` records the evidence).

    Labelling label values as if they were intensities gives confident nonsense, never an error.
    """
    evidence = image.meta.get("labelmap_evidence")
    if evidence:
        raise InputError(f"is a segmentation/labelmap, not an image ({evidence})", image.meta.get("source_path"))


def software_versions() -> Dict[str, str]:
    """Versions of the software that shapes a result (read from package metadata, no imports)."""
    from importlib import metadata

    out = {"medautolabel": __version__, "python": platform.python_version()}
    for dist in ("torch", "monai", "SimpleITK", "numpy", "scipy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


class _Progress:
    """Maps stage-local fractions onto 0..1 and never goes backwards (an OOM retry restarts inference)."""

    def __init__(self, callback: Optional[ProgressFn]) -> None:
        self.callback = callback
        self.last = 0.0

    def __call__(self, stage: str, fraction: float) -> None:
        lo, hi = _STAGES[stage]
        value = max(self.last, lo + (hi - lo) * min(max(fraction, 0.0), 1.0))
        self.last = value
        if self.callback is not None:
            self.callback(value, stage)


def label_image(image: Image, model: Union[str, Path, ModelCard], options: Optional[LabelOptions] = None,
                progress: Optional[ProgressFn] = None, cancel: Optional[CancelFn] = None,
                warn: Optional[Callable[[str], None]] = None, **changes: Any) -> Result:
    """Label ``image`` with ``model`` (a ModelCard, model id or model folder) as ``options`` say.

    ``options`` (a ``LabelOptions``, default: all defaults) may be changed for this call by keyword
    (``device="cpu"``, ``tta="flip"``, ``precision="float32"``, ``postprocess=False``,
    ``low_confidence_threshold=0.9``), so that callers passing single options keep working.
    ``progress(fraction, stage)`` gets 0..1; ``cancel()`` returning True stops the run within one
    window batch with ``Cancelled``; ``warn(message)`` hears about fallbacks (default: the
    "medautolabel" logger). A segmentation given as the image and a mostly non-finite image are
    refused; a few non-finite voxels are repaired first. ``provenance["input_repairs"]`` lists what
    was done to the input (non-finite voxels replaced, DICOM slices interpolated), so that no repair
    goes unrecorded.
    """
    options = make_options(options, **changes)
    t_start = time.perf_counter()
    timings: Dict[str, float] = {}
    report = _Progress(progress)
    warn = warn or log.warning

    def check_cancel() -> None:
        if cancel is not None and cancel():
            raise Cancelled()

    def timed(stage: str, t0: float) -> float:
        now = time.perf_counter()
        timings[stage] = round(now - t0, 4)
        return now

    check_is_image(image)
    image, repairs = repair_non_finite(image)
    report("loading model", 0.0)
    card = resolve_model(model)
    if card.inference is not None and options.tta is not None and options.tta != card.inference.tta:
        card = dataclasses.replace(card, inference=dataclasses.replace(card.inference, tta=options.tta))
    check_modality(image, card)
    dev = select_device(options.device)
    resolve_precision(dev, options.precision)  # an unknown or impossible precision fails before any work
    threshold = card.low_confidence_threshold if options.low_confidence_threshold is None \
        else options.low_confidence_threshold
    classifiers = {t.task: load_classifier(card, t, dev) for t in card.classification if t.method == "network"}
    provenance: Dict[str, Any] = {"model": {"id": card.id, "name": card.name, "version": card.version}}
    if card.segments:
        network = load_network(card, dev)
        provenance["model"].update(weights=card.network.weights, weights_sha256=file_sha256(card.weights_path))
    if classifiers:
        provenance["classifiers"] = [
            {"task": t.task, "architecture": t.network.architecture, "region": t.input.region,
             "weights": t.network.weights, "weights_sha256": file_sha256(card.file(t.network.weights))}
            for t in card.classification if t.method == "network"]
    t = timed("load_model", t_start)
    check_cancel()

    evidence: Dict[str, float] = {}
    if card.segments:
        report("preprocessing", 0.0)
        prepared = preprocess(image, card)
        t = timed("preprocess", t)
        check_cancel()

        report("inference", 0.0)
        window_stats: Dict[str, Any] = {}
        logits, used, used_precision = infer(network, prepared.tensor, card.inference, dev,
                                             progress=lambda f: report("inference", f), cancel=cancel, warn=warn,
                                             load_on=lambda d: load_network(card, d), precision=options.precision,
                                             optimise=True, stats=window_stats)
        t = timed("inference", t)
        prepared.tensor = prepared.tensor.new_empty(0)  # free the input tensor: only its geometry is needed now
        check_cancel()

        report("postprocessing", 0.0)
        evidence = evidence_scores(logits, prepared, card)  # before postprocess edits logits
        labelmap, segments = postprocess_output(logits, prepared, card, options.postprocess,
                                              options.low_confidence_threshold)
        del logits
        t = timed("postprocess", t)
        provenance.update({
            "device": used,
            "amp": used_precision != "float32",
            "precision": used_precision,
            "network_runtime": window_stats["network_runtime"],
            "windows": {"computed": window_stats["windows"] - window_stats["windows_reused"],
                        "reused_constant": window_stats["windows_reused"]},
            "test_time_augmentation": card.inference.tta,
            "network_grid": {"shape_kji": list(prepared.net_shape),
                             "spacing_mm": [round(float(s), 6) for s in prepared.net_spacing],
                             "crop_kji": [[s.start, s.stop] for s in prepared.crop]},
        })
    else:  # a classification-only model labels nothing
        labelmap = Image(np.zeros(image.array.shape, dtype=np.uint8), image.ijk_to_ras.copy(), dict(image.meta))
        segments = []
        provenance.update({"device": str(dev), "amp": False, "precision": "float32"})
    report("postprocessing", 0.5)
    classes = classify(card, image, labelmap, dev, evidence, threshold, networks=lambda task: classifiers[task.task])
    t = timed("classify", t)
    timings["total"] = round(t - t_start, 4)
    report("postprocessing", 1.0)

    provenance.update({
        "input_repairs": list(image.meta.get("input_repairs", [])) + repairs,
        "postprocessing": options.postprocess,
        "low_confidence_threshold": threshold,
        "timings_s": timings,
        "software": software_versions(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    return Result(labelmap=labelmap, segments=segments, classifications=classes, provenance=provenance)
