"""Evaluation protocols on nnU-Net-format datasets, run through `KPrismSession` like any user.

2D per-slice protocol (comparable with K-Prism): every labelled slice of every case, every label
scored on its own, Dice at the original resolution. Volumes are set whole into the session (so
intensity normalisation and orientation are exactly those of inference) and prompted slice by slice.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from ..data.interaction import click_loop, dice, scribble
from ..data.nnunet_v2 import Case, SegmentationDataset
from ..session import KPrismSession, Reference
from .clickers import SliceClicker, timed
from .metrics import dice_auc, noc, nof, nsd, peak_rss_mb, percentiles

SLICE_RULES = ("kprism", "ritm")  # click rules of the 2D per-slice protocol
CLICK_REPORT = (1, 3, 5, 10, 20)
# onepass: the class head, all labels at once; chained: semantic or in-context first, then clicks
MODES = ("semantic", "onepass", "incontext", "interactive", "scribble", "chained")
CURVE_MODES = ("interactive", "chained")  # modes scored by a Dice-against-clicks curve
NSD_TOLERANCE = 2.0  # mm on scans with a physical spacing; pixels on photographs


@dataclass
class Item:
    """One scored target: a label on one slice of one case."""

    case_id: str
    label: str
    slice_index: int  # along the canonical axis 0 (0 for 2D images)
    spacing: tuple[float, float]  # in-plane (row, column) spacing of that slice
    scores: dict[str, dict] = field(default_factory=dict)


@dataclass
class Timings:
    click_ms: list[float] = field(default_factory=list)
    encode_ms: list[float] = field(default_factory=list)


def labelled_slices(labels: np.ndarray, value: int, max_slices: Optional[int]) -> list[int]:
    """Canonical-view slices (axis 0) containing `value`, evenly thinned to at most `max_slices`."""
    present = np.flatnonzero((labels == value).any(axis=(1, 2)))
    if max_slices is not None and len(present) > max_slices:
        present = present[np.linspace(0, len(present) - 1, max_slices).round().astype(int)]
    return present.tolist()


def _slice_mask(mask: np.ndarray, session: KPrismSession, index: int) -> np.ndarray:
    """A source-grid mask → its canonical slice `index` (the 2D image itself for 2D)."""
    return mask if mask.ndim == 2 else session.view.to_canonical(mask)[index]


def _in_plane_spacing(session: KPrismSession) -> tuple[float, float]:
    spacing = session.image.geometry.spacing[::-1]  # array order
    if session.image.ndim == 2:
        return float(spacing[0]), float(spacing[1])
    canonical = [spacing[p] for p in session.view.permutation]
    return float(canonical[1]), float(canonical[2])


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
            image, labels = self._load(candidates[n])
            if (labels == value).any():
                chosen.append(Reference(image, labels == value))
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
    max_clicks: int = 20,
    references: Sequence[int] = (1, 2),
    max_cases: Optional[int] = None,
    max_slices_per_label: Optional[int] = 5,
    labels: Optional[Sequence[str]] = None,
    progress: Optional[Callable[[str], None]] = None,
    timings: Optional[Timings] = None,
    case_ids: Optional[Sequence[str]] = None,
) -> list[Item]:
    """Scores every (case, label, slice) item in the requested modes. Returns the items with scores.

    `case_ids` scores only those cases (from any split: a case held out of a model's training); in-context
    references then come from the split's other cases."""
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"Unknown modes {sorted(unknown)}; choose from {MODES}.")
    if rule not in SLICE_RULES:
        raise ValueError(f"The per-slice protocol clicks by {' or '.join(SLICE_RULES)}, not {rule!r}.")
    if "onepass" in modes and session.model.class_head is None:
        raise ValueError("Mode 'onepass' needs a model with the one-pass class head; this one has none.")
    split = split or dataset.evaluation_split()
    cases = dataset.select(split, case_ids)[: max_cases or None]
    if not cases:
        raise ValueError(f"{dataset.name} has no cases in the {split!r} split.")
    picker = ReferencePicker(dataset, dataset.cases("train") if split == "test" or case_ids else cases)
    wanted = {n: v for n, v in dataset.labels.items() if labels is None or n in labels}
    timings = timings if timings is not None else Timings()
    items: list[Item] = []
    for case in cases:
        image, label_map = dataset.load(case)
        session.set_image(image)
        volume = session.view.to_canonical(label_map) if image.ndim == 3 else label_map[None]
        if progress:
            progress(f"{dataset.name}/{case.case_id}")
        onepass = _one_pass_labels(session, volume, wanted, max_slices_per_label, image.ndim) if "onepass" in modes else None
        for name, value in wanted.items():
            slices = labelled_slices(volume, value, max_slices_per_label)
            if not slices:
                continue
            for index in slices:
                start = time.perf_counter()
                if not session.is_encoded(index):
                    session.features([index])
                    timings.encode_ms.append((time.perf_counter() - start) * 1000)
            case_items = [Item(case.case_id, name, s, _in_plane_spacing(session)) for s in slices]
            truths = {s: volume[s] == value for s in slices}
            restrict = slices if image.ndim == 3 else None
            if "semantic" in modes and name in session.catalog:
                _score(session, case_items, truths, "semantic", session.segment_semantic([name], slices=restrict, engine="prompted")[name].mask)
            if onepass is not None and name in onepass.names:
                _score(session, case_items, truths, "onepass", onepass.labels == onepass.names.index(name) + 1)
            if "incontext" in modes:
                for count in references:
                    refs = picker.references(case.case_id, value, count)
                    if len(refs) == count:
                        _score(session, case_items, truths, f"incontext_{count}", session.segment_in_context(refs, slices=restrict).mask)
            for item in case_items:
                truth = truths[item.slice_index]
                if "interactive" in modes:
                    item.scores["interactive"] = click_curve(session, item, truth, rule, max_clicks, timings)
                if "chained" in modes:
                    chained = chained_curve(session, item, truth, value, picker, rule, max_clicks, timings)
                    if chained is not None:
                        item.scores["chained"] = chained
                if "scribble" in modes:
                    item.scores["scribble"] = scribble_score(session, item, truth, case)
            items.extend(case_items)
    return items


