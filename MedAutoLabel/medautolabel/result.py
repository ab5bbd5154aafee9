"""What a labelling run returns: a labelmap on the input grid, per-segment facts, tags, provenance."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from medautolabel.image import Image


@dataclass
class Code:
    """One coded concept, e.g. ``Code("SCT", "59820001", "Blood vessel")``."""

    scheme: str
    value: str
    meaning: str


@dataclass
class Terminology:
    """DICOM/Slicer terminology of a segment: category and type (SNOMED-CT), optional modifier/region."""

    category: Code
    type: Code
    type_modifier: Optional[Code] = None
    anatomic_region: Optional[Code] = None


@dataclass
class SegmentInfo:
    label_value: int
    name: str
    color: Tuple[float, float, float]  # 0..1 RGB
    terminology: Terminology
    voxel_count: int = 0
    volume_ml: float = 0.0
    mean_confidence: float = 0.0  # mean winning-class probability over the segment's voxels
    low_confidence: bool = False  # mean_confidence below the model card's threshold


@dataclass
class Classification:
    """An image-level finding, e.g. task "aneurysm": label "present", probability 0.93."""

    task: str
    label: str
    probability: float  # probability of ``label``
    probabilities: Dict[str, float] = field(default_factory=dict)  # every class of the task
    low_confidence: bool = False
    method: str = ""  # what made the tag (the card's method, e.g. "voxel_evidence")
    validated: bool = True  # False: the tag missed its validation targets and is shown as "not validated"


@dataclass
class Result:
    labelmap: Image  # uint8 label values on the input image's own grid
    segments: List[SegmentInfo]
    classifications: List[Classification] = field(default_factory=list)
    provenance: Dict[str, Any] = field(default_factory=dict)

    def facts(self) -> Dict[str, Any]:
        """JSON-ready summary (no voxels): what ``<stem>.tags.json`` holds."""
        return {
            "classifications": [asdict(c) for c in self.classifications],
            "segments": [asdict(s) for s in self.segments],
            "provenance": self.provenance,
        }


def repair_notes(provenance: Dict[str, Any]) -> List[str]:
    """One sentence per ``provenance["input_repairs"]`` record: what was changed in the input before labelling.

    For people reading the result (the Slicer panel, a summary line): interpolated slices and
    replaced voxels are not measured data, and a reader of the labels must be able to know.
    """
    notes = []
    for r in provenance.get("input_repairs", []) or []:
        problem = str(r.get("problem", "input repaired"))
        if problem == "non-finite voxels":
            notes.append(f"{r.get('count')} NaN/infinite voxels replaced by {r.get('replaced_by')} (the lowest value)")
        elif problem == "missing DICOM slices":
            gaps = ", ".join(f"{g['gap_mm']:g} mm after slice {g['after_slice']}" for g in r.get("gaps", []))
            notes.append(f"{r.get('missing_slices')} missing DICOM slice(s) interpolated ({gaps}; "
                         f"slices {r.get('slice_spacing_mm'):g} mm apart)")
        else:
            notes.append(f"{problem}: {r.get('detail') or r.get('replaced_by', '')}".rstrip(": "))
    return notes


def _code(d: Optional[Dict[str, Any]]) -> Optional[Code]:
    return None if not d else Code(str(d["scheme"]), str(d["value"]), str(d["meaning"]))


def result_from_facts(labelmap: Image, facts: Dict[str, Any]) -> Result:
    """Rebuild a Result from its labelmap and ``Result.facts()`` (e.g. a ``tags.json`` read back)."""
    segments = []
    for s in facts.get("segments", []):
        t = s["terminology"]
        terminology = Terminology(_code(t["category"]), _code(t["type"]), _code(t.get("type_modifier")),
                                  _code(t.get("anatomic_region")))
        segments.append(SegmentInfo(int(s["label_value"]), s["name"], tuple(s["color"]), terminology,
                                    int(s.get("voxel_count", 0)), float(s.get("volume_ml", 0.0)),
                                    float(s.get("mean_confidence", 0.0)), bool(s.get("low_confidence", False))))
    classes = [Classification(c["task"], c["label"], float(c["probability"]), dict(c.get("probabilities", {})),
                              bool(c.get("low_confidence", False)), str(c.get("method", "")),
                              bool(c.get("validated", True))) for c in facts.get("classifications", [])]
    return Result(labelmap, segments, classes, dict(facts.get("provenance", {})))
