"""The Slicer module's logic on real MRML nodes (slicer-core): every mode, refinement, undo, refusals.

Geometry is checked in physical space: volumes are oblique and anisotropic, and results are read
back through Slicer's own export (slicer.util.arrayFromSegmentBinaryLabelmap), not our converter.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
import vtk
from slicer_fixture import add_volume, blob_array, dice, oblique_ijk_to_ras, read_volume

from KPrismSlicerLib import nodes
from KPrismSlicerLib.interactive import InteractiveSession
from KPrismSlicerLib.logic import KPrismLogic, KPrismUnavailable, SegmentationCancelled
from KPrismSlicerLib.prompts import Prompt
from KPrismSlicerLib.nodes import InputError


def segment_array(segmentation, segment_id, volume) -> np.ndarray:
    """A segment on the volume grid, (k, j, i), through Slicer's own export path."""
    return slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume)


def voxel_at(volume, ras) -> tuple[int, int, int]:
    """The (k, j, i) array index of the voxel containing a RAS point, from the node's own RAS→IJK matrix."""
    ras_to_ijk = vtk.vtkMatrix4x4()
    volume.GetRASToIJKMatrix(ras_to_ijk)
    i, j, k = np.round(slicer.util.arrayFromVTKMatrix(ras_to_ijk) @ [*ras, 1.0])[:3].astype(int)
    return k, j, i


def provenance(segmentation, segment_id) -> dict:
    return json.loads(nodes.segment_tag(segmentation.GetSegmentation().GetSegment(segment_id), nodes.PROVENANCE_TAG))


def snapshot(segmentation, volume) -> dict:
    return {sid: segment_array(segmentation, sid, volume).copy() for sid in nodes.segment_ids(segmentation)}


@pytest.fixture
def blob(scene):
    """(volume, segmentation, blob mask) on an oblique, anisotropic grid."""
    array = blob_array()
    volume = add_volume(scene, array, oblique_ijk_to_ras(), "blob")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "blob segmentation")
    return volume, segmentation, array > 0


def xray_volume(scene, name: str):
    """A chest X-ray as Slicer loads a picture: a single-slice volume, LPS identity (RAS diag(-1, -1, 1))."""
    from kprism.io import read_image
    from kprism.samples import sample_path

    image = read_image(sample_path("chest_xray", f"{name}.png"), modality="x-ray")
    truth = read_image(sample_path("chest_xray", f"{name}_lung.png")).array > 0
    return add_volume(scene, image.array[np.newaxis], np.diag([-1.0, -1.0, 1.0, 1.0]), name), truth[np.newaxis]


# ----------------------------------------------------------------------------------------------- conversions


def test_geometry_of_oblique_anisotropic_volumes_matches_itk(scene, tmp_path):
    from kprism.image import Geometry

    lps_direction = np.diag([-1.0, -1.0, 1.0]) @ (oblique_ijk_to_ras()[:3, :3] / [0.8, 1.1, 3.0])
    for name, flip in (("right_handed", 1.0), ("left_handed", -1.0)):
        image = sitk.GetImageFromArray(blob_array() + np.arange(12, dtype=np.int16)[:, None, None])  # slices differ
        image.SetSpacing((0.8, 1.1, 3.0))
        image.SetOrigin((12.0, -40.0, 5.0))
        image.SetDirection(tuple((lps_direction * [1.0, 1.0, flip]).ravel()))  # flip: a left-handed grid
        sitk.WriteImage(image, str(tmp_path / f"{name}.nii.gz"))
        node = read_volume(scene, tmp_path / f"{name}.nii.gz")
        geometry, array = nodes.geometry_of(node), nodes.volume_array(node)
        # Every voxel holds the same value at the same physical (LPS) point as in ITK.
        for index in ([0, 0, 0], [24, 20, 6], [47, 39, 11], [5, 30, 2]):
            i, j, k = np.round(geometry.lps_to_index(image.TransformIndexToPhysicalPoint(index))).astype(int)
            assert array[k, j, i] == image[index]
        np.testing.assert_allclose(geometry.spacing, image.GetSpacing())
        itk_geometry = Geometry(image.GetSpacing(), image.GetOrigin(), image.GetDirection())
        # Slicer's reader keeps a right-handed grid as it is and flips an axis of a left-handed one.
        assert itk_geometry.same_as(geometry) == (flip > 0)
        assert np.array_equal(array, sitk.GetArrayFromImage(image)) == (flip > 0)
        np.testing.assert_allclose(nodes.ras_matrix_of(geometry), nodes.ijk_to_ras_matrix(node), atol=1e-6)


def test_masks_round_trip_through_segments_on_an_oblique_grid(blob):
    volume, segmentation, mask = blob
    rng = np.random.default_rng(0)
    noisy = mask & (rng.random(mask.shape) > 0.3)
    segment_id = nodes.write_segment(segmentation, volume, noisy, name="noisy", color=(10, 200, 30))
    assert np.array_equal(segment_array(segmentation, segment_id, volume), noisy)  # Slicer's export
    assert np.array_equal(nodes.segment_mask(segmentation, segment_id, volume), noisy)  # ours
    np.testing.assert_allclose(nodes.segment_color(segmentation, segment_id), np.array([10, 200, 30]) / 255, atol=1e-6)
    other = nodes.write_segment(segmentation, volume, mask, name="overlapping")  # overlaps keep both segments
    assert np.array_equal(segment_array(segmentation, segment_id, volume), noisy)
    assert np.array_equal(segment_array(segmentation, other, volume), mask)


