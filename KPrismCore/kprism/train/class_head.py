"""Training the one-pass class head: every labelled class of a slice supervises it at once.

A slice from a dataset teaches every class that dataset labels (present ones as masks, absent ones
as empty). Of the classes it does not label, those no dataset of its modality labels are taken as
absent too: a CT slice holds no "nucleus" or "polyp", and saying so keeps those channels quiet when
someone asks a CT for every class. Classes labelled in another dataset of the same modality stay
unsupervised there (an ACDC heart MRI may well show a liver it does not label).
"""

from __future__ import annotations

from dataclasses import dataclass

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


def class_head_loss(logits: torch.Tensor, targets: ClassTargets) -> torch.Tensor:
    """BCE over each sample's known classes + soft Dice over the classes present, at the logits' grid."""
    losses = []
    for b in range(logits.shape[0]):
        known = targets.known[b]
        full = logits.new_zeros(logits.shape[1], *logits.shape[-2:])
        if len(targets.present[b]):
            full[targets.present[b]] = F.adaptive_avg_pool2d(targets.masks[b], logits.shape[-2:]).to(full.dtype)
        loss = F.binary_cross_entropy_with_logits(logits[b, known], full[known])
        if len(targets.present[b]):
            p = torch.sigmoid(logits[b, targets.present[b]]).flatten(1)
            t = full[targets.present[b]].flatten(1)
            loss = loss + (1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).mean()
        losses.append(loss)
    return torch.stack(losses).mean()
