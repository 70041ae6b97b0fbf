"""A canonical array view of any volume, so every scan is sliced the same way.

Volumes arrive in any voxel order (a NIfTI from one scanner is RAS, a DICOM series LPS, some are
oblique). The model is trained and run on the *closest* LPS-ordered view — index i runs towards
patient left, j towards posterior, k towards superior — so an axial slice always shows the patient
as a radiologist sees it. Only axis permutations and flips are used: no resampling, so the mapping
back to the source grid is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .image import Geometry


@dataclass(frozen=True)
class CanonicalView:
    """Permutation and flips taking a source array (slowest axis first) to the canonical LPS view."""

    permutation: tuple[int, ...]  # canonical array axis a comes from source array axis permutation[a]
    flips: tuple[bool, ...]  # flip canonical array axis a after permuting
    source_shape: tuple[int, ...]

    @classmethod
    def of(cls, geometry: Geometry, shape: tuple[int, ...]) -> "CanonicalView":
        n = geometry.ndim
        if n == 2:  # 2D images are shown as stored
            return cls((0, 1), (False, False), tuple(shape[:2]))
        direction = geometry.direction_matrix()
        # Index axis t (i, j, k) points mostly along physical axis `dominant[t]`, sign `signs[t]`.
        dominant = np.argmax(np.abs(direction), axis=0)
        if len(set(dominant.tolist())) != n:  # a degenerate (~45°) direction: keep the stored order
            return cls(tuple(range(n)), (False,) * n, tuple(shape[:n]))
        signs = np.sign(direction[dominant, np.arange(n)])
        index_axis_for_physical = np.argsort(dominant)  # physical L, P, S → source index axis t
        # Array axes are index axes reversed: array axis a ↔ index axis n-1-a.
        permutation = tuple(int(n - 1 - index_axis_for_physical[n - 1 - a]) for a in range(n))
        flips = tuple(bool(signs[index_axis_for_physical[n - 1 - a]] < 0) for a in range(n))
        return cls(permutation, flips, tuple(shape[:n]))

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        """Source array (channels, if any, last) → canonical view (a view, no copy)."""
        extra = tuple(range(len(self.permutation), array.ndim))
        view = array.transpose(self.permutation + extra)
        for axis, flip in enumerate(self.flips):
            if flip:
                view = np.flip(view, axis=axis)
        return view

    def from_canonical(self, array: np.ndarray) -> np.ndarray:
        """Canonical-view array → source array order (a contiguous copy)."""
        for axis, flip in enumerate(self.flips):
            if flip:
                array = np.flip(array, axis=axis)
        extra = tuple(range(len(self.permutation), array.ndim))
        inverse = tuple(int(i) for i in np.argsort(self.permutation))
        return np.ascontiguousarray(array.transpose(inverse + extra))

    def index_to_canonical(self, array_index: np.ndarray) -> np.ndarray:
        """A source array index (slowest axis first, continuous) → the canonical array index."""
        array_index = np.asarray(array_index, dtype=float)
        out = array_index[list(self.permutation)]
        sizes = np.asarray(self.source_shape, dtype=float)[list(self.permutation)]
        flips = np.asarray(self.flips)
        out[flips] = sizes[flips] - 1 - out[flips]
        return out

    def index_from_canonical(self, canonical_index: np.ndarray) -> np.ndarray:
        """The inverse of `index_to_canonical`: a canonical array index → the source array index."""
        canonical = np.asarray(canonical_index, dtype=float).copy()
        sizes = np.asarray(self.canonical_shape, dtype=float)
        flips = np.asarray(self.flips)
        canonical[flips] = sizes[flips] - 1 - canonical[flips]
        source = np.empty_like(canonical)
        source[list(self.permutation)] = canonical
        return source

    @property
    def canonical_shape(self) -> tuple[int, ...]:
        return tuple(self.source_shape[p] for p in self.permutation)
