"""The Slicer glue (MedAutoLabelLib) on Slicer's real core libraries (slicer-core): scene in, scene out."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (CPython 3.11 wheel only)")
import vtk  # noqa: E402
from cardfactory import GRIDS  # noqa: E402
from slicercore import close_scene, make_scene  # noqa: E402
from thresholdmodel import CENTER, sphere_image, write_threshold_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "MedAutoLabel"))
from medautolabel.image import Image  # noqa: E402
from medautolabel.io.images import read_image, write_image  # noqa: E402
from medautolabel.labelling.pipeline import label_image  # noqa: E402
from MedAutoLabelLib import installer  # noqa: E402
from MedAutoLabelLib import scene as scene_io  # noqa: E402
from MedAutoLabelLib.logic import MedAutoLabelLogic  # noqa: E402
from MedAutoLabelLib.runner import BackgroundLabeller  # noqa: E402
from MedAutoLabelLib.selftest import run_phantom_scenario  # noqa: E402


@pytest.fixture()
def scene():
    s = make_scene()
    yield s
    close_scene(s)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_threshold_model(tmp_path_factory.mktemp("threshold-model"))


@pytest.mark.parametrize("grid_name", sorted(GRIDS))
def test_volume_node_and_engine_image_convert_exactly(grid_name, scene):
    image = sphere_image(grid_name)
    node = scene_io.image_to_volume(image, scene, "v")
    back = scene_io.volume_to_image(node)
    np.testing.assert_array_equal(back.array, image.array)
    np.testing.assert_allclose(back.ijk_to_ras, image.ijk_to_ras, atol=1e-9)
    # Slicer's own view of one voxel agrees: the sphere centre's voxel holds contrast
    ras_to_ijk = vtk.vtkMatrix4x4()
    node.GetRASToIJKMatrix(ras_to_ijk)
    ijk = [int(round(v)) for v in ras_to_ijk.MultiplyPoint([*CENTER, 1.0])[:3]]
    assert slicer.util.arrayFromVolume(node)[ijk[2], ijk[1], ijk[0]] == 300


@pytest.mark.parametrize("grid_name", ["oblique-anisotropic", "flipped-anisotropic", "oblique-permuted-flipped"])
def test_autolabel_exported_by_slicer_equals_the_engine_voxel_for_voxel(grid_name, scene, model_dir):
    image = sphere_image(grid_name)
    volume = scene_io.image_to_volume(image, scene, "CTA")
    logic = MedAutoLabelLogic(scene)
    out = logic.autoLabel(volume, model=str(model_dir), device="cpu")

    labelmap_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "exported")
    ids = vtk.vtkStringArray()
    out.segmentationNode.GetSegmentation().GetSegmentIDs(ids)
    ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
        out.segmentationNode, ids, labelmap_node, volume, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
    assert ok
    exported = slicer.util.arrayFromVolume(labelmap_node)
    engine = label_image(image, str(model_dir), device="cpu").labelmap.array
    assert exported.shape == engine.shape and (engine == 1).sum() > 500
    np.testing.assert_array_equal(exported, engine)  # Vessel is segment 1 -> value 1, Nerve -> 2


def test_segments_attributes_table_and_study(scene, model_dir):
    volume = scene_io.image_to_volume(sphere_image(), scene, "CTA")
    sh = scene.GetSubjectHierarchyNode()
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "P"), "S")
    sh.SetItemParent(scene_io.subject_hierarchy_item(scene, volume), study)
    out = MedAutoLabelLogic(scene).autoLabel(volume, model=str(model_dir), device="cpu")
    seg = out.segmentationNode
    assert seg.GetName() == "CTA auto-labels"
    s = seg.GetSegmentation()
    first = s.GetSegment(s.GetNthSegmentID(0))
    assert [s.GetSegment(s.GetNthSegmentID(n)).GetName() for n in range(s.GetNumberOfSegments())] == \
        ["Vessel", "Nerve"]
    assert first.GetColor() == pytest.approx((0.85, 0.25, 0.2))
    entry = scene_io.get_segment_terminology(first)
    assert "SCT^59820001^Blood vessel" in entry and entry.count("~") == 6
    tag = vtk.mutable("")
    assert first.GetTag("TerminologyEntry", tag) and str(tag) == entry  # what Slicer 5.8 reads, too
    for node in (volume, seg):
        assert node.GetAttribute("MedAutoLabel.Class.aneurysm") == "absent"
        assert float(node.GetAttribute("MedAutoLabel.Probability.aneurysm")) > 0.99
        assert node.GetAttribute("MedAutoLabel.Model") == "threshold"
        assert node.GetAttribute("MedAutoLabel.Device") == "cpu"
        assert len(node.GetAttribute("MedAutoLabel.WeightsSHA256")) == 64
        item = scene_io.subject_hierarchy_item(scene, node)
        assert sh.GetItemAttribute(item, "MedAutoLabel.Class.aneurysm") == "absent"
    assert sh.GetItemParent(scene_io.subject_hierarchy_item(scene, seg)) == study
    table = out.tableNode
    assert table.GetName() == "CTA findings" and table.GetNumberOfRows() == 3
    rows = [[table.GetCellText(r, c) for c in range(table.GetNumberOfColumns())] for r in range(3)]
    assert rows[0][:3] == ["classification", "aneurysm", "absent"]
    assert rows[1][:3] == ["segment", "Vessel", "1"] and float(rows[1][4]) == pytest.approx(1.44, rel=0.08)
    # a second run reuses the table and writes into the given segmentation
    again = MedAutoLabelLogic(scene).autoLabel(volume, model=str(model_dir), device="cpu", outputSegmentationNode=seg)
    assert again.segmentationNode is seg and again.tableNode is table
    assert seg.GetSegmentation().GetNumberOfSegments() == 2


def test_segmentation_written_by_slicer_storage_node_reads_back(scene, model_dir, tmp_path):
    volume = scene_io.image_to_volume(sphere_image("oblique-anisotropic"), scene, "CTA")
    out = MedAutoLabelLogic(scene).autoLabel(volume, model=str(model_dir), device="cpu")
    path = tmp_path / "labels.seg.nrrd"
    writer = slicer.vtkMRMLSegmentationStorageNode()
    writer.SetFileName(str(path))
    assert writer.WriteData(out.segmentationNode)
    loaded = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "loaded")
    reader = slicer.vtkMRMLSegmentationStorageNode()
    reader.SetFileName(str(path))
    assert reader.ReadData(loaded)
    s = loaded.GetSegmentation()
    names = [s.GetSegment(s.GetNthSegmentID(n)).GetName() for n in range(s.GetNumberOfSegments())]
    assert names == ["Vessel", "Nerve"]
    assert "SCT^3057000^Nerve" in scene_io.get_segment_terminology(s.GetSegment(s.GetNthSegmentID(1)))
    vessel = slicer.util.arrayFromSegmentBinaryLabelmap(loaded, s.GetNthSegmentID(0), volume)
    original = slicer.util.arrayFromSegmentBinaryLabelmap(out.segmentationNode,
                                                          out.segmentationNode.GetSegmentation().GetNthSegmentID(0),
                                                          volume)
    np.testing.assert_array_equal(vessel, original)


def test_process_files_gives_the_command_line_outputs(scene, model_dir, tmp_path):
    path = tmp_path / "in" / "scan.nrrd"
    write_image(sphere_image(), path)
    records = MedAutoLabelLogic(scene).processFiles([path], tmp_path / "out", model=str(model_dir), device="cpu")
    assert [r["status"] for r in records] == ["ok"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["scan.seg.nrrd", "scan.tags.json"]


def test_evaluate_section_compares_two_segmentations(scene, model_dir):
    image = sphere_image()
    volume = scene_io.image_to_volume(image, scene, "CTA")
    logic = MedAutoLabelLogic(scene)
    out = logic.autoLabel(volume, model=str(model_dir), device="cpu")
    reference = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "reference")
    reference.CreateDefaultDisplayNodes()
    reference.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    sid = reference.GetSegmentation().AddEmptySegment("ref_vessel", "Vessel")
    truth = label_image(image, str(model_dir), device="cpu").labelmap.array == 1
    half = truth.copy()
    half[: half.shape[0] // 2] = False  # drop the lower half of the sphere's slices
    slicer.util.updateSegmentBinaryLabelmapFromArray(half.astype(np.uint8), reference, sid, volume)
    table, rows = logic.evaluateSegmentations(out.segmentationNode, reference, volume)
    (row,) = rows
    expected = 2 * half.sum() / (truth.sum() + half.sum())
    assert row["name"] == "Vessel" and row["dice"] == pytest.approx(expected, abs=1e-6)
    assert table.GetNumberOfRows() == 1 and table.GetCellText(0, 0) == "Vessel"


@pytest.mark.slow
def test_background_worker_labels_reuses_itself_and_cancels_fast(model_dir, tmp_path):
    runner = BackgroundLabeller(python=sys.executable)
    try:
        image = sphere_image()
        runner.start(image, str(model_dir), device="cpu")
        tmp = runner.tmp
        seen = []
        final = None
        deadline = time.time() + 120
        while final is None and time.time() < deadline:
            for message in runner.poll():  # never blocks
                seen.append(message["event"])
                if message["event"] in ("done", "error"):
                    final = message
            time.sleep(0.05)
        assert final and final["event"] == "done", final
        assert "progress" in seen
        result = runner.read_result(final)
        engine = label_image(image, str(model_dir), device="cpu")
        np.testing.assert_array_equal(result.labelmap.array, engine.labelmap.array)
        assert result.classifications[0].label == "absent" and result.segments[0].name == "Vessel"
        runner.cleanup()
        assert not tmp.exists()
        pid = runner.worker.proc.pid

        # a second run goes to the same worker process (the model stays loaded)
        big = read_image_big(tmp_path)
        runner.start(big, "vessel-nerve-cta", device="cpu")
        assert runner.worker.proc.pid == pid
        deadline = time.time() + 120
        while time.time() < deadline and not any(m["event"] == "progress" and m["fraction"] > 0.1
                                                 for m in runner.poll()):
            time.sleep(0.05)
        tmp, proc = runner.tmp, runner.worker.proc
        t0 = time.monotonic()
        runner.cancel()
        assert time.monotonic() - t0 < 1.0
        assert proc.poll() is not None  # the process is gone
        assert not tmp.exists() and not runner.running
    finally:
        runner.shutdown()


def read_image_big(tmp_path) -> Image:
    """A phantom large enough that labelling it with the built-in model takes several seconds."""
    from medautolabel.synthetic.phantoms import make_phantom

    return make_phantom(1_000_778).image


@pytest.mark.slow
def test_worker_reports_user_errors_and_keeps_serving(tmp_path):
    runner = BackgroundLabeller(python=sys.executable)
    try:
        runner.start(sphere_image(), "no-such-model", device="cpu")
        message = runner.wait(120)
        assert message["event"] == "error" and "unknown model 'no-such-model'" in message["message"]
        assert runner.worker.alive()
    finally:
        runner.shutdown()


@pytest.mark.slow
def test_shared_selftest_scenario(scene):
    facts = run_phantom_scenario(MedAutoLabelLogic(scene), scene)
    assert set(facts["dice"]) == {"Vessel", "Nerve"}


def test_installer_finds_missing_packages_and_explains_no_network():
    missing = installer.missing_packages(find_spec=lambda name: None if name in ("torch", "h5py") else object())
    assert missing == ["torch>=2.0", "h5py>=3.8"]
    assert installer.missing_packages() == []  # this environment has everything
    with pytest.raises(installer.NoNetwork, match="Cannot reach pypi.org"):
        installer.install(missing, confirm=lambda text: True, check_network=lambda: False)
    assert installer.install(missing, confirm=lambda text: False) is False
    assert not any(req.split(">=")[0] in installer.SHIPPED_WITH_SLICER for req in installer.REQUIRED.values())


def test_add_model_folder_makes_it_available(scene, model_dir, monkeypatch):
    monkeypatch.delenv("MEDAUTOLABEL_MODEL_PATH", raising=False)
    logic = MedAutoLabelLogic(scene)
    assert "threshold" not in [c.id for c in logic.availableModels()]
    card = logic.addModelFolder(model_dir)
    assert card.id == "threshold" and "threshold" in [c.id for c in logic.availableModels()]


def test_worker_runs_as_a_plain_script(tmp_path):
    """What PythonSlicer does: run worker.py by path; it announces itself and ends at end of input."""
    worker = Path(__file__).resolve().parent.parent / "MedAutoLabel" / "MedAutoLabelLib" / "worker.py"
    run = subprocess.run([sys.executable, str(worker)], input="", capture_output=True, text=True, timeout=60,
                         check=False)
    assert run.returncode == 0 and run.stdout.strip() == '{"event": "ready"}'


def _segmentation_with(scene, volume, masks):
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    for name, mask in masks:
        sid = seg.GetSegmentation().AddEmptySegment("", name)
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8), seg, sid, volume)
    return seg


def test_scene_pairs_export_to_a_training_dataset(scene, tmp_path):
    from medautolabel.training.data import load_dataset

    pairs, truths = [], []
    for n, grid_name in enumerate(["oblique-anisotropic", "flipped-anisotropic"]):
        image = sphere_image(grid_name)
        volume = scene_io.image_to_volume(image, scene, f"Doe^Jane {n}")  # a name that must not leak
        vessel = image.array > 150
        nerve = np.zeros_like(vessel)
        nerve[2:4, 5:9, 5:9] = True
        masks = [("Vessel", vessel), ("Nerve", nerve)] if n == 0 else [("Nerve", nerve), ("Vessel", vessel)]
        pairs.append((volume, _segmentation_with(scene, volume, masks)))
        truths.append((image, vessel, nerve))
    out = MedAutoLabelLogic(scene).exportTrainingDataset(pairs, tmp_path / "ds")
    meta = (out / "dataset.json").read_text(encoding="utf-8")
    assert "Doe" not in meta and "Jane" not in meta
    dataset = load_dataset(out)
    assert dataset.labels == {1: "Vessel", 2: "Nerve"} and len(dataset.cases) == 2
    for case, (image, vessel, nerve) in zip(dataset.cases, truths):
        img, lab = read_image(case.image), read_image(case.label)
        np.testing.assert_array_equal(img.array, image.array)
        np.testing.assert_allclose(lab.ijk_to_ras, image.ijk_to_ras, atol=1e-4)
        np.testing.assert_array_equal(lab.array == 1, vessel & ~nerve)
        np.testing.assert_array_equal(lab.array == 2, nerve)


@pytest.mark.slow
def test_background_training_reports_progress_and_cancels_fast(scene, tmp_path):
    from MedAutoLabelLib.runner import BackgroundTrainer

    image = sphere_image()
    volume = scene_io.image_to_volume(image, scene, "v")
    seg = _segmentation_with(scene, volume, [("Vessel", image.array > 150)])
    data = MedAutoLabelLogic(scene).exportTrainingDataset([(volume, seg)] * 2, tmp_path / "ds")
    trainer = BackgroundTrainer(python=sys.executable)
    trainer.start(data, tmp_path / "model", epochs=50, device="cpu")
    seen = []
    deadline = time.time() + 180
    while time.time() < deadline and not any(m["event"] == "progress" for m in seen):
        seen += trainer.poll()
        assert not any(m["event"] == "error" for m in seen), seen
        time.sleep(0.1)
    assert any(m["event"] == "progress" and m["epochs"] == 50 for m in seen)
    proc = trainer.process.proc
    t0 = time.monotonic()
    trainer.cancel()
    assert time.monotonic() - t0 < 1.0 and proc.poll() is not None and not trainer.running


def test_a_tag_that_missed_its_validation_says_so_in_the_scene(scene, tmp_path):
    """A card task with ``"validated": false``: attributes, subject hierarchy and findings table all say it (#15)."""
    import json

    folder = write_threshold_model(tmp_path / "unvalidated")
    card = json.loads((folder / "model.json").read_text())
    card["classification"][0]["validated"] = False
    (folder / "model.json").write_text(json.dumps(card))
    volume = scene_io.image_to_volume(sphere_image(), scene, "CTA")
    out = MedAutoLabelLogic(scene).autoLabel(volume, model=str(folder), device="cpu")
    sh = scene.GetSubjectHierarchyNode()
    for node in (volume, out.segmentationNode):
        assert node.GetAttribute("MedAutoLabel.Validated.aneurysm") == "0"
        assert node.GetAttribute("MedAutoLabel.Method.aneurysm") == "voxel_evidence"
        assert sh.GetItemAttribute(scene_io.subject_hierarchy_item(scene, node), "MedAutoLabel.Validated.aneurysm") == "0"
    table = out.tableNode
    header = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    row = dict(zip(header, [table.GetCellText(0, c) for c in range(table.GetNumberOfColumns())]))
    assert row["Kind"] == "classification" and row["Method"] == "voxel_evidence"
    assert row["Validated"] == "no: not validated"
    assert [c.validated for c in out.classifications] == [False]


def _findings_rows(table) -> list:
    header = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    return [dict(zip(header, [table.GetCellText(r, c) for c in range(len(header))]))
            for r in range(table.GetNumberOfRows())]


def _check_classifier_tags_in_scene(scene, volume, out, model_dir) -> None:
    """A classification-only model's tags on the volume, its subject-hierarchy item and the findings table."""
    import hashlib

    from classifiermodel import EXPECTED

    sh = scene.GetSubjectHierarchyNode()
    item = scene_io.subject_hierarchy_item(scene, volume)
    for tag, (label, p, low, validated) in EXPECTED.items():
        for get in (volume.GetAttribute, lambda key: sh.GetItemAttribute(item, key)):
            assert get(f"MedAutoLabel.Class.{tag}") == label
            assert float(get(f"MedAutoLabel.Probability.{tag}")) == pytest.approx(p, abs=1e-4)
            assert get(f"MedAutoLabel.LowConfidence.{tag}") == ("1" if low else "0")
            assert get(f"MedAutoLabel.Method.{tag}") == "network"
            assert get(f"MedAutoLabel.Validated.{tag}") == ("1" if validated else "0")
    assert volume.GetAttribute("MedAutoLabel.Model") == "classifier-only"
    assert volume.GetAttribute("MedAutoLabel.WeightsSHA256") == ""  # no segmentation network
    for task in ("aneurysm", "findings"):  # the weights that made each task's tags
        assert volume.GetAttribute(f"MedAutoLabel.WeightsSHA256.{task}") == \
            hashlib.sha256((model_dir / f"{task}.pt").read_bytes()).hexdigest()
    rows = _findings_rows(out.tableNode)
    assert [(r["Kind"], r["Name"], r["Value"], r["Method"], r["Validated"]) for r in rows] == [
        ("classification", tag, label, "network", "yes" if validated else "no: not validated")
        for tag, (label, _p, _low, validated) in EXPECTED.items()]
    assert [float(r["Probability"]) for r in rows] == pytest.approx([e[1] for e in EXPECTED.values()], abs=1e-3)
    assert out.segmentationNode is None and out.segments == []
    assert [c.task for c in out.classifications] == list(EXPECTED)


def test_a_classification_only_model_tags_the_volume_and_adds_no_segmentation(scene, tmp_path):
    """No segmentation node (nothing to show); a given one is left as it was; a tag an earlier run left
    on the volume is removed, so no other model's tag stands beside this run's model and date."""
    from classifiermodel import write_classifier_model

    folder = write_classifier_model(tmp_path / "classifier-only")
    image = sphere_image()
    volume = scene_io.image_to_volume(image, scene, "CTA")
    sh = scene.GetSubjectHierarchyNode()
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "P"), "S")
    sh.SetItemParent(scene_io.subject_hierarchy_item(scene, volume), study)
    volume.SetAttribute("MedAutoLabel.Class.old-task", "present")  # from an earlier run with another model
    sh.SetItemAttribute(scene_io.subject_hierarchy_item(scene, volume), "MedAutoLabel.Class.old-task", "present")
    volume.SetAttribute("DICOM.Modality", "CT")  # not ours: kept
    mine = _segmentation_with(scene, volume, [("Mine", image.array > 150)])

    out = MedAutoLabelLogic(scene).autoLabel(volume, model=str(folder), device="cpu", outputSegmentationNode=mine)
    _check_classifier_tags_in_scene(scene, volume, out, folder)
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1  # only the user's own
    assert mine.GetSegmentation().GetNumberOfSegments() == 1 and mine.GetAttribute("MedAutoLabel.Model") is None
    assert volume.GetAttribute("MedAutoLabel.Class.old-task") is None
    assert not sh.HasItemAttribute(scene_io.subject_hierarchy_item(scene, volume), "MedAutoLabel.Class.old-task")
    assert volume.GetAttribute("DICOM.Modality") == "CT"
    assert out.tableNode.GetName() == "CTA findings"
    assert sh.GetItemParent(scene_io.subject_hierarchy_item(scene, out.tableNode)) == study


