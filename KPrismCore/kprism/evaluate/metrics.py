"""Segmentation and interaction metrics shared by evaluation and benchmarks."""

from __future__ import annotations

import resource
import sys
from typing import Sequence

import numpy as np
import torch
from monai.metrics import compute_surface_dice

from ..data.interaction import dice, noc

__all__ = ["dice", "noc", "nof", "nsd", "dice_auc", "peak_rss_mb", "percentiles"]


def nsd(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float], tolerance: float = 2.0) -> float:
    """Normalised surface Dice (MONAI) at `tolerance` in the units of `spacing` (mm, or pixels for photos).

    Both empty → 1; one empty → 0 (MONAI returns NaN there, which would hide failures in a mean).
    """
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if not pred.any() and not truth.any():
        return 1.0
    if not pred.any() or not truth.any():
        return 0.0
    value = compute_surface_dice(_one_hot(pred), _one_hot(truth), class_thresholds=[tolerance], spacing=list(spacing))
    return float(value.item())


def _one_hot(mask: np.ndarray) -> torch.Tensor:
    """(1, 2, ...) background/foreground channels, the layout MONAI's surface metrics expect."""
    return torch.from_numpy(np.stack([~mask, mask])[None].astype(np.float32))


def nof(noc_values: Sequence[int], cap: int = 20) -> int:
    """Number of failures: targets that never reached the threshold within `cap` clicks."""
    return int(sum(1 for n in noc_values if n >= cap))


def dice_auc(curve: Sequence[float]) -> float:
    """Area under the Dice-vs-interaction curve, normalised to [0, 1] (trapezoids over unit steps)."""
    values = np.asarray(curve, dtype=float)
    if values.size < 2:
        return float(values.mean()) if values.size else 0.0
    return float(np.trapezoid(values) / (values.size - 1))


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KB on Linux


def percentiles(samples_ms: Sequence[float]) -> dict[str, float | None]:
    if not samples_ms:
        return {"p50": None, "p95": None}
    return {"p50": float(np.percentile(samples_ms, 50)), "p95": float(np.percentile(samples_ms, 95))}
