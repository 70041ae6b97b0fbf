"""Training augmentation with MONAI transforms.

Intensity changes and a mild affine (rotation, scale, shift) only: no left/right flips, which
would turn a left kidney into a right one. The images arrive already normalised by the very
function inference uses (`kprism.preprocess.normalize_slice`).
"""

from __future__ import annotations

import math

import torch
from monai.utils import convert_to_tensor
from monai.transforms import (
    Compose,
    RandAffined,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandShiftIntensityd,
)


def build_augmentation(size: int, seed: int) -> Compose:
    transform = Compose([
        RandAffined(
            keys=("image", "mask"), prob=0.5, rotate_range=math.radians(15), scale_range=0.15,
            # Masks are soft coverages: interpolated like images, not snapped to the nearest pixel.
            translate_range=0.05 * size, mode=("bilinear", "bilinear"), padding_mode="border",
        ),
        RandScaleIntensityd(keys="image", prob=0.3, factors=0.15),
        RandShiftIntensityd(keys="image", prob=0.3, offsets=0.2),
        RandGaussianSmoothd(keys="image", prob=0.1, sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0)),
        RandGaussianNoised(keys="image", prob=0.15, std=0.05),
    ])
    transform.set_random_state(seed)
    return transform


def augment_batch(transform: Compose, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """images (B, 3, S, S), masks (B, S, S) → augmented copies (each sample drawn independently)."""
    out_images, out_masks = [], []
    for image, mask in zip(images, masks):
        sample = transform({"image": image.float(), "mask": mask[None].float()})
        # Plain tensors: a MONAI MetaTensor would route every later model op through its metadata hooks.
        out_images.append(convert_to_tensor(sample["image"], track_meta=False))
        out_masks.append(convert_to_tensor(sample["mask"], track_meta=False)[0])
    return torch.stack(out_images), torch.stack(out_masks)
