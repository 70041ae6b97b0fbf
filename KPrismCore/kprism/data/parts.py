"""The separate parts of a label (two lungs, two kidneys), in an order that means the same side on every image."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def ordered_parts(mask: np.ndarray, min_share: float = 0.1) -> list[np.ndarray]:
    """Connected parts of a 2D mask (each ≥ `min_share` of the largest), ordered by centre column: the first
    part is the one nearest the image's left. [] when there are fewer than two."""
    labelled, count = ndimage.label(np.asarray(mask, bool))
    if count < 2:
        return []
    sizes = ndimage.sum_labels(np.ones_like(labelled), labelled, range(1, count + 1))
    keep = [i + 1 for i in range(count) if sizes[i] >= min_share * sizes.max()]
    centres = ndimage.center_of_mass(np.ones_like(labelled), labelled, keep)
    return [labelled == part for part, _ in sorted(zip(keep, centres), key=lambda item: item[1][1])]
