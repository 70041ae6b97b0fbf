"""Many classes' low-resolution logits → one label map on the full slice grid, cheaply and exactly.

Resizing every class's logits to a 512² slice and taking the arg-max costs a full-size map per
class; on a CT slice most of the 66 organs are absent and the rest cover small boxes. Bilinear
resizing is separable, `R @ L @ Cᵀ` with fixed interpolation matrices, and an output pixel only
mixes its 2×2 nearest inputs, so a class whose logits are negative outside a box cannot reach
0.5 outside the rows and columns that box feeds. Each class is therefore resized only inside its
own box, which gives the same label map as resizing everything (up to float rounding).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F


@lru_cache(maxsize=16)
def interpolation_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """(size_out, size_in) matrix of bilinear weights, identical to `F.interpolate(..., align_corners=False)`."""
    eye = torch.eye(size_in)[None]  # (1, size_in, size_in): each row a unit signal along the last axis
    return F.interpolate(eye, size=size_out, mode="linear", align_corners=False)[0].T.contiguous()


def _reach(matrix: torch.Tensor, first: int, last: int) -> tuple[slice, slice]:
    """Output indices fed by inputs first..last, and the inputs those outputs read."""
    fed = torch.nonzero(matrix[:, first : last + 1].sum(1) > 0).flatten()
    outputs = slice(int(fed[0]), int(fed[-1]) + 1)
    inputs = slice(max(first - 1, 0), min(last + 2, matrix.shape[1]))
    return outputs, inputs


def winning_labels(logits: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(K, h, w) logits → (rows, cols) labels: 1 + the class with the highest resized logit where
    that logit is ≥ 0 (probability ≥ 0.5), else 0. Ties go to the lower class index."""
    logits_t = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))
    rows_m, cols_m = interpolation_matrix(logits.shape[1], shape[0]), interpolation_matrix(logits.shape[2], shape[1])
    best = torch.full(shape, -torch.inf)
    winner = torch.zeros(shape, dtype=torch.int64)
    for k in np.flatnonzero(logits.reshape(len(logits), -1).max(1) >= 0):
        positive = logits_t[k] >= 0
        r = torch.nonzero(positive.any(1)).flatten()
        c = torch.nonzero(positive.any(0)).flatten()
        out_r, in_r = _reach(rows_m, int(r[0]), int(r[-1]))
        out_c, in_c = _reach(cols_m, int(c[0]), int(c[-1]))
        values = rows_m[out_r, in_r] @ logits_t[k, in_r, in_c] @ cols_m[out_c, in_c].T
        region_best, region_winner = best[out_r, out_c], winner[out_r, out_c]  # views: updated in place
        better = values > region_best
        region_winner.masked_fill_(better, int(k) + 1)
        torch.maximum(region_best, values, out=region_best)
    return torch.where(best >= 0, winner, 0).numpy()
