"""The Segment Editor effect's path without Qt, on real MRML (slicer-core): gesture → prompt → model → segment.

Each test drives `EffectLogic` as the effect's Qt class does (world RAS points and the view's
canonical axis), lets the model worker finish (`settle`: the worker computes, the results are
written when they are delivered) and reads the segment back through Slicer's own export.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import slicer
from slicer_fixture import add_volume, blob_array, dice, oblique_ijk_to_ras

from KPrismSlicerLib import effect_geometry, nodes
from KPrismSlicerLib.effect_logic import EffectLogic
from KPrismSlicerLib.worker import ModelWorker

MATRIX = oblique_ijk_to_ras()  # 20° and 12° oblique, voxels 0.8 × 1.1 × 3.0 mm


def ras(i, j, k) -> list[float]:
    return (MATRIX @ [i, j, k, 1.0])[:3].tolist()


def segment(segmentation, segment_id, volume) -> np.ndarray:
    return slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume) > 0


def sagittal_axis(scene, volume) -> int:
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    view = scene.AddNewNodeByClass("vtkMRMLSliceNode")
    assert view.SetOrientation("Sagittal")
    return nodes.view_axis(view, volume)


@pytest.fixture
def editor(scene, logic):
    """(effect, volume, segmentation, segment ID, blob mask, status lines): the editor's selected segment is empty."""
    array = blob_array()
    volume = add_volume(scene, array, MATRIX, "blob")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    segment_id = segmentation.GetSegmentation().AddEmptySegment("", "Segment_1", [0.9, 0.3, 0.3])
    lines: list[str] = []
    effect = EffectLogic(logic, ModelWorker(), lines.append)
    effect.bind(volume, segmentation, segment_id)
    return effect, volume, segmentation, segment_id, array > 0, lines


def test_a_click_on_an_empty_segment_returns_at_once_then_writes_a_3d_result(editor):
    effect, volume, segmentation, segment_id, blob, lines = editor
    assert effect.click(ras(24, 20, 6), axis=0, positive=True)
    # The handler only placed the marker and queued the work: nothing is written before delivery.
    assert effect.pending == 1 and not segment(segmentation, segment_id, volume).any()
    include = effect.state.markers.points_node(True)
    assert include.GetNumberOfControlPoints() == 1
    effect.settle()
    result = segment(segmentation, segment_id, volume)
    assert result[6, 20, 24] and dice(result[6], blob[6]) > 0.5
    slices = np.unique(np.nonzero(result)[0]).tolist()
    assert len(slices) >= 3 and slices == list(range(slices[0], slices[-1] + 1))  # travelled through its neighbours
    assert nodes.segment_ids(segmentation) == [segment_id]  # the editor's segment, no new one
    assert lines[-1].startswith("Segment_1: ") and "voxels" in lines[-1]


def test_a_sagittal_click_segments_the_sagittal_slice_and_the_3d_result(scene, editor):
    effect, volume, segmentation, segment_id, blob, _ = editor
    axis = sagittal_axis(scene, volume)
    effect.click(ras(24, 20, 6), axis)
    effect.settle()
    result = segment(segmentation, segment_id, volume)
    # On the clicked sagittal slice (i = 24) the blob's cross-section over many axial slices, not an axial line.
    assert dice(result[:, :, 24], blob[:, :, 24]) > 0.8 and len(np.unique(np.nonzero(result[:, :, 24])[0])) > 3
    columns = np.unique(np.nonzero(result)[2]).tolist()
    assert len(columns) > 10 and dice(result, blob) > 0.8
    tag = json.loads(nodes.segment_tag(segmentation.GetSegmentation().GetSegment(segment_id), nodes.PROVENANCE_TAG))
    assert tag["prompts"][0]["axis"] == 2


def test_shift_click_excludes_where_it_lands(editor):
    effect, volume, segmentation, segment_id, blob, _ = editor
    corners = [ras(10, 8, 6), ras(38, 8, 6), ras(38, 32, 6), ras(10, 32, 6)]
    effect.box(corners, 0)  # on this synthetic blob the model marks much of the box: room to exclude
    effect.settle()
    before = segment(segmentation, segment_id, volume)
    k, j, i = 6, 21, 38  # inside the box's result, outside the blob
    assert before[k, j, i] and not blob[k, j, i]
    effect.click(ras(i, j, k), 0, positive=False)
    effect.settle()
    after = segment(segmentation, segment_id, volume)
    assert not after[k, j, i] and after.sum() < before.sum()
    assert effect.state.markers.points_node(False).GetNumberOfControlPoints() == 1  # the red exclude marker


