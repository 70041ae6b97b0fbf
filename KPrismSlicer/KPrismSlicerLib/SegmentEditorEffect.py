"""The "KPrism" Segment Editor effect: clicks, boxes and painted scribbles answered by the KPrism model.

Only Qt and view events live here; everything else is `effect_logic.EffectLogic` (tested without
Qt). The KPrism module registers the effect when Slicer has started (`registerEffect`).
"""

import os

import qt
import vtk

import slicer
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

from KPrismSlicerLib import bundled  # noqa: F401 (puts the kprism shipped with the module on sys.path)

DRAG_PIXELS = 4  # a press that moves less than this is a click, more a box or a stroke
MARKER_PIXELS = 8  # a press this close to a marker drags the marker instead
DELIVER_MS = 30  # how often finished model work is written into the scene

_HELP = """<html>Segment the <b>selected segment</b> with the KPrism model, in any slice view.
An empty segment becomes a new structure; a segment with content is refined (its mask is the prior).
<p><ul style="margin: 0">
<li><b>Click:</b> include here. <b>Shift+click:</b> exclude here. <b>e:</b> exclude every click until pressed again.
<li><b>Drag:</b> a box around the structure on that slice; the result continues through the neighbouring slices.
Stretch the box's marker across slices to make it a 3D box that bounds the structure.
<li><b>p</b> or <i>Scribble</i>: drags paint a scribble (applied when the stroke ends); <b>Shift+drag</b> paints an exclude scribble.
<li><b>Ctrl+Z</b> (or <b>z</b>): undo the last KPrism prompt and its marker. <b>Ctrl+Y</b> (or <b>y</b>, <b>Ctrl+Shift+Z</b>): redo.
<li><b>Drag a marker</b> (point, box or stroke): that prompt runs again from its new place.
</ul>
<p>A click works on the slice of the view it was placed in (a sagittal click corrects sagittal slices) and the
change travels to the neighbouring slices. The model runs in the background: prompts placed meanwhile wait in
order. Research use only, not for clinical decisions.</p>"""


