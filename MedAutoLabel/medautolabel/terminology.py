"""Slicer ``TerminologyEntry`` tag strings <-> ``result.Terminology``.

Format (Slicer's ``vtkSlicerTerminologiesModuleLogic::SerializeTerminologyEntry``): seven parts joined
by ``~`` -- context ~ category ~ type ~ typeModifier ~ regionContext ~ region ~ regionModifier --
each coded part ``scheme^value^meaning`` (``^^`` when empty), e.g.::

    Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure~
    SCT^59820001^Blood vessel~^^~Anatomic codes - DICOM master list~^^~^^      (one line)
"""

from __future__ import annotations

from typing import Optional, Tuple

from medautolabel.result import Code, Terminology

TAG_NAME = "TerminologyEntry"  # vtkSegment::GetTerminologyEntryTagName()
SLICER_ANATOMY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
DICOM_MASTER_CONTEXT = "Segmentation category and type - DICOM master list"
ANATOMIC_REGION_CONTEXT = "Anatomic codes - DICOM master list"
# vtkSegment's default for a new segment: Tissue / Tissue
DEFAULT_TERMINOLOGY = Terminology(Code("SCT", "85756007", "Tissue"), Code("SCT", "85756007", "Tissue"))

_FORBIDDEN = ("~", "^", "|", "\n", "\r")  # separators of the entry, of codes, and of segment tags


def _code(code: Optional[Code]) -> str:
    if code is None:
        return "^^"
    parts = (code.scheme, code.value, code.meaning)
    for part in parts:
        if any(ch in str(part) for ch in _FORBIDDEN):
            raise ValueError(f"terminology code {part!r} may not contain any of ~ ^ | or line breaks")
    return "^".join(str(p) for p in parts)


def terminology_entry(terminology: Terminology, context: str = SLICER_ANATOMY_CONTEXT,
                      region_context: str = ANATOMIC_REGION_CONTEXT) -> str:
    """The ``TerminologyEntry`` tag value for ``terminology`` (region modifier left empty)."""
    for name in (context, region_context):
        if any(ch in name for ch in _FORBIDDEN):
            raise ValueError(f"terminology context {name!r} may not contain any of ~ ^ | or line breaks")
    t = terminology
    return "~".join([context, _code(t.category), _code(t.type), _code(t.type_modifier), region_context,
                     _code(t.anatomic_region), "^^"])


def _parse_code(part: str, what: str, entry: str) -> Optional[Code]:
    fields = part.split("^")
    if len(fields) != 3:
        raise ValueError(f"malformed {what} {part!r} in terminology entry {entry!r}")
    if not any(fields):
        return None
    return Code(*fields)


def parse_terminology_entry_with_contexts(entry: str) -> Tuple[Terminology, str, str]:
    """Parse a ``TerminologyEntry`` string into (Terminology, context name, region context name)."""
    parts = entry.split("~")
    if len(parts) != 7:
        raise ValueError(f"a terminology entry has 7 '~'-separated parts, got {len(parts)}: {entry!r}")
    category = _parse_code(parts[1], "category", entry)
    type_ = _parse_code(parts[2], "type", entry)
    if category is None or type_ is None:
        raise ValueError(f"terminology entry without category or type: {entry!r}")
    terminology = Terminology(category, type_, _parse_code(parts[3], "type modifier", entry),
                              _parse_code(parts[5], "region", entry))
    _parse_code(parts[6], "region modifier", entry)  # validated; Terminology has no field for it
    return terminology, parts[0], parts[4]


def parse_terminology_entry(entry: str) -> Terminology:
    """Parse a ``TerminologyEntry`` string; raise ``ValueError`` if it is malformed."""
    return parse_terminology_entry_with_contexts(entry)[0]