def test_bad_volumes_are_refused_and_the_segmentation_is_left_alone(scene, logic, blob):
    volume, segmentation, _ = blob
    rgb = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "photo")
    slicer.util.updateVolumeFromArray(rgb, np.zeros((1, 20, 30, 3), np.uint8))
    line = add_volume(scene, np.zeros((1, 1, 30), np.int16), np.eye(4), "line")
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    cases = [(None, "No input volume"), (rgb, "RGB or vector volume"), (line, "a line or a point"), (empty, "has no voxels")]
    for bad, message in cases:
        with pytest.raises(InputError, match=message):
            logic.segment(bad, segmentation, "semantic", classes=["liver"])
    with pytest.raises(InputError, match="Unknown mode"):
        logic.segment(volume, segmentation, "guess")
    with pytest.raises(ValueError, match="Unknown class 'livr'"):
        logic.segment(volume, segmentation, "semantic", classes=["livr"])
    assert nodes.segment_ids(segmentation) == []


# ----------------------------------------------------------------------------------------------- semantic


def test_semantic_lung_on_a_single_slice_xray_volume(scene, logic):
    volume, truth = xray_volume(scene, "MCUCXR_0013_0")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    progress = []
    written = logic.segment(volume, segmentation, "semantic", classes=["lung"], modality="x-ray",
                            progress=lambda fraction, message: progress.append(fraction))
    assert list(written) == ["lung"] and progress[-1] == 1.0
    lung = segment_array(segmentation, written["lung"], volume)
    assert dice(lung, truth) > 0.85
    expected_color = np.array([197, 165, 145]) / 255  # Slicer's GenericAnatomyColors lung row (item 5)
    np.testing.assert_allclose(nodes.segment_color(segmentation, written["lung"]), expected_color, atol=1e-6)
    tag = provenance(segmentation, written["lung"])
    assert tag["mode"] == "semantic" and tag["classes"] == ["lung"] and tag["model"] == "kprism-tiny"
    again = logic.segment(volume, segmentation, "semantic", classes=["lung"], modality="x-ray")
    assert again == written and nodes.segment_ids(segmentation) == [written["lung"]]  # replaced, not added


def test_semantic_classes_on_the_bundled_ct_make_one_label_map(scene, logic):
    from kprism.samples import sample_path

    volume = read_volume(scene, sample_path("ct", "ts_ct_001crop.nii.gz"), "ct")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    written = logic.segment(volume, segmentation, "semantic", classes=["liver", "spleen"], modality="ct")
    assert list(written) == ["liver", "spleen"]
    assert segmentation.GetSegmentation().GetNumberOfLayers() == 1  # overlaps resolved: most probable class wins
    liver, spleen = (segment_array(segmentation, written[name], volume) for name in ("liver", "spleen"))
    assert not (liver & spleen).any()
    names = [nodes.segment_name(segmentation, sid) for sid in nodes.segment_ids(segmentation)]
    assert names == ["liver", "spleen"]


# ----------------------------------------------------------------------------------------------- in-context


def test_in_context_finds_the_lungs_shown_on_another_xray(scene, logic):
    reference, reference_truth = xray_volume(scene, "MCUCXR_0001_0")
    target, truth = xray_volume(scene, "MCUCXR_0013_0")
    examples = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "examples")
    lung_id = nodes.write_segment(examples, reference, reference_truth, name="lungs", color=(0.1, 0.4, 0.9))
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    written = logic.segment(target, segmentation, "incontext", references=[(reference, examples, lung_id)], modality="x-ray")
    assert list(written) == ["lungs"]  # named and coloured after the reference segment
    np.testing.assert_allclose(nodes.segment_color(segmentation, written["lungs"]), (0.1, 0.4, 0.9), atol=1e-6)
    assert dice(segment_array(segmentation, written["lungs"], target), truth) > 0.8
    assert provenance(segmentation, written["lungs"])["references"][0]["segment"] == "lungs"

    empty = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "no segments")
    before = snapshot(segmentation, target)
    with pytest.raises(InputError, match="has no segments"):
        logic.segment(target, segmentation, "incontext", references=[(reference, empty, None)])
    blank = nodes.write_segment(examples, reference, np.zeros_like(reference_truth), name="blank")
    with pytest.raises(InputError, match="is empty"):
        logic.segment(target, segmentation, "incontext", references=[(reference, examples, blank)])
    after = snapshot(segmentation, target)
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)


# ----------------------------------------------------------------------------------------------- interactive


def test_acceptance_click_on_an_oblique_volume_lands_inside_the_segment(scene, logic, blob):
    """THE ACCEPTANCE TEST: a markups fiducial at a known RAS point on an oblique volume with a bright
    blob, used as a positive click: the voxel at that RAS point is inside the resulting segment."""
    volume, segmentation, mask = blob
    ras = (oblique_ijk_to_ras() @ [24.3, 19.8, 6.2, 1.0])[:3]  # inside the blob, between voxel centres
    fiducial = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "click")
    fiducial.AddControlPoint(ras.tolist())
    session = logic.interactive(volume, segmentation)
    session.add_fiducial(fiducial)

    result = segment_array(segmentation, session.segment_id, volume)
    k, j, i = voxel_at(volume, ras)
    assert (k, j, i) == (6, 20, 24)
    assert result[k, j, i] == 1
    # The click segments the blob in 3D at once: mostly the blob on its slice, and one run of slices around it.
    assert dice(result[k], mask[k]) > 0.2 and (result[k] & ~mask[k]).sum() <= 0.1 * result[k].sum()
    slices = np.nonzero(result.any(axis=(1, 2)))[0].tolist()
    assert k in slices and slices == list(range(slices[0], slices[-1] + 1)) and len(slices) > 1
    assert dice(result, mask) > 0.5
    tag = provenance(segmentation, session.segment_id)
    assert tag["mode"] == "interactive" and tag["prompts"] == [{"type": "point", "ras": np.round(ras, 3).tolist(), "positive": True}]


