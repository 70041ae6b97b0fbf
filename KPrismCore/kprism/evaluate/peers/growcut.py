"""GrowCut peer: Slicer's "Grow from seeds" effect (``vtkImageGrowCutSegment``) driven by clicks.

Protocol (PEERS.md): each click paints a disk (2D) or ball (3D) of radius 3 voxels into a seed
labelmap, 1 = object and 2 = background, and the image border carries a one-voxel background frame,
so that a single object click has background to compete with. The filter is kept between clicks
and only told that the seeds changed, which is how Slicer's effect updates its preview: the first
run is a full Dijkstra pass, later runs only propagate from the new seeds.

Two properties of ``vtkImageGrowCutSegment`` shape the volumes given to it:
- it refuses volumes thinner than three voxels along any axis, so a 2D image is stacked three
  slices thick and the middle slice is read;
- voxels on the outer face of the volume never propagate their label (their neighbourhood is
  empty), so seeds there would be inert. The volume is therefore padded by one voxel (edge values)
  wherever the frame lies, and the frame is drawn on the image's own border, just inside.
"""

from __future__ import annotations

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from . import luminance

OBJECT, BACKGROUND = 1, 2
CLICK_RADIUS = 3  # voxels


def _vtk_image(array: np.ndarray) -> vtk.vtkImageData:
    """A C-contiguous (k, j, i) array as vtkImageData sharing its memory (VTK keeps the array alive)."""
    if not array.flags.c_contiguous:
        raise ValueError("vtkImageData can only share the memory of a C-contiguous array.")
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])  # VTK order: i, j, k
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(array.ravel(), deep=False))
    return image


def _ball(radius: int, ndim: int) -> np.ndarray:
    grid = np.indices((2 * radius + 1,) * ndim) - radius
    return (grid**2).sum(axis=0) <= radius * radius


class _SeededGrowCut:
    """One ``vtkImageGrowCutSegment`` over a (k, j, i) volume whose seed labelmap is edited in place."""

    def __init__(self, intensity: np.ndarray, seeds: np.ndarray):
        self.seeds = np.ascontiguousarray(seeds, dtype=np.uint8)
        self._seed_image = _vtk_image(self.seeds)  # edited through `self.seeds`
        self._filter = slicer.vtkImageGrowCutSegment()
        self._filter.SetIntensityVolume(_vtk_image(np.ascontiguousarray(intensity, dtype=np.float32)))
        self._filter.SetSeedLabelVolume(self._seed_image)

    def paint(self, centre: tuple[int, ...], label: int, radius: int) -> None:
        """Paint a ball of seeds, clipped to the volume."""
        ball = _ball(radius, self.seeds.ndim)
        lows = [c - radius for c in centre]
        target = tuple(slice(max(lo, 0), min(lo + 2 * radius + 1, n)) for lo, n in zip(lows, self.seeds.shape))
        source = tuple(slice(t.start - lo, t.stop - lo) for t, lo in zip(target, lows))
        self.seeds[target][ball[source]] = label

    def update(self) -> np.ndarray:
        """Labels after growing from the current seeds, (k, j, i) uint8."""
        self._seed_image.Modified()  # the array was edited in place: tell the pipeline
        self._filter.Update()
        output = self._filter.GetOutput()
        return numpy_support.vtk_to_numpy(output.GetPointData().GetScalars()).reshape(self.seeds.shape).copy()


class GrowCutSession:
    """Interactive GrowCut on one 2D image (grey ``(H, W)`` or RGB ``(H, W, 3)``, RGB → luminance)."""

    def __init__(self, image: np.ndarray, radius: int = CLICK_RADIUS):
        grey = luminance(image)
        if grey.ndim != 2:
            raise ValueError(f"GrowCutSession takes a 2D grey or RGB image; got shape {np.shape(image)}.")
        self.shape = grey.shape
        self.radius = radius
        padded = np.pad(grey, 1, mode="edge")
        seeds = np.zeros(padded.shape, np.uint8)
        seeds[1:-1, 1:-1] = BACKGROUND
        seeds[2:-2, 2:-2] = 0  # leaves the frame: the image's outermost pixel ring
        self._growcut = _SeededGrowCut(np.stack([padded] * 3), np.stack([seeds] * 3))

    def add_click(self, row: int, col: int, positive: bool) -> np.ndarray:
        """Adds a click and returns the object mask, ``(H, W)`` bool."""
        if not (0 <= row < self.shape[0] and 0 <= col < self.shape[1]):
            raise ValueError(f"Click ({row}, {col}) is outside the image of shape {self.shape}.")
        label = OBJECT if positive else BACKGROUND
        for k in range(3):  # the same seeds on every copy of the slice
            self._growcut.paint((k, row + 1, col + 1), label, self.radius)
        return self._growcut.update()[1, 1:-1, 1:-1] == OBJECT


class GrowCutSession3D:
    """Interactive GrowCut on a grey (k, j, i) volume, clicks given as (k, j, i) indices."""

    def __init__(self, volume: np.ndarray, radius: int = CLICK_RADIUS):
        volume = np.asarray(volume, dtype=np.float32)
        if volume.ndim != 3:
            raise ValueError(f"GrowCutSession3D takes a (k, j, i) volume; got shape {volume.shape}.")
        self.shape = volume.shape
        self.radius = radius
        seeds = np.zeros(tuple(n + 2 for n in volume.shape), np.uint8)
        seeds[1:-1, 1:-1, 1:-1] = BACKGROUND
        seeds[2:-2, 2:-2, 2:-2] = 0  # leaves the frame on the volume's six faces
        self._growcut = _SeededGrowCut(np.pad(volume, 1, mode="edge"), seeds)

    def add_click(self, k: int, j: int, i: int, positive: bool) -> np.ndarray:
        """Adds a click and returns the object mask, ``(k, j, i)`` bool."""
        if not all(0 <= v < n for v, n in zip((k, j, i), self.shape)):
            raise ValueError(f"Click ({k}, {j}, {i}) is outside the volume of shape {self.shape}.")
        self._growcut.paint((k + 1, j + 1, i + 1), OBJECT if positive else BACKGROUND, self.radius)
        return self._growcut.update()[1:-1, 1:-1, 1:-1] == OBJECT
