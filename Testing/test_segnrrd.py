"""``.seg.nrrd`` written by the engine, read by Slicer's own storage node (slicer-core) and by slicerio."""

from __future__ import annotations

import re

import numpy as np
import pytest
import slicerio

from medautolabel.errors import InputError
from medautolabel.image import Image, make_ijk_to_ras
from medautolabel.io.segnrrd import read_seg_nrrd, seg_nrrd_header, write_seg_nrrd
from medautolabel.result import Code, SegmentInfo, Terminology
from medautolabel.terminology import terminology_entry

STRUCTURE = Code("SCT", "123037004", "Anatomical Structure")
SEGMENTS = [
    SegmentInfo(1, "Vessel", (0.85, 0.25, 0.2), Terminology(STRUCTURE, Code("SCT", "59820001", "Blood vessel"))),
    SegmentInfo(2, "Nerve", (0.95, 0.85, 0.3), Terminology(STRUCTURE, Code("SCT", "3057000", "Nerve"),
                                                           anatomic_region=Code("SCT", "69536005", "Head"))),
    SegmentInfo(4, "Aneurysm", (0.2, 0.4, 1.0),  # never present in the labelmap: an empty segment
                Terminology(Code("SCT", "49755003", "Morphologically Altered Structure"),
                            Code("SCT", "432119003", "Aneurysm"))),
]
_ROT = np.linalg.qr(np.array([[2.0, 1, 0.5], [1, 3, 1], [0, 1, 4]]))[0]
GRIDS = {
    "oblique-anisotropic": make_ijk_to_ras([0.7, 1.3, 2.9], _ROT, [12.5, -40.25, 7.0]),
    "flipped-anisotropic": make_ijk_to_ras([0.8, 0.5, 3.0], np.diag([-1.0, -1.0, 1.0]) @ _ROT, [3.0, 4.0, -5.0]),
    "permuted": make_ijk_to_ras([1.0, 0.6, 2.0], np.array([[0, 0, 1], [-1, 0, 0], [0, 1, 0]], float), [0, 0, 0]),
}
SHAPE = (6, 7, 9)  # (k, j, i)


def _labelmap(grid: str) -> Image:
    lab = np.zeros(SHAPE, np.uint8)
    lab[1:4, 2:5, 1:3] = 1
    lab[5, 0:2, 6:9] = 2  # touches the array border
    lab[0, 6, 8] = 1  # a corner voxel: catches off-by-one and axis-order mistakes
    return Image(lab, GRIDS[grid].copy())


@pytest.fixture(params=sorted(GRIDS))
def written(request, tmp_path):
    img = _labelmap(request.param)
    return img, write_seg_nrrd(img, SEGMENTS, tmp_path / "labels.seg.nrrd")


def test_engine_reads_back_what_it_wrote(written):
    img, path = written
    back, segments = read_seg_nrrd(path)
    np.testing.assert_array_equal(back.array, img.array)
    np.testing.assert_allclose(back.ijk_to_ras, img.ijk_to_ras, atol=1e-12)
    assert [(s.label_value, s.name, s.color, s.terminology) for s in segments] == \
        [(s.label_value, s.name, s.color, s.terminology) for s in SEGMENTS]
    assert [s.voxel_count for s in segments] == [int((img.array == v).sum()) for v in (1, 2, 4)]
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_slicerio_reads_it(written):
    img, path = written
    seg = slicerio.read_segmentation(str(path))
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ img.ijk_to_ras
    np.testing.assert_allclose(seg["ijkToLPS"], lps, atol=1e-12)
    np.testing.assert_array_equal(np.asarray(seg["voxels"]).transpose(2, 1, 0), img.array)
    by_name = {s["name"]: s for s in seg["segments"]}
    for info in SEGMENTS:
        s = by_name[info.name]
        assert s["labelValue"] == info.label_value and s["layer"] == 0
        np.testing.assert_allclose(s["color"], info.color)
        assert s["terminology"]["category"] == [info.terminology.category.scheme,
                                                info.terminology.category.value,
                                                info.terminology.category.meaning]
        assert s["terminology"]["type"][1] == info.terminology.type.value
    assert by_name["Vessel"]["extent"] == [1, 8, 2, 6, 0, 3]  # i0 i1 j0 j1 k0 k1 of label 1