def test_box_scribble_negative_click_and_undo(scene, logic, blob):
    volume, segmentation, mask = blob
    session = logic.interactive(volume, segmentation, name="blob")
    roi = nodes.create_prompt_node(scene, "box")
    ijk_to_ras = oblique_ijk_to_ras()
    roi.SetXYZ((ijk_to_ras @ [24, 20, 6, 1])[:3].tolist())
    roi.SetRadiusXYZ(8.0, 8.0, 4.0)  # an axis-aligned RAS box around the centre of the oblique blob
    session.add_box(roi)
    boxed = segment_array(segmentation, session.segment_id, volume)
    corners = [voxel_at(volume, (ijk_to_ras @ [24, 20, 6, 1])[:3] + np.array([x, y, z]))
               for x in (-8, 8) for y in (-8, 8) for z in (-4, 4)]
    low, high = np.min(corners, axis=0), np.max(corners, axis=0)
    # Every slice the box spans gets a result, and only those; in-plane it stays around the box (the
    # bundled model's masks are not clipped to the box; on this synthetic blob it marks the box area).
    assert np.unique(np.nonzero(boxed)[0]).tolist() == list(range(low[0], high[0] + 1))
    rows, columns = np.nonzero(boxed.any(axis=0))
    assert low[1] - 4 <= rows.min() and rows.max() <= high[1] + 4
    assert low[2] - 4 <= columns.min() and columns.max() <= high[2] + 4

    helper = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "scribbles")
    stroke = np.zeros_like(mask)
    stroke[7, 18:23, 20:29] = True
    scribble_id = nodes.write_segment(helper, volume, stroke, name="stroke")
    session.add_scribble(helper, scribble_id, positive=True)
    scribbled = segment_array(segmentation, session.segment_id, volume)
    assert scribbled[7][stroke[7]].mean() > 0.5

    negative = nodes.create_prompt_node(scene, "negative")  # the widget's red click list
    negative.AddControlPoint((ijk_to_ras @ [24, 20, 7, 1])[:3].tolist())
    session.add_fiducial(negative)
    assert session.prompts[-1]["positive"] is False
    session.undo()  # back to exactly the scribble result
    assert np.array_equal(segment_array(segmentation, session.segment_id, volume), scribbled)
    session.undo()
    assert np.array_equal(segment_array(segmentation, session.segment_id, volume), boxed)
    assert [p["type"] for p in provenance(segmentation, session.segment_id)["prompts"]] == ["box"]


def test_refining_an_existing_segment_writes_into_it(scene, logic, blob):
    volume, segmentation, mask = blob
    rough = np.zeros_like(mask)
    rough[6, 14:26, 14:26] = True  # a corner of the blob, drawn by hand
    segment_id = nodes.write_segment(segmentation, volume, rough, name="manual")
    session = logic.interactive(volume, segmentation, segment_id)
    ras = (oblique_ijk_to_ras() @ [30, 22, 6, 1])[:3]
    session.add_click(ras, positive=True)
    refined = segment_array(segmentation, segment_id, volume)
    assert nodes.segment_ids(segmentation) == [segment_id]
    assert refined[6, 22, 30] == 1
    tag = provenance(segmentation, segment_id)
    assert tag["refined"] == "manual" and tag["prompts"][0]["type"] == "point"

    # The blocking form: prompts refine the segment given as a prior.
    again = logic.segment(volume, segmentation, "interactive", prompts=[Prompt.prior(segmentation, segment_id), Prompt.point(ras)])
    assert again == {"manual": segment_id}
    assert segment_array(segmentation, segment_id, volume)[6, 22, 30] == 1


def test_a_click_continues_the_last_semantic_result(scene, logic):
    volume, truth = xray_volume(scene, "MCUCXR_0013_0")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    lung_id = logic.segment(volume, segmentation, "semantic", classes=["lung"], modality="x-ray")["lung"]
    session = logic.interactive(volume, segmentation, lung_id, modality="x-ray")
    rows, columns = np.nonzero(truth[0])
    session.add_click(nodes.volume_ras(volume, [columns[0] + 1, rows[0] + 1, 0]), positive=True)
    assert dice(segment_array(segmentation, lung_id, volume), truth) > 0.8
    tag = provenance(segmentation, lung_id)  # the class knowledge was kept, not turned into a prior mask
    assert "refined" not in tag and tag["continues"]["classes"] == ["lung"] and len(tag["prompts"]) == 1


def test_sessions_interleaved_with_a_blocking_run_keep_their_own_segments(scene, logic, blob):
    volume, segmentation, mask = blob
    to_ras = oblique_ijk_to_ras()
    first = logic.interactive(volume, segmentation, name="first")
    first.add_click((to_ras @ [24, 20, 6, 1])[:3])
    first_clicked = segment_array(segmentation, first.segment_id, volume).copy()
    liver = logic.segment(volume, segmentation, "semantic", classes=["liver"])["liver"]  # takes over the session
    liver_before = segment_array(segmentation, liver, volume).copy()
    second = logic.interactive(volume, segmentation, name="second")
    second.add_click((to_ras @ [24, 20, 4, 1])[:3], positive=False)
    assert np.array_equal(segment_array(segmentation, first.segment_id, volume), first_clicked)  # untouched by the others
    first.add_click((to_ras @ [28, 20, 6, 1])[:3])  # continues from its own segment, not from the others
    ours = segment_array(segmentation, first.segment_id, volume)
    assert ours[6, 20, 24] == 1 and ours[6, 20, 28] == 1
    assert np.array_equal(segment_array(segmentation, liver, volume), liver_before)
    assert segment_array(segmentation, second.segment_id, volume)[4, 20, 24] == 0


