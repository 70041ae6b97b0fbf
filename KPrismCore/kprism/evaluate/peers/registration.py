"""Registration peer: transfer one annotated reference's label onto a target by image registration.

Protocol (PEERS.md), in SimpleITK: both images shrunk to at most 256 pixels per side; the target is
the fixed image and the reference the moving one; centred initialisation, then an affine transform
and then a B-spline with an 8-per-axis control mesh, both driven by Mattes mutual information
(which copes with different contrasts between cases); finally the reference mask is warped with
nearest-neighbour interpolation onto the target's full-resolution grid.

Images live in pixel units (spacing 1, origin 0) so that reference and target of different sizes
share one physical space; shrinking by binning keeps that space, so a transform found on the small
images applies unchanged at full size. Metric sampling uses a fixed seed and ITK runs on one thread
(the metric's partial sums depend on the thread split), so the same inputs give the same mask.

2D only: the same B-spline stage on a small 3D volume (24×28×28, 8×8×8 mesh) already takes ~27 s.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import SimpleITK as sitk

from . import luminance

MAX_SIDE = 256
MESH_SIZE = 8  # B-spline control mesh per axis
HISTOGRAM_BINS = 32
# Metric samples: all pixels for the affine (a tiny coarse level otherwise gives too few to find a
# shift), a seeded quarter for the B-spline (its many parameters make each evaluation costly).
AFFINE_SAMPLING, BSPLINE_SAMPLING = 1.0, 0.25
SEED = 1  # any fixed non-zero value: 0 is sitkWallClock, which reseeds from the clock


def _image(array: np.ndarray) -> sitk.Image:
    grey = luminance(array)
    if grey.ndim != 2:
        raise ValueError(f"Registration transfer takes 2D grey or RGB images; got shape {np.shape(array)}.")
    return sitk.GetImageFromArray(grey)  # spacing 1, origin 0: pixel units


def _shrunk(image: sitk.Image) -> sitk.Image:
    """Bin-averaged so that no side exceeds MAX_SIDE (binning low-passes, so no aliasing)."""
    factor = max(1, math.ceil(max(image.GetSize()) / MAX_SIDE))
    return sitk.BinShrink(image, [factor] * image.GetDimension())


@contextmanager
def _single_threaded() -> Iterator[None]:
    """ITK's default thread count set to 1 for the duration (registration methods ignore their own)."""
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)


def _registration(sampling: float) -> sitk.ImageRegistrationMethod:
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=HISTOGRAM_BINS)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(sampling, SEED)
    method.SetInterpolator(sitk.sitkLinear)
    return method


def _affine(fixed: sitk.Image, moving: sitk.Image) -> sitk.Transform:
    initial = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.AffineTransform(2), sitk.CenteredTransformInitializerFilter.GEOMETRY
    )
    method = _registration(AFFINE_SAMPLING)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=1e-4, numberOfIterations=200, gradientMagnitudeTolerance=1e-6
    )
    method.SetOptimizerScalesFromPhysicalShift()  # balances matrix entries against translations
    method.SetShrinkFactorsPerLevel([4, 2, 1])
    method.SetSmoothingSigmasPerLevel([2, 1, 0])
    method.SetInitialTransform(initial, inPlace=True)
    method.Execute(fixed, moving)
    return initial


def _bspline(fixed: sitk.Image, moving: sitk.Image, affine: sitk.Transform) -> sitk.Transform:
    """Affine followed by a B-spline refinement; only the B-spline (the last transform added) is optimised."""
    bspline = sitk.BSplineTransformInitializer(fixed, [MESH_SIZE, MESH_SIZE])
    composite = sitk.CompositeTransform([affine, bspline])  # points map through the B-spline, then the affine
    method = _registration(BSPLINE_SAMPLING)
    method.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=100, maximumNumberOfCorrections=5)
    method.SetShrinkFactorsPerLevel([2, 1])
    method.SetSmoothingSigmasPerLevel([1, 0])
    method.SetInitialTransform(composite, inPlace=True)
    method.Execute(fixed, moving)
    return composite


def transfer_label(
    reference_image: np.ndarray, reference_mask: np.ndarray, target_image: np.ndarray
) -> np.ndarray:
    """The reference's binary mask carried onto the target: a bool array of the target's spatial shape.

    Images are grey ``(H, W)`` or RGB ``(H, W, 3)`` (registered on luminance) and may differ in
    size; the reference mask has the reference image's ``(H, W)``.
    """
    fixed, moving = _image(target_image), _image(reference_image)
    mask = sitk.GetImageFromArray(np.asarray(reference_mask, dtype=np.uint8))
    if mask.GetSize() != moving.GetSize():
        raise ValueError(f"Reference mask {np.shape(reference_mask)} does not match the reference image {np.shape(reference_image)}.")
    with _single_threaded():
        fixed_small, moving_small = _shrunk(fixed), _shrunk(moving)
        affine = _affine(fixed_small, moving_small)
        transform = _bspline(fixed_small, moving_small, affine)
        warped = sitk.Resample(mask, fixed, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(warped) > 0
