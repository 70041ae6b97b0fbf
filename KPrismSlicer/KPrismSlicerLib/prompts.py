"""Prompts as the Slicer module receives them (points, boxes, scribbles, priors on MRML nodes) and their
translation into kprism's prompt steps, each refused in one line before any model work when it is off the
volume or empty. Plain Python over MRML (no Qt, no torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import numpy as np
import slicer

from . import nodes
from .nodes import InputError

if TYPE_CHECKING:
    from kprism.pipeline import PromptStep


@dataclass
class Prompt:
    """One prompt on the input volume. Build it with the class methods.

    - ``point``: a click at a world RAS position, or every control point of a markups node
      (positive unless the node's ``KPrism.Positive`` attribute is false);
    - ``box``: a markups ROI (any orientation), or two opposite RAS corners;
    - ``scribble``: a segment painted as a hint (positive or negative);
    - ``prior``: an existing segment to refine (the starting point, applied before the other prompts).

    ``axis`` is the canonical axis of the view a point was placed in (0 axial, 1 coronal,
    2 sagittal; see :func:`nodes.view_axis`); None uses the run's slicing axis.
    """

    kind: str
    node: Any = None
    segment_id: Optional[str] = None
    positive: Optional[bool] = True
    ras: Optional[Sequence[float]] = None
    ras_max: Optional[Sequence[float]] = None
    axis: Optional[int] = None
    mask: Optional[np.ndarray] = None  # a scribble drawn on the volume's grid, (k, j, i), instead of a segment

    @classmethod
    def point(cls, ras: Sequence[float], positive: bool = True, axis: Optional[int] = None) -> "Prompt":
        return cls("point", ras=tuple(float(v) for v in ras), positive=positive, axis=axis)

    @classmethod
    def points(cls, markups_node: Any, positive: Optional[bool] = None, axis: Optional[int] = None) -> "Prompt":
        return cls("point", node=markups_node, positive=positive, axis=axis)

    @classmethod
    def box(cls, roi_node: Any, axis: Optional[int] = None) -> "Prompt":
        return cls("box", node=roi_node, axis=axis)

    @classmethod
    def box_ras(cls, ras_min: Sequence[float], ras_max: Sequence[float], axis: Optional[int] = None) -> "Prompt":
        return cls("box", ras=tuple(ras_min), ras_max=tuple(ras_max), axis=axis)

    @classmethod
    def scribble(cls, segmentation_node: Any, segment_id: str, positive: bool = True) -> "Prompt":
        return cls("scribble", node=segmentation_node, segment_id=segment_id, positive=positive)

    @classmethod
    def scribble_mask(cls, mask: np.ndarray, positive: bool = True, axis: Optional[int] = None) -> "Prompt":
        """A stroke painted in a view: a 0/1 mask on the volume's grid, (k, j, i)."""
        return cls("scribble", mask=np.asarray(mask), positive=positive, axis=axis)

    @classmethod
    def prior(cls, segmentation_node: Any, segment_id: str) -> "Prompt":
        return cls("prior", node=segmentation_node, segment_id=segment_id)

    @classmethod
    def of(cls, item: Any) -> "Prompt":
        """A Prompt, or a markups fiducial / ROI node standing for its points / its box."""
        if isinstance(item, Prompt):
            return item
        if isinstance(item, slicer.vtkMRMLMarkupsROINode):
            return cls.box(item)
        if isinstance(item, slicer.vtkMRMLMarkupsNode):
            return cls.points(item)
        raise InputError(f"Not a prompt: {item!r}. Use Prompt.point/points/box/scribble/prior or a markups node.")


@dataclass(frozen=True)
class PromptResult:
    """What one interactive prompt did to its segment."""

    segment_id: str
    voxels: int  # voxels in the segment now
    quality: float  # the model's predicted quality (Dice), averaged over the slices segmented so far
    region: tuple[slice, ...]  # the box of the volume, (k, j, i), that was rewritten (empty: nothing changed)
    axis: int  # the canonical axis the prompt was answered along
    slices: tuple[int, ...]  # the canonical slices recomputed, the prompted one first


def prompt_steps(prompts: Sequence[Prompt], volume_node: Any, axis_of: Callable[[Optional[int]], int] = lambda axis: axis):
    """Slicer prompts → kprism prompt steps (voxel indices of the volume), their JSON records, and the prior.

    The prior (a segment to refine) is the starting point, returned apart as (mask, segment name);
    `axis_of` maps a point's view axis to the axis it is answered along.
    """
    from kprism.pipeline import BoxPrompt, ClickPrompt, ScribblePrompt

    steps: list["PromptStep"] = []
    records: list[dict] = []
    prior = None
    for prompt in prompts:
        if prompt.kind == "point":
            points = [(prompt.ras, None)] if prompt.node is None else nodes.control_points(prompt.node)
            positive = prompt.positive if prompt.positive is not None or prompt.node is None else nodes.is_positive(prompt.node)
            axis = None if prompt.axis is None else axis_of(prompt.axis)
            for position, _ in points:
                ras = np.round(np.asarray(position, float), 3).tolist()
                ijk = nodes.world_to_ijk(volume_node, position).tolist()
                steps.append(ClickPrompt(ijk, bool(positive), "ijk", axis, where=f"The click at RAS {ras}"))
                records.append({"type": "point", "ras": ras, "positive": bool(positive),
                                **({} if axis is None else {"axis": axis})})
        elif prompt.kind == "box":
            low, high = _box_indices(prompt, volume_node)
            axis = None if prompt.axis is None else axis_of(prompt.axis)
            steps.append(BoxPrompt(low.tolist(), high.tolist(), "ijk", axis, where="The box"))
            records.append({"type": "box", "ras_min": np.round(nodes.volume_ras(volume_node, low), 3).tolist(),
                            "ras_max": np.round(nodes.volume_ras(volume_node, high), 3).tolist(),
                            **({} if axis is None else {"axis": axis})})
        elif prompt.kind == "scribble":
            axis = None if prompt.axis is None else axis_of(prompt.axis)
            if prompt.mask is not None:  # a stroke painted in a view
                name, mask = "stroke", prompt.mask
            else:
                name = nodes.segment_name(prompt.node, prompt.segment_id)
                mask = nodes.segment_mask(prompt.node, prompt.segment_id, volume_node)
            steps.append(ScribblePrompt(mask, bool(prompt.positive), axis, where=f"The scribble {name!r}"))
            records.append({"type": "scribble", "segment": name, "positive": bool(prompt.positive),
                            **({} if axis is None else {"axis": axis})})
        else:
            name = nodes.segment_name(prompt.node, prompt.segment_id)
            prior = (nodes.segment_mask(prompt.node, prompt.segment_id, volume_node), name)
            records.append({"type": "prior", "segment": name})
    return steps, records, prior


def check_point(volume_node: Any, ras: Sequence[float], label: str = "click") -> None:
    """Refuse, in one line, a point off the volume (the panel's points and the effect's clicks alike)."""
    ijk = nodes.world_to_ijk(volume_node, ras)
    if not nodes.index_inside(volume_node, ijk):
        size = list(volume_node.GetImageData().GetDimensions())
        raise InputError(
            f"The {label!r} at RAS {np.round(np.asarray(ras, float), 2).tolist()} is outside the volume "
            f"{volume_node.GetName()!r} (voxel {np.round(ijk, 1).tolist()}, size {size}). Place it on the volume."
        )


def check_prompt(prompt: Prompt, volume_node: Any) -> None:
    """Refuse a prompt before any work: points outside the volume, empty boxes or scribbles."""
    if prompt.kind == "point":
        points = [(prompt.ras, "point")] if prompt.node is None else nodes.control_points(prompt.node)
        if not points:
            raise InputError(f"{prompt.node.GetName()!r} has no placed control point.")
        for ras, label in points:
            check_point(volume_node, ras, label)
    elif prompt.kind == "box":
        _box_indices(prompt, volume_node)
    elif prompt.kind == "scribble" and prompt.mask is not None:
        shape = tuple(reversed(volume_node.GetImageData().GetDimensions()))
        if prompt.mask.shape != shape or not prompt.mask.any():
            raise InputError(f"The stroke is empty on the volume {volume_node.GetName()!r} (mask {prompt.mask.shape}, volume {shape}).")
    elif prompt.kind in ("scribble", "prior"):
        if prompt.node is None or not nodes.has_segment(prompt.node, prompt.segment_id):
            raise InputError(f"The {prompt.kind} segment {prompt.segment_id!r} does not exist.")
        nodes.check_same_frame(volume_node, prompt.node)
        if prompt.kind == "scribble" and not nodes.segment_mask(prompt.node, prompt.segment_id, volume_node).any():
            raise InputError(f"The scribble segment {nodes.segment_name(prompt.node, prompt.segment_id)!r} is empty on this volume.")
    else:
        raise InputError(f"Unknown prompt kind {prompt.kind!r}.")


def _box_indices(prompt: Prompt, volume_node: Any) -> tuple[np.ndarray, np.ndarray]:
    """A box → its voxel bounding box on the volume (clipped), as two IJK corners."""
    if prompt.node is not None:
        corners = nodes.roi_corners(prompt.node)  # a box in space, possibly rotated
    else:
        corners = np.array([prompt.ras, prompt.ras_max], float)  # two opposite voxel corners, as in prompts.json
    ijk = np.array([nodes.world_to_ijk(volume_node, c) for c in corners])
    size = np.asarray(volume_node.GetImageData().GetDimensions()) - 1
    low, high = np.clip(np.round(ijk.min(0)), 0, size), np.clip(np.round(ijk.max(0)), 0, size)
    if (np.round(ijk.max(0)) < 0).any() or (np.round(ijk.min(0)) > size).any():
        raise InputError(f"The box does not overlap the volume {volume_node.GetName()!r}.")
    return low, high
