"""MRML nodes ↔ numpy arrays and kprism geometry.

Plain Python over MRML (no Qt), so it runs in the Slicer application and under plain Python with
the `slicer-core` wheel alike. Conventions:

- Voxel arrays are slowest axis first, ``(k, j, i)``, as ``slicer.util.arrayFromVolume`` returns
  them and as :mod:`kprism.image` expects.
- A volume's geometry comes from its IJK→RAS matrix and is handed to kprism in ITK's LPS frame.
- Points from markups are *world* RAS; they are mapped into the volume's own frame through any
  parent transform of the volume before they become voxel indices.
- Segments are exchanged as binary masks on the grid of a reference volume, through
  ``vtkOrientedImageData`` and the static functions of ``vtkSlicerSegmentationsModuleLogic``: no
  temporary nodes, and overlapping segments are kept (Slicer moves them to separate layers).

kprism itself is imported only inside functions: this module must import before it is installed.
"""

from __future__ import annotations

import json
import types
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

if TYPE_CHECKING:
    from kprism.image import Geometry, ImageData

PROVENANCE_TAG = "KPrism.Provenance"
LOCK_TAG = "KPrism.Locked"  # "true" protects a segment from being overwritten by KPrism
POSITIVE_ATTRIBUTE = "KPrism.Positive"  # on a markups node: "false" makes its points negative clicks
PROMPT_COLORS = {True: (0.2, 0.8, 0.2), False: (0.9, 0.2, 0.2)}  # include (green), exclude (red)
_RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
_HEADLESS_LOGICS: list = []  # keeps the logic objects of headless scenes alive


class InputError(ValueError):
    """Input the user can fix (a missing volume, a locked segment, a click outside the volume…)."""


# ----------------------------------------------------------------------------------------------- scene


def app_running() -> bool:
    """True inside the 3D Slicer application, False under plain Python with slicer-core."""
    return getattr(slicer, "app", None) is not None


def headless_scene(new: bool = False):
    """The scene to work in: the application's, or (plain Python) a scene set up as Slicer would.

    A bare ``vtkMRMLScene`` cannot add segments until a ``vtkSlicerSegmentationsModuleLogic`` is
    attached to it, and ``slicer.util`` looks for ``slicer.mrmlScene`` and ``slicer.modules``; this
    provides all three. ``new`` replaces an earlier headless scene.
    """
    if app_running():
        return slicer.mrmlScene
    if not new and isinstance(getattr(slicer, "mrmlScene", None), slicer.vtkMRMLScene):
        return slicer.mrmlScene
    scene = slicer.vtkMRMLScene()
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    _HEADLESS_LOGICS[:] = [logic]
    slicer.mrmlScene = scene
    modules = getattr(slicer, "modules", None) or types.SimpleNamespace()
    modules.segmentations = types.SimpleNamespace(logic=lambda: logic)
    slicer.modules = modules
    return scene


# ----------------------------------------------------------------------------------------------- volumes


def check_volume(volume_node: Any, what: str = "input volume") -> None:
    """Refuse what KPrism cannot segment, with a message that says how to fix it."""
    if volume_node is None:
        raise InputError(f"No {what}: select a volume first.")
    if not isinstance(volume_node, slicer.vtkMRMLScalarVolumeNode):
        raise InputError(f"The {what} {_name(volume_node)} is a {volume_node.GetClassName()}, not a scalar volume.")
    image = volume_node.GetImageData()
    if image is None or image.GetNumberOfPoints() == 0:
        raise InputError(f"The {what} {_name(volume_node)} has no voxels (was it loaded?).")
    components = image.GetNumberOfScalarComponents()
    if components != 1 or isinstance(volume_node, slicer.vtkMRMLVectorVolumeNode):
        raise InputError(
            f"The {what} {_name(volume_node)} has {components} values per voxel (an RGB or vector volume); KPrism "
            "segments single-component volumes. Convert it first, e.g. with the 'Vector to Scalar Volume' module."
        )
    size = image.GetDimensions()
    if sum(n > 1 for n in size) < 2:
        raise InputError(
            f"The {what} {_name(volume_node)} has size {tuple(size)}: a line or a point, not an image. KPrism "
            "segments 3D volumes and single-slice (2D) images."
        )