# ----------------------------------------------------------------------------------------------- refusals


def test_locked_segments_are_left_untouched(scene, logic, blob):
    volume, segmentation, mask = blob
    ras = (oblique_ijk_to_ras() @ [24, 20, 6, 1])[:3]
    for lock in ("tag", "status"):
        segment_id = nodes.write_segment(segmentation, volume, mask, name=f"locked by {lock}")
        segment = segmentation.GetSegmentation().GetSegment(segment_id)
        if lock == "tag":
            segment.SetTag(nodes.LOCK_TAG, "true")
        else:
            slicer.vtkSlicerSegmentationsModuleLogic.SetSegmentStatus(segment, slicer.vtkSlicerSegmentationsModuleLogic.Completed)
        before = snapshot(segmentation, volume)
        with pytest.raises(InputError, match="is locked"):
            logic.interactive(volume, segmentation, segment_id).add_click(ras)
        with pytest.raises(InputError, match="is locked"):
            logic.segment(volume, segmentation, "interactive", prompts=[Prompt.point(ras)], segment_id=segment_id)
        after = snapshot(segmentation, volume)
        assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)


def test_a_click_outside_the_volume_is_refused(scene, logic, blob):
    volume, segmentation, _ = blob
    session = logic.interactive(volume, segmentation)
    outside = (oblique_ijk_to_ras() @ [24, 20, 40, 1])[:3]  # k = 40 on a 12-slice volume
    with pytest.raises(InputError, match="outside the volume"):
        session.add_click(outside)
    with pytest.raises(InputError, match="outside the volume"):
        logic.segment(volume, segmentation, "interactive", prompts=[Prompt.point(outside)])
    assert nodes.segment_ids(segmentation) == [] and session.prompts == []


def test_points_follow_the_volume_transform(scene, logic, blob):
    volume, segmentation, _ = blob
    shift = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = np.eye(4)
    matrix[:3, 3] = (40.0, -15.0, 7.5)
    shift.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    volume.SetAndObserveTransformNodeID(shift.GetID())
    local = (oblique_ijk_to_ras() @ [24, 20, 6, 1])[:3]
    np.testing.assert_allclose(nodes.world_to_ijk(volume, local + matrix[:3, 3]), [24, 20, 6], atol=1e-9)
    with pytest.raises(InputError, match="different transforms"):
        logic.interactive(volume, segmentation)
    segmentation.SetAndObserveTransformNodeID(shift.GetID())
    session = logic.interactive(volume, segmentation)
    session.add_click(local + matrix[:3, 3])  # a world point
    assert segment_array(segmentation, session.segment_id, volume)[6, 20, 24] == 1


def test_cancelling_leaves_the_segmentation_as_it_was(scene, logic, blob):
    from kprism.samples import sample_path

    volume = read_volume(scene, sample_path("ct", "ts_ct_001crop.nii.gz"), "ct")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    existing = np.zeros(nodes.volume_array(volume).shape, np.uint8)
    existing[10:20, 30:60, 40:80] = 1
    nodes.write_segment(segmentation, volume, existing, name="liver")  # would be replaced by a semantic run
    before = snapshot(segmentation, volume)
    calls = []
    with pytest.raises(SegmentationCancelled):
        logic.segment(volume, segmentation, "semantic", classes=["liver", "kidney_left"],
                      progress=lambda fraction, message: calls.append(message), cancel=lambda: len(calls) > 3)
    assert any("slices" in message for message in calls)  # cancelled mid-volume
    after = snapshot(segmentation, volume)
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)