def test_a_drag_is_a_box_on_its_slice_that_travels_and_its_marker_spans_the_rectangle(editor):
    effect, volume, segmentation, segment_id, blob, _ = editor
    corners = [ras(14, 10, 6), ras(34, 10, 6), ras(34, 30, 6), ras(14, 30, 6)]
    effect.box(corners, 0)
    effect.settle()
    result = segment(segmentation, segment_id, volume)
    rows, columns = np.nonzero(result[6])
    assert dice(result[6], blob[6]) > 0.6
    # In-plane it stays around the rectangle (the bundled model's masks are not clipped to the box).
    assert rows.min() >= 10 - 4 and rows.max() <= 30 + 4 and columns.min() >= 14 - 4 and columns.max() <= 34 + 4
    assert len(np.unique(np.nonzero(result)[0])) > 1  # one slice drawn, the structure continued in 3D
    roi = effect.state.applied[0].marker.node
    ijk = np.array([nodes.world_to_ijk(volume, corner) for corner in nodes.roi_corners(roi)])
    assert np.allclose(ijk.min(0), [14, 10, 5.5], atol=1e-6) and np.allclose(ijk.max(0), [34, 30, 6.5], atol=1e-6)


def test_a_box_marker_stretched_across_slices_reruns_as_a_3d_box_that_does_not_travel(editor):
    effect, volume, segmentation, segment_id, _, _ = editor
    effect.box([ras(14, 10, 6), ras(34, 10, 6), ras(34, 30, 6), ras(14, 30, 6)], 0)
    effect.settle()
    roi = effect.state.applied[0].marker.node
    size = list(roi.GetSize())
    roi.SetSize(size[0], size[1], 3 * 3.0)  # three 3 mm slices across the axial view: k 5, 6, 7
    roi.InvokeCustomModifiedEvent(slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent)
    effect.settle()
    result = segment(segmentation, segment_id, volume)
    assert np.unique(np.nonzero(result)[0]).tolist() == [5, 6, 7]
    assert len(effect.state.applied) == 1 and effect.state.applied[0].prompt.axis == 0


def test_a_painted_stroke_is_a_scribble_on_its_slice(editor):
    effect, volume, segmentation, segment_id, blob, _ = editor
    points = [ras(18, 20, 7), ras(24, 18, 7), ras(30, 21, 7)]
    painted = effect_geometry.stroke_mask(volume, points, 0, 2.0)
    assert np.unique(np.nonzero(painted)[0]).tolist() == [7] and painted[7, 18, 24]  # its slice, along its line
    effect.stroke(points, 0, radius_mm=2.0, positive=True)
    effect.settle()
    result = segment(segmentation, segment_id, volume)
    assert result[painted > 0].all() and dice(result, blob) > 0.6
    curve = effect.state.applied[0].marker.node
    assert curve.IsA("vtkMRMLMarkupsCurveNode") and curve.GetNumberOfControlPoints() == 3


def test_undo_removes_the_marker_and_the_change_redo_restores_both(editor):
    effect, volume, segmentation, segment_id, _, lines = editor
    include = effect.state.markers
    effect.click(ras(24, 20, 6), 0)
    effect.settle()
    first = segment(segmentation, segment_id, volume)
    effect.box([ras(14, 10, 7), ras(34, 10, 7), ras(34, 30, 7), ras(14, 30, 7)], 0)
    effect.settle()
    second = segment(segmentation, segment_id, volume)
    box_node = effect.state.applied[1].marker.node
    assert not np.array_equal(first, second) and box_node.GetScene() is not None

    effect.undo()
    effect.settle()
    assert np.array_equal(segment(segmentation, segment_id, volume), first)
    assert box_node.GetScene() is None and not slicer.mrmlScene.GetNodesByName(box_node.GetName()).GetNumberOfItems()
    effect.undo()
    effect.settle()
    assert not segment(segmentation, segment_id, volume).any()
    assert include.points_node(True).GetNumberOfControlPoints() == 0
    effect.undo()
    effect.settle()
    assert lines[-1] == "Nothing to undo."

    effect.redo()
    effect.redo()
    effect.settle()
    assert np.array_equal(segment(segmentation, segment_id, volume), second)
    assert include.points_node(True).GetNumberOfControlPoints() == 1
    restored = effect.state.applied[1].marker.node
    assert restored.GetScene() is not None and np.allclose(nodes.roi_corners(restored), nodes.roi_corners(box_node))


