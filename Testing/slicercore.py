"""A Slicer MRML scene on slicer-core (no Qt), set up the way Slicer's application does at start-up.

Usage in a test (skip cleanly where slicer-core is not installed)::

    pytest.importorskip("slicer")
    from slicercore import make_scene

    scene = make_scene()            # also sets slicer.mrmlScene and slicer.modules.<name>.logic()
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")

Registered module logics (``slicer.modules.<key>.logic()`` and ``module_logic(scene, name)``):
colors, segmentations, volumes, subjecthierarchy, terminologies.
"""

from __future__ import annotations

import types

import slicer
import vtk

_LOGIC_CLASSES = {
    "Segmentations": "vtkSlicerSegmentationsModuleLogic",
    "Volumes": "vtkSlicerVolumesLogic",
    "SubjectHierarchy": "vtkSlicerSubjectHierarchyModuleLogic",
    "Terminologies": "vtkSlicerTerminologiesModuleLogic",
}

# Scene id -> (application logic, {module name: logic}); keeps the VTK objects alive with the scene.
_REGISTRY: dict[int, tuple] = {}


class _ModuleShim:
    """Stands in for ``slicer.modules.<name>``: only ``logic()`` is available."""

    def __init__(self, logic) -> None:
        self._logic = logic

    def logic(self):
        return self._logic


def _register_logic(scene, app_logic, name: str):
    logic = getattr(slicer, _LOGIC_CLASSES[name])()
    quiet = name == "Terminologies"  # it logs errors about *.term.json files slicer-core lacks
    previous = vtk.vtkObject.GetGlobalWarningDisplay()
    if quiet:
        vtk.vtkObject.GlobalWarningDisplayOff()
    try:
        logic.SetMRMLScene(scene)
    finally:
        vtk.vtkObject.SetGlobalWarningDisplay(previous)
    logic.SetMRMLApplicationLogic(app_logic)
    app_logic.SetModuleLogic(name, logic)
    return logic


def make_scene():
    """A new ``vtkMRMLScene`` with application and module logics; becomes ``slicer.mrmlScene``."""
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    colors = app_logic.GetColorLogic()
    colors.SetMRMLScene(scene)
    colors.AddDefaultColorNodes()
    app_logic.SetModuleLogic("Colors", colors)  # the Volumes logic looks the colour logic up by this name
    logics = {"Colors": colors}
    logics.update({name: _register_logic(scene, app_logic, name) for name in _LOGIC_CLASSES})
    _REGISTRY[id(scene)] = (app_logic, logics)
    slicer.mrmlScene = scene
    modules = getattr(slicer, "modules", None) or types.SimpleNamespace()
    for name, logic in logics.items():
        setattr(modules, name.lower(), _ModuleShim(logic))
    slicer.modules = modules
    return scene


def app_logic(scene):
    """The ``vtkSlicerApplicationLogic`` that ``make_scene`` registered for ``scene``."""
    return _REGISTRY[id(scene)][0]


def module_logic(scene, name: str):
    """A registered module logic by its Slicer module name, e.g. ``"Segmentations"``."""
    return _REGISTRY[id(scene)][1][name]


def close_scene(scene) -> None:
    """Clear the scene and forget its logics (``slicer.mrmlScene`` is unset if it was this scene)."""
    scene.Clear(1)
    _REGISTRY.pop(id(scene), None)
    if getattr(slicer, "mrmlScene", None) is scene:
        slicer.mrmlScene = None
