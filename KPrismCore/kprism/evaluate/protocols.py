"""Evaluation protocols on nnU-Net-format datasets, run through `KPrismSession` like any user.

2D per-slice protocol (comparable with K-Prism): every labelled slice of every case, every label
scored on its own, Dice at the original resolution. Volumes are set whole into the session (so
intensity normalisation and orientation are exactly those of inference) and prompted slice by slice.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from ..data.interaction import click_kprism, click_ritm, dice
from ..data.nnunet_v2 import Case, SegmentationDataset
from ..orientation import CanonicalView
from ..session import KPrismSession, Reference

CLICK_RULES = {"kprism": click_kprism, "ritm": click_ritm}
CLICK_REPORT = (1, 3, 5, 10, 20)


@dataclass
class Item:
    """One scored target: a label on one slice of one case."""

    case_id: str
    label: str
    slice_index: int  # along the canonical axis 0 (0 for 2D images)
    scores: dict[str, object] = field(default_factory=dict)


def labelled_slices(labels: np.ndarray, value: int, max_slices: Optional[int]) -> list[int]:
    """Canonical-view slices (axis 0) containing `value`, evenly thinned to at most `max_slices`."""
    present = np.flatnonzero((labels == value).any(axis=(1, 2)))
    if max_slices is not None and len(present) > max_slices:
        present = present[np.linspace(0, len(present) - 1, max_slices).round().astype(int)]
    return present.tolist()


def _canonical(session: KPrismSession, labels: np.ndarray) -> np.ndarray:
    view = CanonicalView.of(session.image.geometry, session.image.spatial_shape)
    return view.to_canonical(labels) if labels.ndim == 3 else labels


def _slice_mask(result_mask: np.ndarray, session: KPrismSession, index: int) -> np.ndarray:
    canonical = _canonical(session, result_mask)
    return canonical[index] if canonical.ndim == 3 else canonical


def _ijk_of(session: KPrismSession, index: int, row: int, col: int) -> list[float]:
    """Canonical (slice, row, column) → IJK of the source image."""
    if session.image.ndim == 2:
        return [col, row]
    view = CanonicalView.of(session.image.geometry, session.image.spatial_shape)
    k, j, i = view.index_from_canonical([index, row, col])
    return [int(i), int(j), int(k)]


class ReferencePicker:
    """A fixed, seeded list of reference cases per label: other cases than the target, same dataset."""

    def __init__(self, dataset: SegmentationDataset, pool: Sequence[Case], seed: int = 0):
        self.dataset, self.pool, self.seed = dataset, list(pool), seed
        self._loaded: dict[str, tuple] = {}

    def references(self, target_case: str, value: int, count: int) -> list[Reference]:
        candidates = [c for c in self.pool if c.case_id != target_case]
        # Seeded by the target itself (crc32 is stable across runs, unlike hash()): the same list every run.
        order = np.random.default_rng(zlib.crc32(f"{self.seed}/{target_case}/{value}".encode())).permutation(len(candidates))
        chosen: list[Reference] = []
        for n in order:
            case = candidates[n]
            image, labels = self._load(case)
            mask = labels == value
            if mask.any():
                chosen.append(Reference(image, mask))
            if len(chosen) == count:
                break
        return chosen

    def _load(self, case: Case):
        if case.case_id not in self._loaded:
            self._loaded[case.case_id] = self.dataset.load(case)
        return self._loaded[case.case_id]


def evaluate_dataset(
    session: KPrismSession,
    dataset: SegmentationDataset,
    modes: Sequence[str] = ("semantic", "incontext", "interactive"),
    split: Optional[str] = None,
    rule: str = "kprism",
    max_clicks: int = 5,
    references: Sequence[int] = (1,),
    max_cases: Optional[int] = None,
    max_slices_per_label: Optional[int] = 5,
    labels: Optional[Sequence[str]] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> list[Item]:
    """Scores every (case, label, slice) item in the requested modes. Returns the items with scores."""
    split = split or dataset.evaluation_split()
    cases = dataset.cases(split)[: max_cases or None]
    if not cases:
        raise ValueError(f"{dataset.name} has no cases in the {split!r} split.")
    pool = dataset.cases("train") if split == "test" else cases
    picker = ReferencePicker(dataset, pool)
    wanted = {n: v for n, v in dataset.labels.items() if labels is None or n in labels}
    known = set(session.catalog.names)
    items: list[Item] = []
    for case in cases:
        image, label_map = dataset.load(case)
        session.set_image(image)
        canonical_labels = _canonical(session, label_map)
        volume = canonical_labels if canonical_labels.ndim == 3 else canonical_labels[None]
        if progress:
            progress(f"{dataset.name}/{case.case_id}")
        for name, value in wanted.items():
            slices = labelled_slices(volume, value, max_slices_per_label)
            if not slices:
                continue
            case_items = [Item(case.case_id, name, s) for s in slices]
            truths = {s: volume[s] == value for s in slices}
            if "semantic" in modes and name in known:
                result = session.segment_semantic([name], slices=slices if image.ndim == 3 else None)[name]
                for item in case_items:
                    item.scores["semantic"] = dice(_slice_mask(result.mask, session, item.slice_index), truths[item.slice_index])
            if "incontext" in modes:
                for count in references:
                    refs = picker.references(case.case_id, value, count)
                    if len(refs) < count:
                        continue
                    result = session.segment_in_context(refs, slices=slices if image.ndim == 3 else None)
                    for item in case_items:
                        item.scores[f"incontext_{count}"] = dice(_slice_mask(result.mask, session, item.slice_index), truths[item.slice_index])
            if "interactive" in modes:
                for item in case_items:
                    item.scores["clicks"] = click_curve(session, item.slice_index, truths[item.slice_index], rule, max_clicks)
            items.extend(case_items)
    return items


def click_curve(session: KPrismSession, index: int, truth: np.ndarray, rule: str, max_clicks: int) -> list[float]:
    """Dice after each of `max_clicks` simulated clicks on one slice (starting from nothing)."""
    session.reset()
    choose = CLICK_RULES[rule]
    prediction = np.zeros_like(truth)
    curve: list[float] = []
    for _ in range(max_clicks):
        click = choose(prediction, truth)
        if click is None:  # perfect already: later clicks change nothing
            curve.append(curve[-1] if curve else 1.0)
            continue
        row, col = click.point
        result = session.add_click(_ijk_of(session, index, row, col), positive=click.positive)
        prediction = _slice_mask(result.mask, session, index) > 0
        curve.append(dice(prediction, truth))
    return curve


def summarise(items: Sequence[Item]) -> dict[str, object]:
    """Means over items: semantic, in-context per reference count, Dice after 1/3/5/10/20 clicks, NoC."""
    summary: dict[str, object] = {"targets": len(items), "cases": len({i.case_id for i in items})}
    keys = sorted({k for i in items for k in i.scores if k != "clicks"})
    for key in keys:
        values = [float(i.scores[key]) for i in items if key in i.scores]
        summary[f"{key}_dice"] = float(np.mean(values)) if values else None
    curves = [i.scores["clicks"] for i in items if "clicks" in i.scores]
    if curves:
        length = len(curves[0])
        summary["dice_at_clicks"] = {str(n): float(np.mean([c[n - 1] for c in curves])) for n in CLICK_REPORT if n <= length}
    return summary