def geometry_of(volume_node: Any) -> "Geometry":
    """The volume's grid as kprism geometry: spacing, origin and direction in LPS, ITK order."""
    from kprism.image import Geometry

    ijk_to_lps = _RAS_FROM_LPS @ ijk_to_ras_matrix(volume_node)  # the same diagonal maps RAS to LPS
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    direction = ijk_to_lps[:3, :3] / spacing
    return Geometry(tuple(spacing.tolist()), tuple(ijk_to_lps[:3, 3].tolist()), tuple(direction.ravel().tolist()))


def ras_matrix_of(geometry: "Geometry") -> np.ndarray:
    """The IJK→RAS matrix of a 3D kprism geometry (the inverse of :func:`geometry_of`)."""
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = geometry.direction_matrix() * np.asarray(geometry.spacing)
    ijk_to_lps[:3, 3] = geometry.origin
    return _RAS_FROM_LPS @ ijk_to_lps


def ijk_to_ras_matrix(volume_node: Any) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def volume_array(volume_node: Any) -> np.ndarray:
    """A copy of the voxels, ``(k, j, i)``."""
    image = volume_node.GetImageData()
    i, j, k = image.GetDimensions()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(k, j, i).copy()


def volume_to_image(volume_node: Any, modality: Optional[str] = None) -> "ImageData":
    """A checked scalar volume node → kprism ImageData (always 3D; single-slice volumes stay 3D)."""
    from kprism.image import ImageData

    check_volume(volume_node)
    modality = modality or volume_node.GetAttribute("DICOM.Modality") or "unknown"
    return ImageData(volume_array(volume_node), geometry_of(volume_node), modality=modality.lower())


def slicing_axis(image: "ImageData", requested: int = 0) -> int:
    """The canonical axis to slice along: a single-slice volume is segmented on its one slice."""
    return _slicing_axis(image.geometry, image.spatial_shape, requested)


def volume_slicing_axis(volume_node: Any, requested: int = 0) -> int:
    """:func:`slicing_axis` of a volume node, without copying its voxels."""
    return _slicing_axis(geometry_of(volume_node), tuple(reversed(volume_node.GetImageData().GetDimensions())), requested)


def _slicing_axis(geometry: "Geometry", shape: Sequence[int], requested: int) -> int:
    from kprism.orientation import CanonicalView

    canonical = CanonicalView.of(geometry, tuple(shape)).canonical_shape
    singletons = [axis for axis, size in enumerate(canonical) if size == 1]
    return singletons[0] if singletons else requested


def world_to_ijk(volume_node: Any, ras: Sequence[float]) -> np.ndarray:
    """A world RAS point → the continuous voxel index ``[i, j, k]`` of the volume."""
    point = np.asarray(ras, dtype=float)
    parent = volume_node.GetParentTransformNode()
    if parent is not None:
        to_volume = vtk.vtkGeneralTransform()
        slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(None, parent, to_volume)
        point = np.asarray(to_volume.TransformPoint(point.tolist()))
    ras_to_ijk = np.linalg.inv(ijk_to_ras_matrix(volume_node))
    return (ras_to_ijk @ np.append(point, 1.0))[:3]


def volume_ras(volume_node: Any, ijk: Sequence[float]) -> np.ndarray:
    """A voxel index ``[i, j, k]`` → the RAS point in the volume's own frame."""
    return (ijk_to_ras_matrix(volume_node) @ np.append(np.asarray(ijk, float), 1.0))[:3]


