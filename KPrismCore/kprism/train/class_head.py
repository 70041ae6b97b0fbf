"""Training the one-pass class head: every labelled class of a slice supervises it at once.

A slice from a dataset teaches every class that dataset labels (present ones as masks, absent ones
as empty). Of the classes it does not label, those no dataset of its modality labels are taken as
absent too: a CT slice holds no "nucleus" or "polyp", and saying so keeps those channels quiet when
someone asks a CT for every class. Classes labelled in another dataset of the same modality stay
unsupervised there (an ACDC heart MRI may well show a liver it does not label).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.utils import convert_to_tensor
from monai.transforms import Compose

from ..catalog import ClassCatalog
from ..data.slices import SliceBank


@dataclass
class ClassTargets:
    images: torch.Tensor  # (B, 3, S, S) augmented
    present: list[torch.Tensor]  # per sample: catalog indices of the classes on the slice
    masks: list[torch.Tensor]  # per sample: (len(present), S, S) soft masks, same order
    known: list[torch.Tensor]  # per sample: catalog indices of every class its dataset labels


class ClassTargetBuilder:
    def __init__(self, bank: SliceBank, catalog: ClassCatalog):
        self.bank = bank
        self.value_names: dict[str, dict[int, str]] = {}
        for name, pairs in bank.by_class.items():
            for slice_id, value in pairs:
                self.value_names.setdefault(bank.records[slice_id].dataset, {})[value] = name
        by_modality: dict[str, set[str]] = {}
        for dataset, names in self.value_names.items():
            by_modality.setdefault(bank.modality.get(dataset, dataset), set()).update(names.values())
        self.known = {}
        for dataset, names in self.value_names.items():
            same_modality = by_modality[bank.modality.get(dataset, dataset)]
            known = set(names.values()) | {n for n in catalog.names if n not in same_modality}
            self.known[dataset] = torch.tensor(sorted(catalog.index(n) for n in known if n in catalog))
        self.catalog = catalog

    def build(self, slice_ids: list[int], augmentation: Compose) -> ClassTargets:
        images, present, masks, known = [], [], [], []
        for slice_id in slice_ids:
            dataset = self.bank.records[slice_id].dataset
            names = self.value_names.get(dataset, {})
            values = [int(v) for v in torch.unique(self.bank.labels[slice_id]).tolist() if int(v) in names and names[int(v)] in self.catalog]
            stack = torch.stack([self.bank.mask(slice_id, v) for v in values]) if values else torch.zeros(0, self.bank.size, self.bank.size)
            # One affine for the image and all of its class masks (MONAI draws it once per call).
            sample = augmentation({"image": self.bank.images[slice_id].float(), "mask": stack if values else stack.new_zeros(1, *stack.shape[1:])})
            images.append(convert_to_tensor(sample["image"], track_meta=False))
            masks.append(convert_to_tensor(sample["mask"], track_meta=False)[: len(values)])
            present.append(torch.tensor([self.catalog.index(names[v]) for v in values], dtype=torch.long))
            known.append(self.known[dataset])
        return ClassTargets(torch.stack(images), present, masks, known)


@dataclass
class ChannelBatch:
    classes: torch.Tensor  # (B, K) catalog indices to score (padded with a repeat of a valid one)
    valid: torch.Tensor  # (B, K) bool: a real entry, not padding
    present: torch.Tensor  # (B, K) bool: the class is on the slice
    masks: torch.Tensor  # (B, K, h, w) soft targets on the logits' grid


def choose_channels(targets: ClassTargets, size: tuple[int, int], absent: int, rng: np.random.Generator) -> ChannelBatch:
    """Every class present on each slice plus up to `absent` known-absent classes drawn at random.

    Scoring a sample's few present classes and a handful of absent ones, rather than all 80 channels,
    makes a step several times cheaper; over many steps every known-absent class is still drawn.
    """
    rows = []
    for present, masks, known in zip(targets.present, targets.masks, targets.known):
        others = np.setdiff1d(known.numpy(), present.numpy())
        drawn = rng.choice(others, min(absent, len(others)), replace=False) if len(others) else np.zeros(0, np.int64)
        classes = torch.cat([present, torch.from_numpy(np.asarray(drawn, dtype=np.int64))])
        soft = torch.zeros(len(classes), *size)
        if len(present):
            soft[: len(present)] = F.adaptive_avg_pool2d(masks, size)
        rows.append((classes, soft, len(present)))
    width = max(1, max(len(c) for c, _, _ in rows))
    batch = ChannelBatch(torch.zeros(len(rows), width, dtype=torch.long), torch.zeros(len(rows), width, dtype=torch.bool),
                         torch.zeros(len(rows), width, dtype=torch.bool), torch.zeros(len(rows), width, *size))
    for i, (classes, soft, count) in enumerate(rows):
        k = len(classes)
        batch.classes[i, :k], batch.valid[i, :k], batch.present[i, :count], batch.masks[i, :k] = classes, True, True, soft
    return batch


def class_head_loss(logits: torch.Tensor, channels: ChannelBatch) -> torch.Tensor:
    """BCE over the chosen classes + soft Dice over the present ones; logits (B, K, h, w) match `channels`."""
    target = channels.masks.to(logits.device, logits.dtype)
    valid, present = channels.valid.to(logits.device), channels.present.to(logits.device)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean((2, 3))  # (B, K)
    loss = ((bce * valid).sum(1) / valid.sum(1).clamp(min=1)).mean()
    if present.any():
        p = torch.sigmoid(logits)
        dice = 1 - (2 * (p * target).sum((2, 3)) + 1) / (p.sum((2, 3)) + target.sum((2, 3)) + 1)
        per_sample = (dice * present).sum(1) / present.sum(1).clamp(min=1)
        loss = loss + per_sample[present.any(1)].mean()
    return loss