def _one_pass_labels(session: KPrismSession, volume: np.ndarray, wanted: dict[str, int], max_slices: Optional[int], ndim: int):
    """All of a case's known labels from the class head at once (they compete for each pixel, as in use)."""
    names = [n for n in wanted if n in session.catalog]
    slices = sorted({s for n in names for s in labelled_slices(volume, wanted[n], max_slices)})
    if not names or not slices:
        return None
    return session.segment_semantic_labels(names, slices=slices if ndim == 3 else None, engine="one_pass")


def _score(session: KPrismSession, items: Sequence[Item], truths: dict[int, np.ndarray], key: str, mask: np.ndarray) -> None:
    """Dice and NSD of one whole-image or whole-volume result on each item's slice."""
    for item in items:
        predicted = _slice_mask(mask, session, item.slice_index) > 0
        truth = truths[item.slice_index]
        item.scores[key] = {"dice": dice(predicted, truth), "nsd": nsd(predicted, truth, item.spacing, NSD_TOLERANCE)}


def click_curve(session: KPrismSession, item: Item, truth: np.ndarray, rule: str, max_clicks: int,
                timings: Optional[Timings] = None) -> dict:
    """Dice after each of `max_clicks` simulated clicks on one slice, starting from nothing."""
    session.reset()
    clicker = SliceClicker(session.new_target(item.label), 0, item.slice_index, propagate=False)
    curve = click_loop(timed(clicker, timings.click_ms if timings else None), truth, rule, max_clicks)
    return {"curve": curve.dice, "nsd": nsd(curve.prediction, truth, item.spacing, NSD_TOLERANCE)}


def chained_curve(session: KPrismSession, item: Item, truth: np.ndarray, value: int, picker: "ReferencePicker",
                  rule: str, max_clicks: int, timings: Optional[Timings] = None) -> Optional[dict]:
    """Semantic or in-context first (`knowledge_first`) on the item's slice, then `max_clicks` clicks on it.

    None when the label is no class of the model and no other case shows it.
    """
    knowledge = knowledge_first(session, item.label, value, item.case_id, picker,
                                slices=[item.slice_index] if session.image.ndim == 3 else None)
    if knowledge is None:
        return None
    clicker = SliceClicker(session.target, 0, item.slice_index, propagate=False)
    curve = click_loop(timed(clicker, timings.click_ms if timings else None), truth, rule, max_clicks,
                       start=clicker.prediction())
    return {"knowledge": knowledge, "start": curve.start_dice, "curve": curve.dice,
            "nsd": nsd(curve.prediction, truth, item.spacing, NSD_TOLERANCE)}