def index_inside(volume_node: Any, ijk: Sequence[float]) -> bool:
    """Whether a continuous index rounds to a voxel of the volume."""
    index = np.round(np.asarray(ijk, dtype=float)).astype(int)
    size = np.asarray(volume_node.GetImageData().GetDimensions())
    return bool((index >= 0).all() and (index < size).all())


def check_same_frame(volume_node: Any, segmentation_node: Any) -> None:
    """Masks are exchanged in the nodes' own frames, so both must sit under the same transform."""
    if volume_node.GetParentTransformNode() is not segmentation_node.GetParentTransformNode():
        raise InputError(
            f"{_name(volume_node)} and {_name(segmentation_node)} are under different transforms. Put them under "
            "the same transform, or harden the transforms (Data module), first."
        )


# ----------------------------------------------------------------------------------------------- segments


def has_segment(segmentation_node: Any, segment_id: Optional[str]) -> bool:
    return segment_id is not None and segmentation_node.GetSegmentation().GetSegment(segment_id) is not None


def segment_ids(segmentation_node: Any) -> list[str]:
    ids = vtk.vtkStringArray()
    segmentation_node.GetSegmentation().GetSegmentIDs(ids)
    return [ids.GetValue(n) for n in range(ids.GetNumberOfValues())]


def segment_id_by_name(segmentation_node: Any, name: str) -> Optional[str]:
    segment_id = segmentation_node.GetSegmentation().GetSegmentIdBySegmentName(name)
    return segment_id or None


def segment_mask(segmentation_node: Any, segment_id: str, volume_node: Any) -> np.ndarray:
    """A segment as a ``(k, j, i)`` uint8 0/1 mask on the volume's grid (resampled if needed)."""
    segmentation = segmentation_node.GetSegmentation()
    if segmentation.GetSegment(segment_id) is None:
        raise InputError(f"{_name(segmentation_node)} has no segment {segment_id!r}.")
    labelmap_name = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    if not segmentation.ContainsRepresentation(labelmap_name):
        segmentation_node.CreateBinaryLabelmapRepresentation()
    labelmap = slicer.vtkOrientedImageData()
    slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(segmentation_node, segment_id, labelmap)
    reference = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(volume_node)
    resampled = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        labelmap, reference, resampled, False, False
    ):
        raise RuntimeError(f"Could not resample segment {segment_id!r} onto {_name(volume_node)}.")
    i, j, k = resampled.GetDimensions()
    scalars = resampled.GetPointData().GetScalars()
    if scalars is None:
        return np.zeros((k, j, i), np.uint8)
    values = numpy_support.vtk_to_numpy(scalars).reshape(k, j, i)
    # In a shared labelmap each segment has its own label value.
    label = segmentation.GetSegment(segment_id).GetLabelValue()
    return (values == label).astype(np.uint8)


def write_segment(
    segmentation_node: Any,
    volume_node: Any,
    mask: np.ndarray,
    segment_id: Optional[str] = None,
    name: str = "KPrism",
    color: Optional[Sequence[float]] = None,
    tags: Optional[dict[str, Any]] = None,
) -> str:
    """Write a ``(k, j, i)`` mask on the volume's grid into a segment (a new one without ``segment_id``).

    Colours are RGB in 0–1 or 0–255 ints; tag values that are not strings are stored as JSON.
    Returns the segment ID.
    """
    mask = np.asarray(mask)
    size = volume_node.GetImageData().GetDimensions()
    if mask.shape != tuple(reversed(size)):
        raise ValueError(f"The mask has shape {mask.shape}; the volume {_name(volume_node)} has {tuple(reversed(size))}.")
    segment_id = _segment_to_write(segmentation_node, volume_node, segment_id, name, color)
    labelmap = _labelmap_on_volume_grid(volume_node, (0, size[0] - 1, 0, size[1] - 1, 0, size[2] - 1), mask)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    # MODE_REPLACE makes the segment exactly the given labelmap (cropped to the extent): a whole-volume write.
    if not logic.SetBinaryLabelmapToSegment(labelmap, segmentation_node, segment_id, logic.MODE_REPLACE, labelmap.GetExtent()):
        raise RuntimeError(f"Could not write segment {segment_id!r} of {_name(segmentation_node)}.")
    segmentation_node.GetSegmentation().CollapseBinaryLabelmaps(False)  # share one layer where segments do not overlap
    set_tags(segmentation_node, segment_id, tags)
    return segment_id


