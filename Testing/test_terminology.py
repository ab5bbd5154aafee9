"""Slicer TerminologyEntry strings: exact format, round trips, and agreement with Slicer's own serializer."""

from __future__ import annotations

import pytest

from medautolabel.result import Code, Terminology
from medautolabel.terminology import parse_terminology_entry, parse_terminology_entry_with_contexts, terminology_entry

VESSEL = Terminology(Code("SCT", "123037004", "Anatomical Structure"), Code("SCT", "59820001", "Blood vessel"))
FULL = Terminology(Code("SCT", "49755003", "Morphologically Altered Structure"), Code("SCT", "4147007", "Mass"),
                   type_modifier=Code("SCT", "24028007", "Right"),
                   anatomic_region=Code("SCT", "23451007", "Adrenal gland"))


def test_exact_string_for_a_vessel():
    assert terminology_entry(VESSEL) == (
        "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure"
        "~SCT^59820001^Blood vessel~^^~Anatomic codes - DICOM master list~^^~^^")


@pytest.mark.parametrize("t", [VESSEL, FULL])
def test_round_trip(t):
    text = terminology_entry(t, context="ctx", region_context="rctx")
    assert parse_terminology_entry_with_contexts(text) == (t, "ctx", "rctx")


@pytest.mark.parametrize("text", ["a~b", "ctx~^^~SCT^1^x~^^~r~^^~^^", "ctx~SCT^1~SCT^2^y~^^~r~^^~^^"])
def test_malformed_entries_raise(text):
    with pytest.raises(ValueError):
        parse_terminology_entry(text)


def test_separators_inside_codes_are_refused():
    with pytest.raises(ValueError, match="may not contain"):
        terminology_entry(Terminology(Code("SCT", "1", "a|b"), Code("SCT", "2", "c")))
    with pytest.raises(ValueError, match="may not contain"):
        terminology_entry(Terminology(Code("SCT", "1", "a~b"), Code("SCT", "2", "c")))


@pytest.mark.parametrize("t", [VESSEL, FULL])
def test_agrees_with_slicer_terminologies_logic(t):
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
    from slicercore import close_scene, make_scene

    scene = make_scene()
    try:
        logic = slicer.modules.terminologies.logic()
        ctx, rctx = "Segmentation category and type - DICOM master list", "Anatomic codes - DICOM master list"
        codes = [t.category, t.type, t.type_modifier, t.anatomic_region, None]
        args = [ctx]
        for n, c in enumerate(codes):
            if n == 3:
                args.append(rctx)
            args += ["", "", ""] if c is None else [c.value, c.scheme, c.meaning]  # Slicer's order
        ours = terminology_entry(t, context=ctx, region_context=rctx)
        assert logic.SerializeTerminologyEntry(*args) == ours
        entry = slicer.vtkSlicerTerminologyEntry()
        assert logic.DeserializeTerminologyEntry(ours, entry)
        assert entry.GetTypeObject().GetCodeValue() == t.type.value
        assert entry.GetCategoryObject().GetCodingSchemeDesignator() == t.category.scheme
    finally:
        close_scene(scene)
