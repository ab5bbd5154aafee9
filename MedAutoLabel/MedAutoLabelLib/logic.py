"""MedAutoLabelLogic: auto-labelling of scene volumes and of files, without Qt (tests run it on slicer-core).

Console use::

    logic = MedAutoLabelLogic()
    out = logic.autoLabel(getNode("CTA"), model="vessel-nerve-cta", device="auto")
    out.segmentationNode, out.classifications, out.segments, out.provenance
    logic.processFiles(["/data/a.nii.gz", "/data/b.nrrd"], "/data/labels")
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import slicer

from medautolabel.image import Image
from medautolabel.result import Classification, Result, SegmentInfo, repair_notes

from . import scene as scene_io

try:  # the application's base class; absent on slicer-core, where a plain object does the same job here
    from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic
except ImportError:  # pragma: no cover - depends on the environment
    ScriptedLoadableModuleLogic = object

DEFAULT_MODEL = "vessel-nerve-cta"
ProgressFn = Callable[[float, str], None]


@dataclass
class AutoLabelOutput:
    """What ``autoLabel`` leaves in the scene and reports."""

    segmentationNode: Any  # None when the model segments nothing (classification only)
    tableNode: Any
    classifications: List[Classification]
    segments: List[SegmentInfo]
    provenance: Dict[str, Any]
    result: Optional[Result] = field(default=None, repr=False)
    # what was repaired in the input before labelling (missing DICOM slices interpolated, NaN voxels
    # replaced), one sentence each, for the panel to show; also in the findings table and the
    # MedAutoLabel.InputRepairs attribute
    warnings: List[str] = field(default_factory=list)


class MedAutoLabelLogic(ScriptedLoadableModuleLogic):
    """Runs the engine on scene volumes and files and writes the results into the scene."""

    def __init__(self, scene=None) -> None:
        if ScriptedLoadableModuleLogic is not object:
            ScriptedLoadableModuleLogic.__init__(self)
        self._scene = scene

    @property
    def scene(self):
        return self._scene if self._scene is not None else slicer.mrmlScene

    # --- models ---------------------------------------------------------------------------------

    @staticmethod
    def availableModels():
        """Model cards of every model found (built-in and MEDAUTOLABEL_MODEL_PATH folders)."""
        from medautolabel.catalog.registry import list_models

        return list_models()

    @staticmethod
    def addModelFolder(path: Union[str, Path]):
        """Validate a model folder and make its models findable in this session; returns its card."""
        from medautolabel.catalog.registry import ENV_VAR, resolve_model

        card = resolve_model(Path(path))
        folder = str(Path(card.path).parent if card.path else path)
        paths = [p for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]
        if folder not in paths:
            os.environ[ENV_VAR] = os.pathsep.join(paths + [folder])
        return card

    # --- labelling ------------------------------------------------------------------------------

    def autoLabel(self, inputVolumeNode, model: Optional[str] = None, outputSegmentationNode=None,
                  device: str = "auto", progress: Optional[ProgressFn] = None, postprocess: bool = True,
                  lowConfidenceThreshold: Optional[float] = None) -> AutoLabelOutput:
        """Label a volume node synchronously (console, tests) and put the results into the scene."""
        from medautolabel.labelling.pipeline import label_image
        from medautolabel.options import LabelOptions

        options = LabelOptions(device=device, postprocess=postprocess, low_confidence_threshold=lowConfidenceThreshold)
        image = self.volumeToImage(inputVolumeNode)
        result = label_image(image, model or DEFAULT_MODEL, options, progress=progress)
        return self.applyResult(inputVolumeNode, result, outputSegmentationNode)

    def volumeToImage(self, volumeNode) -> Image:
        return scene_io.volume_to_image(volumeNode, modality=self._modality(volumeNode))

    @staticmethod
    def _modality(volumeNode) -> Optional[str]:
        value = volumeNode.GetAttribute("DICOM.Modality")
        return value or None

    def applyResult(self, inputVolumeNode, result: Result, outputSegmentationNode=None) -> AutoLabelOutput:
        """Write an engine Result into the scene: segmentation, attributes, findings table, subject hierarchy.

        A result without segments (a classification-only model segments nothing) adds no segmentation
        node and leaves ``outputSegmentationNode`` as it was (an empty node would only clutter the
        scene, and emptying the given one would destroy its segments): its tags go on the input
        volume node and its subject-hierarchy item and into the findings table, and the returned
        ``segmentationNode`` is None.
        """
        scene = self.scene
        name = inputVolumeNode.GetName()
        seg = None
        if result.segments:
            seg = outputSegmentationNode or scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{name} auto-labels")
            if seg.GetDisplayNode() is None:
                seg.CreateDefaultDisplayNodes()
            scene_io.fill_segmentation(seg, inputVolumeNode, result.labelmap.array, result.segments)
            scene_io.place_beside(scene, seg, inputVolumeNode)
        table_name = f"{name} findings"
        table = scene.GetFirstNodeByName(table_name)
        if table is None or not table.IsA("vtkMRMLTableNode"):
            table = None
        table = scene_io.findings_table(scene, table_name, result, table)
        scene_io.place_beside(scene, table, inputVolumeNode)
        attributes = scene_io.classification_attributes(result.classifications)
        attributes.update(scene_io.provenance_attributes(result.provenance))
        scene_io.set_attributes(scene, [inputVolumeNode] + ([seg] if seg is not None else []), attributes)
        return AutoLabelOutput(seg, table, list(result.classifications), list(result.segments),
                               dict(result.provenance), result, repair_notes(result.provenance))

    def processFiles(self, inputPaths: Sequence[Union[str, Path]], outputDir: Union[str, Path],
                     model: Optional[str] = None, device: str = "auto", fmt: str = "seg.nrrd",
                     overwrite: bool = False) -> List[Dict[str, Any]]:
        """Label files (or DICOM series folders) into ``outputDir`` exactly as ``medautolabel label`` does."""
        from medautolabel.labelling.batch import label_files
        from medautolabel.options import LabelOptions

        return label_files(list(inputPaths), outputDir, model=model or DEFAULT_MODEL, options=LabelOptions(device=device),
                           fmt=fmt, overwrite=overwrite)

    # --- training (the panel's Train section) -------------------------------------------------------

    @staticmethod
    def userModelFolder(name: str) -> Path:
        """Where the panel's trained models go: ``$MEDAUTOLABEL_USER_MODELS`` or ``~/.medautolabel/models``."""
        import re

        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name or ""):
            raise ValueError("model name: letters, digits, '.', '_' and '-' only (at most 64)")
        root = Path(os.environ.get("MEDAUTOLABEL_USER_MODELS", Path.home() / ".medautolabel" / "models"))
        return root.expanduser() / name

    @staticmethod
    def exportTrainingDataset(pairs, outputDir: Union[str, Path], labelNames: Optional[List[str]] = None) -> Path:
        """Volume + segmentation pairs from the scene -> an MSD-style dataset folder for training."""
        from .trainingdata import export_training_dataset

        return export_training_dataset(pairs, outputDir, labelNames)

    # --- evaluation (the panel's Evaluate section) ------------------------------------------------

    def segmentationToLabelmap(self, segmentationNode, referenceVolumeNode, names: Optional[Dict[int, str]] = None):
        """The segmentation as an engine labelmap on the reference volume's grid; {value: name} by segment order
        or by the given names (non-empty segments the names do not list get the next free values)."""
        import numpy as np

        image = self.volumeToImage(referenceVolumeNode)
        labelmap = np.zeros(image.array.shape, np.uint8)
        segmentation = segmentationNode.GetSegmentation()
        found: Dict[int, str] = {}
        by_name = {v: k for k, v in (names or {}).items()}
        spare = max(by_name.values(), default=0) + 1  # for non-empty segments the names do not list
        for n in range(segmentation.GetNumberOfSegments()):
            segment_id = segmentation.GetNthSegmentID(n)
            segment_name = segmentation.GetSegment(segment_id).GetName()
            value = by_name.get(segment_name, n + 1 if not names else None)
            mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segment_id, referenceVolumeNode)
            if value is None:  # only in this segmentation: reported (e.g. as a false positive) if it has voxels
                if not mask.any():
                    continue
                value, spare = spare, spare + 1
            labelmap[mask > 0] = value
            found[value] = segment_name
        return Image(labelmap, image.ijk_to_ras), found

    def evaluateSegmentations(self, predictionNode, referenceNode, referenceVolumeNode, tableNode=None):
        """Dice, HD95, MSD, volume difference and status (e.g. "only in prediction") per segment (matched by
        name) into a table node."""
        import vtk

        from medautolabel.evaluation import evaluate_labelmaps

        ref, names = self.segmentationToLabelmap(referenceNode, referenceVolumeNode)
        pred, pred_names = self.segmentationToLabelmap(predictionNode, referenceVolumeNode, names)
        rows = evaluate_labelmaps(pred, ref, {**pred_names, **names})  # segments only predicted: false positives
        table = tableNode or self.scene.AddNewNodeByClass(
            "vtkMRMLTableNode", f"{predictionNode.GetName()} vs {referenceNode.GetName()}")
        table.RemoveAllColumns()
        columns = ["Segment", "Dice", "HD95 (mm)", "MSD (mm)", "Volume difference (mL)", "Status"]
        for column in columns:
            array = vtk.vtkStringArray()
            array.SetName(column)
            table.AddColumn(array)
        for row in rows:
            r = table.AddEmptyRow()
            values = [row["name"], row["dice"], row["hd95_mm"], row["msd_mm"], row["volume_diff_ml"], row["status"]]
            for c, v in enumerate(values):
                table.SetCellText(r, c, v if isinstance(v, str) else ("n/a" if v != v else f"{v:.3f}"))
        return table, rows
