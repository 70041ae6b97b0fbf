"""3D volumetric protocol of the CVPR 2025 interactive challenge, through `KPrismSession`.

Per structure: the ground truth's 3D bounding box as the first prompt, then 5 clicks, each at the
centre of the largest 3D error component (26-connectivity). Scores: final volumetric Dice, Dice AUC
over the 6 interactions and NSD at 2 mm.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from ..data.interaction import box_from_mask, click_kprism, dice
from ..data.nnunet_v2 import SegmentationDataset
from ..session import KPrismSession
from .metrics import dice_auc, nsd

CLICKS = 5
SEED = 42
TOLERANCE_MM = 2.0


@dataclass
class VolumeItem:
    case_id: str
    label: str
    curve: list[float] = field(default_factory=list)  # Dice after the box and after each click
    final_dice: float = 0.0
    dice_auc: float = 0.0
    nsd: float = 0.0


def segment_structure(session: KPrismSession, truth: np.ndarray, clicks: int = CLICKS) -> list[np.ndarray]:
    """Box, then `clicks` corrective clicks; returns the mask after each interaction (source grid)."""
    session.reset()
    (k0, j0, i0), (k1, j1, i1) = box_from_mask(truth, np.random.default_rng(SEED))
    masks = [session.add_box([i0, j0, k0], [i1, j1, k1]).mask > 0]
    for _ in range(clicks):
        click = click_kprism(masks[-1], truth)  # 26-connected components in 3D
        if click is None:
            masks.append(masks[-1])
            continue
        k, j, i = click.point
        masks.append(session.add_click([i, j, k], positive=click.positive).mask > 0)
    return masks


def evaluate_volumes(session: KPrismSession, dataset: SegmentationDataset, labels: Optional[Sequence[str]] = None,
                     max_cases: Optional[int] = None, progress: Optional[Callable[[str], None]] = None) -> list[VolumeItem]:
    if dataset.dim != 3:
        raise ValueError(f"{dataset.name} is 2D; the volumetric protocol needs 3D volumes.")
    items = []
    for case in dataset.cases(dataset.evaluation_split())[: max_cases or None]:
        image, label_map = dataset.load(case)
        session.set_image(image)
        spacing = image.geometry.spacing[::-1]  # array order, mm
        for name, value in dataset.labels.items():
            if labels is not None and name not in labels:
                continue
            truth = label_map == value
            if not truth.any():
                continue
            if progress:
                progress(f"{dataset.name}/{case.case_id}/{name}")
            masks = segment_structure(session, truth)
            curve = [dice(m, truth) for m in masks]
            items.append(VolumeItem(case.case_id, name, curve, curve[-1], dice_auc(curve),
                                    nsd(masks[-1], truth, spacing, TOLERANCE_MM)))
    return items


def summarise_volumes(items: Sequence[VolumeItem]) -> dict[str, dict]:
    """The `interactive_3d` mode entry: final Dice, Dice AUC and NSD@2 mm, as means over structures."""
    if not items:
        return {}
    return {"interactive_3d": {
        "cases": len({i.case_id for i in items}), "targets": len(items),
        "dice_mean": float(np.mean([i.final_dice for i in items])),
        "dice_auc": float(np.mean([i.dice_auc for i in items])),
        "nsd_mean": float(np.mean([i.nsd for i in items])),
        "dice_at_interactions": {str(n): float(np.mean([i.curve[n] for i in items])) for n in range(len(items[0].curve))},
    }}
