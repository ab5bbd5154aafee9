"""The slicer-core scene helper: segment arrays round-trip through Slicer's own classes."""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (CPython 3.11 wheel only)")
from slicercore import close_scene, make_scene, module_logic  # noqa: E402  (after the importorskip)


def test_scene_has_logics_and_segments_round_trip():
    scene = make_scene()
    try:
        assert slicer.mrmlScene is scene
        assert slicer.modules.segmentations.logic() is module_logic(scene, "Segmentations")
        assert slicer.modules.volumes.logic().GetMRMLScene() is scene
        ijk_to_ras = np.array([[-0.7, 0, 0, 10], [0, 0, 2.5, -3], [0, 1.2, 0, 4], [0, 0, 0, 1]])
        vol = slicer.util.addVolumeFromArray(np.zeros((4, 5, 6), np.int16), ijkToRAS=ijk_to_ras)
        seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        seg.SetReferenceImageGeometryParameterFromVolumeNode(vol)
        sid = seg.GetSegmentation().AddEmptySegment("a", "A")
        mask = np.zeros((4, 5, 6), np.uint8)
        mask[1:3, 2, 3:5] = 1
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask, seg, sid, vol)
        np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(seg, sid, vol), mask)
    finally:
        close_scene(scene)
    assert slicer.mrmlScene is None
