"""The markers of the effect's prompts: a markups point per click, a markups ROI per box, a markups curve per stroke.

Plain Python over MRML (no Qt). Undo takes a prompt's marker off the scene and redo puts it back
where it was; a marker the user drags to a new place is reported by :meth:`Markers.moved`, so the
effect can run its prompt again from there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import slicer
import vtk

from . import nodes

MARKER_ATTRIBUTE = "KPrism.EffectMarker"  # "true" on every node the effect made for its markers
MAX_STROKE_POINTS = 40  # a stroke's curve keeps this many of the painted points: enough to redraw it, light to drag
_MOVED_MM = 1e-3


@dataclass(eq=False)
class Marker:
    """One prompt's marker and the geometry its prompt was last run with."""

    kind: str  # "click", "box" or "stroke"
    positive: bool
    node: Any = None  # the include/exclude points node of a click; the ROI or curve node of a box or stroke
    point_id: Optional[str] = None  # a click's control point
    label: str = ""
    geometry: Any = None  # click: RAS point; box: (object-to-node matrix, size); stroke: curve points (n, 3)
    shown: bool = True
    extra: dict = field(default_factory=dict)


class Markers:
    """Creates, hides, shows and reads the markers of one segment's prompts."""

    def __init__(self, scene: Any):
        self.scene = scene
        self._points: dict[bool, Any] = {}  # positive → the include / exclude points node
        self._all: list[Marker] = []
        self.closed = False  # after clear(): the effect moved on to another segment

    # ------------------------------------------------------------------------------ create
    def click(self, ras: Sequence[float], positive: bool, label: str) -> Marker:
        node = self.points_node(positive)
        index = node.AddControlPointWorld(vtk.vtkVector3d(*[float(v) for v in ras]), label)
        marker = Marker("click", positive, node, node.GetNthControlPointID(index), label, np.asarray(ras, float))
        return self._keep(marker)

    def box(self, corners_ras: Sequence[Sequence[float]], thickness_mm: float, label: str) -> Marker:
        """An ROI on the drawn rectangle (corners in drawing order), `thickness_mm` across the view."""
        corners = np.asarray(corners_ras, float)
        x, y = corners[1] - corners[0], corners[3] - corners[0]
        size = [float(np.linalg.norm(x)), float(np.linalg.norm(y)), float(thickness_mm)]
        axes = np.column_stack([x / max(size[0], 1e-9), y / max(size[1], 1e-9), np.zeros(3)])
        axes[:, 2] = np.cross(axes[:, 0], axes[:, 1])
        matrix = np.eye(4)
        matrix[:3, :3], matrix[:3, 3] = axes, corners.mean(axis=0)
        marker = Marker("box", True, label=label, geometry=(matrix, size))
        self._make_box(marker)
        return self._keep(marker)

    def stroke(self, points_ras: Sequence[Sequence[float]], positive: bool, label: str) -> Marker:
        points = np.asarray(points_ras, float).reshape(-1, 3)
        if len(points) > MAX_STROKE_POINTS:
            points = points[np.unique(np.linspace(0, len(points) - 1, MAX_STROKE_POINTS).round().astype(int))]
        marker = Marker("stroke", positive, label=label, geometry=points)
        self._make_stroke(marker)
        return self._keep(marker)

    def points_node(self, positive: bool) -> Any:
        """The include (green) or exclude (red) points node, created on first use."""
        node = self._points.get(positive)
        if node is None or node.GetScene() is None:
            node = nodes.create_prompt_node(self.scene, "positive" if positive else "negative")
            node.SetName("KPrism include" if positive else "KPrism exclude")
            node.SetAttribute(MARKER_ATTRIBUTE, "true")
            self._points[positive] = node
        return node

    # ------------------------------------------------------------------------------ read
    def position(self, marker: Marker) -> Any:
        """Where the marker is now: a click's RAS point, a box's 8 corners, a stroke's curve points (world RAS)."""
        if marker.kind == "click":
            index = self._index(marker)
            if index < 0:
                return marker.geometry
            point = [0.0, 0.0, 0.0]
            marker.node.GetNthControlPointPositionWorld(index, point)
            return np.asarray(point)
        if marker.kind == "box":
            return nodes.roi_corners(marker.node)
        return slicer.util.arrayFromMarkupsControlPoints(marker.node, world=True)

    def moved(self, node: Any) -> list[Marker]:
        """The shown markers on `node` that are no longer where their prompt was last run."""
        return [m for m in self._all if m.shown and m.node is node and self._changed(m)]

    def sync(self, marker: Marker) -> None:
        """Remember the marker's current place as the one its prompt was run with."""
        marker.geometry = self._geometry(marker)

    def restore(self, marker: Marker) -> None:
        """Put a moved marker back where its prompt was last run (a refused move)."""
        if not marker.shown:
            return
        if marker.kind == "click":
            index = self._index(marker)
            if index >= 0:
                marker.node.SetNthControlPointPositionWorld(index, *marker.geometry)
        elif marker.kind == "box":
            self._set_box(marker.node, *marker.geometry)
        else:
            slicer.util.updateMarkupsControlPointsFromArray(marker.node, marker.geometry, world=True)

    # ------------------------------------------------------------------------------ undo / redo
    def hide(self, marker: Marker) -> None:
        """Take the marker off the scene (undo); `show` brings it back where it was."""
        if not marker.shown:
            return
        marker.geometry = self._geometry(marker)
        if marker.kind == "click":
            index = self._index(marker)
            if index >= 0:
                marker.node.RemoveNthControlPoint(index)
        elif marker.node is not None and marker.node.GetScene() is not None:
            self.scene.RemoveNode(marker.node)
        marker.shown = False

    def show(self, marker: Marker) -> None:
        if marker.shown or self.closed:
            return
        if marker.kind == "click":
            node = self.points_node(marker.positive)
            index = node.AddControlPointWorld(vtk.vtkVector3d(*[float(v) for v in marker.geometry]), marker.label)
            marker.node, marker.point_id = node, node.GetNthControlPointID(index)
        elif marker.kind == "box":
            self._make_box(marker)
        else:
            self._make_stroke(marker)
        marker.shown = True

    def discard(self, marker: Marker) -> None:
        """Remove the marker for good (its prompt failed, or can no longer be redone)."""
        self.hide(marker)
        if marker in self._all:
            self._all.remove(marker)

    def clear(self) -> None:
        """Remove every marker and the nodes made for them."""
        self.closed = True
        for marker in list(self._all):
            self.discard(marker)
        for node in self._points.values():
            if node.GetScene() is not None:
                self.scene.RemoveNode(node)
        self._points.clear()

    def shown(self) -> list[Marker]:
        """The markers on the scene now."""
        return [m for m in self._all if m.shown]

    # ------------------------------------------------------------------------------ internals
    def _keep(self, marker: Marker) -> Marker:
        self._all.append(marker)
        return marker

    def _index(self, marker: Marker) -> int:
        if marker.node is None or marker.node.GetScene() is None or marker.point_id is None:
            return -1
        return marker.node.GetNthControlPointIndexByID(marker.point_id)

    def _geometry(self, marker: Marker) -> Any:
        if not marker.shown or marker.node is None or marker.node.GetScene() is None:
            return marker.geometry
        if marker.kind == "box":
            return slicer.util.arrayFromVTKMatrix(marker.node.GetObjectToNodeMatrix()), list(marker.node.GetSize())
        return np.asarray(self.position(marker), float)

    def _changed(self, marker: Marker) -> bool:
        now = self._geometry(marker)
        if marker.kind == "box":
            return not (np.allclose(now[0], marker.geometry[0], atol=_MOVED_MM)
                        and np.allclose(now[1], marker.geometry[1], atol=_MOVED_MM))
        return np.shape(now) != np.shape(marker.geometry) or not np.allclose(now, marker.geometry, atol=_MOVED_MM)

    def _make_box(self, marker: Marker) -> None:
        node = nodes.create_prompt_node(self.scene, "box")
        node.SetName(f"KPrism box {marker.label}")
        node.SetAttribute(MARKER_ATTRIBUTE, "true")
        node.CreateDefaultDisplayNodes()
        self._set_box(node, *marker.geometry)
        marker.node = node

    @staticmethod
    def _set_box(node: Any, matrix: np.ndarray, size: Sequence[float]) -> None:
        node.SetAndObserveObjectToNodeMatrix(slicer.util.vtkMatrixFromArray(np.asarray(matrix, float)))
        node.SetSize(*[float(v) for v in size])

    def _make_stroke(self, marker: Marker) -> None:
        node = self.scene.AddNewNodeByClass("vtkMRMLMarkupsCurveNode", f"KPrism stroke {marker.label}")
        node.SetAttribute(MARKER_ATTRIBUTE, "true")
        node.SetCurveTypeToLinear()
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        if display is not None:  # none without the application's markups logic
            display.SetSelectedColor(nodes.PROMPT_COLORS[marker.positive])
            display.SetPointLabelsVisibility(False)
        slicer.util.updateMarkupsControlPointsFromArray(node, np.asarray(marker.geometry, float), world=True)
        marker.node = node
