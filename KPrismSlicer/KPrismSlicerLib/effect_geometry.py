"""What a gesture in a slice view means on the volume's grid: a click, a 2D/3D box, a painted stroke.

Plain Python over MRML (no Qt). The Segment Editor effect turns mouse positions into world RAS
points; these functions turn those into prompts on the volume's voxels, along the canonical axis
of the view (0 axial, 1 coronal, 2 sagittal; see :func:`nodes.view_axis`).

A drag is a box on the slice it was drawn on: the rectangle in-plane, one slice across. That is
what nnInteractive sends for a drag too (a 2D box on the drawn slice), and for KPrism a one-slice
box is answered on that slice and then travels through the neighbouring slices like a click does
(`kprism.target.Target.box`). A box that spans several slices says where the structure starts and
ends and does not travel; the effect makes one when the user stretches the box's marker (a
markups ROI) across slices, in the 3D view or with its handles.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from . import nodes
from .nodes import InputError

THIN = 1.0 + 1e-6  # a marker at most one voxel thick across its view is a one-slice (2D) box


def index_axis(volume_node: Any, axis: int) -> int:
    """The voxel index axis (0 i, 1 j, 2 k) that the volume's canonical `axis` runs along."""
    from kprism.orientation import CanonicalView

    shape = tuple(reversed(volume_node.GetImageData().GetDimensions()))  # (k, j, i)
    view = CanonicalView.of(nodes.geometry_of(volume_node), shape)
    return 2 - int(view.permutation[axis])  # canonical axis a is array axis permutation[a]; array (k, j, i)


def voxel_spacing(volume_node: Any) -> np.ndarray:
    """Millimetres per voxel along i, j, k."""
    return np.linalg.norm(nodes.ijk_to_ras_matrix(volume_node)[:3, :3], axis=0)


def box_corners(volume_node: Any, corners_ras: Sequence[Sequence[float]], axis: int) -> tuple[list[float], list[float]]:
    """World RAS of the two opposite voxel corners of a box given by its corner points.

    In-plane the box holds every corner; across the view (`axis`) a box at most one voxel thick
    is the one slice through its centre, a thicker one spans the slices it covers. Refuses a box
    that misses the volume.
    """
    ijk = np.array([nodes.world_to_ijk(volume_node, c) for c in corners_ras])
    across = index_axis(volume_node, axis)
    # The voxels whose centres lie inside (a corner on a voxel boundary, x.5, leaves that voxel out).
    low, high = np.ceil(ijk.min(0) - 1e-6), np.floor(ijk.max(0) + 1e-6)
    if np.ptp(ijk[:, across]) <= THIN:
        low[across] = high[across] = np.round(ijk[:, across].mean())
    last = np.asarray(volume_node.GetImageData().GetDimensions()) - 1
    if (high < 0).any() or (low > last).any():
        raise InputError(f"The box does not overlap the volume {volume_node.GetName()!r}: draw it on the volume.")
    low, high = np.clip(low, 0, last), np.clip(high, 0, last)
    if (high - low)[[a for a in range(3) if a != across]].min() < 1:
        raise InputError("The box is a line: drag a rectangle around the structure.")
    world = [nodes._to_world(volume_node, nodes.volume_ras(volume_node, corner)) for corner in (low, high)]
    return world[0].tolist(), world[1].tolist()


def stroke_mask(volume_node: Any, points_ras: Sequence[Sequence[float]], axis: int, radius_mm: float) -> np.ndarray:
    """A painted stroke as a 0/1 mask on the volume's grid, ``(k, j, i)``, on the one slice it was painted on.

    Voxels of that slice within `radius_mm` of the stroke's polyline are marked (at least the
    voxels the line passes through, however thin the brush). Refuses a stroke off the volume.
    """
    size = np.asarray(volume_node.GetImageData().GetDimensions())  # i, j, k
    ijk = np.array([nodes.world_to_ijk(volume_node, p) for p in points_ras], dtype=float).reshape(-1, 3)
    across = index_axis(volume_node, axis)
    plane = [a for a in range(3) if a != across]
    index = int(np.round(np.median(ijk[:, across]))) if len(ijk) else -1
    mask = np.zeros(tuple(size[::-1]), np.uint8)
    if not 0 <= index < size[across]:
        raise InputError(f"The stroke is off the volume {volume_node.GetName()!r}: paint on the volume.")
    spacing = voxel_spacing(volume_node)[plane]
    radius = max(float(radius_mm), 0.5 * float(spacing.max()))
    uv = ijk[:, plane]
    painted = np.zeros((size[plane[0]], size[plane[1]]), bool)  # (u, v) of the slice
    segments = zip(uv, uv[1:]) if len(uv) > 1 else [(uv[0], uv[0])]
    for start, end in segments:
        reach = radius / spacing
        low = np.maximum(np.floor(np.minimum(start, end) - reach), 0).astype(int)
        high = np.minimum(np.ceil(np.maximum(start, end) + reach), np.array(painted.shape) - 1).astype(int)
        if (high < low).any():
            continue
        u, v = np.mgrid[low[0]:high[0] + 1, low[1]:high[1] + 1]
        painted[low[0]:high[0] + 1, low[1]:high[1] + 1] |= _distance_mm(u, v, start, end, spacing) <= radius
    if not painted.any():
        raise InputError(f"The stroke is off the volume {volume_node.GetName()!r}: paint on the volume.")
    # Array order is (k, j, i): index axis a is array axis 2 - a, so the slice's array rows run along v.
    box: list[Any] = [slice(None)] * 3
    box[2 - across] = index
    mask[tuple(box)] = painted.T
    return mask


def _distance_mm(u: np.ndarray, v: np.ndarray, start: np.ndarray, end: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Distance in millimetres from voxel centres (u, v) to the segment start–end (voxel coordinates)."""
    point = np.stack([u, v], -1) * spacing
    a, b = start * spacing, end * spacing
    direction = b - a
    length = float(direction @ direction)
    t = np.clip(((point - a) @ direction) / length, 0.0, 1.0) if length > 0 else 0.0
    nearest = a + np.multiply.outer(t, direction) if length > 0 else a
    return np.linalg.norm(point - nearest, axis=-1)