def write_segment_region(
    segmentation_node: Any,
    volume_node: Any,
    region: Sequence[slice],
    mask: np.ndarray,
    segment_id: Optional[str] = None,
    name: str = "KPrism",
    color: Optional[Sequence[float]] = None,
    tags: Optional[dict[str, Any]] = None,
) -> str:
    """Replace a segment inside one box of the volume's grid only; the rest of it stays as it is.

    `region` is one slice per array axis ``(k, j, i)`` and `mask` its new 0/1 content. The cost
    grows with the box and the segment's own extent, not with the volume. Slicer has no "replace
    inside an extent" mode — ``MODE_REPLACE`` makes the segment equal to the given labelmap cropped
    to the extent and drops everything outside it — so the box is written the way the Segment
    Editor's "set" does: ``MODE_MERGE_MIN`` removes this segment's voxels where the mask is 0, then
    ``MODE_MERGE_MASK`` adds them where it is 1, both limited to the box. Other segments are left
    alone: the removal is masked by this segment, and an addition that would cover another segment
    of a shared layer first moves this one to a layer of its own. Layers are not collapsed here
    (that costs the whole volume per segment). Returns the segment ID.
    """
    mask = np.asarray(mask)
    size = tuple(reversed(volume_node.GetImageData().GetDimensions()))  # (k, j, i)
    bounds = [s.indices(n) for s, n in zip(region, size)]
    if len(bounds) != 3 or any(step != 1 or start >= stop for start, stop, step in bounds):
        raise ValueError(f"The region {list(region)} is not a box of the volume {_name(volume_node)} of size {size}.")
    if mask.shape != tuple(stop - start for start, stop, _ in bounds):
        raise ValueError(f"The mask has shape {mask.shape}; the region {list(region)} has another.")
    segment_id = _segment_to_write(segmentation_node, volume_node, segment_id, name, color)
    (k0, k1, _), (j0, j1, _), (i0, i1, _) = bounds
    if _write_in_place(segmentation_node, volume_node, segment_id, ((k0, k1), (j0, j1), (i0, i1)), mask):
        set_tags(segmentation_node, segment_id, tags)
        return segment_id
    extent = (i0, i1 - 1, j0, j1 - 1, k0, k1 - 1)
    labelmap = _labelmap_on_volume_grid(volume_node, extent, mask)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    # An empty segment has nothing to remove: the adding half alone (a first click's write is the largest).
    modes = (logic.MODE_MERGE_MASK,) if _is_empty(segmentation_node, segment_id) else (logic.MODE_MERGE_MIN, logic.MODE_MERGE_MASK)
    for mode in modes:
        if not logic.SetBinaryLabelmapToSegment(labelmap, segmentation_node, segment_id, mode, extent):
            raise RuntimeError(f"Could not write segment {segment_id!r} of {_name(segmentation_node)}.")
    set_tags(segmentation_node, segment_id, tags)
    return segment_id


