"""Training losses: Dice + BCE with deep supervision, the MoE balance loss and the quality-head loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss

from ..model import Prediction, upsample_logits

_dice = DiceLoss(sigmoid=True, reduction="mean")


def mask_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice + BCE for (B, 1, h, w) logits and soft targets of the same size."""
    return _dice(logits, target) + F.binary_cross_entropy_with_logits(logits, target)


def hard_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) Dice of the thresholded prediction; 1 when both are empty (the quality head's target)."""
    pred = (logits > 0).float().flatten(1)
    truth = (target > 0.5).float().flatten(1)
    overlap = (pred * truth).sum(1)
    total = pred.sum(1) + truth.sum(1)
    return torch.where(total > 0, 2 * overlap / total.clamp(min=1), torch.ones_like(total))


def total_loss(prediction: Prediction, target: torch.Tensor, weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """All loss terms for targets (B, S, S); returns the parts and their weighted sum under 'loss'.

    The deep-supervision term needs a prediction decoded with `deep_supervision=True`.
    """
    if not prediction.aux_logits:
        raise ValueError("The prediction has no deep-supervision logits: decode with deep_supervision=True for training.")
    target = target.unsqueeze(1)
    logits = upsample_logits(prediction.logits, target.shape[-2:])
    parts = {"mask": mask_loss(logits, target)}
    aux = [mask_loss(a, F.adaptive_avg_pool2d(target, a.shape[-2:])) for a in prediction.aux_logits]
    parts["deep"] = torch.stack(aux).mean()
    parts["balance"] = prediction.balance_loss
    parts["quality"] = F.mse_loss(prediction.quality, hard_dice(logits.detach(), target))
    parts["loss"] = sum(weights[k] * parts[k] for k in ("mask", "deep", "balance", "quality"))
    return parts
