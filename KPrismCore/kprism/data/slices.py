"""An in-memory bank of training slices at model resolution, indexed by class.

Every 2D image and every slice of every 3D volume (taken along one axis of the canonical LPS
view, exactly as inference slices it) is normalised with the inference code, resized to S×S and
kept as float16, with its label map. For each class the bank knows which slices contain it, so
sampling never wastes steps on empty slices; a few empty slices per volume are kept as negatives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..orientation import CanonicalView
from ..preprocess import intensity_range, normalize_slice, resize_image
from .nnunet_v2 import load_dataset

NEGATIVE_SLICES_PER_VOLUME = 2


@dataclass
class SliceRecord:
    dataset: str
    case_id: str
    slice_index: int  # position along the slicing axis (0 for 2D images)
    num_slices: int  # slices in the source volume (1 for 2D)


@dataclass
class SliceBank:
    size: int
    label_scale: int = 1  # labels are kept at size × label_scale; masks are area-averaged down to size
    images: list[torch.Tensor] = field(default_factory=list)  # (3, S, S) float16
    labels: list[torch.Tensor] = field(default_factory=list)  # (S, S) uint8, dataset label values
    records: list[SliceRecord] = field(default_factory=list)
    # class key → (slice id, label value) pairs; the class key is the label name, shared across datasets
    by_class: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    negatives: list[int] = field(default_factory=list)  # slices with no foreground at all
    modality: dict[str, str] = field(default_factory=dict)  # dataset → modality

    @property
    def class_names(self) -> list[str]:
        return sorted(self.by_class)

    def datasets_of(self, class_name: str) -> list[str]:
        return sorted({self.records[i].dataset for i, _ in self.by_class[class_name]})

    def mask(self, slice_id: int, value: int) -> torch.Tensor:
        """(S, S) target in [0, 1]; with label_scale > 1 a soft coverage, so one-pixel vessels survive."""
        mask = (self.labels[slice_id] == value).float()
        return F.avg_pool2d(mask[None, None], self.label_scale)[0, 0] if self.label_scale > 1 else mask

    def add(self, image: torch.Tensor, labels: torch.Tensor, record: SliceRecord, names: dict[int, str]) -> None:
        slice_id = len(self.images)
        self.images.append(image.half())
        self.labels.append(labels.to(torch.uint8))
        self.records.append(record)
        present = [int(v) for v in torch.unique(labels).tolist() if v != 0 and int(v) in names]
        for value in present:
            self.by_class.setdefault(names[value], []).append((slice_id, value))
        if not present:
            self.negatives.append(slice_id)


def _resize_labels(labels: np.ndarray, size: int) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(labels).astype(np.int64))[None, None].float()
    return F.interpolate(tensor, size=(size, size), mode="nearest-exact")[0, 0].to(torch.uint8)


def training_slice_indices(labels: np.ndarray, axis: int, rng: np.random.Generator) -> list[int]:
    """The slices of a volume that training uses: every labelled one plus a few empty ones drawn by `rng`."""
    count = labels.shape[axis]
    keep = [i for i in range(count) if np.take(labels, i, axis=axis).any()]
    kept = set(keep)
    empty = [i for i in range(count) if i not in kept]
    keep += rng.choice(empty, min(NEGATIVE_SLICES_PER_VOLUME, len(empty)), replace=False).tolist() if empty else []
    return sorted(keep)


def build_slice_bank(
    roots: Sequence[str | Path],
    size: int,
    split: str = "train",
    axis: int = 0,
    progress: Optional[Callable[[str], None]] = None,
    rng: Optional[np.random.Generator] = None,
    label_scale: int = 1,
) -> SliceBank:
    """Load every case of the given nnU-Net / MSD datasets into a `SliceBank`.

    `label_scale` = 2 keeps labels at twice the model resolution, for soft training targets.
    """
    bank = SliceBank(size, label_scale)
    for case in training_cases(roots, split, axis, rng, progress):
        bank.modality[case.dataset.name] = case.dataset.modality
        names = case.names
        for index in case.indices:
            pixels, plane = case.plane(index)
            tensor = resize_image(case.normalized(pixels), size)
            bank.add(tensor, _resize_labels(plane, size * label_scale), case.record(index), names)
    return bank


@dataclass(frozen=True)
class TrainingCase:
    """One case of a dataset as training sees it: canonical arrays and the slices it trains on."""

    dataset: Any  # the loaded dataset (`load_dataset`)
    case_id: str
    image: Any  # its ImageData (modality, RGB, dimensionality)
    array: np.ndarray  # the image, canonical order
    labels: np.ndarray  # the labels, canonical order
    value_range: Any  # the intensity range `normalize_slice` uses
    indices: list[int]  # the training slices along `axis` (0 for a picture)
    axis: int

    @property
    def names(self) -> dict[int, str]:
        return {value: name for name, value in self.dataset.labels.items()}

    def plane(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(pixels, labels) of one training slice."""
        if self.image.ndim == 2:
            return self.array, self.labels
        return np.take(self.array, index, axis=self.axis), np.take(self.labels, index, axis=self.axis)

    def normalized(self, pixels: np.ndarray):
        return normalize_slice(pixels, self.image.modality, self.image.is_rgb, self.value_range)

    def record(self, index: int) -> SliceRecord:
        return SliceRecord(self.dataset.name, self.case_id, index, 1 if self.image.ndim == 2 else self.array.shape[self.axis])


def training_cases(
    roots: Sequence[str | Path],
    split: str = "train",
    axis: int = 0,
    rng: Optional[np.random.Generator] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> Iterator[TrainingCase]:
    """Every case of the datasets under `roots` with the slices training uses, in one fixed order.

    The slice bank, the embedding cache's fill and the embedded bank all walk this, so with the same
    `rng` (default: seed 0) they draw the same empty slices and meet the same slices.
    """
    rng = rng or np.random.default_rng(0)
    for root in roots:
        dataset = load_dataset(root)
        for case in dataset.cases(split):
            image, labels = dataset.load(case)
            if progress:
                progress(f"{dataset.name}/{case.case_id}")
            view = CanonicalView.of(image.geometry, image.spatial_shape)
            array, labels = view.to_canonical(image.array), view.to_canonical(labels)
            indices = [0] if image.ndim == 2 else training_slice_indices(labels, axis, rng)
            yield TrainingCase(dataset, case.case_id, image, array, labels,
                               intensity_range(image.array, image.modality, image.is_rgb), indices, axis)