def test_moving_a_marker_reruns_its_prompt_and_replays_the_later_ones(scene, logic):
    a = blob_array((64, 40, 16), (16, 20, 8), (9, 8, 5)) > 0
    b = blob_array((64, 40, 16), (47, 20, 8), (8, 7, 5)) > 0
    volume = add_volume(scene, np.where(a | b, 60, -900).astype(np.int16), MATRIX, "two blobs")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segment_id = segmentation.GetSegmentation().AddEmptySegment("", "Segment_1")
    effect = EffectLogic(logic, ModelWorker())
    effect.bind(volume, segmentation, segment_id)
    effect.click(ras(16, 20, 8), 0)  # blob A
    effect.click(ras(60, 36, 8), 0, positive=False)  # background, a later prompt
    effect.settle()
    assert dice(segment(segmentation, segment_id, volume), a) > 0.5

    include = effect.state.markers.points_node(True)
    include.SetNthControlPointPositionWorld(0, *ras(47, 20, 8))  # the user drags the first click onto blob B
    include.InvokeCustomModifiedEvent(slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent)
    assert effect.pending > 0
    effect.settle()
    moved = segment(segmentation, segment_id, volume)
    assert dice(moved, b) > 0.6 and not (moved & a).any()
    assert len(effect.state.applied) == 2 and effect.state.markers.points_node(False).GetNumberOfControlPoints() == 1
    assert [p["positive"] for p in effect.state.session.prompts] == [True, False]  # the later prompt was replayed


def test_a_non_empty_segment_is_refined_with_its_mask_as_the_prior(scene, logic, editor):
    effect, volume, segmentation, segment_id, blob, _ = editor
    rough = np.zeros_like(blob)
    rough[6, 14:26, 14:26] = True  # a corner of the blob, drawn by hand
    manual = nodes.write_segment(segmentation, volume, rough, name="manual")
    effect.bind(volume, segmentation, manual)
    effect.click(ras(30, 22, 6), 0)
    effect.settle()
    refined = segment(segmentation, manual, volume)
    assert refined[6, 22, 30] and refined[6, 20, 20]  # the click's place added, the hand-drawn part kept
    tag = json.loads(nodes.segment_tag(segmentation.GetSegmentation().GetSegment(manual), nodes.PROVENANCE_TAG))
    assert tag["refined"] == "manual"
    assert not segment(segmentation, segment_id, volume).any()  # the other segment is untouched


def test_a_click_outside_the_volume_is_refused_in_one_line_and_changes_nothing(editor):
    effect, volume, segmentation, segment_id, _, lines = editor
    assert not effect.click(ras(24, 20, 40), 0)  # 28 slices above the volume
    assert effect.pending == 0 and effect.state.markers.shown() == []
    assert len(lines) == 1 and "\n" not in lines[0] and "outside the volume 'blob'" in lines[0]
    assert not effect.box([ras(100, 100, 6), ras(120, 100, 6), ras(120, 120, 6), ras(100, 120, 6)], 0)
    assert "does not overlap" in lines[-1]
    assert not segment(segmentation, segment_id, volume).any() and nodes.segment_ids(segmentation) == [segment_id]


def test_a_gesture_without_a_selected_segment_is_refused(scene, logic):
    volume = add_volume(scene, blob_array(), MATRIX, "blob")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    effect = EffectLogic(logic, ModelWorker())
    with pytest.raises(nodes.InputError, match="Select a segment"):
        effect.bind(volume, segmentation, None)
    assert not effect.click(ras(24, 20, 6), 0) and "Select a source volume" in effect.status


# ----------------------------------------------------------------------------------------------- SLICER_API.md

def _slicer_api():
    """Utilities/slicer_api.py: the one extraction of the module's Slicer-facing names and their places."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "Utilities" / "slicer_api.py"
    spec = importlib.util.spec_from_file_location("slicer_api", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_slicer_call_of_the_module_is_in_SLICER_API_md():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "KPrismSlicer" / "SLICER_API.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"`([^`]+)`", text))
    api = _slicer_api()
    missing = {kind: sorted(n for n in names if n not in documented) for kind, names in api.used_names().items()}
    assert not any(missing.values()), f"Add these to KPrismSlicer/SLICER_API.md with their place in Slicer's source: {missing}"
    # The "used at" column follows the code: a call that moved is found where it is now.
    assert api.rewritten_api_file() == text, "SLICER_API.md's 'used at' column is stale: run python Utilities/slicer_api.py"
