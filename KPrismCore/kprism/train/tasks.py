"""The three-mode task sampler: each training step is a semantic, in-context or interactive task.

One mode per batch keeps the prompt tensors rectangular; over many steps the modes mix with the
configured ratios (K-Prism: semantic 0.3, in-context 0.4, interactive 0.3). Semantic and
in-context tasks are sometimes followed by correction clicks, which teaches the combined modes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..catalog import ClassCatalog
from ..data.parts import ordered_parts
from ..data.slices import SliceBank

MIN_SLICE_DISTANCE = 3  # a same-volume reference must be at least this many slices away
ABSENT = -1  # label value of a class asked for on a slice that does not show it


def mask_parts(bank: SliceBank, slice_id: int, value: int, min_share: float = 0.1) -> list[torch.Tensor]:
    """The connected parts of a label on a slice (`ordered_parts`) as (S, S) soft masks at the bank's size:
    "the first part" means the same side on every image."""
    if value == ABSENT:
        return []
    parts = []
    for part in ordered_parts((bank.labels[slice_id] == value).numpy(), min_share):
        mask = torch.from_numpy(part).float()
        parts.append(F.avg_pool2d(mask[None, None], bank.label_scale)[0, 0] if bank.label_scale > 1 else mask)
    return parts


@dataclass(frozen=True)
class TaskConfig:
    semantic: float = 0.3
    in_context: float = 0.4
    interactive: float = 0.3
    knowledge_then_clicks: float = 0.3  # share of semantic / in-context tasks that also get clicks
    first_prompt_box: float = 0.2  # interactive tasks that start with a box instead of a click
    first_prompt_scribble: float = 0.2  # ... or with a scribble
    max_correction_rounds: int = 3
    references: int = 1
    negative_rate: float = 0.05  # semantic tasks on a slice without the class (target empty)
    # Relative draw weight per dataset folder name (default 1 each): a dataset with many classes
    # (TotalSegmentator: 66) gets each class far less often than a one-class dataset otherwise.
    dataset_weights: dict[str, float] = field(default_factory=dict)
    # "uniform": every class of a dataset equally often; "sqrt_slices": by the square root of the number
    # of slices showing it, so large organs (what users ask for first) are seen more, small ones still often.
    class_weighting: str = "uniform"
    # Tasks where *what* is asked must decide the answer (all 0 by default, which draws nothing extra):
    absent_class_rate: float = 0.0  # semantic: ask the query slice for a class it does not show → empty target
    foreign_reference_rate: float = 0.0  # in-context: the reference marks a class from another dataset → empty target
    part_reference_rate: float = 0.0  # in-context: the reference marks one of several parts (one lung) → that part


@dataclass
class TaskBatch:
    mode: str  # "semantic" | "in_context" | "interactive"
    query_ids: list[int]
    targets: torch.Tensor  # (B, S, S) float
    class_ids: Optional[torch.Tensor] = None  # (B,)
    ref_ids: Optional[list[list[int]]] = None  # (B, k) slice ids
    ref_masks: Optional[torch.Tensor] = None  # (B, k, S, S)
    first_prompt: str = "none"  # "click" | "box" | "scribble" | "none"
    correction_rounds: int = 0
    class_names: list[str] = field(default_factory=list)


class TaskSampler:
    """Draws task batches from a `SliceBank`; its state is just the RNG, so resuming is exact."""

    def __init__(self, bank: SliceBank, catalog: ClassCatalog, config: TaskConfig, seed: int = 0):
        missing = [c for c in catalog.names if c not in bank.by_class]
        if missing:
            raise ValueError(f"No training slices for classes {missing}; remove them or add data that contains them.")
        self.bank, self.catalog, self.config = bank, catalog, config
        self.rng = np.random.default_rng(seed)
        # Datasets are drawn uniformly, then a class, then a slice: small datasets are not drowned out.
        self.classes_by_dataset: dict[str, list[str]] = {}
        for name in catalog.names:
            for dataset in bank.datasets_of(name):
                self.classes_by_dataset.setdefault(dataset, []).append(name)
        self.datasets = sorted(self.classes_by_dataset)
        self.dataset_p = self._dataset_probabilities(config.dataset_weights)
        self.class_p = {d: self._class_probabilities(d, names) for d, names in self.classes_by_dataset.items()}

    def _dataset_probabilities(self, weights: dict[str, float]) -> Optional[np.ndarray]:
        unknown = sorted(set(weights) - set(self.datasets))
        if unknown:
            raise ValueError(f"dataset_weights names datasets {unknown} that are not in training; known: {self.datasets}")
        if any(w < 0 for w in weights.values()) or not any(weights.get(d, 1.0) > 0 for d in self.datasets):
            raise ValueError("dataset_weights must be ≥ 0 with at least one dataset above 0.")
        if not weights:
            return None  # uniform: integer draws, so configs without weights replay earlier runs exactly
        w = np.array([weights.get(d, 1.0) for d in self.datasets], dtype=float)
        return w / w.sum()

    def _class_probabilities(self, dataset: str, names: list[str]) -> Optional[np.ndarray]:
        if self.config.class_weighting == "uniform":
            return None
        if self.config.class_weighting != "sqrt_slices":
            raise ValueError(f"class_weighting must be 'uniform' or 'sqrt_slices', not {self.config.class_weighting!r}.")
        counts = np.array([sum(self.bank.records[i].dataset == dataset for i, _ in self.bank.by_class[n]) for n in names], dtype=float)
        w = np.sqrt(counts)
        return w / w.sum()

    def _draw(self, count: int, p: Optional[np.ndarray]) -> int:
        return int(self.rng.integers(count)) if p is None else int(self.rng.choice(count, p=p))

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state

    def sample(self, batch_size: int) -> TaskBatch:
        c = self.config
        mode = self.rng.choice(["semantic", "in_context", "interactive"], p=np.array([c.semantic, c.in_context, c.interactive]) / (c.semantic + c.in_context + c.interactive))
        names, query_ids, values = [], [], []
        for _ in range(batch_size):
            while True:
                dataset = self.datasets[self._draw(len(self.datasets), self.dataset_p)]
                names_here = self.classes_by_dataset[dataset]
                name = names_here[self._draw(len(names_here), self.class_p[dataset])]
                slice_id, value = self._slice_with(name, dataset)
                # A class seen on a single slice has no reference that is not the target itself.
                if mode != "in_context" or self._reference_pool(name, slice_id):
                    break
            if mode == "semantic" and self.rng.random() < c.negative_rate:
                slice_id = self._negative_slice(dataset, name, slice_id)
            names.append(name), query_ids.append(slice_id), values.append(value)
        if mode == "semantic" and c.absent_class_rate:
            for n, slice_id in enumerate(query_ids):
                if self.rng.random() < c.absent_class_rate:
                    names[n], values[n] = self._absent_class(slice_id, names[n]), ABSENT
        targets = torch.stack([self._mask(i, v) for i, v in zip(query_ids, values)])
        batch = TaskBatch(str(mode), query_ids, targets, class_names=names)
        if mode == "semantic":
            batch.class_ids = torch.tensor([self.catalog.index(n) for n in names])
        elif mode == "in_context":
            batch.ref_ids, masks = [], []
            for n, (name, query) in enumerate(zip(names, query_ids)):
                refs = [self._reference(name, query) for _ in range(c.references)]
                ref_masks = [self.bank.mask(r, v) for r, v in refs]
                if c.foreign_reference_rate and self.rng.random() < c.foreign_reference_rate:
                    foreign = self._foreign_reference(query)
                    if foreign is not None:
                        refs, ref_masks = [foreign] * c.references, [self.bank.mask(*foreign)] * c.references
                        batch.targets[n] = 0  # nothing on the query looks like what the reference marks
                elif c.part_reference_rate and self.rng.random() < c.part_reference_rate:
                    parts = self._matching_parts(query, values[n], refs)
                    if parts is not None:
                        ref_masks, batch.targets[n] = parts
                batch.ref_ids.append([r for r, _ in refs])
                masks.append(torch.stack(ref_masks))
            batch.ref_masks = torch.stack(masks)
        if mode == "interactive":
            draw = self.rng.random()
            batch.first_prompt = "box" if draw < c.first_prompt_box else (
                "scribble" if draw < c.first_prompt_box + c.first_prompt_scribble else "click")
            batch.correction_rounds = int(self.rng.integers(0, c.max_correction_rounds + 1))
        elif self.rng.random() < c.knowledge_then_clicks:
            batch.correction_rounds = int(self.rng.integers(1, c.max_correction_rounds + 1))
        return batch

    def _mask(self, slice_id: int, value: int) -> torch.Tensor:
        return torch.zeros(self.bank.size, self.bank.size) if value == ABSENT else self.bank.mask(slice_id, value)

    def _absent_class(self, slice_id: int, fallback: str) -> str:
        """A catalog class the slice does not show: half the time one its dataset labels elsewhere, else any."""
        shown = {n for n, pairs in self.bank.by_class.items() if any(i == slice_id for i, _ in pairs)}
        dataset = self.bank.records[slice_id].dataset
        same_set = [n for n in self.classes_by_dataset[dataset] if n not in shown]
        anywhere = [n for n in self.catalog.names if n not in shown]
        pool = same_set if same_set and self.rng.random() < 0.5 else anywhere
        return pool[self.rng.integers(len(pool))] if pool else fallback

    def _foreign_reference(self, query: int) -> Optional[tuple[int, int]]:
        """A labelled slice of another dataset, with one of its classes: unrelated to anything on the query."""
        dataset = self.bank.records[query].dataset
        others = [d for d in self.datasets if d != dataset]
        if not others:
            return None
        other = others[self.rng.integers(len(others))]
        names = self.classes_by_dataset[other]
        return self._slice_with(names[self.rng.integers(len(names))], other)

    def _matching_parts(self, query: int, value: int, references: list[tuple[int, int]]
                        ) -> Optional[tuple[list[torch.Tensor], torch.Tensor]]:
        """One part of a class that comes in several (two lungs, two kidneys): the same part, counted from the
        image's left, marked on every reference and expected on the query. None if any count differs."""
        query_parts = mask_parts(self.bank, query, value)
        reference_parts = [mask_parts(self.bank, *reference) for reference in references]
        if len(query_parts) < 2 or any(len(parts) != len(query_parts) for parts in reference_parts):
            return None
        k = int(self.rng.integers(len(query_parts)))
        return [parts[k] for parts in reference_parts], query_parts[k]

    def _slice_with(self, name: str, dataset: str) -> tuple[int, int]:
        candidates = [(i, v) for i, v in self.bank.by_class[name] if self.bank.records[i].dataset == dataset]
        return candidates[self.rng.integers(len(candidates))]

    def _negative_slice(self, dataset: str, name: str, fallback: int) -> int:
        has = {i for i, _ in self.bank.by_class[name]}
        pool = [i for i, r in enumerate(self.bank.records) if r.dataset == dataset and i not in has]
        return pool[self.rng.integers(len(pool))] if pool else fallback

    def _reference(self, name: str, query: int) -> tuple[int, int]:
        pool = self._reference_pool(name, query)
        return pool[self.rng.integers(len(pool))]

    def _reference_pool(self, name: str, query: int) -> list[tuple[int, int]]:
        """Another case with the class (same dataset first), else a distant slice of the same volume."""
        q = self.bank.records[query]
        pairs = self.bank.by_class[name]
        other_case = [(i, v) for i, v in pairs if self.bank.records[i].case_id != q.case_id]
        same_set = [(i, v) for i, v in other_case if self.bank.records[i].dataset == q.dataset]
        distant = [(i, v) for i, v in pairs if self.bank.records[i].case_id == q.case_id
                   and abs(self.bank.records[i].slice_index - q.slice_index) >= MIN_SLICE_DISTANCE]
        return same_set or distant or other_case
