"""Slices as LiteMedSAM's encoder expects them: one grey window (or RGB), letterboxed to S², in [0, 1].

LiteMedSAM was trained on images prepared this way (MedSAM's preprocessing): CT clipped to one
window, MR and other grey images clipped to the 0.5–99.5 percentiles, 8-bit pictures as they are;
the long side resized to S keeping the aspect ratio, zero padding at the bottom and right, and the
image min–max scaled to [0, 1]. Grey images are repeated into three channels.

Unlike `kprism.preprocess` (three CT windows as three channels for our own encoder), the encoder
sees one window at a time: which one matters (a soft-tissue window loses the lungs; see the
foundation-encoder experiment), so CT callers pass it explicitly; `CT_WINDOWS` names the usual ones.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from . import preprocess
from .preprocess import CT_NAMES, _check_finite, intensity_range

IMAGE_SIZE = 256
# (level, width) in HU, by name: the three windows `kprism.preprocess` stacks as channels for the tiny encoder.
CT_WINDOWS: dict[str, tuple[float, float]] = dict(zip(("soft_tissue", "lung", "bone"), preprocess.CT_WINDOWS))


class Letterbox(NamedTuple):
    """Where the image sits on the S×S grid: rows × columns of content from the top-left corner."""

    rows: int
    columns: int

    @classmethod
    def of(cls, shape: tuple[int, int], size: int = IMAGE_SIZE) -> "Letterbox":
        scale = size / max(shape)
        return cls(max(1, int(shape[0] * scale + 0.5)), max(1, int(shape[1] * scale + 0.5)))


def grey_or_rgb_unit(
    array: np.ndarray, modality: str, is_rgb: bool = False,
    value_range: tuple[float, float] | None = None, window: str | tuple[float, float] | None = None,
) -> np.ndarray:
    """One slice, (H, W) or (H, W, 3) → float32 (3, H, W) in [0, 1] before resizing.

    CT needs `window` (a name from `CT_WINDOWS` or a (level, width) pair); other grey modalities use
    `value_range` (the volume's `intensity_range`, so neighbouring slices share one contrast).
    """
    array = _check_finite(np.asarray(array)).astype(np.float32, copy=False)
    if is_rgb:
        low = min(0.0, float(array.min(initial=0)))
        scale = 255.0 if low == 0 and array.max(initial=0) <= 255 else float(array.max(initial=0)) - low
        return np.ascontiguousarray(np.moveaxis((array - low) / max(scale, 1e-6), -1, 0).clip(0, 1))
    if modality.lower() in CT_NAMES:
        if window is None:
            raise ValueError(f"A CT slice needs a window for the medsam encoder: one of {sorted(CT_WINDOWS)} or (level, width) in HU.")
        level, width = CT_WINDOWS[window] if isinstance(window, str) else window
        low, high = level - width / 2, level + width / 2
    else:
        low, high = value_range or intensity_range(array, modality)
    grey = np.clip((array - low) / max(high - low, 1e-6), 0, 1)
    return np.repeat(grey[None], 3, axis=0)


def letterbox(channels: np.ndarray | torch.Tensor, size: int = IMAGE_SIZE) -> tuple[torch.Tensor, Letterbox]:
    """(C, H, W) in [0, 1] → (C, S, S): long side to S (antialiased), min–max to [0, 1], zero pad bottom/right."""
    tensor = torch.as_tensor(channels, dtype=torch.float32)
    box = Letterbox.of(tuple(tensor.shape[-2:]), size)
    resized = F.interpolate(tensor[None], size=box, mode="bilinear", align_corners=False, antialias=True)[0]
    low, high = resized.min(), resized.max()
    resized = (resized - low) / (high - low) if high - low > 1e-6 else torch.zeros_like(resized)
    return F.pad(resized, (0, size - box.columns, 0, size - box.rows)), box


def letterbox_mask(mask: np.ndarray | torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """(H, W) binary → (S, S) float coverage on the same letterbox as `letterbox` (area-weighted)."""
    tensor = torch.as_tensor(np.asarray(mask, dtype=np.float32))
    box = Letterbox.of(tuple(tensor.shape), size)
    resized = F.interpolate(tensor[None, None], size=box, mode="bilinear", align_corners=False, antialias=True)[0, 0]
    return F.pad(resized.clamp(0, 1), (0, size - box.columns, 0, size - box.rows))


def encoder_input(
    array: np.ndarray, modality: str, is_rgb: bool = False,
    value_range: tuple[float, float] | None = None, window: str | tuple[float, float] | None = None,
    size: int = IMAGE_SIZE,
) -> tuple[torch.Tensor, Letterbox]:
    """A slice → the (3, S, S) encoder input and where its content sits."""
    return letterbox(grey_or_rgb_unit(array, modality, is_rgb, value_range, window), size)
