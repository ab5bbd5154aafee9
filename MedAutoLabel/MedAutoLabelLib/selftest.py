"""The self-test scenario, shared by the Slicer self-test (MedAutoLabelTest) and the pytest suite.

A held-out synthetic CT angiogram (no download) goes into the scene inside a patient/study;
``autoLabel`` runs on the CPU; the segmentation, terminology, Dice against the phantom's reference,
the classification tag, the findings table and the subject-hierarchy placement are checked.
"""

from __future__ import annotations

from typing import Any, Dict

import numpy as np
import slicer

from . import scene as scene_io

DICE_FLOOR = {"Vessel": 0.5, "Nerve": 0.4}  # a guard against broken geometry or weights, not a benchmark


def run_phantom_scenario(logic, scene, device: str = "cpu") -> Dict[str, Any]:
    """Run the scenario with ``logic`` in ``scene``; raise AssertionError on the first failed check."""
    from medautolabel.evaluation.metrics import dice as mask_dice
    from medautolabel.synthetic.phantoms import DEMO_SEED, make_phantom

    ph = make_phantom(DEMO_SEED)  # the demo's phantom (outside the training seeds)
    volume = scene_io.image_to_volume(ph.image, scene, "Phantom CTA")
    sh = scene.GetSubjectHierarchyNode()
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "Phantom patient"), "Phantom study")
    sh.SetItemParent(scene_io.subject_hierarchy_item(scene, volume), study)

    out = logic.autoLabel(volume, model="vessel-nerve-cta", device=device)
    seg = out.segmentationNode
    facts: Dict[str, Any] = {"dice": {}}

    assert seg.GetName() == "Phantom CTA auto-labels", seg.GetName()
    segmentation = seg.GetSegmentation()
    names = [segmentation.GetSegment(segmentation.GetNthSegmentID(n)).GetName()
             for n in range(segmentation.GetNumberOfSegments())]
    assert names == ["Vessel", "Nerve"], names
    for n, code in ((0, "SCT^59820001^Blood vessel"), (1, "SCT^3057000^Nerve")):
        entry = scene_io.get_segment_terminology(segmentation.GetSegment(segmentation.GetNthSegmentID(n)))
        assert code in entry and "SCT^123037004^Anatomical Structure" in entry, entry

    for n, name in enumerate(names):
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(seg, segmentation.GetNthSegmentID(n), volume) > 0
        ref = ph.labels.array == n + 1
        dice = mask_dice(mask, ref)
        facts["dice"][name] = dice
        assert dice >= DICE_FLOOR[name], f"{name} Dice {dice:.3f} below {DICE_FLOOR[name]}"

    label = volume.GetAttribute("MedAutoLabel.Class.aneurysm")
    probability = float(volume.GetAttribute("MedAutoLabel.Probability.aneurysm"))
    assert label in ("present", "absent") and 0.0 <= probability <= 1.0, (label, probability)
    assert seg.GetAttribute("MedAutoLabel.Class.aneurysm") == label
    assert sh.GetItemAttribute(scene_io.subject_hierarchy_item(scene, seg), "MedAutoLabel.Class.aneurysm") == label
    assert seg.GetAttribute("MedAutoLabel.Model") == "vessel-nerve-cta"
    assert sh.GetItemParent(scene_io.subject_hierarchy_item(scene, seg)) == study

    table = out.tableNode
    assert table.GetName() == "Phantom CTA findings" and table.GetNumberOfRows() == 3, table.GetNumberOfRows()
    facts.update(aneurysm=label, probability=probability, truth="present" if ph.aneurysm else "absent",
                 volume_ml={s.name: s.volume_ml for s in out.segments})
    facts["voxels"] = int(np.prod(ph.image.array.shape))
    return facts
