"""How prompts are placed on the model's S×S grid — one convention for training and for inference.

The model learns what a click, a box edge, a scribble stroke or a prior mask looks like from the
training code; inference must draw them the same way or the model sees inputs it never learned.
Both paths call these functions:

- a click sits at the centre of its pixel: (column + 0.5, row + 0.5) scaled to the grid, as (x, y);
- a box runs along the outer edges of its corner pixels: (x0, y0, x1, y1);
- a scribble is a binary stroke map: any grid cell the stroke touches is on (the dense prompt
  encoder max-pools it, so a one-pixel stroke survives);
- the prior is the model's own logits from its last answer on that slice, upsampled to S×S and
  clamped to ±`PRIOR_LOGIT_LIMIT` — exactly what training feeds back in its correction rounds. A
  mask from elsewhere (a manual segment, a slice filled by propagation) has no logits; its
  probabilities become logits clamped to ±`MASK_PRIOR_LOGIT`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

PRIOR_LOGIT_LIMIT = 20.0  # the model's own logits, fed back as in training
MASK_PRIOR_LOGIT = 6.0  # a binary mask from elsewhere: probability 0.998 inside


def click_point(row: float, column: float, shape: Sequence[int], size: int) -> tuple[float, float]:
    """A click on pixel (row, column) of a `shape` slice → (x, y) on the S×S grid (pixel centres)."""
    return (column + 0.5) * size / shape[1], (row + 0.5) * size / shape[0]


def box_edges(first: Sequence[float], last: Sequence[float], shape: Sequence[int], size: int) -> tuple[float, ...]:
    """Two opposite corner pixels (row, column) → (x0, y0, x1, y1) along their outer edges on the S×S grid."""
    r0, r1 = sorted((first[0], last[0]))
    c0, c1 = sorted((first[1], last[1]))
    sx, sy = size / shape[1], size / shape[0]
    return c0 * sx, r0 * sy, (c1 + 1) * sx, (r1 + 1) * sy


def scribble_map(stroke: np.ndarray, size: int) -> np.ndarray:
    """A binary stroke on a slice → an S×S binary map: a grid cell is on where any of the stroke falls."""
    tensor = torch.as_tensor(np.asarray(stroke, dtype=np.float32))[None, None]
    if tuple(tensor.shape[-2:]) == (size, size):
        return (tensor[0, 0] > 0).numpy().astype(np.float32)
    coverage = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (coverage[0, 0] > 1e-6).numpy().astype(np.float32)


def prior_from_logits(logits: torch.Tensor | np.ndarray, size: int) -> torch.Tensor:
    """The model's logits of a slice (any grid) → (1, 1, S, S) prior, as training feeds them back."""
    tensor = torch.as_tensor(np.asarray(logits, dtype=np.float32))
    while tensor.dim() < 4:
        tensor = tensor[None]
    if tuple(tensor.shape[-2:]) != (size, size):
        tensor = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False)
    return tensor.clamp(-PRIOR_LOGIT_LIMIT, PRIOR_LOGIT_LIMIT)


def prior_from_probability(probability: np.ndarray, size: int) -> torch.Tensor:
    """A probability map (or binary mask) on a slice → (1, 1, S, S) prior logits, clamped to ±MASK_PRIOR_LOGIT."""
    tensor = torch.as_tensor(np.asarray(probability, dtype=np.float32))[None, None]
    coverage = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return torch.logit(coverage.clamp(1e-3, 1 - 1e-3)).clamp(-MASK_PRIOR_LOGIT, MASK_PRIOR_LOGIT)
