"""Names and colours of the segments KPrism creates (plain Python: no torch, no Qt).

- a class (semantic mode) is coloured as Slicer colours that anatomy: from the application's
  GenericAnatomyColors table when the scene has it (the Colors module loads it in the
  application, not in the slicer-core wheel), else from `ANATOMY_COLORS` below, a copy of that
  table's rows for the model's classes it names; other classes get the model catalog's colour;
- a new interactive segment without a name is "KPrism 1", "KPrism 2", … with a colour no segment
  of the segmentation has yet (GenericAnatomyColors' rows in turn, as the Segment Editor does).
"""

from __future__ import annotations

import re
from typing import Any, Optional

GENERIC_ANATOMY_COLORS_ID = "vtkMRMLColorTableNodeFileGenericAnatomyColors.txt"  # vtkMRMLColorLogic's file node ID
NUMBERED = "KPrism"

# class name → (GenericAnatomyColors row name, its RGB 0–255), from Slicer's
# Base/Logic/Resources/ColorFiles/GenericAnatomyColors.txt (left/right variants share one colour there).
ANATOMY_COLORS: dict[str, tuple[str, tuple[int, int, int]]] = {
    "adrenal_gland_left": ("left_adrenal_gland", (249, 186, 150)),
    "adrenal_gland_right": ("right_adrenal_gland", (249, 186, 150)),
    "aorta": ("aorta", (224, 97, 76)),
    "colon": ("colon", (204, 168, 143)),
    "duodenum": ("duodenum", (255, 253, 229)),
    "gallbladder": ("gallbladder", (139, 150, 98)),
    "hip_left": ("left_hip", (177, 122, 101)),
    "hip_right": ("right_hip", (177, 122, 101)),
    "kidney_left": ("left_kidney", (185, 102, 83)),
    "kidney_right": ("right_kidney", (185, 102, 83)),
    "left_ventricle": ("left_ventricle_of_heart", (152, 55, 13)),
    "liver": ("liver", (221, 130, 101)),
    "lung": ("right_lung", (197, 165, 145)),
    "lung_right": ("right_lung", (197, 165, 145)),
    "lung_upper_lobe_left": ("superior_lobe_of_left_lung", (172, 138, 115)),
    "lung_middle_lobe_right": ("middle_lobe_of_right_lung", (202, 164, 140)),
    "lung_lower_lobe_left": ("inferior_lobe_of_left_lung", (224, 186, 162)),
    "lung_lower_lobe_right": ("inferior_lobe_of_right_lung", (224, 186, 162)),
    "pancreas": ("pancreas", (249, 180, 111)),
    "prostate": ("prostate", (230, 158, 140)),
    "right_ventricle": ("right_ventricle_of_heart", (181, 85, 57)),
    "small_bowel": ("small_bowel", (205, 167, 142)),
    "spinal_cord": ("spinal_cord", (244, 214, 49)),
    "spleen": ("spleen", (157, 108, 162)),
    "stomach": ("stomach", (216, 132, 105)),
    "urinary_bladder": ("urinary_bladder", (222, 154, 132)),
}

# Distinct colours for numbered segments when the scene has no GenericAnatomyColors table (slicer-core).
FALLBACK_PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
]


def class_color(name: str, segmentation_node: Any = None) -> Optional[tuple[float, float, float]]:
    """Slicer's anatomy colour (0–1) for a class, or None when Slicer does not name that structure."""
    known = ANATOMY_COLORS.get(name)
    if known is None:
        return None
    table = _anatomy_table(segmentation_node)
    if table is not None:
        index = table.GetColorIndexByName(known[0])
        rgba = [0.0, 0.0, 0.0, 0.0]
        if index > 0 and table.GetColor(index, rgba):
            return (rgba[0], rgba[1], rgba[2])
    return tuple(v / 255.0 for v in known[1])  # type: ignore[return-value]


def next_segment_name(segmentation_node: Any) -> str:
    """ "KPrism N" with N one more than the highest number already used in the segmentation."""
    pattern = re.compile(rf"^{NUMBERED} (\d+)$")
    used = [int(m.group(1)) for m in (pattern.match(n) for n in _segment_names(segmentation_node)) if m]
    return f"{NUMBERED} {max(used, default=0) + 1}"


def new_segment_color(segmentation_node: Any) -> tuple[float, float, float]:
    """A colour (0–1) that no segment of the segmentation has: GenericAnatomyColors' rows in turn, or a fixed palette."""
    taken = {tuple(round(c, 3) for c in color) for color in _segment_colors(segmentation_node)}
    candidates = []
    table = _anatomy_table(segmentation_node)
    if table is not None:
        for index in range(1, table.GetNumberOfColors()):  # row 0 is the background
            rgba = [0.0, 0.0, 0.0, 0.0]
            if table.GetColor(index, rgba):
                candidates.append((rgba[0], rgba[1], rgba[2]))
    candidates += [tuple(v / 255.0 for v in rgb) for rgb in FALLBACK_PALETTE]
    for color in candidates:
        if tuple(round(c, 3) for c in color) not in taken:
            return color  # type: ignore[return-value]
    return candidates[len(taken) % len(candidates)]  # type: ignore[return-value]


def _anatomy_table(segmentation_node: Any):
    scene = segmentation_node.GetScene() if segmentation_node is not None else None
    table = scene.GetNodeByID(GENERIC_ANATOMY_COLORS_ID) if scene is not None else None
    return table if table is not None and table.GetNumberOfColors() > 1 else None


def _segments(segmentation_node: Any):
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegment(n) for n in range(segmentation.GetNumberOfSegments())]


def _segment_names(segmentation_node: Any) -> list[str]:
    return [segment.GetName() for segment in _segments(segmentation_node)]


def _segment_colors(segmentation_node: Any) -> list[tuple[float, float, float]]:
    return [tuple(segment.GetColor()) for segment in _segments(segmentation_node)]
