"""KPrism: one promptable model for semantic, in-context and interactive segmentation in 3D Slicer.

Only wires the panel (Resources/UI) to the parameter node and the model worker; the work is in
KPrismSlicerLib (no Qt). Model work never runs on the GUI thread: each run or prompt is read here
(`prepare`), computed by the shared worker thread, and written here when a 30 ms timer delivers it.
"""

import logging

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import *  # noqa: F403 (the scripted-module base classes)
from slicer.util import VTKObservationMixin

from KPrismSlicerLib import bundled, effect_logic, install
from KPrismSlicerLib.logic import KPrismLogic, KPrismUnavailable, known_models
from KPrismSlicerLib.prompts import Prompt
from KPrismSlicerLib.nodes import InputError, create_prompt_node, placement_axis
from KPrismSlicerLib.parameters import AXES, KPrismSlicerParameterNode
from KPrismSlicerLib.worker import JobCancelled, shared_worker

DELIVER_MS = 30  # how often the GUI thread collects finished model work


class KPrismSlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("KPrism")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Markups", "Segmentations"]
        self.parent.contributors = ["KPrism developers"]
        self.parent.helpText = _(
            "One promptable model for <b>semantic</b> (name a structure), <b>in-context</b> (show an annotated example) "
            "and <b>interactive</b> segmentation (clicks, boxes, scribbles that create or refine any segment). Segments "
            "carry the prompts that made them (tag KPrism.Provenance). Needs 3D Slicer 5.10 or later. The model runs in "
            "the background: Slicer stays responsive, prompts placed meanwhile wait their turn, and Cancel stops a run "
            "without changing anything. Research use only, not for clinical decisions.")
        self.parent.acknowledgementText = _("Follows the K-Prism design (ICLR 2026). Built on KPrismCore (Apache-2.0).")
        slicer.app.connect("startupCompleted()", self.registerEditorEffect)

    def registerEditorEffect(self) -> None:
        """Adds the Segment Editor effect "KPrism" (KPrismSlicerLib/SegmentEditorEffect.py) once Slicer has started."""
        from KPrismSlicerLib.SegmentEditorEffect import registerEffect

        registerEffect()


class KPrismSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = self._parameterNode = self._parameterNodeGuiTag = self._interactive = None
        self.worker, self._scene, self._installed = shared_worker(), 0, False  # _scene: a closed scene's results are dropped

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        problem = bundled.python_problem()
        if problem:  # Slicer 5.8 (Python 3.9): one clear line instead of a broken panel
            self.layout.addWidget(qt.QLabel(problem))
            return
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/KPrismSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = KPrismSlicerLogic()
        effect_logic.set_shared_logic(self.logic)  # the Segment Editor effect uses the same model and encoded volumes
        self.ui.progressBar.hide()
        self.ui.cancelButton.enabled = False
        for widget in (self.ui.positivePlaceWidget, self.ui.negativePlaceWidget):
            widget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.semanticButton.connect("clicked(bool)", self.onSemantic)
        self.ui.inContextButton.connect("clicked(bool)", self.onInContext)
        self.ui.applyBoxButton.connect("clicked(bool)", lambda: self._prompt(lambda s: s.prepare(self._parameterNode.box)))
        self.ui.applyScribbleButton.connect("clicked(bool)", self.onApplyScribble)
        self.ui.undoButton.connect("clicked(bool)", lambda: self._prompt(lambda session: session.prepare_undo()))
        self.ui.propagateButton.connect("clicked(bool)", lambda: self._prompt(
            lambda session: session.prepare_propagate(cross_axes=self.ui.crossAxesCheckBox.checked)))
        self.ui.newSegmentButton.connect("clicked(bool)", self.onNewSegment)
        self.ui.cancelButton.connect("clicked(bool)", lambda: self.worker.cancel())  # the running job; queued ones stay
        self.ui.installButton.connect("clicked(bool)", lambda: self._dependenciesReady(even_if_declined=True))
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)  # a known model picked
        self.ui.modelComboBox.lineEdit().connect("editingFinished()", self.onModelChanged)  # a file path typed
        self.ui.settingsCollapsibleButton.connect("contentsCollapsed(bool)", lambda collapsed: collapsed or self._showVersions())
        self._timer = qt.QTimer()
        self._timer.setInterval(DELIVER_MS)
        self._timer.connect("timeout()", self._deliver)
        self._timer.start()
        self.initializeParameterNode()
        self._fillModelsAndClasses()

    def cleanup(self) -> None:
        if getattr(self, "_timer", None) is not None:
            self._timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        if self.logic is not None:
            self.initializeParameterNode()

    def exit(self) -> None:
        if self.logic is not None:
            self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        self.worker.cancel(drop_queued=True)
        self._scene += 1
        p = self._parameterNode
        for node in (p.positivePoints, p.negativePoints) if p else ():
            if node is not None:  # m7: the closing scene's prompt nodes are no longer observed
                self.removeObserver(node, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onPointPlaced)
        self.setParameterNode(None)
        self._interactive = None

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ------------------------------------------------------------------------------ parameter node
    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._ensurePromptNodes()
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
            self._updateGui()

    def _updateGui(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        ready, busy = bool(p.inputVolume and p.outputSegmentation), self.worker.busy
        for button in (self.ui.semanticButton, self.ui.inContextButton):
            button.enabled = ready and not busy  # a run never starts under another one
        for button in (self.ui.applyBoxButton, self.ui.applyScribbleButton, self.ui.undoButton, self.ui.newSegmentButton,
                       self.ui.propagateButton):
            button.enabled = ready  # prompts placed while busy wait their turn
        self.ui.positivePlaceWidget.enabled = self.ui.negativePlaceWidget.enabled = ready
        self.ui.modelComboBox.enabled = self.ui.deviceComboBox.enabled = not busy
        if self.ui.targetSegmentSelector.currentNode() is not p.outputSegmentation:
            self.ui.targetSegmentSelector.setCurrentNode(p.outputSegmentation)
        text = p.classFilter.strip().lower()
        for row in range(self.ui.classListWidget.count):
            item = self.ui.classListWidget.item(row)
            item.setHidden(bool(text) and text not in item.text().lower())

    def _ensurePromptNodes(self) -> None:
        """Positive (green) and negative (red) click lists and a box, created once per scene."""
        p = self._parameterNode
        p.positivePoints = p.positivePoints or create_prompt_node(slicer.mrmlScene, "positive")
        p.negativePoints = p.negativePoints or create_prompt_node(slicer.mrmlScene, "negative")
        p.box = p.box or create_prompt_node(slicer.mrmlScene, "box")
        for node in (p.positivePoints, p.negativePoints):
            if not self.hasObserver(node, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onPointPlaced):
                self.addObserver(node, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onPointPlaced)
        self.ui.positivePlaceWidget.setCurrentNode(p.positivePoints)
        self.ui.negativePlaceWidget.setCurrentNode(p.negativePoints)
        self.ui.boxPlaceWidget.setCurrentNode(p.box)

    # ------------------------------------------------------------------------------ model, classes, install
    def _fillModelsAndClasses(self) -> None:
        """Models and classes from the catalog file (no torch needed); a model file's classes come from the worker."""
        model = (self._parameterNode.model if self._parameterNode else "") or "kprism-tiny"
        models = known_models()
        self.ui.modelComboBox.blockSignals(True)
        self.ui.modelComboBox.clear()
        self.ui.modelComboBox.addItems(list(models))
        self.ui.modelComboBox.setCurrentText(model)
        self.ui.modelComboBox.blockSignals(False)
        installed = install.is_installed()  # reads package metadata: once per refill
        if model in models:
            self._setClasses(models[model])
        elif installed:
            self._configure()
            self._submit(_("Reading the model's classes"), lambda control: self.logic.class_names(), self._setClasses)
        if not installed:
            self.ui.statusLabel.text = _("KPrism's Python packages install on first use (or press 'Install dependencies').")

    def _setClasses(self, names) -> None:
        self.ui.classListWidget.clear()
        self.ui.classListWidget.addItems(list(names))
        self._updateGui()

    def onModelChanged(self, *_) -> None:
        text = self.ui.modelComboBox.currentText.strip()
        if self._parameterNode and text != self._parameterNode.model:
            self._parameterNode.model = text
            self._interactive = None
            self._fillModelsAndClasses()

    def _configure(self) -> None:
        self.logic.configure(self._parameterNode.model or None, self._parameterNode.device)

    def _showVersions(self) -> None:  # m7: torch is imported by the worker, never on the GUI thread
        self._submit(_("Checking torch"), lambda control: self.logic.runtime_versions(),
                     lambda text: setattr(self.ui.versionLabel, "text", text))

    def _dependenciesReady(self, even_if_declined: bool = False) -> bool:
        """Offer the first-use install from any mode; after an install the model and class lists refill."""
        if self._installed:
            return True
        needed = install.missing()
        try:
            with slicer.util.WaitCursor():
                ready = install.ensure_dependencies(ask=True, even_if_declined=even_if_declined)
        except RuntimeError as error:
            slicer.util.errorDisplay(str(error), windowTitle=_("KPrism"))
            return False
        self._installed = ready
        if not ready:
            self.ui.statusLabel.text = install.DECLINED
        elif needed:
            self._fillModelsAndClasses()
            self._showVersions()
        return ready

    # ------------------------------------------------------------------------------ the worker
    def _submit(self, label, compute, on_done) -> None:
        """Queue model work; `on_done` runs here (GUI thread) unless the scene was closed meanwhile."""
        scene = self._scene
        self.worker.submit(label, compute, lambda result: scene == self._scene and on_done(result),
                           lambda error: scene == self._scene and self._failed(label, error))
        self._deliver()

    def _failed(self, label, error) -> None:
        self.ui.statusLabel.text = str(error)
        if isinstance(error, (InputError, JobCancelled)):
            return  # a refused prompt or a Cancel: the status line says it, nothing changed
        if not isinstance(error, (KPrismUnavailable, ValueError, RuntimeError)):
            logging.error("KPrism: %s failed", label, exc_info=error)
        slicer.util.errorDisplay(_("{label} failed: {error}").format(label=label, error=error), windowTitle=_("KPrism"))

    def _deliver(self) -> None:
        """Timer: write finished results, then show what runs and how many prompts wait."""
        self.worker.deliver()
        running, waiting = self.worker.current, len(self.worker.queued_labels())
        self.ui.progressBar.visible = self.ui.cancelButton.enabled = running is not None
        if running is not None:
            self.ui.progressBar.value = int(100 * running.fraction)
            queue = _("  ({n} prompts waiting)").format(n=waiting) if waiting else ""
            self.ui.progressBar.format = f"{running.message or running.label}  %p%{queue}"
        if self._parameterNode is not None and (running is not None) != getattr(self, "_wasBusy", False):
            self._wasBusy = running is not None
            self._updateGui()

    # ------------------------------------------------------------------------------ runs
    def _options(self) -> dict:
        p = self._parameterNode
        return {"modality": None if p.modality == "auto" else p.modality, "axis": AXES.index(p.axis)}

    def _run(self, mode: str, **arguments) -> None:
        p = self._parameterNode
        if not self._dependenciesReady():
            return
        self._configure()
        try:
            prepared = self.logic.prepare_segment(p.inputVolume, p.outputSegmentation, mode, **arguments, **self._options())
        except (InputError, KPrismUnavailable) as error:
            self._failed(mode, error)
            return
        self._submit(prepared.label, prepared.compute, lambda outcome: self._written(self.logic.finish_segment(prepared, outcome)))

    def _written(self, written) -> None:
        self.ui.statusLabel.text = _("Segmented: {names}").format(names=", ".join(written))
        self._interactive = None  # the next click continues the new result
        if len(written) == 1:
            self.ui.targetSegmentSelector.setCurrentSegmentID(next(iter(written.values())))

    def onSemantic(self) -> None:
        classes = [item.text() for item in self.ui.classListWidget.selectedItems()]
        if not classes:
            self.ui.statusLabel.text = _("Select one or more classes first.")
            return
        self._run("semantic", classes=classes)

    def onInContext(self) -> None:
        selector = self.ui.referenceSegmentSelector
        reference = (self._parameterNode.referenceVolume, selector.currentNode(), selector.currentSegmentID() or None)
        self._run("incontext", references=[reference], segment_id=self.ui.targetSegmentSelector.currentSegmentID() or None)

    # ------------------------------------------------------------------------------ interactive
    def _session(self):
        p = self._parameterNode
        target = self.ui.targetSegmentSelector.currentSegmentID() or None
        session = self._interactive
        if (session is None or session.volume_node is not p.inputVolume or session.segmentation_node is not p.outputSegmentation
                or (target is not None and target != session.segment_id)):
            self._configure()
            session = self._interactive = self.logic.interactive(p.inputVolume, p.outputSegmentation, target,
                                                                 start=False, **self._options())
        return session

    def _prompt(self, prepare) -> None:
        """Read one prompt now and queue its model work; a refused prompt changes nothing and says why."""
        if not self._dependenciesReady():
            return
        try:
            session = self._session()
            prepared = prepare(session)
        except (InputError, KPrismUnavailable, ValueError) as error:
            self.ui.statusLabel.text = str(error)
            return
        self._submit(prepared.label, prepared.compute, lambda delta: self._shown(session, session.finish(prepared, delta)))

    def _shown(self, session, result) -> None:
        if session.segment_id:
            self.ui.targetSegmentSelector.setCurrentSegmentID(session.segment_id)
        if result is not None:
            self.ui.statusLabel.text = _("{n} voxels, predicted quality (Dice) {q:.2f}").format(n=result.voxels, q=result.quality)

    def onPointPlaced(self, caller, event) -> None:
        p = self._parameterNode
        if p and p.inputVolume and p.outputSegmentation:  # the click slices along the view it was placed in
            axis = placement_axis(slicer.mrmlScene, p.inputVolume)
            self._prompt(lambda session: session.prepare(session.fiducial_prompt(caller, axis=axis)))

    def onApplyScribble(self) -> None:
        selector, positive = self.ui.scribbleSegmentSelector, self.ui.scribblePositiveCheckBox.checked
        self._prompt(lambda session: session.prepare(Prompt.scribble(selector.currentNode(), selector.currentSegmentID(), positive)))

    def onNewSegment(self) -> None:
        if self._interactive is not None:
            self._interactive.reset()
        self.ui.targetSegmentSelector.setCurrentSegmentID("")
        for node in (self._parameterNode.positivePoints, self._parameterNode.negativePoints):
            node.RemoveAllControlPoints()


class KPrismSlicerLogic(ScriptedLoadableModuleLogic, KPrismLogic):
    """The module's logic: KPrismLogic (KPrismSlicerLib.logic) plus the parameter node."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        KPrismLogic.__init__(self)

    def getParameterNode(self):
        return KPrismSlicerParameterNode(super().getParameterNode())


class KPrismSlicerTest(ScriptedLoadableModuleTest):
    """A positive click on a bright blob in an oblique volume, computed by the worker, lands inside the new segment."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_click_on_oblique_blob()

    def test_click_on_oblique_blob(self):
        missing = install.missing() if bundled.kprism_found() else ["kprism"]
        if missing:  # m3: a missing install fails with the fix, never passes without testing anything
            self.fail(f"KPrism's dependencies are missing ({', '.join(missing)}): open the KPrism module, press "
                      "'Install dependencies', then run this test again.")
        import numpy as np

        k, j, i = np.mgrid[:12, :40, :48]
        blob = np.where(((i - 24) / 10) ** 2 + ((j - 20) / 8) ** 2 + ((k - 6) / 4) ** 2 <= 1, 60, -900).astype(np.int16)
        c, s = np.cos(np.radians(20)), np.sin(np.radians(20))  # 20° oblique, anisotropic voxels
        ijkToRAS = np.array([[c, -s, 0, -30.0], [s, c, 0, 12.5], [0, 0, 1, 88.0], [0, 0, 0, 1]]) @ np.diag([0.8, 1.1, 3.0, 1])
        volume = slicer.util.addVolumeFromArray(blob, ijkToRAS, name="blob")
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        session = KPrismSlicerLogic().interactive(volume, segmentation, start=False)
        prepared, results, worker = session.prepare(Prompt.point((ijkToRAS @ [24, 20, 6, 1])[:3])), [], shared_worker()
        worker.submit("self-test click", prepared.compute, lambda delta: results.append(session.finish(prepared, delta)),
                      lambda error: results.append(error))
        self.assertTrue(worker.wait(300))
        worker.deliver()
        self.assertFalse(isinstance(results[0], BaseException), results[0])
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, results[0].segment_id, volume)
        self.assertEqual(mask[6, 20, 24], 1)
        self.delayDisplay("Test passed")
