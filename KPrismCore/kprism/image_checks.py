"""Images that carry no information are refused before the model sees them.

A network always answers: fed a flat grey input (an all-NaN volume after NaN filling, a constant
image, a 1-pixel strip stretched to the model's grid) the bundled model marked 100 % of the voxels
as "liver" with a predicted quality of 0.53. No information must give no confident answer, so these
inputs are refused with the reason and what to do, and nothing is segmented.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

MIN_SLICE_SIDE = 8  # pixels on each side of a slice; smaller slices hold too little to segment
MAX_MAGNITUDE = 1e30  # larger values overflow float32 arithmetic (±3.4e38) in normalisation


class UninformativeImageError(ValueError):
    """An image the model cannot segment meaningfully: non-finite, constant, too small, or of a non-real type."""


def check_pixel_type(array: np.ndarray, what: str = "The image") -> None:
    """Real numbers only: complex values (MR raw data) and booleans (masks) are not images to segment."""
    dtype = np.asarray(array).dtype
    if np.issubdtype(dtype, np.complexfloating):
        raise UninformativeImageError(
            f"{what} holds complex values ({dtype}); KPrism segments real-valued images: take the magnitude first."
        )
    if dtype == np.bool_:
        raise UninformativeImageError(
            f"{what} is a boolean (mask) array; KPrism segments intensity images: pass the image, not a mask."
        )
    if not np.issubdtype(dtype, np.number):
        raise UninformativeImageError(f"{what} has the non-numeric pixel type {dtype}; pass an array of numbers.")


def check_informative(array: np.ndarray, slice_shape: Sequence[int], what: str = "The image") -> None:
    """Refuse non-finite voxels, constant images, values beyond ±MAX_MAGNITUDE and slices under MIN_SLICE_SIDE."""
    array = np.asarray(array)
    check_pixel_type(array, what)
    if min(slice_shape) < MIN_SLICE_SIDE:
        raise UninformativeImageError(
            f"{what} is too small to segment: its slices are {'×'.join(map(str, slice_shape))} pixels, and KPrism "
            f"needs at least {MIN_SLICE_SIDE}×{MIN_SLICE_SIDE}."
        )
    if np.issubdtype(array.dtype, np.floating):
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise UninformativeImageError(
                f"{what} has {bad} of {array.size} voxels that are NaN or infinite; replace them (e.g. with the "
                "background value) before segmenting."
            )
    low, high = array.min(), array.max()
    if max(abs(float(low)), abs(float(high))) > MAX_MAGNITUDE:
        raise UninformativeImageError(
            f"{what} has values up to {max(abs(float(low)), abs(float(high))):.3g}, beyond what any scanner writes "
            f"(limit {MAX_MAGNITUDE:.0e}); rescale the intensities first."
        )
    if low == high:
        raise UninformativeImageError(
            f"{what} has no contrast: every voxel is {low.item()!r}, so there is nothing to segment."
        )
