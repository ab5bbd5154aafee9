"""The panel's settings, kept in the module's parameter node so that a saved scene reopens with them.

``parameterNodeWrapper`` lives in the Slicer application (it needs Qt for its GUI connectors); on
slicer-core this module still imports and ``MedAutoLabelParameterNode`` is None.
"""

from __future__ import annotations

from typing import Optional

try:
    from typing import Annotated

    from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
    from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
except ImportError:  # slicer-core, or Python without typing.Annotated
    parameterNodeWrapper = None

DEVICES = ("auto", "cpu", "cuda")

if parameterNodeWrapper is not None:

    @parameterNodeWrapper
    class MedAutoLabelParameterNode:
        inputVolume: Optional[vtkMRMLScalarVolumeNode] = None
        outputSegmentation: Optional[vtkMRMLSegmentationNode] = None
        model: str = "vessel-nerve-cta"
        device: Annotated[str, Choice(list(DEVICES))] = "auto"
        postprocess: bool = True
        lowConfidenceThreshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.7

else:
    MedAutoLabelParameterNode = None