def test_slicer_storage_node_reads_names_colours_tags_and_voxels(written):
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
    import vtk
    from slicercore import close_scene, make_scene

    img, path = written
    scene = make_scene()
    try:
        seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
        storage.SetFileName(str(path))
        assert storage.ReadData(seg) == 1
        segmentation = seg.GetSegmentation()
        assert segmentation.GetNumberOfSegments() == len(SEGMENTS)
        reference = slicer.util.addVolumeFromArray(np.zeros(SHAPE, np.int16), ijkToRAS=img.ijk_to_ras)
        for n, info in enumerate(SEGMENTS):
            segment_id = segmentation.GetNthSegmentID(n)
            segment = segmentation.GetSegment(segment_id)
            assert segment.GetName() == info.name
            np.testing.assert_allclose(segment.GetColor(), info.color, atol=1e-9)
            assert segment.GetLabelValue() == info.label_value
            tag = vtk.mutable("")
            assert segment.GetTag("TerminologyEntry", tag)
            assert str(tag) == terminology_entry(info.terminology)
            if info.label_value in img.array:
                mask = slicer.util.arrayFromSegmentBinaryLabelmap(seg, segment_id, reference)
                np.testing.assert_array_equal(mask.astype(bool), img.array == info.label_value)
    finally:
        close_scene(scene)


def _slicer_written(tmp_path, masks, collapse: bool):
    """A .seg.nrrd written by Slicer's storage node from binary masks on a flipped oblique grid."""
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
    from slicercore import close_scene, make_scene

    grid = GRIDS["flipped-anisotropic"]
    scene = make_scene()
    try:
        reference = slicer.util.addVolumeFromArray(np.zeros(SHAPE, np.int16), ijkToRAS=grid)
        seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        seg.SetReferenceImageGeometryParameterFromVolumeNode(reference)
        for n, mask in enumerate(masks):
            sid = seg.GetSegmentation().AddEmptySegment(f"s{n}", f"Seg {n}", (0.1 * n, 0.5, 0.9))
            slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8), seg, sid, reference)
        if collapse:
            seg.GetSegmentation().CollapseBinaryLabelmaps(False)
        storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
        path = tmp_path / "slicer.seg.nrrd"
        storage.SetFileName(str(path))
        assert storage.WriteData(seg) == 1
        return path, grid
    finally:
        close_scene(scene)


def test_engine_reads_files_slicer_wrote(tmp_path):
    a = np.zeros(SHAPE, bool)
    a[1:3, 2:4, 3:6] = True
    b = np.zeros(SHAPE, bool)
    b[4:6, 5:7, 0:2] = True
    path, grid = _slicer_written(tmp_path, [a, b], collapse=False)
    img, segments = read_seg_nrrd(path)
    assert [s.name for s in segments] == ["Seg 0", "Seg 1"]
    # Slicer may store a cropped box: compare in physical space through the file's own grid
    offset = np.round(np.linalg.solve(grid, img.ijk_to_ras[:, 3])).astype(int)[:3]  # (i, j, k) of voxel 0
    np.testing.assert_allclose(img.ijk_to_ras[:3, :3], grid[:3, :3], atol=1e-9)
    full = np.zeros(SHAPE, np.uint8)
    k, j, i = img.array.shape
    full[offset[2]:offset[2] + k, offset[1]:offset[1] + j, offset[0]:offset[0] + i] = img.array
    np.testing.assert_array_equal(full == segments[0].label_value, a)
    np.testing.assert_array_equal(full == segments[1].label_value, b)


