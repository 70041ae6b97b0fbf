"""In-context knowledge: reference (image, mask) pairs → the prompts that say "find this", and a check of the result.

A reference is refused when its mask is missing, empty, of several labels without saying which,
or of another aspect ratio than its picture; its image gets the same information checks and the
same modality rule as the image being segmented.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch

from .data.interaction import dice
from .encoded_image import EncodedImage
from .image import ImageData
from .image_checks import check_informative
from .modality import choose_modality
from .model import Prompts
from .orientation import CanonicalView
from .preprocess import intensity_range, resize_mask
from .reference_agreement import Agreement, ReferenceMismatchWarning
from .target import Reference


def reference_knowledge(encoded: EncodedImage, references: Sequence[Reference], axis: int) -> Prompts:
    """The knowledge prompt of up to `max_references` examples (their slices encoded once)."""
    if not references:
        raise ValueError("Give at least one reference (image, mask) pair.")
    limit = encoded.model.config.max_references
    if len(references) > limit:
        raise ValueError(f"At most {limit} references are supported; got {len(references)}.")
    target_axis = axis if encoded.ndim == 3 else 0
    inputs, masks = zip(*(_reference_input(encoded, r, n, target_axis) for n, r in enumerate(references)))
    features = encoded.encode(torch.stack(inputs)).embedding.unsqueeze(0)
    return Prompts(ref_features=features, ref_masks=torch.stack(masks)[None, :, None])


def check_agreement(encoded: EncodedImage, knowledge: Prompts, slices: dict[int, np.ndarray], axis: int) -> Agreement:
    """Ask again with the reference masks inverted, on the slice where the result is largest (see reference_agreement)."""
    indices = list(slices)
    areas = [int((slices[i] >= 0.5).sum()) for i in indices]
    best = int(np.argmax(areas))
    index = indices[best]
    inverted_masks = 1 - knowledge.ref_masks
    if areas[best] == 0 or not bool((inverted_masks > 0).any()):
        return Agreement(float("nan"), index)  # nothing claimed, or a reference marking everything
    inverted = Prompts(ref_features=knowledge.ref_features, ref_masks=inverted_masks)
    logits, _ = encoded.decode(encoded.features(axis, [index])[0], inverted)
    agreement = Agreement(dice(slices[index] >= 0.5, encoded.to_slice_grid(axis, logits[0]) >= 0.5), index)
    problem = agreement.problem()
    if problem:
        warnings.warn(f"In-context result not trusted: {problem}.", ReferenceMismatchWarning, stacklevel=4)
    return agreement


def _reference_input(encoded: EncodedImage, reference: Reference, number: int, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    image = reference.image
    if not isinstance(image, ImageData):
        raise TypeError(f"Reference {number + 1}: the image must be a kprism ImageData (kprism.io.read_image), "
                        f"not {type(image).__name__}.")
    mask = reference_mask(reference, number)
    if mask.shape != image.spatial_shape:
        # A mask saved at another size is scaled onto the reference image, but only a uniform scale:
        # stretching a mask of another aspect ratio would mark the wrong place.
        _check_uniform_scale(mask.shape, image.spatial_shape, f"Reference {number + 1}")
        mask = _resize_nearest(mask, image.spatial_shape)
    view = CanonicalView.of(image.geometry, image.spatial_shape)
    array, mask = view.to_canonical(image.array), view.to_canonical(mask)
    if image.ndim == 3:
        areas = mask.sum(axis=tuple(a for a in range(3) if a != axis))
        index = reference.slice_index if reference.slice_index is not None else int(np.argmax(areas))
        array, mask = np.take(array, index, axis=axis), np.take(mask, index, axis=axis)
        if not mask.any():
            raise ValueError(f"Reference {number + 1}: slice {index} of the mask is empty.")
    check_informative(array, array.shape[:2], what=f"Reference {number + 1}'s image (on the masked slice)")
    modality = choose_modality(image.array, image.modality, image.is_rgb).modality
    value_range = intensity_range(image.array, modality, image.is_rgb)
    return encoded.model_input(array, modality, image.is_rgb, value_range), resize_mask(mask, encoded.size)


def reference_mask(reference: Reference, number: int) -> np.ndarray:
    """The reference's binary mask: its non-zero voxels, or those equal to `label` in a multi-label mask."""
    what = f"Reference {number + 1}"
    if reference.mask is None:
        raise ValueError(f"{what}: the mask is None; give an array marking the structure to find (non-zero inside).")
    mask = np.asarray(reference.mask)
    if not np.issubdtype(mask.dtype, np.number) and mask.dtype != np.bool_:
        raise ValueError(f"{what}: the mask has the non-numeric type {mask.dtype}; give an integer label array.")
    if np.issubdtype(mask.dtype, np.floating) and not np.isfinite(mask).all():
        raise ValueError(f"{what}: the mask contains NaN or infinite values.")
    labels = np.unique(mask[mask != 0]) if mask.dtype != np.bool_ else np.array([1])
    if reference.label is not None:
        if reference.label not in labels:
            raise ValueError(f"{what}: the mask has no voxel of label {reference.label}; its labels are "
                             f"{_label_list(labels)}.")
        return mask == reference.label
    if labels.size > 1:
        raise ValueError(f"{what}: the mask holds {labels.size} labels ({_label_list(labels)}); say which one marks "
                         "the structure (--reference-label VALUE, or Reference(..., label=VALUE)).")
    mask = mask > 0
    if not mask.any():
        raise ValueError(f"{what}: the mask is empty; it must mark the structure to find.")
    return mask


def _label_list(labels: np.ndarray, shown: int = 12) -> str:
    values = [v.item() for v in labels[:shown]]
    return ", ".join(map(str, values)) + (f", … ({labels.size} in all)" if labels.size > shown else "")


def _check_uniform_scale(mask_shape: tuple[int, ...], image_shape: tuple[int, ...], what: str) -> None:
    if len(mask_shape) != len(image_shape):
        raise ValueError(f"{what}: the mask has {len(mask_shape)} dimensions but its image has {len(image_shape)}.")
    scale = image_shape[-1] / mask_shape[-1]
    # Within a pixel of rounding on every side: a half- or double-size mask, not another aspect ratio.
    if any(abs(m * scale - n) > max(1.0, scale) for m, n in zip(mask_shape, image_shape)):
        raise ValueError(f"{what}: the mask is {'×'.join(map(str, mask_shape))} but its image is "
                         f"{'×'.join(map(str, image_shape))}, another aspect ratio; give the mask on the image's grid.")


def _resize_nearest(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour resize of a binary mask to `shape` (same number of dimensions)."""
    index = np.ix_(*[np.minimum((np.arange(n) + 0.5) * m / n, m - 1).astype(int) for n, m in zip(shape, mask.shape)])
    return mask[index]


def as_reference(item, number: int) -> Reference:
    """A `Reference`, or an (image, mask) pair."""
    if isinstance(item, Reference):
        return item
    try:
        return Reference(*item)
    except TypeError:
        raise TypeError(f"Reference {number + 1}: give a Reference or an (image, mask) pair, not {type(item).__name__}.") from None
