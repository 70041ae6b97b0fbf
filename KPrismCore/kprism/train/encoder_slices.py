"""The training slices as the frozen `medsam` encoder sees them, for filling its embedding cache.

The same slices the tiny model trains on (`kprism.data.slices`: every 2D image; every labelled
slice of each volume along one axis of the canonical view, plus a few empty ones drawn by the same
random generator), prepared as LiteMedSAM expects (`kprism.medsam_preprocess`). A CT slice is
given once per CT window: with one window the encoder cannot see everything (a soft-tissue window
loses the lungs), so the decoder side can pick, per class or at random, the window a radiologist
would display.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from ..data.nnunet_v2 import Split
from ..data.slices import training_cases
from ..medsam_preprocess import CT_WINDOWS, IMAGE_SIZE, Letterbox, encoder_input
from ..preprocess import CT_NAMES, resize_image

# "letterbox": LiteMedSAM's own preparation (`kprism.medsam_preprocess`), CT once per window.
# "stretched": what the `medsam` model derives from KPrism's standard input (stretched to S², CT soft-tissue
# window only; `kprism.model.foundation_input`), so the model's own cache keys find these entries.
LAYOUTS = ("letterbox", "stretched")


@dataclass(frozen=True)
class EncoderSlice:
    dataset: str
    case_id: str
    slice_index: int  # along the slicing axis of the canonical view; 0 for 2D images
    window: str  # CT window name; "" for other modalities
    image: torch.Tensor  # (3, S, S) encoder input in [0, 1]
    letterbox: Letterbox  # where the content sits on the S×S grid
    labels: np.ndarray  # the slice's label map on its own grid (letterbox it like the image to train on it)

    layout: str = "letterbox"

    def info(self) -> dict[str, str]:
        return {"dataset": self.dataset, "case": self.case_id, "slice": str(self.slice_index), "window": self.window,
                "rows": str(self.letterbox.rows), "columns": str(self.letterbox.columns), "input": self.layout}


def encoder_training_slices(
    roots: Sequence[str | Path],
    split: Split = "train",
    axis: int = 0,
    ct_windows: Sequence[str] = tuple(CT_WINDOWS),
    rng: Optional[np.random.Generator] = None,
    size: int = IMAGE_SIZE,
    layout: str = "letterbox",
) -> Iterator[EncoderSlice]:
    """Every training slice of the datasets under `roots`, in `build_slice_bank` order (letterbox CT: once per window)."""
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown encoder input layout {layout!r}; choose one of {LAYOUTS}.")
    for case in training_cases(roots, split, axis, rng):  # build_slice_bank's walk: the same slices, the same draw
        image, name = case.image, case.dataset.name
        is_ct = image.modality.lower() in CT_NAMES
        for index in case.indices:
            pixels, slice_labels = case.plane(index)
            slice_labels = np.ascontiguousarray(slice_labels)
            if layout == "stretched":
                from ..model.foundation_input import foundation_input  # the model's own derivation

                standard = resize_image(case.normalized(pixels), size)
                yield EncoderSlice(name, case.case_id, index, "soft_tissue" if is_ct else "",
                                   foundation_input(standard[None])[0], Letterbox(size, size), slice_labels, layout)
                continue
            for window in (list(ct_windows) if is_ct else [""]):
                x, box = encoder_input(pixels, image.modality, image.is_rgb, case.value_range, window or None, size)
                yield EncoderSlice(name, case.case_id, index, window, x, box, slice_labels)