def _write_in_place(segmentation_node: Any, volume_node: Any, segment_id: str,
                    box: tuple[tuple[int, int], ...], mask: np.ndarray) -> bool:
    """Write the box straight into the segment's labelmap layer when that is exactly equivalent; True if done.

    ``SetBinaryLabelmapToSegment`` scans, merges and re-crops the segment's whole layer on every
    call, so its cost follows the segment's size (≈ 100 ms per call for a liver on a 512×512×300
    CT), not the box. When the layer already covers the box on the volume's own grid, binary
    labelmap is the source representation, and the new voxels cover no other segment of a shared
    layer, the same result is a write into the layer's array (Slicer's documented way:
    ``arrayFromSegmentInternalBinaryLabelmap``, then ``segment.Modified()``). Anything else falls
    back to the general path.
    """
    segmentation = segmentation_node.GetSegmentation()
    binary = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    if segmentation.GetSourceRepresentationName() != binary:
        return False
    layer = segmentation_node.GetBinaryLabelmapInternalRepresentation(segment_id)
    if layer is None or layer.GetPointData().GetScalars() is None:
        return False
    i0, i1, j0, j1, k0, k1 = layer.GetExtent()
    (bk0, bk1), (bj0, bj1), (bi0, bi1) = box
    if not (i0 <= bi0 and bi1 - 1 <= i1 and j0 <= bj0 and bj1 - 1 <= j1 and k0 <= bk0 and bk1 - 1 <= k1):
        return False
    layer_matrix = vtk.vtkMatrix4x4()
    layer.GetImageToWorldMatrix(layer_matrix)
    if not np.allclose(slicer.util.arrayFromVTKMatrix(layer_matrix), ijk_to_ras_matrix(volume_node), atol=1e-6):
        return False
    label = segmentation.GetSegment(segment_id).GetLabelValue()
    voxels = numpy_support.vtk_to_numpy(layer.GetPointData().GetScalars()).reshape(tuple(reversed(layer.GetDimensions())))
    window = voxels[bk0 - k0:bk1 - k0, bj0 - j0:bj1 - j0, bi0 - i0:bi1 - i0]
    inside = np.asarray(mask) > 0
    if np.any(inside & (window != 0) & (window != label)):
        return False  # another segment of this shared layer is there: the general path moves ours out first
    window[inside] = label
    window[~inside & (window == label)] = 0
    layer.Modified()  # a numpy write does not touch VTK's modified time
    segmentation.GetSegment(segment_id).Modified()
    return True


def _is_empty(segmentation_node: Any, segment_id: str) -> bool:
    """True when the segment has no voxel (no layer yet, an empty layer, or none of its label in a shared one)."""
    layer = segmentation_node.GetBinaryLabelmapInternalRepresentation(segment_id)
    if layer is None or layer.GetPointData().GetScalars() is None:
        return True
    i0, i1, j0, j1, k0, k1 = layer.GetExtent()
    if i1 < i0 or j1 < j0 or k1 < k0:
        return True
    label = segmentation_node.GetSegmentation().GetSegment(segment_id).GetLabelValue()
    return not np.any(numpy_support.vtk_to_numpy(layer.GetPointData().GetScalars()) == label)


def _segment_to_write(segmentation_node: Any, volume_node: Any, segment_id: Optional[str], name: str,
                      color: Optional[Sequence[float]]) -> str:
    """The segment to write into: `segment_id`, or a new empty one (the first takes the volume's geometry)."""
    segmentation = segmentation_node.GetSegmentation()
    if not segment_ids(segmentation_node):
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    if segment_id is None or segmentation.GetSegment(segment_id) is None:
        return segmentation.AddEmptySegment(segment_id or "", name, list(_unit_color(color)))
    if color is not None:
        segmentation.GetSegment(segment_id).SetColor(*_unit_color(color))
    return segment_id


def _labelmap_on_volume_grid(volume_node: Any, extent: Sequence[int], mask: np.ndarray):
    """A 0/1 ``vtkOrientedImageData`` on the volume's voxel grid, covering `extent` (i0, i1, j0, j1, k0, k1)."""
    labelmap = slicer.vtkOrientedImageData()
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    labelmap.SetImageToWorldMatrix(matrix)
    labelmap.SetExtent(*extent)
    labelmap.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars())[:] = (np.asarray(mask) > 0).ravel()
    return labelmap


