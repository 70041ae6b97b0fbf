"""Image arrays with their physical geometry, and the coordinate conversions between them.

Conventions (the same as SimpleITK and ITK, so geometry passes through I/O untouched):
- ``array`` is indexed slowest axis first: a 2D grey image is ``(rows, columns)``, an RGB image
  ``(rows, columns, 3)``, a volume ``(k, j, i)``.
- A point index is given fastest axis first: ``[i, j, k]``; for a 2D image ``[column, row]``.
- Physical points are LPS (ITK's convention). RAS points differ by the sign of the first two axes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np

CoordinateSystem = Literal["ijk", "ras", "lps"]

_LPS_TO_RAS_SIGNS = {2: np.array([-1.0, -1.0]), 3: np.array([-1.0, -1.0, 1.0])}


@dataclass(frozen=True)
class Geometry:
    """Spacing, origin and direction of an image grid, in ITK order (fastest axis first), LPS."""

    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]  # row-major d×d matrix; columns are the axis directions

    @property
    def ndim(self) -> int:
        return len(self.spacing)

    @classmethod
    def identity(cls, ndim: int) -> "Geometry":
        return cls((1.0,) * ndim, (0.0,) * ndim, tuple(np.eye(ndim).ravel().tolist()))

    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(self.ndim, self.ndim)

    def index_to_lps(self, index: Sequence[float]) -> np.ndarray:
        """Continuous index ``[i, j(, k)]`` → physical LPS point."""
        index = np.asarray(index, dtype=float)
        return np.asarray(self.origin) + self.direction_matrix() @ (index * np.asarray(self.spacing))

    def lps_to_index(self, point: Sequence[float]) -> np.ndarray:
        """Physical LPS point → continuous index ``[i, j(, k)]``."""
        offset = np.asarray(point, dtype=float) - np.asarray(self.origin)
        return np.linalg.solve(self.direction_matrix(), offset) / np.asarray(self.spacing)

    def to_index(self, point: Sequence[float], coordinates: CoordinateSystem) -> np.ndarray:
        """Any supported point → continuous index ``[i, j(, k)]``."""
        point = np.asarray(point, dtype=float)
        if point.shape != (self.ndim,):
            raise ValueError(
                f"A point on this {self.ndim}D image needs {self.ndim} coordinates, got {point.tolist()}."
            )
        if coordinates == "ijk":
            return point
        if coordinates == "lps":
            return self.lps_to_index(point)
        if coordinates == "ras":
            return self.lps_to_index(point * _LPS_TO_RAS_SIGNS[self.ndim])
        raise ValueError(f"Unknown coordinate system {coordinates!r}; use 'ijk', 'ras' or 'lps'.")

    def index_to_ras(self, index: Sequence[float]) -> np.ndarray:
        return self.index_to_lps(index) * _LPS_TO_RAS_SIGNS[self.ndim]

    def same_as(self, other: "Geometry", tolerance: float = 1e-4) -> bool:
        return self.ndim == other.ndim and all(
            np.allclose(a, b, atol=tolerance)
            for a, b in ((self.spacing, other.spacing), (self.origin, other.origin), (self.direction, other.direction))
        )


@dataclass
class ImageData:
    """A 2D image (grey or RGB) or a 3D volume, its geometry and its modality."""

    array: np.ndarray
    geometry: Geometry = field(default=None)  # type: ignore[assignment]
    modality: str = "unknown"
    is_rgb: bool = False

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        spatial = self.array.ndim - (1 if self.is_rgb else 0)
        if self.is_rgb and (self.array.ndim != 3 or self.array.shape[-1] != 3):
            raise ValueError(f"An RGB image must have shape (rows, columns, 3); got {self.array.shape}.")
        if spatial not in (2, 3):
            raise ValueError(
                f"KPrism segments 2D images and 3D volumes; this array has shape {self.array.shape} "
                f"({spatial} spatial dimensions). Select one channel or time point first."
            )
        if self.geometry is None:
            self.geometry = Geometry.identity(spatial)
        if self.geometry.ndim != spatial:
            raise ValueError(f"Geometry is {self.geometry.ndim}D but the image is {spatial}D.")

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions (2 or 3)."""
        return self.geometry.ndim

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """Array shape without the colour channel, slowest axis first."""
        return tuple(self.array.shape[: self.ndim])
