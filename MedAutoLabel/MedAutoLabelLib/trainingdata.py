"""Scene -> training dataset: volume + segmentation pairs written as an MSD-style folder for ``medautolabel train``.

Cases are named ``case_001``, ``case_002``, ... (never after the volume, whose name may hold a
patient's name). Segments are matched across pairs by name; label values follow ``label_names``
(default: the names in order of first appearance).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import slicer

from medautolabel.image import Image

from . import scene as scene_io


def segmentation_labelmap(segmentation_node, volume_node, values: Dict[str, int]) -> np.ndarray:
    """The segments named in ``values`` as one labelmap on the volume's grid (later segments win overlaps)."""
    segmentation = segmentation_node.GetSegmentation()
    shape = slicer.util.arrayFromVolume(volume_node).shape
    labelmap = np.zeros(shape, np.uint8)
    for n in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(n)
        name = segmentation.GetSegment(segment_id).GetName()
        if name in values:
            mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, segment_id, volume_node)
            labelmap[mask > 0] = values[name]
    return labelmap


def export_training_dataset(pairs: Sequence[Tuple[object, object]], out_dir: Union[str, Path],
                            label_names: Optional[List[str]] = None, name: str = "Slicer scene") -> Path:
    """Write ``out_dir/imagesTr``, ``labelsTr`` and ``dataset.json`` from (volume node, segmentation node) pairs."""
    from medautolabel.io.images import write_image

    if not pairs:
        raise ValueError("no (volume, segmentation) pairs to export")
    if label_names is None:
        label_names = []
        for _, seg in pairs:
            s = seg.GetSegmentation()
            for n in range(s.GetNumberOfSegments()):
                segment_name = s.GetSegment(s.GetNthSegmentID(n)).GetName()
                if segment_name not in label_names:
                    label_names.append(segment_name)
    if not label_names or len(label_names) > 254:
        raise ValueError("between 1 and 254 segment names are needed")
    values = {segment_name: n + 1 for n, segment_name in enumerate(label_names)}
    out = Path(out_dir)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    training = []
    for n, (volume, seg) in enumerate(pairs, start=1):
        case = f"case_{n:03d}"
        image = scene_io.volume_to_image(volume)
        labels = Image(segmentation_labelmap(seg, volume, values), image.ijk_to_ras)
        if not labels.array.any():
            raise ValueError(f"pair {n}: the segmentation has none of the segments {label_names}")
        write_image(image, out / "imagesTr" / f"{case}.nii.gz")
        write_image(labels, out / "labelsTr" / f"{case}.nii.gz")
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    dataset = {"name": name, "description": "exported from a 3D Slicer scene by MedAutoLabel",
               "tensorImageSize": "3D", "modality": {"0": "CT"},
               "labels": {"0": "background", **{str(v): k for k, v in values.items()}},
               "numTraining": len(training), "numTest": 0, "training": training, "test": []}
    (out / "dataset.json").write_text(json.dumps(dataset, indent=2), encoding="utf-8")
    return out