def set_tags(segmentation_node: Any, segment_id: str, tags: Optional[dict[str, Any]]) -> None:
    """Set segment tags; values that are not strings are stored as JSON (see :func:`json_tag`)."""
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    for key, value in (tags or {}).items():
        segment.SetTag(key, value if isinstance(value, str) else json_tag(value))


def json_tag(value: Any) -> str:
    """JSON for a segment tag. A .seg.nrrd header stores tags as ``key:value|``, so '|' is escaped."""
    return json.dumps(value, ensure_ascii=True).replace("|", "\\u007c")


def segment_tag(segment: Any, key: str) -> Optional[str]:
    """A segment tag's value, or None (vtkSegment.GetTag returns the value through a reference)."""
    value = vtk.reference("")
    return str(value) if segment.GetTag(key, value) else None


def is_locked(segment: Any) -> bool:
    """Slicer has no per-segment lock; KPrism honours its own tag and the 'completed' review status."""
    if (segment_tag(segment, LOCK_TAG) or "").strip().lower() in ("1", "true", "yes", "locked"):
        return True
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    return logic.GetSegmentStatus(segment) == logic.Completed


def check_editable(segmentation_node: Any, segment_id: Optional[str]) -> None:
    """Refuse to overwrite a locked segment (see :func:`is_locked`)."""
    if segment_id is None:
        return
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is not None and is_locked(segment):
        raise InputError(
            f"Segment {segment.GetName()!r} of {_name(segmentation_node)} is locked (tag {LOCK_TAG} or status "
            "'completed'), so KPrism leaves it as it is. Unlock it, set its status back to 'in progress', or choose "
            "another segment."
        )


def segment_color(segmentation_node: Any, segment_id: str) -> tuple[float, float, float]:
    return tuple(segmentation_node.GetSegmentation().GetSegment(segment_id).GetColor())


def segment_name(segmentation_node: Any, segment_id: str) -> str:
    return segmentation_node.GetSegmentation().GetSegment(segment_id).GetName()


# ----------------------------------------------------------------------------------------------- markups


def control_points(markups_node: Any) -> list[tuple[np.ndarray, str]]:
    """The defined control points of a markups node: (world RAS, label)."""
    points = []
    for n in range(markups_node.GetNumberOfControlPoints()):
        if markups_node.GetNthControlPointPositionStatus(n) != markups_node.PositionDefined:
            continue
        position = [0.0, 0.0, 0.0]
        markups_node.GetNthControlPointPositionWorld(n, position)
        points.append((np.asarray(position), markups_node.GetNthControlPointLabel(n)))
    return points


def is_positive(markups_node: Any) -> bool:
    """Clicks from a markups node are positive unless its ``KPrism.Positive`` attribute is false."""
    value = (markups_node.GetAttribute(POSITIVE_ATTRIBUTE) or "true").strip().lower()
    return value not in ("0", "false", "no", "negative")


def create_prompt_node(scene: Any, kind: str) -> Any:
    """A markups node for prompts: 'positive' (green) or 'negative' (red) clicks, or a 'box' ROI."""
    if kind == "box":
        return scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "KPrism box")
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", f"KPrism {kind}")
    node.SetAttribute(POSITIVE_ATTRIBUTE, "true" if kind == "positive" else "false")
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    if display is not None:  # none without the application's markups logic
        display.SetSelectedColor(PROMPT_COLORS[kind == "positive"])
    return node


