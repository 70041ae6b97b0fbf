"""Validation during training: Dice per dataset and mode on fixed slices, at model resolution.

The slices come from each dataset's evaluation split when it has one; they only draw the learning
curve (nothing is tuned on them). Every mode uses one fixed prompt: the class token, one reference
from the training bank, or one click at the centre of the object.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..catalog import ClassCatalog
from ..data.interaction import Click, dice, first_click
from ..data.slices import SliceBank
from ..model_grid import click_point
from ..model import KPrismModel, Prompts, upsample_logits


@dataclass(frozen=True)
class ValidationItem:
    dataset: str
    class_name: str
    slice_id: int  # in the validation bank
    value: int
    reference_id: int  # a slice of the training bank with the same class


def validation_items(val_bank: SliceBank, train_bank: SliceBank, catalog: ClassCatalog, per_dataset: int = 4,
                     seed: int = 0) -> list[ValidationItem]:
    rng = np.random.default_rng(seed)
    items = []
    for name in val_bank.class_names:
        if name not in catalog or name not in train_bank.by_class:
            continue
        by_dataset: dict[str, list] = {}
        for slice_id, value in val_bank.by_class[name]:
            by_dataset.setdefault(val_bank.records[slice_id].dataset, []).append((slice_id, value))
        for dataset, pairs in by_dataset.items():
            chosen = rng.permutation(len(pairs))[:per_dataset]
            references = [i for i, _ in train_bank.by_class[name] if train_bank.records[i].dataset == dataset] or \
                         [i for i, _ in train_bank.by_class[name]]
            for n in chosen:
                slice_id, value = pairs[n]
                items.append(ValidationItem(dataset, name, slice_id, value, int(references[rng.integers(len(references))])))
    return items


@torch.no_grad()
def validate(model: KPrismModel, items: list[ValidationItem], val_bank: SliceBank, train_bank: SliceBank,
             catalog: ClassCatalog) -> dict[tuple[str, str], float]:
    """Mean Dice per (dataset, mode) for modes semantic, in_context and click."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores: dict[tuple[str, str], list[float]] = {}
    for item in items:
        truth = val_bank.mask(item.slice_id, item.value)
        features = model.encode(val_bank.images[item.slice_id].float()[None].to(device))
        reference = model.encode(train_bank.images[item.reference_id].float()[None].to(device)).embedding
        ref_value = dict((i, v) for i, v in train_bank.by_class[item.class_name])[item.reference_id]
        # Soft targets of thin structures may nowhere exceed 0.5: click the best-covered pixel then.
        click = first_click(truth.numpy() > 0.5) or Click(tuple(int(v) for v in np.unravel_index(int(truth.argmax()), truth.shape)), True)
        prompts = {
            "semantic": Prompts(class_ids=torch.tensor([catalog.index(item.class_name)])),
            "in_context": Prompts(ref_features=reference[:, None], ref_masks=train_bank.mask(item.reference_id, ref_value)[None, None, None]),
            "click": Prompts(points=torch.tensor([[click_point(*click.point, truth.shape, truth.shape[-1])]]),
                             point_labels=torch.tensor([[1]])),
        }
        for mode, prompt in prompts.items():
            logits = upsample_logits(model.decode(features, prompt.to(device)).logits.float(), truth.shape).cpu()
            scores.setdefault((item.dataset, mode), []).append(dice(logits[0, 0].numpy() > 0, truth.numpy() > 0.5))
    model.train(was_training)
    return {key: float(np.mean(values)) for key, values in scores.items()}