def test_a_classification_only_result_through_the_worker_and_process_files(scene, tmp_path):
    """The panel's path (worker request -> result files -> runner.read_result -> applyResult) and processFiles
    (the .seg.nrrd opens in Slicer's own reader with no segments)."""
    import io
    import json

    from classifiermodel import write_classifier_model

    from MedAutoLabelLib import worker

    folder = write_classifier_model(tmp_path / "classifier-only")
    image = sphere_image("flipped-anisotropic")
    write_image(image, tmp_path / "run" / "input.nrrd")
    sent = io.StringIO()
    worker.handle({"id": 7, "image": str(tmp_path / "run" / "input.nrrd"), "output": str(tmp_path / "run"),
                   "model": str(folder), "options": {"device": "cpu"}, "modality": "CT"}, sent)
    done = json.loads(sent.getvalue().splitlines()[-1])
    assert done["event"] == "done", done
    volume = scene_io.image_to_volume(image, scene, "CTA")
    out = MedAutoLabelLogic(scene).applyResult(volume, BackgroundLabeller().read_result(done))
    _check_classifier_tags_in_scene(scene, volume, out, folder)
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0

    path = tmp_path / "in" / "scan.nrrd"
    write_image(image, path)
    records = MedAutoLabelLogic(scene).processFiles([path], tmp_path / "out", model=str(folder), device="cpu")
    assert [r["status"] for r in records] == ["ok"]
    loaded = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "loaded")
    reader = slicer.vtkMRMLSegmentationStorageNode()
    reader.SetFileName(str(tmp_path / "out" / "scan.seg.nrrd"))
    assert reader.ReadData(loaded) and loaded.GetSegmentation().GetNumberOfSegments() == 0
