"""From KPrism's network input to the input LiteMedSAM's encoder was trained on.

Every KPrism model receives slices prepared by `kprism.preprocess`: three channels, centred with
(x − 0.5) / 0.25, where a CT slice carries three Hounsfield windows (soft tissue, lung, bone) and
any other grey image the same percentile-scaled grey three times. LiteMedSAM saw one grey window
repeated three times (or an RGB picture), min–max scaled to [0, 1] (`kprism.medsam_preprocess`).

So the `medsam` model undoes the centring, and for a CT slice feeds the encoder its soft-tissue
channel — the window `medsam_preprocess.CT_WINDOWS["soft_tissue"]`, the same numbers as channel 0
here — repeated three times. The trainable stem beside the encoder still sees all three windows,
so the lungs (black in that window) keep their contrast at strides 2 and 4.

A CT slice is recognised from the numbers alone, because the model is not told the modality: where
the soft-tissue and lung channels are both unclipped, they are two linear maps of one Hounsfield
value and must agree. Grey images (three equal channels) and RGB pictures do not satisfy that.
"""

from __future__ import annotations

import torch

from ..preprocess import CT_WINDOWS

CENTRE, SPREAD = 0.5, 0.25  # `normalize_slice` maps [0, 1] to (x − CENTRE) / SPREAD
_HU_AGREEMENT = 5.0  # Hounsfield units: far above float rounding, far below what RGB pictures give
_MIN_CT_PIXELS = 16


def _to_hounsfield(channel: torch.Tensor, window: tuple[float, float]) -> torch.Tensor:
    level, width = window
    return channel * width + level - width / 2


def looks_like_ct(unit: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) inputs in [0, 1] → (B,) bool: the channels are the three CT windows of one slice."""
    soft, lung = unit[:, 0], unit[:, 1]
    both = (soft > 0.02) & (soft < 0.98) & (lung > 0.02) & (lung < 0.98)
    gap = (_to_hounsfield(soft, CT_WINDOWS[0]) - _to_hounsfield(lung, CT_WINDOWS[1])).abs()
    counts = both.flatten(1).sum(1)
    # The median gap over the shared unclipped range; +inf where a slice has none of it.
    masked = torch.where(both, gap, torch.full_like(gap, float("inf"))).flatten(1)
    median = masked.sort(dim=1).values.gather(1, (counts.clamp(min=1) - 1).div(2, rounding_mode="floor")[:, None])[:, 0]
    agree = (counts >= _MIN_CT_PIXELS) & (median < _HU_AGREEMENT)
    # An all-air or all-bone slice has no shared range: three different channels there mean CT windows.
    no_overlap = (counts < _MIN_CT_PIXELS) & ((unit[:, 0] - unit[:, 1]).abs().flatten(1).amax(1) > 1e-3)
    return agree | no_overlap


def foundation_input(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) KPrism-normalised slices → (B, 3, S, S) encoder input in [0, 1], per slice min–max scaled."""
    unit = (images.float() * SPREAD + CENTRE).clamp(0, 1)
    ct = looks_like_ct(unit)
    unit = torch.where(ct[:, None, None, None], unit[:, :1].expand_as(unit), unit)
    low = unit.flatten(1).amin(1)[:, None, None, None]
    high = unit.flatten(1).amax(1)[:, None, None, None]
    span = high - low
    return torch.where(span > 1e-6, (unit - low) / span.clamp(min=1e-6), torch.zeros_like(unit))
