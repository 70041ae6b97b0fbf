"""Segmenters for `kprism.data.interaction.click_loop`: a `Target` answering simulated clicks.

`SliceClicker` clicks on one canonical slice and answers with that slice (the 2D per-slice
protocol, the demo, the one-slice volume benchmark); `VolumeClicker` clicks anywhere in 3D, on
the slice of the axis each click names, and answers with the whole source-grid mask (the CVPR 2025
protocol). Both speak the frames of their truth: canonical (row, column) on the slice, or source
array order (k, j, i) for the volume; the target itself takes source IJK points.
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

import numpy as np

from ..data.interaction import Click, Segmenter
from ..image_checks import UninformativeImageError
from ..orientation import CanonicalView
from ..target import Delta, Target


def source_slice(view: CanonicalView, source_axis: int, index: int) -> tuple[int, int]:
    """Slice `index` along source array axis `source_axis` → (canonical axis, canonical index): the same voxels."""
    axis = view.permutation.index(source_axis)
    flipped = view.flips[axis]
    return axis, (view.canonical_shape[axis] - 1 - index) if flipped else index


class SliceClicker:
    """Clicks on canonical slice `index` along `axis` of a target's image, answered with that slice's mask.

    `propagate` is passed to every click: False keeps each click to its slice (the per-slice
    protocol); None lets the change travel through the volume as it does for a user.
    """

    def __init__(self, target: Target, axis: int, index: int, propagate: Optional[bool] = False):
        target.encoded.check_axis(axis)
        self.target, self.axis, self.index, self.propagate = target, axis, index, propagate
        self.view = target.encoded.view

    def truth_of(self, mask: np.ndarray) -> np.ndarray:
        """A source-grid mask → its part on this slice, in the slice's (row, column) frame."""
        canonical = self.view.to_canonical(np.asarray(mask, bool))
        return canonical if canonical.ndim == 2 else np.take(canonical, self.index, axis=self.axis)

    def prediction(self) -> np.ndarray:
        return self.target.canonical_slice_probability(self.axis, self.index) >= 0.5

    def source_ijk(self, row: float, column: float) -> list[float]:
        """(row, column) on this slice → the source IJK point (fastest axis first)."""
        canonical = [row, column]
        if len(self.view.permutation) == 3:
            canonical.insert(self.axis, self.index)
        return [float(v) for v in self.view.index_from_canonical(np.asarray(canonical, float))[::-1]]

    def __call__(self, click: Click) -> np.ndarray:
        self.target.click(self.source_ijk(*click.point), click.positive, "ijk", axis=self.axis, propagate=self.propagate)
        return self.prediction()


class VolumeClicker:
    """Clicks anywhere in a 3D target, each on the slice of the source axis it names; answered in 3D.

    The answer is the whole mask on the source grid, kept up to date from each interaction's `Delta`
    (only the changed box is written), and returned as a copy.
    """

    def __init__(self, target: Target, axes: Optional[Sequence[int]] = None):
        encoded = target.encoded
        if encoded.ndim != 3:
            raise ValueError("VolumeClicker needs a 3D image; use SliceClicker on a 2D one.")
        self.target, self.view = target, encoded.view
        self.axes = (0, 1, 2) if axes is None else tuple(axes)  # canonical axes clicks may be placed on
        for axis in self.axes:
            if axis not in (0, 1, 2):
                raise ValueError(f"Click axes are canonical axes 0, 1, 2; got {axis}.")
        current = target.result()
        self.mask = np.zeros(encoded.shape, bool) if current is None else current.mask > 0

    @property
    def source_axes(self) -> list[int]:
        """Source array axes of the allowed views whose slices the image can segment (a thin volume has fewer)."""
        usable = []
        for axis in self.axes:
            try:
                self.target.encoded.check_axis(axis)
            except UninformativeImageError:
                continue
            usable.append(self.view.permutation[axis])
        return sorted(usable)

    def box(self, first: Sequence[int], last: Sequence[int]) -> np.ndarray:
        """A 3D box between two corner voxels (source array order, inclusive): every slice it spans is prompted."""
        self._apply(self.target.box([float(v) for v in first[::-1]], [float(v) for v in last[::-1]], "ijk",
                                    propagate=False))
        return self.mask.copy()

    def __call__(self, click: Click) -> np.ndarray:
        axis = None if click.axis is None else self.view.permutation.index(click.axis)
        self._apply(self.target.click([float(v) for v in click.point[::-1]], click.positive, "ijk", axis=axis))
        return self.mask.copy()

    def _apply(self, delta: Delta) -> None:
        delta.apply_to(self.mask, threshold=0.5)


def timed(segment: Segmenter, samples_ms: Optional[list[float]]) -> Segmenter:
    """`segment`, appending the milliseconds each click takes to `samples_ms` (when given)."""
    if samples_ms is None:
        return segment

    def answer(click: Click) -> np.ndarray:
        start = time.perf_counter()
        prediction = segment(click)
        samples_ms.append((time.perf_counter() - start) * 1000)
        return prediction

    return answer