def test_overlapping_slicer_segments_are_refused(tmp_path):
    a = np.zeros(SHAPE, bool)
    a[1:4, 1:4, 1:4] = True
    b = np.zeros(SHAPE, bool)
    b[2:5, 2:5, 2:5] = True
    path, _ = _slicer_written(tmp_path, [a, b], collapse=True)
    with pytest.raises(InputError, match="overlap"):
        read_seg_nrrd(path)


def test_two_layer_file_is_merged_with_renumbered_labels(tmp_path):
    """Slicer stores overlapping-capable segments as layers (a 'list' axis); each may use label 1."""
    import nrrd

    img = _labelmap("oblique-anisotropic")
    header = seg_nrrd_header(img, SEGMENTS[:2])
    layers = np.stack([(img.array == 1), (img.array == 2)], axis=-1).astype(np.uint8)  # (k, j, i, layer)
    header["dimension"] = 4
    header["kinds"] = ["list", "domain", "domain", "domain"]
    header["space directions"] = np.vstack([np.full(3, np.nan), header["space directions"]])
    header["Segment1_LabelValue"], header["Segment1_Layer"] = "1", "1"
    path = tmp_path / "layers.seg.nrrd"
    nrrd.write(str(path), layers, header, index_order="C")
    back, segments = read_seg_nrrd(path)
    assert [(s.name, s.label_value) for s in segments] == [("Vessel", 1), ("Nerve", 2)]
    np.testing.assert_array_equal(back.array, img.array)
    np.testing.assert_allclose(back.ijk_to_ras, img.ijk_to_ras, atol=1e-12)


def test_writer_refuses_inconsistent_segments(tmp_path):
    img = _labelmap("permuted")
    with pytest.raises(ValueError, match="without a segment"):
        write_seg_nrrd(img, SEGMENTS[:1], tmp_path / "a.seg.nrrd")
    with pytest.raises(ValueError, match="distinct"):
        write_seg_nrrd(img, SEGMENTS + [SEGMENTS[0]], tmp_path / "b.seg.nrrd")
    with pytest.raises(ValueError, match="integer"):
        write_seg_nrrd(img.with_array(img.array.astype(np.float32)), SEGMENTS, tmp_path / "c.seg.nrrd")
    assert list(tmp_path.iterdir()) == []


def test_extents_and_wider_integer_labelmaps(tmp_path):
    rng = np.random.default_rng(7)
    lab = np.zeros((11, 13, 17), np.int16)
    lab[rng.random(lab.shape) < 0.01] = 1
    lab[3:5, 7:12, 0:4] = 2
    img = Image(lab, GRIDS["oblique-anisotropic"].copy())
    header = seg_nrrd_header(img, SEGMENTS)
    for n, seg in enumerate(SEGMENTS):
        k, j, i = np.nonzero(lab == seg.label_value)
        expected = f"{i.min()} {i.max()} {j.min()} {j.max()} {k.min()} {k.max()}" if k.size else "0 -1 0 -1 0 -1"
        assert header[f"Segment{n}_Extent"] == expected
    back, _ = read_seg_nrrd(write_seg_nrrd(img, SEGMENTS, tmp_path / "wide.seg.nrrd"))
    np.testing.assert_array_equal(back.array, lab)
    for bad, shown in ((300, "[300]"), (-1, "[-1]"), (3, "[3]")):
        with pytest.raises(ValueError, match=r"without a segment: " + re.escape(shown)):
            write_seg_nrrd(img.with_array(np.where(lab == 2, bad, lab).astype(np.int16)), SEGMENTS,
                           tmp_path / "bad.seg.nrrd")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wide.seg.nrrd"]


@pytest.mark.parametrize("content", [b"", b"NRRD0004\ntype: what\n\n", None])
def test_reader_gives_input_errors(tmp_path, content):
    path = tmp_path / "bad.seg.nrrd"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError) as info:
        read_seg_nrrd(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
