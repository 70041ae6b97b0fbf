"""Intensity normalisation and resizing shared by training, evaluation and inference.

Every slice reaches the network as 3 channels on an S×S grid:
- CT: three fixed Hounsfield windows (soft tissue, lung, bone) as the three channels, so one
  model sees every organ at its usual contrast;
- RGB images: each channel scaled from 8 bits;
- any other grey modality: the 0.5–99.5 percentile range mapped to [0, 1], repeated 3 times.
The result is centred (mean 0.5, std 0.25) so that all modalities share one input range.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

CT_WINDOWS = ((40.0, 400.0), (-600.0, 1500.0), (400.0, 1800.0))  # (level, width) in HU
CT_NAMES = {"ct"}


def _check_finite(array: np.ndarray) -> np.ndarray:
    """NaN and ±inf voxels are replaced, so one bad voxel cannot turn a whole slice into NaN."""
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        finite = array[np.isfinite(array)]
        fill = float(finite.min()) if finite.size else 0.0
        array = np.where(np.isfinite(array), array, fill)
    return array


def intensity_range(array: np.ndarray, modality: str, is_rgb: bool = False) -> tuple[float, float] | None:
    """The percentile window of a whole image or volume (None where fixed windows are used).

    Computed once per volume, so that neighbouring slices of an MRI keep the same contrast.
    """
    if is_rgb or modality.lower() in CT_NAMES:
        return None
    finite = _check_finite(np.asarray(array))
    # A strided sample keeps this fast on large volumes; percentiles barely move.
    sample = finite.ravel()[:: max(1, finite.size // 2_000_000)]
    low, high = np.percentile(sample, (0.5, 99.5))
    return float(low), float(high)


def normalize_slice(
    array: np.ndarray, modality: str, is_rgb: bool = False, value_range: tuple[float, float] | None = None
) -> np.ndarray:
    """One 2D slice, (H, W) or (H, W, 3) → float32 (3, H, W), roughly in [-2, 2].

    `value_range` is the volume's `intensity_range`; without it the slice's own percentiles are used.
    """
    array = _check_finite(np.asarray(array)).astype(np.float32, copy=False)
    if is_rgb:
        low = min(0.0, float(array.min(initial=0)))  # 8-bit pictures keep 0–255; anything else its own range
        scale = 255.0 if low == 0 and array.max(initial=0) <= 255 else float(array.max(initial=0)) - low
        channels = (np.moveaxis(array, -1, 0) - low) / max(scale, 1e-6)
    elif modality.lower() in CT_NAMES:
        channels = np.stack([np.clip((array - (lvl - wid / 2)) / wid, 0, 1) for lvl, wid in CT_WINDOWS])
    else:
        low, high = value_range or intensity_range(array, modality)
        if high - low < 1e-6:  # a constant slice carries no contrast: a flat mid-grey input
            channels = np.full((3,) + array.shape, 0.5, dtype=np.float32)
        else:
            grey = np.clip((array - low) / (high - low), 0, 1)
            channels = np.repeat(grey[None], 3, axis=0)
    return ((channels - 0.5) / 0.25).astype(np.float32)


def resize_image(channels: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) → (3, S, S) with antialiasing (aspect ratio is not kept, as in K-Prism)."""
    tensor = torch.as_tensor(channels, dtype=torch.float32).unsqueeze(0)
    return F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


def resize_mask(mask: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """(H, W) binary → (S, S) float coverage in [0, 1] (area-weighted, so thin lines survive as soft values)."""
    tensor = torch.as_tensor(np.asarray(mask, dtype=np.float32))[None, None]
    return F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0, 0].clamp(0, 1)
