"""MedAutoLabel: automatic labelling of CT/MR volumes (segments + classification tags). The panel only:
the work is in MedAutoLabelLib (scene logic, background runner) and the medautolabel engine."""

from __future__ import annotations

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from MedAutoLabelLib.logic import DEFAULT_MODEL, MedAutoLabelLogic
from MedAutoLabelLib.parameters import MedAutoLabelParameterNode

MODEL_FOLDERS_SETTING = "MedAutoLabel/ModelFolders"


class MedAutoLabel(ScriptedLoadableModule):
    def __init__(self, parent) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        parent.title = "MedAutoLabel"
        parent.categories = ["Segmentation"]
        parent.dependencies = []
        parent.contributors = ["MedAutoLabel developers"]
        parent.helpText = ("Labels a CT or MR volume automatically: a segmentation with named, coloured, "
                           "SNOMED-CT coded segments and classification tags with probabilities. Runs in the "
                           "background; nothing is downloaded. See docs/slicer.md.")
        parent.acknowledgementText = "Built on MONAI, PyTorch and SimpleITK."


class MedAutoLabelWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.runner = None
        self.timer = qt.QTimer()
        self.timer.setInterval(100)
        self.timer.connect("timeout()", self.onPoll)
        self.lastOutput = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedAutoLabel.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedAutoLabelLogic()
        for folder in self.savedModelFolders():
            try:
                self.logic.addModelFolder(folder)
            except Exception as e:  # a folder that went away: say so, keep the others
                slicer.util.warningDisplay(f"Model folder skipped: {e}")
        self.populateModels()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.addModelFolderButton.connect("clicked(bool)", self.onAddModelFolder)
        self.ui.modelSelector.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.show3DButton.connect("clicked(bool)", self.onShow3D)
        self.ui.evaluateButton.connect("clicked(bool)", self.onEvaluate)
        self.ui.addTrainPairButton.connect("clicked(bool)", self.onAddTrainPair)
        self.ui.clearTrainPairsButton.connect("clicked(bool)", self.onClearTrainPairs)
        self.ui.trainButton.connect("clicked(bool)", self.onTrainButton)
        self.trainPairs, self.trainer = [], None
        self.trainTimer = qt.QTimer()
        self.trainTimer.setInterval(250)
        self.trainTimer.connect("timeout()", self.onTrainPoll)
        self.initializeParameterNode()

    # --- parameter node -----------------------------------------------------------------------

    def cleanup(self) -> None:
        self.cancelRun()
        if self.trainer is not None:
            self.trainer.cancel()
        if self.runner is not None:
            self.runner.shutdown()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        self.cancelRun()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(MedAutoLabelParameterNode(self.logic.getParameterNode()))
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, node) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
        self._parameterNode = node
        if node:
            self.ui.modelSelector.setCurrentText(node.model)
            self._parameterNodeGuiTag = node.connectGui(self.ui)
            self.addObserver(node, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
            self.updateButtons()

    def updateButtons(self, caller=None, event=None) -> None:
        running = self.runner is not None and self.runner.running
        self.ui.applyButton.enabled = running or bool(self._parameterNode and self._parameterNode.inputVolume)
        self.ui.applyButton.text = "Cancel" if running else "Auto-label"

    # --- models -------------------------------------------------------------------------------

    def populateModels(self) -> None:
        self.cards = {card.id: card for card in self.logic.availableModels()}
        self.ui.modelSelector.clear()
        self.ui.trainBaseModelSelector.clear()
        self.ui.trainBaseModelSelector.addItem("(train from scratch)")
        for model_id in self.cards:
            self.ui.modelSelector.addItem(model_id)
            self.ui.trainBaseModelSelector.addItem(model_id)
        self.ui.modelSelector.setCurrentText(DEFAULT_MODEL)
        self.onModelChanged()

    def onModelChanged(self, index=None) -> None:
        card = self.cards.get(self.ui.modelSelector.currentText)
        if self._parameterNode and card:
            self._parameterNode.model = card.id
        if card is None:
            self.ui.modelDescriptionLabel.text = ""
            return
        labels = ", ".join(lab.name for lab in card.labels) or "none (classification only: no segmentation)"
        classes = ", ".join(f"{t.task} ({'/'.join(t.classes)}, {t.method}"
                            + ("" if t.validated else ", <i>not validated</i>") + ")"
                            for t in card.classification) or "none"
        source = card.provenance.get("training_data", "") or str(card.path.parent if card.path else "")
        metrics = "; ".join(f"{k} {v}" for k, v in card.metrics.items() if not isinstance(v, dict))
        self.ui.modelDescriptionLabel.text = (f"<b>{card.name}</b> v{card.version} ({card.modality})<br>"
                                              f"Labels: {labels}<br>Classes: {classes}<br>From: {source}"
                                              + (f"<br>Held-out: {metrics}" if metrics else ""))

    @staticmethod
    def savedModelFolders():
        value = qt.QSettings().value(MODEL_FOLDERS_SETTING, [])
        return [value] if isinstance(value, str) else list(value or [])  # QSettings returns one item as str

    def onAddModelFolder(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Model folder (holds model.json)")
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay("This folder is not a usable model.", waitCursor=True):
            card = self.logic.addModelFolder(folder)
            folders = self.savedModelFolders()
            qt.QSettings().setValue(MODEL_FOLDERS_SETTING, folders + [folder] if folder not in folders else folders)
            self.populateModels()
            self.ui.modelSelector.setCurrentText(card.id)

    # --- running ------------------------------------------------------------------------------

    def onApplyButton(self) -> None:
        if self.runner is not None and self.runner.running:
            self.cancelRun()
            self.ui.statusLabel.text = "Cancelled."
            return
        from MedAutoLabelLib import installer
        from MedAutoLabelLib.runner import BackgroundLabeller

        with slicer.util.tryWithErrorDisplay("Could not start auto-labelling.", waitCursor=True):
            missing = installer.missing_packages()
            if missing and not installer.install(missing, confirm=slicer.util.confirmOkCancelDisplay):
                return
            p = self._parameterNode
            image = self.logic.volumeToImage(p.inputVolume)
            self.runner = self.runner or BackgroundLabeller()
            self.runner.start(image, p.model, device=p.device, postprocess=p.postprocess,
                              low_confidence=p.lowConfidenceThreshold)
            self.runVolume, self.runOutput = p.inputVolume, p.outputSegmentation
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = "Starting…"
            self.timer.start()
        self.updateButtons()

    def onPoll(self) -> None:
        for message in self.runner.poll() if self.runner else []:
            if message["event"] == "progress":
                self.ui.progressBar.value = int(100 * message["fraction"])
                self.ui.statusLabel.text = message["stage"]
            elif message["event"] == "done":
                self.finishRun(message)
            elif message["event"] == "error":
                self.timer.stop()
                self.runner.cleanup()
                self.ui.statusLabel.text = "Failed."
                slicer.util.errorDisplay(message["message"], detailedText=message.get("details") or None)
        self.updateButtons()

    def finishRun(self, message) -> None:
        self.timer.stop()
        try:
            with slicer.util.tryWithErrorDisplay("Could not load the result.", waitCursor=True):
                out = self.logic.applyResult(self.runVolume, self.runner.read_result(message), self.runOutput)
                self.showResults(out)
                self.ui.progressBar.value = 100
                seconds = out.provenance.get("timings_s", {}).get("total", 0.0)
                self.ui.statusLabel.text = f"Done in {seconds:.1f} s on {out.provenance.get('device', '?')}." + (
                    "" if out.segmentationNode is not None else " Tags only (the model segments nothing): "
                                                                "see the volume's findings table.")
        finally:
            self.runner.cleanup()

    def cancelRun(self) -> None:
        self.timer.stop()
        if self.runner is not None and self.runner.running:
            self.runner.cancel()

    def showResults(self, out) -> None:
        self.lastOutput = out
        self.ui.classificationLabel.text = "<br>".join(
            f"<b>{c.task}</b>: {c.label}, p={c.probability:.2f}" + (" <i>(low confidence)</i>" if c.low_confidence
                                                                     else "")
            + ("" if c.validated else " <i>(not validated)</i>") for c in out.classifications)
        table = self.ui.segmentsTable
        table.setRowCount(len(out.segments))
        for row, s in enumerate(out.segments):
            cells = [s.name, f"{s.volume_ml:.2f}", f"{s.mean_confidence:.2f}", "yes" if s.low_confidence else ""]
            for col, text in enumerate(cells):
                table.setItem(row, col, qt.QTableWidgetItem(text))
        hasSegments = out.segmentationNode is not None  # None: a classification-only model
        self.ui.show3DButton.enabled = hasSegments
        if hasSegments:
            self.ui.evaluatePredictionSelector.setCurrentNode(out.segmentationNode)

    def onShow3D(self) -> None:
        if self.lastOutput is not None and self.lastOutput.segmentationNode is not None:
            self.lastOutput.segmentationNode.CreateClosedSurfaceRepresentation()

    def onEvaluate(self) -> None:
        with slicer.util.tryWithErrorDisplay("Evaluation failed.", waitCursor=True):
            pred, ref = self.ui.evaluatePredictionSelector.currentNode(), self.ui.evaluateReferenceSelector.currentNode()
            volume = self._parameterNode.inputVolume
            if not (pred and ref and volume):
                raise ValueError("Choose a result, a reference segmentation and the input volume.")
            table, _ = self.logic.evaluateSegmentations(pred, ref, volume)
            slicer.app.layoutManager().setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
            slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(table.GetID())
            slicer.app.applicationLogic().PropagateTableSelection()


    # --- training -----------------------------------------------------------------------------

    def onAddTrainPair(self) -> None:
        volume, seg = self.ui.trainVolumeSelector.currentNode(), self.ui.trainSegmentationSelector.currentNode()
        if volume and seg:
            self.trainPairs.append((volume, seg))
            self.ui.trainPairsList.addItem(f"{volume.GetName()}  +  {seg.GetName()}")

    def onClearTrainPairs(self) -> None:
        self.trainPairs = []
        self.ui.trainPairsList.clear()

    def onTrainButton(self) -> None:
        from MedAutoLabelLib.runner import BackgroundTrainer

        if self.trainer is not None and self.trainer.running:
            self.trainer.cancel()
            self.trainTimer.stop()
            self.ui.trainButton.text = "Train"
            self.ui.trainStatusLabel.text = "Cancelled (resume with 'medautolabel train --resume')."
            return
        with slicer.util.tryWithErrorDisplay("Could not start training.", waitCursor=True):
            name = self.ui.trainNameLineEdit.text.strip()
            self.trainModelDir = self.logic.userModelFolder(name)
            if self.trainPairs:
                data = self.logic.exportTrainingDataset(self.trainPairs, self.trainModelDir.parent / f".{name}-data")
            elif self.ui.trainDatasetPathLineEdit.currentPath:
                data = self.ui.trainDatasetPathLineEdit.currentPath
            else:
                raise ValueError("Add volume + segmentation pairs or choose a dataset folder.")
            base = self.ui.trainBaseModelSelector.currentText if self.ui.trainBaseModelSelector.currentIndex > 0 \
                else None
            self.trainer = self.trainer or BackgroundTrainer()
            self.trainer.start(data, self.trainModelDir, base=base, epochs=self.ui.trainEpochsSpinBox.value,
                               device=self._parameterNode.device)
            self.ui.trainButton.text = "Cancel"
            self.ui.trainProgressBar.value = 0
            self.trainTimer.start()

    def onTrainPoll(self) -> None:
        for m in self.trainer.poll():
            if m["event"] == "progress":
                self.ui.trainProgressBar.value = int(100 * m.get("epoch", 0) / max(1, m.get("epochs", 1)))
                dice = f", validation Dice {m['val_mean_dice']:.3f}" if "val_mean_dice" in m else ""
                self.ui.trainStatusLabel.text = f"Epoch {m['epoch']}/{m['epochs']}, loss {m['loss']:.4f}{dice}"
            elif m["event"] == "log":
                self.ui.trainStatusLabel.text = m["message"]
            elif m["event"] in ("done", "error"):
                self.trainTimer.stop()
                self.ui.trainButton.text = "Train"
                if m["event"] == "error":
                    slicer.util.errorDisplay(m["message"], detailedText=m.get("details") or None)
                else:
                    card = self.logic.addModelFolder(m["model_dir"])
                    self.populateModels()
                    self.ui.modelSelector.setCurrentText(card.id)
                    self.ui.trainStatusLabel.text = f"Trained: {card.id} (now in the model selector)."


class MedAutoLabelTest(ScriptedLoadableModuleTest):
    """Runs the shared phantom scenario (MedAutoLabelLib.selftest) on the CPU; no downloads."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_phantom_scenario()

    def test_phantom_scenario(self) -> None:
        from MedAutoLabelLib.selftest import run_phantom_scenario

        self.delayDisplay("Labelling a synthetic CT angiogram on the CPU")
        facts = run_phantom_scenario(MedAutoLabelLogic(), slicer.mrmlScene)
        self.delayDisplay(f"Passed: Dice {facts['dice']}, aneurysm {facts['aneurysm']} p={facts['probability']:.2f}")

