"""3D volumetric protocol of the CVPR 2025 interactive challenge, through the 3D interaction of a `Target`.

Per structure, on one `EncodedImage` shared by all structures of a case:
- interactive: the ground truth's 3D bounding box (two corners; every slice it spans is prompted,
  without travel), then clicks by the CVPR25 rule (`click_cvpr25`): each at the core centre of the
  largest 26-connected 3D error, placed on the source axis where that error's cross-section through
  the point is largest. Each click re-segments its slice and travels through the volume as a
  user's click does.
- chained: semantic (a known class, through the one-pass class head when the model has one) or
  in-context from one other case first, over the whole volume; then the same clicks.
Scores: volumetric Dice after the first step and after each click, Dice AUC over those
interactions, and the final NSD at 2 mm (MONAI's surface Dice, as the challenge).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Optional, Sequence

import numpy as np

from ..data.interaction import ClickCurve, box_from_mask, click_cvpr25, click_loop
from ..data.nnunet_v2 import SegmentationDataset
from ..session import KPrismSession
from .clickers import VolumeClicker, timed
from .metrics import dice_auc, nsd, percentiles
from .protocols import ReferencePicker, knowledge_first

CLICKS = 5
TOLERANCE_MM = 2.0
VOLUME_MODES = ("interactive", "chained")  # `kprism eval --protocol cvpr25 --mode …`


@dataclass
class VolumeItem:
    case_id: str
    label: str
    mode: str = "interactive"
    curve: list[float] = field(default_factory=list)  # Dice after the first step (box, or semantic / in-context) and after each click
    final_dice: float = 0.0
    dice_auc: float = 0.0
    nsd: float = 0.0
    knowledge: Optional[str] = None  # chained: "semantic" or "incontext"
    click_axes: list[int] = field(default_factory=list)  # source array axis of each click given
    click_ms: list[float] = field(default_factory=list)


def box_then_clicks(session: KPrismSession, truth: np.ndarray, clicks: int = CLICKS,
                    timings: Optional[list[float]] = None, click_axes: Optional[Sequence[int]] = None) -> ClickCurve:
    """The CVPR25 interaction on a new target of the session's image: a 3D box, then `clicks` clicks.

    `click_axes`: the canonical axes (views) clicks may be placed on; default all three.
    """
    clicker = VolumeClicker(session.new_target(), click_axes)
    first, last = box_from_mask(truth)
    start = clicker.box(first, last)
    return _clicks(clicker, truth, clicks, start, timings)


def chained_then_clicks(session: KPrismSession, truth: np.ndarray, name: str, value: int, case_id: str,
                        picker: ReferencePicker, clicks: int = CLICKS, timings: Optional[list[float]] = None,
                        click_axes: Optional[Sequence[int]] = None) -> Optional[tuple[str, ClickCurve]]:
    """Semantic or in-context over the whole volume (`knowledge_first`), then `clicks` CVPR25 clicks.

    Returns which knowledge came first and the curve; None when neither is possible.
    """
    knowledge = knowledge_first(session, name, value, case_id, picker)
    if knowledge is None:
        return None
    clicker = VolumeClicker(session.target, click_axes)
    return knowledge, _clicks(clicker, truth, clicks, clicker.mask.copy(), timings)


def _clicks(clicker: VolumeClicker, truth: np.ndarray, clicks: int, start: np.ndarray,
            timings: Optional[list[float]]) -> ClickCurve:
    rule = partial(click_cvpr25, axes=clicker.source_axes)
    return click_loop(timed(clicker, timings), truth, rule, clicks, start=start)


def evaluate_volumes(session: KPrismSession, dataset: SegmentationDataset, labels: Optional[Sequence[str]] = None,
                     max_cases: Optional[int] = None, progress: Optional[Callable[[str], None]] = None,
                     modes: Sequence[str] = ("interactive",), clicks: int = CLICKS,
                     case_ids: Optional[Sequence[str]] = None, click_axes: Optional[Sequence[int]] = None) -> list[VolumeItem]:
    """Every structure of every case of the dataset's evaluation split (or the cases `case_ids`), in each mode.

    In-context references (chained mode, structures that are no class) come from the training cases
    when the dataset has a test split, else from the other cases of the split.
    """
    if dataset.dim != 3:
        raise ValueError(f"{dataset.name} is 2D; the volumetric protocol needs 3D volumes.")
    unknown = set(modes) - set(VOLUME_MODES)
    if not modes or unknown:
        raise ValueError(f"The cvpr25 protocol scores the modes {', '.join(VOLUME_MODES)}; got {', '.join(modes) or 'none'}.")
    if clicks < 1:
        raise ValueError(f"Give at least one click per structure; got {clicks}.")
    split = dataset.evaluation_split()
    cases = dataset.select(split, case_ids)[: max_cases or None]
    picker = ReferencePicker(dataset, dataset.cases("train") if split == "test" else dataset.cases(split))
    items = []
    for case in cases:
        image, label_map = dataset.load(case)
        session.set_image(image)
        spacing = image.geometry.spacing[::-1]  # array order, mm
        for name, value in dataset.labels.items():
            if labels is not None and name not in labels:
                continue
            truth = label_map == value
            if not truth.any():
                continue
            for mode in modes:
                if progress:
                    progress(f"{dataset.name}/{case.case_id}/{name} ({mode})")
                item = _score(session, truth, spacing, mode, name, value, case.case_id, picker, clicks, click_axes)
                if item is not None:
                    items.append(item)
    return items


def _score(session: KPrismSession, truth: np.ndarray, spacing, mode: str, name: str, value: int, case_id: str,
           picker: ReferencePicker, clicks: int, click_axes: Optional[Sequence[int]]) -> Optional[VolumeItem]:
    click_ms: list[float] = []
    knowledge = None
    if mode == "interactive":
        curve = box_then_clicks(session, truth, clicks, click_ms, click_axes)
    else:
        chained = chained_then_clicks(session, truth, name, value, case_id, picker, clicks, click_ms, click_axes)
        if chained is None:
            return None
        knowledge, curve = chained
    dices = curve.with_start
    return VolumeItem(case_id, name, mode, dices, dices[-1], dice_auc(dices),
                      nsd(curve.prediction, truth, spacing, TOLERANCE_MM), knowledge,
                      [c.axis for c in curve.clicks], click_ms)


def summarise_volumes(items: Sequence[VolumeItem]) -> dict[str, dict]:
    """Per mode (`interactive_3d`, `chained_3d`): mean Dice after each interaction, final Dice, Dice AUC,
    NSD@2 mm, click latency and which axes the clicks went to."""
    modes: dict[str, dict] = {}
    for mode in VOLUME_MODES:
        scored = [i for i in items if i.mode == mode]
        if not scored:
            continue
        latency = percentiles([ms for i in scored for ms in i.click_ms])
        entry = {
            "cases": len({i.case_id for i in scored}), "targets": len(scored),
            "dice_mean": float(np.mean([i.final_dice for i in scored])),
            "dice_auc": float(np.mean([i.dice_auc for i in scored])),
            "nsd_mean": float(np.mean([i.nsd for i in scored])),
            "dice_at_interactions": {str(n): float(np.mean([i.curve[n] for i in scored])) for n in range(len(scored[0].curve))},
            "click_axes": {str(a): sum(i.click_axes.count(a) for i in scored) for a in range(3)},
            "latency_ms": {"click_p50": latency["p50"], "click_p95": latency["p95"]},
        }
        if mode == "chained":
            entry["knowledge"] = {k: sum(i.knowledge == k for i in scored) for k in ("semantic", "incontext")}
        modes[f"{mode}_3d"] = entry
    return modes
