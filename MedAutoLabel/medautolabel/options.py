"""How to label: the one set of options carried from every door (CLI, batch, Dask workers, Slicer) to ``label_image``.

Adding an option means adding a field here and using it where it matters; every layer in between
passes the whole object. ``from_mapping`` is the door for options that arrive as data (the Slicer
worker's JSON requests, Dask task arguments): it refuses a field it does not know instead of
dropping it. This module is a noun: it imports nothing of the engine but its errors, so the lists of
devices, precisions and test-time augmentations below are the only ones (runtime/device.py and
catalog/modelcard.py import them from here).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

from medautolabel.errors import MedAutoLabelError

DEVICES = ("auto", "cpu", "cuda", "mps")  # "cuda:N" too
PRECISIONS = ("auto", "float32", "bfloat16", "float16")
TTA_MODES = ("none", "flip", "flip-all")


@dataclass(frozen=True)
class LabelOptions:
    """Options of one labelling run; checked when made, so a bad value fails in one line before any work.

    device: "auto" (CUDA, then MPS, then the CPU), "cpu", "cuda", "cuda:N" or "mps".
    precision: the network's arithmetic: "auto" (float16 on CUDA, bfloat16 on CPUs that compute it
        natively, float32 otherwise), "float32", "bfloat16" or "float16" (CUDA only).
    tta: test-time augmentation overriding the model card's ("none", "flip", "flip-all"); None keeps the card's.
    postprocess: run the card's per-label clean-up.
    low_confidence_threshold: flag segments whose mean confidence is below it (0..1); None: the card's.
    trust: run a MONAI bundle's configs (they can execute Python code; see docs/bundles.md).
    """

    device: str = "auto"
    precision: str = "auto"
    tta: Optional[str] = None
    postprocess: bool = True
    low_confidence_threshold: Optional[float] = None
    trust: bool = False

    def __post_init__(self) -> None:
        """Refuse a value no run could use, whichever door it came through."""
        if not isinstance(self.device, str) or self.device.strip().lower().split(":")[0] not in DEVICES:
            raise MedAutoLabelError(f"unknown device {self.device!r}: expected one of {', '.join(DEVICES)}")
        if not isinstance(self.precision, str) or self.precision.strip().lower() not in PRECISIONS:
            raise MedAutoLabelError(f"unknown precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if self.tta is not None and self.tta not in TTA_MODES:
            raise MedAutoLabelError(f"unknown test-time augmentation {self.tta!r}: use one of {', '.join(TTA_MODES)}")
        t = self.low_confidence_threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t)
                              or not 0.0 <= t <= 1.0):
            raise MedAutoLabelError(f"low-confidence threshold {t!r} is not a number between 0 and 1")
        for name in ("postprocess", "trust"):
            if not isinstance(getattr(self, name), bool):
                raise MedAutoLabelError(f"option {name} must be true or false, not {getattr(self, name)!r}")

    def replace(self, **changes: Any) -> LabelOptions:
        """A copy with ``changes`` (checked like a new object); an unknown name is a TypeError, as for a function."""
        return dataclasses.replace(self, **changes) if changes else self

    def to_mapping(self) -> Dict[str, Any]:
        """The options as JSON-ready data (for the worker protocol and Dask tasks)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> LabelOptions:
        """Options from data; a field this version does not know is refused, never dropped."""
        if not isinstance(data, Mapping):
            raise MedAutoLabelError(f"labelling options must be a mapping of names to values, not {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise MedAutoLabelError(f"unknown labelling option(s): {', '.join(unknown)}")
        return cls(**dict(data))


def make_options(options: Optional[LabelOptions] = None, **changes: Any) -> LabelOptions:
    """``options`` (default: all defaults) with keyword ``changes``: how callers that still pass single
    options (``device="cpu"``, ``tta="flip"``) keep working beside those that pass one object."""
    if options is not None and not isinstance(options, LabelOptions):
        raise TypeError(f"options must be a LabelOptions, not {type(options).__name__} (pass device=... by name)")
    return (options if options is not None else LabelOptions()).replace(**changes)