def test_a_failure_while_writing_restores_the_segmentation(scene, logic, monkeypatch):
    """Fault injection: the second of two segments fails to write (say, out of memory)."""
    volume, truth = xray_volume(scene, "MCUCXR_0013_0")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    kept = nodes.write_segment(segmentation, volume, truth, name="lung")
    before = snapshot(segmentation, volume)
    real, calls = nodes.write_segment, []

    def failing(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise MemoryError("no memory left")
        return real(*args, **kwargs)

    monkeypatch.setattr(nodes, "write_segment", failing)
    with pytest.raises(MemoryError):
        logic.segment(volume, segmentation, "semantic", classes=["lung", "lung_right"], modality="x-ray")
    after = snapshot(segmentation, volume)
    assert list(after) == [kept] and np.array_equal(after[kept], before[kept])


def test_no_model_available_is_a_clear_error(scene, blob, tmp_path):
    volume, segmentation, _ = blob
    missing = KPrismLogic(model=str(tmp_path / "missing.safetensors"), device="cpu", threads=1)
    with pytest.raises(KPrismUnavailable, match="No KPrism model available"):
        missing.segment(volume, segmentation, "semantic", classes=["liver"])
    with pytest.raises(KPrismUnavailable):
        InteractiveSession(missing, volume, segmentation)
    assert nodes.segment_ids(segmentation) == []


# ----------------------------------------------------------------------------------------------- files


def test_seg_nrrd_written_by_the_storage_node_reads_back_with_slicerio(scene, logic, blob, tmp_path):
    from KPrismSlicerLib import batch
    import slicerio
    from kprism.io import read_segmentation

    volume, segmentation, mask = blob
    session = logic.interactive(volume, segmentation, name="blob")
    session.add_click((oblique_ijk_to_ras() @ [24, 20, 6, 1])[:3])
    second = np.zeros_like(mask)
    second[2:4, 5:9, 30:40] = True
    other = nodes.write_segment(segmentation, volume, second, name="other", color=(255, 128, 0))
    target = tmp_path / "out" / "blob.seg.nrrd"
    batch.write_output(scene, segmentation, volume, target)
    assert [p.name for p in target.parent.iterdir()] == ["blob.seg.nrrd"]  # no temporary left behind

    labels, geometry, segments = read_segmentation(target)
    assert geometry.same_as(nodes.geometry_of(volume)) and labels.shape == mask.shape
    by_name = {s["name"]: s for s in segments}
    assert set(by_name) == {"blob", "other"}
    for name, segment_id in (("blob", session.segment_id), ("other", other)):
        assert np.array_equal(labels == by_name[name]["value"], segment_array(segmentation, segment_id, volume) > 0)
    np.testing.assert_allclose(by_name["other"]["color"], (1.0, 128 / 255, 0.0), atol=1e-3)
    assert json.loads(by_name["blob"]["tags"]["KPrism.Provenance"])["prompts"][0]["type"] == "point"
    raw = slicerio.read_segmentation(str(target))
    np.testing.assert_allclose(raw["ijkToLPS"], np.diag([-1, -1, 1, 1]) @ oblique_ijk_to_ras(), atol=1e-5)


# ----------------------------------------------------------------------------------------------- module files


def test_module_files_agree_with_each_other():
    """What the Slicer application would load, checked without it: .ui names, parameters, CMake, catalog entry."""
    import ast
    import re
    import xml.etree.ElementTree as ElementTree

    from slicer_fixture import SLICER_MODULE_DIR

    ui = ElementTree.parse(SLICER_MODULE_DIR / "Resources" / "UI" / "KPrismSlicer.ui")
    widgets = {w.get("name") for w in ui.iter("widget")}
    bound = {p.findtext("string") for p in ui.iter("property") if p.get("name") == "SlicerParameterName"}
    tree = ast.parse((SLICER_MODULE_DIR / "KPrismSlicerLib" / "parameters.py").read_text(encoding="utf-8"))
    wrapper = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "KPrismSlicerParameterNode")
    fields = {n.target.id for n in wrapper.body if isinstance(n, ast.AnnAssign)}
    assert bound <= fields, f"widgets bound to unknown parameters: {bound - fields}"
    module = (SLICER_MODULE_DIR / "KPrismSlicer.py").read_text(encoding="utf-8")
    used = set(re.findall(r"self\.ui\.(\w+)", module))
    assert used <= widgets, f"KPrismSlicer.py uses widgets missing from the .ui: {used - widgets}"
    assert len(module.splitlines()) <= 400  # the panel, its worker wiring and the self-test; the work is in the Lib
    cmake = (SLICER_MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8").replace("${MODULE_NAME}", "KPrismSlicer")
    shipped = {str(p.relative_to(SLICER_MODULE_DIR)) for p in SLICER_MODULE_DIR.rglob("*")
               if p.is_file() and p.suffix in (".py", ".ui", ".png", ".txt") and p.name != "CMakeLists.txt" and "__pycache__" not in p.parts}
    assert {f for f in shipped if f not in cmake} == set()
    from packaging.requirements import Requirement

    from KPrismSlicerLib import install

    listed = {Requirement(line).name.lower() for line in install.requirements()}
    assert not listed & {"torch", "numpy", "simpleitk"} and install.missing() == []  # Slicer's own are never replaced
    entry = json.loads((SLICER_MODULE_DIR.parent / "KPrism.json").read_text(encoding="utf-8"))
    assert {"$schema", "category", "scm_url"} <= set(entry) and "schema-v1.0.2" in entry["$schema"]
    assert set(entry) <= {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
                          "dicom_support_rule", "build_subdirectory", "enabled", "tier"}


def test_the_logic_imports_without_torch_or_kprism():
    """Slicer imports the module before its dependencies are installed: only first use needs them."""
    import subprocess
    import sys

    from slicer_fixture import SLICER_MODULE_DIR

    script = (
        "import sys; sys.modules['torch'] = None; sys.modules['kprism'] = None\n"
        f"sys.path.insert(0, {str(SLICER_MODULE_DIR)!r})\n"
        "from KPrismSlicerLib import logic, nodes\n"
        "try:\n    logic.KPrismLogic().session\nexcept logic.KPrismUnavailable as error:\n    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, encoding="utf-8", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "KPrism is not installed" in result.stdout and "Install dependencies" in result.stdout


def test_propagation_from_a_clicked_slice_fills_its_neighbours_and_undoes_as_one(scene, logic, blob):
    volume, segmentation, mask = blob
    session = logic.interactive(volume, segmentation)
    session.add_click((oblique_ijk_to_ras() @ [24, 20, 6, 1.0])[:3].tolist())
    clicked = segment_array(segmentation, session.segment_id, volume)
    session.propagate(min_quality=0.0, min_area_ratio=0.0, stop_when_unchanged=None)  # only an empty slice stops it
    spread = segment_array(segmentation, session.segment_id, volume)
    slices = np.nonzero(spread.any(axis=(1, 2)))[0].tolist()
    assert {5, 6, 7} <= set(slices) and slices == list(range(slices[0], slices[-1] + 1))  # one run through slice 6
    assert np.array_equal(spread[6], clicked[6])
    assert provenance(segmentation, session.segment_id)["prompts"][-1]["type"] == "propagate"
    session.undo()
    assert np.array_equal(segment_array(segmentation, session.segment_id, volume), clicked)


# ----------------------------------------------------------------------------------------------- sessions and views (issue 11)


def slice_view(scene, orientation: str):
    """A slice view node as the application has it, set to a named orientation."""
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)  # the application's Axial/Coronal/Sagittal
    node = scene.AddNewNodeByClass("vtkMRMLSliceNode")
    assert node.SetOrientation(orientation)
    return node


def reformat_view(scene, normal) -> object:
    """A slice view whose plane has the given RAS normal (a reformat: no named orientation)."""
    node = scene.AddNewNodeByClass("vtkMRMLSliceNode")
    normal = np.asarray(normal, float) / np.linalg.norm(normal)
    helper = np.array([0.0, 0.0, 1.0]) if abs(normal[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    x = np.cross(helper, normal)
    x /= np.linalg.norm(x)
    matrix = np.eye(4)
    matrix[:3, 0], matrix[:3, 1], matrix[:3, 2] = x, np.cross(normal, x), normal
    node.GetSliceToRAS().DeepCopy(slicer.util.vtkMatrixFromArray(matrix))
    node.UpdateMatrices()
    return node


def test_M3_view_axis_maps_named_views_and_reformats_to_the_volumes_canonical_axes(scene):
    from slicer_fixture import rotation

    for orientation, axis in (("Axial", 0), ("Coronal", 1), ("Sagittal", 2)):
        assert nodes.view_axis(slice_view(scene, orientation)) == axis
    # A plane 60° from sagittal towards coronal: the patient axis nearest its normal is A (coronal)…
    angle = np.radians(60)
    reformat = reformat_view(scene, (np.cos(angle), np.sin(angle), 0.0))
    assert reformat.GetOrientation() == "Reformat" and nodes.view_axis(reformat) == 1
    # …but on a volume turned 40° about S the plane is 20° from that volume's sagittal slices.
    turned = add_volume(scene, blob_array(), rotation(2, 40) @ np.diag([0.8, 1.1, 3.0, 1.0]), "turned")
    assert nodes.view_axis(reformat, turned) == 2
    # The canonical axis is the volume's, whatever its voxel order: i along S, j along A, k along R.
    permuted = np.zeros((4, 4))
    permuted[2, 0], permuted[1, 1], permuted[0, 2], permuted[3, 3] = 3.0, 1.1, 0.8, 1.0
    stored = add_volume(scene, blob_array().transpose(2, 1, 0).copy(), permuted, "permuted")
    assert [nodes.view_axis(slice_view(scene, o), stored) for o in ("Axial", "Coronal", "Sagittal")] == [0, 1, 2]


def test_M3_placement_axis_is_the_slice_view_under_the_mouse(scene, blob):
    volume, _, _ = blob
    crosshair = scene.AddNewNodeByClass("vtkMRMLCrosshairNode")
    crosshair.SetCursorPositionXYZ([10.0, 20.0, 0.0], slice_view(scene, "Sagittal"))
    assert nodes.placement_axis(scene, volume) == 2
    crosshair.SetCursorPositionXYZ([10.0, 20.0, 0.0], slice_view(scene, "Coronal"))
    assert nodes.placement_axis(scene, volume) == 1
    crosshair.SetCursorPositionRAS([1.0, 2.0, 3.0])  # a 3D view: no slice view under the mouse
    assert nodes.placement_axis(scene, volume) is None


def test_m1_region_writes_replace_only_their_box_and_leave_other_segments_alone(blob, monkeypatch):
    volume, segmentation, mask = blob
    in_place = []  # which boxes took the direct write into the layer (the others go through Slicer's merge)
    direct = nodes._write_in_place
    monkeypatch.setattr(nodes, "_write_in_place", lambda *args: in_place.append(direct(*args)) or in_place[-1])
    rng = np.random.default_rng(11)
    ours = mask & (rng.random(mask.shape) > 0.2)
    theirs = np.zeros_like(mask)
    theirs[2:10, 30:38, 2:12] = True  # beside ours: both end up on one shared layer
    ours_id = nodes.write_segment(segmentation, volume, ours, name="ours")
    theirs_id = nodes.write_segment(segmentation, volume, theirs, name="theirs")
    assert segmentation.GetSegmentation().GetNumberOfLayers() == 1
    expected = ours.copy()
    for box in [(slice(4, 8), slice(14, 26), slice(16, 32)),  # inside our layer's extent: written in place
                (slice(4, 8), slice(10, 30), slice(10, 40)),  # beyond our extent: some voxels go, some come
                (slice(0, 12), slice(24, 36), slice(0, 22)),  # over the other segment, beyond our extent
                (slice(6, 7), slice(0, 40), slice(0, 48))]:  # a whole slice, cleared
        new = rng.random(tuple(s.stop - s.start for s in box)) > 0.5
        if box[0].stop - box[0].start == 1:
            new[:] = False
        nodes.write_segment_region(segmentation, volume, box, new, ours_id, tags={"step": box[0].start})
        expected[box] = new
        assert np.array_equal(segment_array(segmentation, ours_id, volume), expected)
        assert np.array_equal(segment_array(segmentation, theirs_id, volume), theirs)  # never touched
    assert nodes.segment_tag(segmentation.GetSegmentation().GetSegment(ours_id), "step") == "6"
    # Inside the layer's extent and clear of the other segment: written in place; beyond it, or over the
    # other segment: Slicer's merge.
    assert in_place == [True, False, False, False]
    created = nodes.write_segment_region(segmentation, volume, (slice(3, 5), slice(3, 6), slice(3, 9)),
                                         np.ones((2, 3, 6), bool), name="new")
    created_mask = segment_array(segmentation, created, volume)
    assert created_mask.sum() == 36 and created_mask[3:5, 3:6, 3:9].all()
    with pytest.raises(ValueError, match="not a box of the volume"):
        nodes.write_segment_region(segmentation, volume, (slice(3, 3), slice(0, 4), slice(0, 4)), np.ones((0, 4, 4)), ours_id)


def test_m1_a_direct_write_never_covers_another_segment_of_its_shared_layer(blob, monkeypatch):
    volume, segmentation, _ = blob
    shell = np.zeros((12, 40, 48), bool)
    shell[2:10, 10:30, 10:40] = True
    shell[4:8, 15:25, 18:30] = False  # a hole inside our extent ...
    core = np.zeros_like(shell)
    core[5:7, 18:22, 22:26] = True  # ... holding the other segment: one shared layer, nested extents
    ours_id = nodes.write_segment(segmentation, volume, shell, name="ours")
    core_id = nodes.write_segment(segmentation, volume, core, name="core")
    assert segmentation.GetSegmentation().GetNumberOfLayers() == 1
    in_place = []
    direct = nodes._write_in_place
    monkeypatch.setattr(nodes, "_write_in_place", lambda *args: in_place.append(direct(*args)) or in_place[-1])
    box = (slice(4, 8), slice(15, 25), slice(18, 30))  # the hole, the other segment included
    nodes.write_segment_region(segmentation, volume, box, np.ones((4, 10, 12), bool), ours_id)
    expected = shell.copy()
    expected[box] = True
    assert in_place == [False]  # it would have overwritten the core
    assert np.array_equal(segment_array(segmentation, ours_id, volume), expected)
    assert np.array_equal(segment_array(segmentation, core_id, volume), core)
    box = (slice(3, 5), slice(12, 16), slice(12, 20))  # clear of the core, inside our extent
    nodes.write_segment_region(segmentation, volume, box, np.zeros((2, 4, 8), bool), ours_id)
    expected[box] = False
    assert in_place == [False, True]
    assert np.array_equal(segment_array(segmentation, ours_id, volume), expected)
    assert np.array_equal(segment_array(segmentation, core_id, volume), core)


def test_m1_interactive_prompts_rewrite_only_the_box_they_changed(scene, logic, blob, monkeypatch):
    """Slicer audit m1: no whole-volume write per click; the segment still equals the session's 3D result."""
    volume, segmentation, mask = blob
    to_ras = oblique_ijk_to_ras()
    whole_writes, region_writes = [], []
    real_region = nodes.write_segment_region
    monkeypatch.setattr(nodes, "write_segment", lambda *args, **kwargs: whole_writes.append(args))
    monkeypatch.setattr(nodes, "write_segment_region",
                        lambda *args, **kwargs: region_writes.append(args[2]) or real_region(*args, **kwargs))
    session = logic.interactive(volume, segmentation, name="blob")

    def written_as_computed() -> bool:
        return np.array_equal(segment_array(segmentation, session.segment_id, volume), session.target.result().mask)

    first = session.add_click((to_ras @ [24, 20, 6, 1])[:3])
    assert written_as_computed() and first.voxels == segment_array(segmentation, first.segment_id, volume).sum() > 0
    second = session.add_click((to_ras @ [30, 20, 8, 1])[:3], positive=False)
    assert written_as_computed() and second.voxels == segment_array(segmentation, second.segment_id, volume).sum()
    box_voxels = int(np.prod([s.stop - s.start for s in second.region]))
    assert 0 < box_voxels < mask.size / 4  # a box around the change, not the volume
    assert region_writes[-1] == second.region
    for step in (session.undo, session.redo, session.undo):
        step()
        assert written_as_computed()
    assert np.array_equal(segment_array(segmentation, session.segment_id, volume) > 0,
                          segment_array(segmentation, first.segment_id, volume) > 0)
    assert whole_writes == [] and len(region_writes) >= 5
    assert session.redo() is not None and written_as_computed() and session.redo() is None


def test_CR1_two_interactive_sessions_keep_their_own_undo(scene, logic, blob):
    """Code review finding 1: A clicks twice, B clicks once, A.undo() must take back A's second click."""
    volume, segmentation, mask = blob
    to_ras = oblique_ijk_to_ras()
    a = logic.interactive(volume, segmentation, name="A")
    a.add_click((to_ras @ [24, 20, 6, 1])[:3])
    a_after_one = segment_array(segmentation, a.segment_id, volume).copy()
    a.add_click((to_ras @ [31, 20, 6, 1])[:3], positive=False)
    a_after_two = segment_array(segmentation, a.segment_id, volume).copy()
    b = logic.interactive(volume, segmentation, name="B")
    b.add_click((to_ras @ [24, 20, 6, 1])[:3])
    b_after_one = segment_array(segmentation, b.segment_id, volume).copy()

    assert a.encoded is b.encoded  # one encoded volume, two structures
    assert not np.array_equal(a_after_two, a_after_one)
    a.undo()
    assert np.array_equal(segment_array(segmentation, a.segment_id, volume), a_after_one)
    assert len(provenance(segmentation, a.segment_id)["prompts"]) == len(a.prompts) == 1
    assert np.array_equal(segment_array(segmentation, b.segment_id, volume), b_after_one)  # B untouched
    b.undo()
    assert not segment_array(segmentation, b.segment_id, volume).any()
    assert np.array_equal(segment_array(segmentation, a.segment_id, volume), a_after_one)  # A untouched by B's undo
    a.redo()
    assert np.array_equal(segment_array(segmentation, a.segment_id, volume), a_after_two)


def test_M3_a_click_on_a_sagittal_slice_changes_that_slice_and_the_3d_result(scene, logic, blob):
    """Slicer audit M3: the click is answered along the view it was placed in, then travels in 3D."""
    volume, segmentation, mask = blob
    ijk = [24, 20, 6]
    ras = (oblique_ijk_to_ras() @ [*ijk, 1])[:3]
    axis = nodes.view_axis(slice_view(scene, "Sagittal"), volume)
    fiducial = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "click")
    fiducial.AddControlPoint(ras.tolist())
    session = logic.interactive(volume, segmentation)

    result = session.add_fiducial(fiducial, axis=axis)

    sagittal = session.encoded.locate(ijk, "ijk", 2).index
    assert axis == 2 and result.axis == 2 and result.slices[0] == sagittal  # the clicked sagittal slice came first
    written = segment_array(segmentation, session.segment_id, volume)
    # On that sagittal slice (i = 24: every k and j) the blob's cross-section, not an axial line.
    assert dice(written[:, :, 24], mask[:, :, 24]) > 0.8 and len(np.unique(np.nonzero(written[:, :, 24])[0])) > 3
    # The change travelled to the neighbouring sagittal slices: the 3D result.
    columns = np.nonzero(written.any(axis=(0, 1)))[0].tolist()
    assert columns == list(range(columns[0], columns[-1] + 1)) and len(columns) > 10 and dice(written, mask) > 0.8
    assert provenance(segmentation, session.segment_id)["prompts"][0]["axis"] == 2
    session.undo()
    assert not segment_array(segmentation, session.segment_id, volume).any()


def test_CR1_a_run_is_continued_only_while_its_segment_is_as_it_wrote_it(scene, logic):
    volume, truth = xray_volume(scene, "MCUCXR_0013_0")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    lung_id = logic.segment(volume, segmentation, "semantic", classes=["lung"], modality="x-ray")["lung"]
    edited = segment_array(segmentation, lung_id, volume).copy()
    top = np.nonzero(edited[0].any(axis=1))[0][0]
    edited[0, top : top + 30] = 0  # the user erased the lungs' apices in the Segment Editor
    nodes.write_segment(segmentation, volume, edited, lung_id)

    session = logic.interactive(volume, segmentation, lung_id, modality="x-ray")
    assert np.array_equal(session.target.result().mask, edited)  # starts from what is there, not the run's result
    rows, columns = np.nonzero(edited[0])
    session.add_click(nodes.volume_ras(volume, [columns[len(columns) // 2], rows[len(rows) // 2], 0]), positive=True)

    tag = provenance(segmentation, lung_id)
    assert tag["mode"] == "interactive" and tag["refined"] == "lung" and "continues" not in tag


def test_CR4_blocking_refusals_come_from_the_one_pipeline(scene, logic, blob):
    volume, segmentation, _ = blob
    ras = (oblique_ijk_to_ras() @ [24, 20, 6, 1])[:3]
    with pytest.raises(ValueError, match="Prompts and an initial mask refine one structure: give a single class"):
        logic.segment(volume, segmentation, "semantic", classes=["liver", "spleen"], prompts=[Prompt.point(ras)])
    with pytest.warns(UserWarning, match="Repeated class names are segmented once: liver"):
        written = logic.segment(volume, segmentation, "semantic", classes=["liver", "liver"])
    assert list(written) == ["liver"] and len(nodes.segment_ids(segmentation)) == 1


def test_m1_a_segment_deleted_during_a_session_comes_back_whole_on_the_next_prompt(scene, logic, blob):
    volume, segmentation, _ = blob
    to_ras = oblique_ijk_to_ras()
    session = logic.interactive(volume, segmentation, name="blob")
    first = session.add_click((to_ras @ [24, 20, 6, 1])[:3])
    segmentation.GetSegmentation().RemoveSegment(first.segment_id)  # the user deleted it in the Segment Editor

    second = session.add_click((to_ras @ [31, 20, 6, 1])[:3], positive=False)

    assert second.segment_id == first.segment_id
    assert np.array_equal(segment_array(segmentation, second.segment_id, volume), session.target.result().mask)
    assert second.voxels == session.target.result().mask.sum() > 0


# ----------------------------------------------------------------------------------------------- names and colours (issue 12 item 5)


def test_new_segments_are_numbered_with_distinct_colours_and_classes_get_slicers_anatomy_colour(scene, logic, blob):
    from KPrismSlicerLib import names

    volume, segmentation, _ = blob
    to_ras = oblique_ijk_to_ras()
    nodes.write_segment(segmentation, volume, np.zeros(nodes.volume_array(volume).shape, bool), name="KPrism 4",
                        color=np.array(names.FALLBACK_PALETTE[0]) / 255)  # a user's segment already took number 4
    first = logic.interactive(volume, segmentation).add_click((to_ras @ [24, 20, 6, 1])[:3])
    second = logic.interactive(volume, segmentation).add_click((to_ras @ [24, 20, 4, 1])[:3])
    named = logic.interactive(volume, segmentation, name="tumour").add_click((to_ras @ [24, 20, 8, 1])[:3])
    assert [nodes.segment_name(segmentation, s.segment_id) for s in (first, second, named)] == ["KPrism 5", "KPrism 6", "tumour"]
    colors = [tuple(np.round(nodes.segment_color(segmentation, sid), 3)) for sid in nodes.segment_ids(segmentation)]
    assert len(set(colors)) == len(colors) == 4  # every segment its own colour
    assert names.class_color("spleen") == tuple(v / 255 for v in (157, 108, 162)) and names.class_color("tumor") is None