def knowledge_first(session: KPrismSession, name: str, value: int, case_id: str, picker: "ReferencePicker",
                    slices: Optional[Sequence[int]] = None) -> Optional[str]:
    """The chained mode's first step; the result becomes the session's target, ready for clicks.

    A known class is segmented semantically (through the one-pass class head when the model has
    one); any other structure in-context from one reference case. Returns "semantic", "incontext",
    or None when neither is possible (no class, and no other case shows the structure).
    """
    if name in session.catalog:
        session.segment_semantic([name], slices=slices, engine="auto")
        return "semantic"
    references = picker.references(case_id, value, 1)
    if not references:
        return None
    session.segment_in_context(references, slices=slices)
    return "incontext"


def scribble_score(session: KPrismSession, item: Item, truth: np.ndarray, case: Case) -> dict:
    """One positive scribble inside the target (line kind, seeded by the case), Dice of the result."""
    session.reset()
    rng = np.random.default_rng(zlib.crc32(f"scribble/{case.case_id}/{item.label}/{item.slice_index}".encode()))
    stroke = scribble(truth, rng, "line", positive=True)
    canonical = np.zeros(session.view.canonical_shape if session.image.ndim == 3 else truth.shape, bool)
    if session.image.ndim == 3:
        canonical[item.slice_index] = stroke
        source = session.view.from_canonical(canonical)
    else:
        source = stroke
    result = session.add_scribble(source, positive=True, propagate=False)  # scored on its slice: no travel
    predicted = _slice_mask(result.mask, session, item.slice_index) > 0
    return {"dice": dice(predicted, truth), "nsd": nsd(predicted, truth, item.spacing, NSD_TOLERANCE)}


def summarise(items: Sequence[Item], timings: Optional[Timings] = None, cap: int = 20) -> dict[str, dict]:
    """Per mode: cases, targets, dice_mean, nsd_mean and, for clicks, dice_at_clicks, NoC@85/90, NoF.

    Every mode entry also carries the dataset's click/encode latency and the process's peak memory,
    so that one mode's numbers can be compared between versions on their own.
    """
    timings = timings or Timings()
    shared = {
        "latency_ms": {"click_p50": percentiles(timings.click_ms)["p50"], "click_p95": percentiles(timings.click_ms)["p95"],
                       "encode_p50": percentiles(timings.encode_ms)["p50"]},
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    modes: dict[str, dict] = {}
    for key in sorted({k for i in items for k in i.scores}):
        scored = [i for i in items if key in i.scores]
        entry: dict = {"cases": len({i.case_id for i in scored}), "targets": len(scored)}
        if key in CURVE_MODES:
            curves = [i.scores[key]["curve"] for i in scored]
            if key == "chained":
                entry["dice_start"] = float(np.mean([i.scores[key]["start"] for i in scored]))
                entry["knowledge"] = {k: sum(i.scores[key]["knowledge"] == k for i in scored) for k in ("semantic", "incontext")}
            entry["dice_mean"] = float(np.mean([c[-1] for c in curves]))
            entry["dice_at_clicks"] = {str(n): float(np.mean([c[n - 1] for c in curves])) for n in CLICK_REPORT if n <= len(curves[0])}
            # The chained mode's area includes its start: what the first step got right counts too.
            starts = [[i.scores[key]["start"]] if key == "chained" else [] for i in scored]
            entry["dice_auc"] = float(np.mean([dice_auc(s + c) for s, c in zip(starts, curves)]))
            # NoC needs the full click budget: with fewer clicks a target that never got there has no count.
            complete = len(curves[0]) >= cap
            for threshold in (85, 90):
                entry[f"noc{threshold}"] = float(np.mean([noc(c, threshold / 100, cap=cap) for c in curves])) if complete else None
            entry["nof90"] = nof([noc(c, 0.90, cap=cap) for c in curves], cap=cap) if complete else None
        else:
            entry["dice_mean"] = float(np.mean([i.scores[key]["dice"] for i in scored]))
        entry["nsd_mean"] = float(np.mean([i.scores[key]["nsd"] for i in scored]))
        modes[key] = {**entry, **shared}
    return modes