def registerEffect() -> None:
    """Add the effect to the Segment Editor (the module calls this on Slicer's startupCompleted)."""
    import qSlicerSegmentationsEditorEffectsPythonQt as effects

    instance = effects.qSlicerSegmentEditorScriptedEffect(None)
    instance.setPythonSource(__file__.replace("\\", "/"))
    instance.self().register()


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """Turns view events into EffectLogic calls; shows the stroke or box being drawn and the status line."""

    def __init__(self, scriptedEffect):
        scriptedEffect.name = "KPrism"  # not translated: modules find effects by name
        scriptedEffect.title = "KPrism"
        scriptedEffect.perSegment = True
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.logic = None
        self._gesture = None  # the press being drawn: {"view", "xy", "points", "actor", "positive", "scribble"}
        self._shortcuts, self._silenced = [], []
        self._timer = None

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        iconPath = os.path.join(os.path.dirname(__file__), "SegmentEditorEffect.png")
        return qt.QIcon(iconPath) if os.path.exists(iconPath) else qt.QIcon()

    def helpText(self):
        return _HELP

    # ------------------------------------------------------------------------------ options
    def setupOptionsFrame(self):
        self.excludeCheckBox = qt.QCheckBox("Exclude (e)")
        self.excludeCheckBox.toolTip = "Clicks and scribbles remove from the segment (Shift does it for one click)."
        self.scribbleCheckBox = qt.QCheckBox("Scribble (p)")
        self.scribbleCheckBox.toolTip = "Drags paint a scribble instead of drawing a box."
        row = qt.QHBoxLayout()
        row.addWidget(self.excludeCheckBox)
        row.addWidget(self.scribbleCheckBox)
        self.scriptedEffect.addLabeledOptionsWidget("Prompts:", row)

        self.brushSlider = slicer.qMRMLSliderWidget()
        self.brushSlider.setMRMLScene(slicer.mrmlScene)
        self.brushSlider.quantity = "length"
        self.brushSlider.minimum, self.brushSlider.maximum, self.brushSlider.value = 0.5, 20.0, 3.0
        self.brushSlider.toolTip = "Radius of a painted scribble."
        self.scriptedEffect.addLabeledOptionsWidget("Scribble radius:", self.brushSlider)

        self.undoButton = qt.QPushButton("Undo (Ctrl+Z)")
        self.redoButton = qt.QPushButton("Redo (Ctrl+Y)")
        buttons = qt.QHBoxLayout()
        buttons.addWidget(self.undoButton)
        buttons.addWidget(self.redoButton)
        self.scriptedEffect.addOptionsWidget(buttons)
        self.statusLabel = qt.QLabel("")
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.statusLabel)

        self.excludeCheckBox.connect("toggled(bool)", self.updateMRMLFromGUI)
        self.scribbleCheckBox.connect("toggled(bool)", self.updateMRMLFromGUI)
        self.brushSlider.connect("valueChanged(double)", self.updateMRMLFromGUI)
        self.undoButton.connect("clicked()", self.onUndo)
        self.redoButton.connect("clicked()", self.onRedo)

    def setMRMLDefaults(self):
        self.scriptedEffect.setParameterDefault("Exclude", 0)
        self.scriptedEffect.setParameterDefault("Scribble", 0)
        self.scriptedEffect.setParameterDefault("ScribbleRadiusMm", 3.0)

    def updateGUIFromMRML(self):
        for widget, checked in ((self.excludeCheckBox, self.scriptedEffect.integerParameter("Exclude")),
                                (self.scribbleCheckBox, self.scriptedEffect.integerParameter("Scribble"))):
            blocked = widget.blockSignals(True)
            widget.checked = bool(checked)
            widget.blockSignals(blocked)
        blocked = self.brushSlider.blockSignals(True)
        self.brushSlider.value = self.scriptedEffect.doubleParameter("ScribbleRadiusMm")
        self.brushSlider.blockSignals(blocked)
        if self.scriptedEffect.active() and self.logic is not None:
            self._bind(quiet=True)  # another segment selected: its own prompts from now on

    def updateMRMLFromGUI(self):
        self.scriptedEffect.setParameter("Exclude", int(self.excludeCheckBox.checked))
        self.scriptedEffect.setParameter("Scribble", int(self.scribbleCheckBox.checked))
        self.scriptedEffect.setParameter("ScribbleRadiusMm", self.brushSlider.value)

    # ------------------------------------------------------------------------------ activation
    def activate(self):
        from KPrismSlicerLib.effect_logic import EffectLogic

        if self.logic is None:
            self.logic = EffectLogic(report=self._showStatus)
        self._bind(quiet=True)
        self._takeOverUndoShortcuts()
        self._ensureTimer()

    def deactivate(self):
        self._cancelGesture()
        self._restoreUndoShortcuts()
        if self.logic is not None:
            self.logic.release()  # the markers go; queued prompts still finish (the timer runs until then)

    def cleanup(self):
        self.deactivate()
        if self._timer is not None:
            self._timer.stop()

    def _ensureTimer(self):
        if self._timer is None:
            self._timer = qt.QTimer()
            self._timer.setInterval(DELIVER_MS)
            self._timer.connect("timeout()", self._deliver)
        self._timer.start()

    def _deliver(self):
        """Write finished model work into the scene (GUI thread); stop polling once idle and inactive."""
        self.logic.worker.deliver()
        if not self.logic.busy and not self.scriptedEffect.active():
            self._timer.stop()

    def _bind(self, quiet=False):
        from KPrismSlicerLib.nodes import InputError

        editorNode = self.scriptedEffect.parameterSetNode()
        try:
            self.logic.bind(editorNode.GetSourceVolumeNode(), editorNode.GetSegmentationNode(),
                            editorNode.GetSelectedSegmentID())
            return True
        except InputError as error:
            self.logic.release()
            if not quiet:
                self._showStatus(str(error))
            return False

    # ------------------------------------------------------------------------------ shortcuts
    def _takeOverUndoShortcuts(self):
        """Ctrl+Z/Y (and z/y) undo KPrism's prompts while the effect is active, not the editor's snapshots."""
        keys = [qt.QKeySequence(qt.QKeySequence.Undo), qt.QKeySequence("Z"),
                qt.QKeySequence(qt.QKeySequence.Redo), qt.QKeySequence("Ctrl+Y"), qt.QKeySequence("Y")]
        names = {key.toString() for key in keys}
        mainWindow = slicer.util.mainWindow()
        if mainWindow is None or self._shortcuts:
            return
        for shortcut in [child for child in mainWindow.children() if isinstance(child, qt.QShortcut)]:
            if shortcut.enabled and shortcut.key.toString() in names:
                shortcut.setEnabled(False)  # the Segment Editor's own undo/redo (qMRMLSegmentEditorWidget::installKeyboardShortcuts)
                self._silenced.append(shortcut)
        for key, action in zip(keys, (self.onUndo, self.onUndo, self.onRedo, self.onRedo, self.onRedo)):
            shortcut = qt.QShortcut(key, mainWindow)
            shortcut.connect("activated()", action)
            self._shortcuts.append(shortcut)

    def _restoreUndoShortcuts(self):
        for shortcut in self._shortcuts:
            shortcut.disconnect("activated()")
            shortcut.setParent(None)
        self._shortcuts = []
        for shortcut in self._silenced:
            shortcut.setEnabled(True)
        self._silenced = []

    def onUndo(self):
        if self.logic is not None and self._bind():
            self.logic.undo()
            self._ensureTimer()

    def onRedo(self):
        if self.logic is not None and self._bind():
            self.logic.redo()
            self._ensureTimer()

    # ------------------------------------------------------------------------------ view events
    def processInteractionEvents(self, callerInteractor, eventId, viewWidget):
        if viewWidget.className() != "qMRMLSliceWidget" or self.logic is None:
            return False
        if eventId == vtk.vtkCommand.KeyPressEvent:
            return self._onKey(callerInteractor.GetKeySym())
        if eventId == vtk.vtkCommand.LeftButtonPressEvent:
            if callerInteractor.GetControlKey() or callerInteractor.GetAltKey():
                return False
            xy = callerInteractor.GetEventPosition()
            if self._nearMarker(xy, viewWidget):
                return False  # let the markups widget drag it; its end re-runs the prompt
            confirmed = self.scriptedEffect.confirmCurrentSegmentVisible()
            if confirmed in (self.scriptedEffect.NotConfirmed, self.scriptedEffect.ConfirmedWithDialog):
                return True
            exclude = callerInteractor.GetShiftKey() or self.scriptedEffect.integerParameter("Exclude")
            self._beginGesture(viewWidget, xy, not exclude, bool(self.scriptedEffect.integerParameter("Scribble")))
            return True
        if self._gesture is None or self._gesture["view"] is not viewWidget:
            return False
        if eventId == vtk.vtkCommand.MouseMoveEvent:
            self._extendGesture(callerInteractor.GetEventPosition())
            return True
        if eventId == vtk.vtkCommand.LeftButtonReleaseEvent:
            self._finishGesture(callerInteractor.GetEventPosition())
            return True
        return False

    def _onKey(self, key):
        if key == "e":
            self.scriptedEffect.setParameter("Exclude", 0 if self.scriptedEffect.integerParameter("Exclude") else 1)
            return True
        if key == "p":
            self.scriptedEffect.setParameter("Scribble", 0 if self.scriptedEffect.integerParameter("Scribble") else 1)
            return True
        return False

    def _beginGesture(self, viewWidget, xy, positive, scribble):
        self._cancelGesture()
        points = vtk.vtkPoints()
        polyData = vtk.vtkPolyData()
        polyData.SetPoints(points)
        polyData.SetLines(vtk.vtkCellArray())
        mapper = vtk.vtkPolyDataMapper2D()
        mapper.SetInputData(polyData)
        actor = vtk.vtkActor2D()
        actor.SetMapper(mapper)
        actor.GetProperty().SetColor((0.2, 0.8, 0.2) if positive else (0.9, 0.2, 0.2))
        actor.GetProperty().SetLineWidth(2)
        self.scriptedEffect.addActor2D(viewWidget, actor)
        self._gesture = {"view": viewWidget, "xy": [tuple(xy)], "points": points, "polyData": polyData,
                         "actor": actor, "positive": positive, "scribble": scribble, "dragged": False}

    def _extendGesture(self, xy):
        gesture = self._gesture
        start = gesture["xy"][0]
        if abs(xy[0] - start[0]) + abs(xy[1] - start[1]) >= DRAG_PIXELS:
            gesture["dragged"] = True
        if gesture["scribble"]:
            gesture["xy"].append(tuple(xy))
            outline = gesture["xy"]
        else:
            gesture["xy"][1:] = [tuple(xy)]
            (x0, y0), (x1, y1) = start, xy
            outline = [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]
        self._drawOutline(outline)

    def _drawOutline(self, xyPoints):
        gesture = self._gesture
        gesture["points"].Reset()
        lines = vtk.vtkCellArray()
        lines.InsertNextCell(len(xyPoints))
        for index, (x, y) in enumerate(xyPoints):
            gesture["points"].InsertNextPoint(x, y, 0.0)
            lines.InsertCellPoint(index)
        gesture["polyData"].SetLines(lines)
        gesture["polyData"].Modified()
        self.scriptedEffect.scheduleRender(gesture["view"])

    def _finishGesture(self, xy):
        gesture, view = self._gesture, self._gesture["view"]
        self._cancelGesture()
        if not self._bind() or not self._dependenciesReady():
            return
        sliceNode = view.mrmlSliceNode()
        from KPrismSlicerLib.nodes import view_axis

        axis = view_axis(sliceNode, self.logic.state.volume_node)
        if gesture["scribble"] and gesture["dragged"]:
            points = [self.xyToRas(p, view) for p in gesture["xy"]]
            self.logic.stroke(points, axis, self.scriptedEffect.doubleParameter("ScribbleRadiusMm"), gesture["positive"])
        elif gesture["dragged"]:
            (x0, y0), (x1, y1) = gesture["xy"][0], xy
            corners = [self.xyToRas(p, view) for p in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))]
            self.logic.box(corners, axis)
        else:
            self.logic.click(self.xyToRas(gesture["xy"][0], view), axis, gesture["positive"])
        self._ensureTimer()

    def _cancelGesture(self):
        if self._gesture is not None:
            self.scriptedEffect.removeActor2D(self._gesture["view"], self._gesture["actor"])
            self.scriptedEffect.scheduleRender(self._gesture["view"])
        self._gesture = None

    def _dependenciesReady(self):
        from KPrismSlicerLib import install

        if install.missing() and not install.ensure_dependencies(ask=True):
            self._showStatus("KPrism's Python packages are not installed: open the KPrism module and press "
                             "'Install dependencies'.")
            return False
        return True

    def _nearMarker(self, xy, viewWidget):
        """Whether the press is on one of the current segment's markers shown in this view."""
        state = self.logic.state
        if state is None:
            return False
        sliceNode = viewWidget.mrmlSliceNode()
        sliceToRAS = slicer.util.arrayFromVTKMatrix(sliceNode.GetSliceToRAS())
        normal, origin = sliceToRAS[:3, 2], sliceToRAS[:3, 3]
        halfSlice = 0.5 * self.scriptedEffect.sliceSpacing(viewWidget)
        for marker in state.markers.shown():
            points = state.markers.position(marker)
            points = [points] if marker.kind == "click" else list(points)
            distances = [float((p - origin) @ normal) for p in points]
            if marker.kind == "box":
                crosses = min(distances) <= halfSlice and max(distances) >= -halfSlice
                if crosses and _nearRectangle(xy, [self.rasToXy(p, viewWidget) for p in points]):
                    return True
                continue
            for point, distance in zip(points, distances):
                if abs(distance) <= halfSlice:
                    px, py = self.rasToXy(point, viewWidget)
                    if abs(px - xy[0]) <= MARKER_PIXELS and abs(py - xy[1]) <= MARKER_PIXELS:
                        return True
        return False

    def _showStatus(self, message):
        if self.logic is not None and self.logic.busy and self.logic.pending > 1:
            message = f"{message}  [{self.logic.pending - 1} waiting]"
        self.statusLabel.text = message


def _nearRectangle(xy, corners):
    """Whether `xy` is within MARKER_PIXELS of the edges of the box spanned by projected corners."""
    xs, ys = [c[0] for c in corners], [c[1] for c in corners]
    x, y = xy
    inside = min(xs) - MARKER_PIXELS <= x <= max(xs) + MARKER_PIXELS and min(ys) - MARKER_PIXELS <= y <= max(ys) + MARKER_PIXELS
    onEdge = min(abs(x - min(xs)), abs(x - max(xs)), abs(y - min(ys)), abs(y - max(ys))) <= MARKER_PIXELS
    return inside and onEdge
