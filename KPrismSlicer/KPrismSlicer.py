"""KPrism: one promptable model for semantic, in-context and interactive segmentation in 3D Slicer.

Only wires the panel (Resources/UI) to the parameter node; the work is in KPrismSlicerLib (no Qt).
"""

import logging

import slicer
import vtk
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import *  # noqa: F403 (the scripted-module base classes)
from slicer.util import VTKObservationMixin

from KPrismSlicerLib import install
from KPrismSlicerLib.logic import KPrismLogic, KPrismUnavailable, SegmentationCancelled, known_models
from KPrismSlicerLib.nodes import InputError, create_prompt_node, placement_axis
from KPrismSlicerLib.parameters import AXES, KPrismSlicerParameterNode


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
            "carry the prompts that made them (tag KPrism.Provenance). Research use only, not for clinical decisions.")
        self.parent.acknowledgementText = _("Follows the K-Prism design (ICLR 2026). Built on KPrismCore (Apache-2.0).")


class KPrismSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = self._parameterNode = self._parameterNodeGuiTag = self._interactive = None
        self._cancelRequested = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/KPrismSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = KPrismSlicerLogic()
        self.ui.propagateButton.connect("clicked(bool)", lambda: self._prompt(lambda s: s.propagate(cross_axes=self.ui.crossAxesCheckBox.checked)))
        self.ui.progressBar.hide()
        for widget in (self.ui.positivePlaceWidget, self.ui.negativePlaceWidget):
            widget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.semanticButton.connect("clicked(bool)", self.onSemantic)
        self.ui.inContextButton.connect("clicked(bool)", self.onInContext)
        self.ui.applyBoxButton.connect("clicked(bool)", self.onApplyBox)
        self.ui.applyScribbleButton.connect("clicked(bool)", self.onApplyScribble)
        self.ui.undoButton.connect("clicked(bool)", lambda: self._prompt(lambda session: session.undo()))
        self.ui.newSegmentButton.connect("clicked(bool)", self.onNewSegment)
        self.ui.cancelButton.connect("clicked(bool)", lambda: setattr(self, "_cancelRequested", True))
        self.ui.installButton.connect("clicked(bool)", self.onInstall)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)  # a known model picked
        self.ui.modelComboBox.lineEdit().connect("editingFinished()", self.onModelChanged)  # a file path typed
        self.ui.settingsCollapsibleButton.connect("contentsCollapsed(bool)", lambda collapsed: collapsed or self._showVersions())
        self.initializeParameterNode()
        self._fillModelsAndClasses()

    def cleanup(self) -> None:
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
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
        ready = bool(p.inputVolume and p.outputSegmentation)
        for button in (self.ui.semanticButton, self.ui.inContextButton, self.ui.applyBoxButton, self.ui.applyScribbleButton,
                       self.ui.undoButton, self.ui.newSegmentButton):
            button.enabled = ready
        self.ui.positivePlaceWidget.enabled = self.ui.negativePlaceWidget.enabled = ready
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

    # ------------------------------------------------------------------------------ model and classes
    def _fillModelsAndClasses(self) -> None:
        if not install.is_installed():
            self.ui.statusLabel.text = _("KPrism's Python packages are not installed yet: they install on first use.")
            return
        self.ui.modelComboBox.blockSignals(True)
        self.ui.modelComboBox.clear()
        self.ui.modelComboBox.addItems(list(known_models()))
        self.ui.modelComboBox.setCurrentText(self._parameterNode.model or "kprism-tiny")
        self.ui.modelComboBox.blockSignals(False)
        self.ui.classListWidget.clear()
        with slicer.util.tryWithErrorDisplay(_("Could not read the KPrism model's classes."), waitCursor=True):
            self._configure()
            self.ui.classListWidget.addItems(self.logic.class_names())
        self._updateGui()

    def onModelChanged(self, *_) -> None:
        text = self.ui.modelComboBox.currentText.strip()
        if self._parameterNode and text != self._parameterNode.model:
            self._parameterNode.model = text
            self._interactive = None
            self._fillModelsAndClasses()

    def _configure(self) -> None:
        self.logic.configure(self._parameterNode.model or None, self._parameterNode.device)

    def _showVersions(self) -> None:
        self.ui.versionLabel.text = self.logic.runtime_versions()

    def onInstall(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Installing KPrism's dependencies failed."), waitCursor=True):
            if install.ensure_dependencies(ask=True):
                self._fillModelsAndClasses()
                self._showVersions()

    # ------------------------------------------------------------------------------ blocking runs
    def _options(self) -> dict:
        p = self._parameterNode
        return {"modality": None if p.modality == "auto" else p.modality, "axis": AXES.index(p.axis)}

    def _run(self, mode: str, **arguments) -> None:
        p, self._cancelRequested = self._parameterNode, False
        self.ui.progressBar.show()
        self.ui.cancelButton.enabled = True
        try:
            if not install.ensure_dependencies(ask=True):
                return
            self._configure()
            written = self.logic.segment(p.inputVolume, p.outputSegmentation, mode, progress=self._progress,
                                         cancel=lambda: self._cancelRequested, **arguments, **self._options())
            self.ui.statusLabel.text = _("Segmented: {names}").format(names=", ".join(written))
            self._interactive = None  # the next click continues the new result
            if len(written) == 1:
                self.ui.targetSegmentSelector.setCurrentSegmentID(next(iter(written.values())))
        except (SegmentationCancelled, InputError, KPrismUnavailable, ValueError, RuntimeError) as error:
            self.ui.statusLabel.text = str(error)
            if not isinstance(error, SegmentationCancelled):
                slicer.util.errorDisplay(str(error), windowTitle=_("KPrism"))
        except Exception as error:
            logging.exception("KPrism segmentation failed")
            slicer.util.errorDisplay(_("Segmentation failed: {error}").format(error=error), windowTitle=_("KPrism"))
        finally:
            self.ui.progressBar.hide()
            self.ui.cancelButton.enabled = False

    def _progress(self, fraction: float, message: str) -> None:
        self.ui.progressBar.value = int(100 * fraction)
        self.ui.progressBar.format = f"{message}  %p%"
        slicer.app.processEvents()  # lets Cancel be clicked

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
            session = self._interactive = self.logic.interactive(p.inputVolume, p.outputSegmentation, target, **self._options())
        return session

    def _prompt(self, action) -> None:
        """Run one interactive prompt; errors are shown in the status line and change nothing."""
        try:
            if not install.ensure_dependencies(ask=True):
                return
            with slicer.util.WaitCursor():
                session = self._session()
                result = action(session)
            if session.segment_id:
                self.ui.targetSegmentSelector.setCurrentSegmentID(session.segment_id)
            if result is not None:
                self.ui.statusLabel.text = _("{n} voxels, predicted quality (Dice) {q:.2f}").format(n=result.voxels, q=result.quality)
        except (InputError, KPrismUnavailable, ValueError, RuntimeError) as error:
            self.ui.statusLabel.text = str(error)
        except Exception as error:
            logging.exception("KPrism prompt failed")
            self.ui.statusLabel.text = _("Prompt failed: {error}").format(error=error)

    def onPointPlaced(self, caller, event) -> None:
        p = self._parameterNode
        if p and p.inputVolume and p.outputSegmentation:  # the click slices along the view it was placed in
            axis = placement_axis(slicer.mrmlScene, p.inputVolume)
            self._prompt(lambda session: session.add_fiducial(caller, axis=axis))

    def onApplyBox(self) -> None:
        self._prompt(lambda session: session.add_box(self._parameterNode.box))

    def onApplyScribble(self) -> None:
        selector = self.ui.scribbleSegmentSelector
        positive = self.ui.scribblePositiveCheckBox.checked
        self._prompt(lambda session: session.add_scribble(selector.currentNode(), selector.currentSegmentID(), positive))

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
    """A positive click on a bright blob in an oblique volume must land inside the new segment."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_click_on_oblique_blob()

    def test_click_on_oblique_blob(self):
        if not install.is_installed():
            self.delayDisplay("KPrism's dependencies are not installed; nothing to test.")
            return
        import numpy as np

        k, j, i = np.mgrid[:12, :40, :48]
        blob = np.where(((i - 24) / 10) ** 2 + ((j - 20) / 8) ** 2 + ((k - 6) / 4) ** 2 <= 1, 60, -900).astype(np.int16)
        c, s = np.cos(np.radians(20)), np.sin(np.radians(20))  # 20° oblique, anisotropic voxels
        ijkToRAS = np.array([[c, -s, 0, -30.0], [s, c, 0, 12.5], [0, 0, 1, 88.0], [0, 0, 0, 1]]) @ np.diag([0.8, 1.1, 3.0, 1])
        volume = slicer.util.addVolumeFromArray(blob, ijkToRAS, name="blob")
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        clicked = KPrismSlicerLogic().interactive(volume, segmentation).add_click((ijkToRAS @ [24, 20, 6, 1])[:3])
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, clicked.segment_id, volume)
        self.assertEqual(mask[6, 20, 24], 1)
        self.delayDisplay("Test passed")
