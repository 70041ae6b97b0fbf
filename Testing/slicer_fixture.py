"""Real MRML (the slicer-core wheel) for the Slicer module's tests: a scene, the logic, test volumes.

A bare vtkMRMLScene cannot add segments until a vtkSlicerSegmentationsModuleLogic is attached, and
slicer.util looks for slicer.mrmlScene and slicer.modules; `KPrismSlicerLib.nodes.headless_scene`
does all three, exactly as batch.py does under plain Python. Imported by conftest.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

SLICER_MODULE_DIR = Path(__file__).resolve().parents[1] / "KPrismSlicer"
if str(SLICER_MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(SLICER_MODULE_DIR))  # KPrismSlicerLib and batch, as Slicer puts them on the path


@pytest.fixture
def scene():
    """A fresh MRML scene set up as in the application (segmentations logic, slicer.util usable)."""
    from KPrismSlicerLib import nodes

    mrml = nodes.headless_scene(new=True)
    yield mrml
    mrml.Clear(1)


@pytest.fixture(scope="session")
def logic():
    """One KPrismLogic for the whole run (the model loads once), on one CPU thread."""
    from KPrismSlicerLib.logic import KPrismLogic

    return KPrismLogic(device="cpu", threads=1)


def rotation(axis: int, degrees: float) -> np.ndarray:
    """A 4×4 rotation about RAS axis 0, 1 or 2."""
    a = np.radians(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = [(1, 2), (0, 2), (0, 1)][axis]
    matrix = np.eye(4)
    matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = c, -s, s, c
    return matrix


def oblique_ijk_to_ras(spacing=(0.8, 1.1, 3.0), origin=(-30.0, 12.5, 88.0)) -> np.ndarray:
    """Oblique (20° about S, 12° about R) and anisotropic voxels."""
    matrix = rotation(2, 20) @ rotation(0, 12) @ np.diag([*spacing, 1.0])
    matrix[:3, 3] = origin
    return matrix


def blob_array(size=(48, 40, 12), centre=(24, 20, 6), radii=(10, 8, 4)) -> np.ndarray:
    """A bright ellipsoid (60 HU) in dark surroundings (-900 HU), shape (k, j, i)."""
    k, j, i = np.mgrid[: size[2], : size[1], : size[0]]
    inside = sum(((axis - c) / r) ** 2 for axis, c, r in zip((i, j, k), centre, radii)) <= 1
    return np.where(inside, 60, -900).astype(np.int16)


def add_volume(scene, array: np.ndarray, ijk_to_ras: np.ndarray, name: str = "volume"):
    """A scalar volume node holding `array` (k, j, i) on the grid `ijk_to_ras`."""
    import slicer

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras))
    slicer.util.updateVolumeFromArray(node, array)
    return node


def read_volume(scene, path: Path, name: str | None = None):
    """A volume read the way Slicer reads it (vtkMRMLVolumeArchetypeStorageNode)."""
    from KPrismSlicerLib import batch

    return batch.read_volume(scene, Path(path), name)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return 2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1)