def roi_corners(roi_node: Any) -> np.ndarray:
    """The 8 corners (world RAS) of a markups ROI, which may be rotated."""
    radius = [0.0, 0.0, 0.0]
    roi_node.GetRadiusXYZ(radius)
    object_to_world = slicer.util.arrayFromVTKMatrix(roi_node.GetObjectToWorldMatrix())  # origin at the centre
    signs = np.array([(x, y, z) for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=float)
    corners = np.hstack([signs * np.asarray(radius), np.ones((8, 1))])
    return (corners @ object_to_world.T)[:, :3]


# ----------------------------------------------------------------------------------------------- views

ORIENTATION_AXES = {"Axial": 0, "Coronal": 1, "Sagittal": 2}  # kprism's canonical axes: I→S, A→P, R→L


def view_axis(slice_node: Any, volume_node: Any = None) -> int:
    """The canonical axis a slice view cuts across: 0 axial, 1 coronal, 2 sagittal.

    With `volume_node`, the axis whose slices of that volume lie closest to the view's plane
    (its slice-to-RAS normal against the volume's axes, through any parent transform), so an
    oblique volume or a reformatted view gets the slices the user is looking at. Without it, a
    named orientation maps directly and a reformat goes to the patient axis nearest its normal.
    """
    normal = slicer.util.arrayFromVTKMatrix(slice_node.GetSliceToRAS())[:3, 2]
    if volume_node is None:
        named = ORIENTATION_AXES.get(slice_node.GetOrientation())
        return named if named is not None else 2 - int(np.argmax(np.abs(normal)))  # R, A, S → 2, 1, 0
    axes = _canonical_axis_directions(volume_node)
    return int(np.argmax(np.abs(axes @ (normal / np.linalg.norm(normal)))))


def placement_axis(scene: Any, volume_node: Any) -> Optional[int]:
    """The canonical axis of the slice view under the mouse (where a point was just placed); None elsewhere.

    Slice views report the mouse position to the scene's crosshair node; a 3D view does not.
    """
    crosshair = scene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
    slice_node = crosshair.GetCursorPositionXYZ([0.0, 0.0, 0.0]) if crosshair is not None else None
    if slice_node is None:
        return None
    try:
        return view_axis(slice_node, volume_node)
    except ImportError:  # kprism not installed yet: the view's own orientation
        return view_axis(slice_node)


def _canonical_axis_directions(volume_node: Any) -> np.ndarray:
    """Unit world-RAS direction of each canonical axis of the volume (rows 0, 1, 2)."""
    from kprism.orientation import CanonicalView

    size = np.asarray(volume_node.GetImageData().GetDimensions(), dtype=float)  # i, j, k
    centre = (size - 1) / 2
    world = [_to_world(volume_node, volume_ras(volume_node, centre + step)) for step in np.eye(3)]
    origin = _to_world(volume_node, volume_ras(volume_node, centre))
    index_directions = np.array([w - origin for w in world])  # rows: i, j, k
    index_directions /= np.linalg.norm(index_directions, axis=1, keepdims=True)
    view = CanonicalView.of(geometry_of(volume_node), tuple(int(n) for n in size[::-1]))
    # Canonical axis a is source array axis permutation[a], i.e. index axis 2 - permutation[a].
    return np.array([index_directions[2 - source] for source in view.permutation])


def _to_world(volume_node: Any, ras: Sequence[float]) -> np.ndarray:
    """A point in the volume's own frame → world RAS (through its parent transform, if any)."""
    parent = volume_node.GetParentTransformNode()
    if parent is None:
        return np.asarray(ras, dtype=float)
    to_world = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(parent, None, to_world)
    return np.asarray(to_world.TransformPoint([float(v) for v in ras]))


# ----------------------------------------------------------------------------------------------- helpers


def _name(node: Any) -> str:
    return repr(node.GetName()) if node is not None and node.GetName() else "(unnamed node)"


def _unit_color(color: Optional[Sequence[float]]) -> tuple[float, float, float]:
    if color is None:
        return (0.95, 0.84, 0.57)  # Slicer's default segment colour family
    values = np.asarray(color, dtype=float)
    if np.issubdtype(np.asarray(color).dtype, np.integer) or values.max() > 1.0:
        values = values / 255.0
    return tuple(float(v) for v in np.clip(values, 0.0, 1.0))
