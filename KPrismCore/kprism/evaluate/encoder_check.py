"""Real slices with ground truth for checking the `medsam` encoder, and LiteMedSAM's box Dice on an embedding.

Used by the conversion check (KPrismCore/scripts/convert_litemedsam.py) and the encoder speed
benchmark (benchmarks/encoder_speed.py): an encoder variant (float16 weights, bfloat16, int8 …)
is judged by how far its embedding moves and by how much LiteMedSAM's own box prompt Dice moves
on that embedding, the same decoder and the same tight ground-truth boxes for every variant.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..medsam_preprocess import encoder_input, letterbox_mask
from ..samples import SAMPLES

Structure = tuple[str, torch.Tensor]  # name, letterboxed (S, S) bool mask
CheckSlice = tuple[str, torch.Tensor, list[Structure]]  # name, (3, S, S) encoder input, structures


def _structures(labels: np.ndarray, names: dict[int, str], limit: int = 3) -> list[Structure]:
    """Up to `limit` largest labelled structures of a slice, letterboxed like the image (coverage ≥ 0.5)."""
    values, counts = np.unique(labels[labels > 0], return_counts=True)
    order = [int(v) for v in values[np.argsort(-counts)]][:limit]
    return [(names.get(v, str(v)), letterbox_mask(labels == v) >= 0.5) for v in order]


def bundled_slices() -> Iterator[CheckSlice]:
    """The bundled samples: two chest X-rays, two fetal heads, three axial CT slices (soft-tissue window)."""
    from ..io import read_image, read_mask

    for folder, modality, structure in (("chest_xray", "x-ray", "lung"), ("fetal_head", "ultrasound", "fetal_head")):
        for mask_path in sorted((SAMPLES / folder).glob(f"*_{structure}.png")):
            image = read_image(mask_path.with_name(mask_path.name.removesuffix(f"_{structure}.png") + ".png"), modality=modality)
            mask = read_mask(mask_path, reference=image).array
            x, _ = encoder_input(image.array, modality, image.is_rgb)
            yield f"sample/{mask_path.stem}", x, _structures(mask, {1: structure})
    ct = read_image(SAMPLES / "ct" / "ts_ct_001crop.nii.gz", modality="ct")
    labels = read_mask(SAMPLES / "ct" / "ts_ct_001crop_labels.nii.gz", reference=ct).array
    names = {v: k for k, v in json.loads((SAMPLES / "ct" / "labels.json").read_text()).items()}
    for k in (8, 15, 22):
        x, _ = encoder_input(ct.array[k], "ct", window="soft_tissue")
        yield f"sample/ts_ct_001crop[{k}]", x, _structures(labels[k], names)


def dataset_slices(root: Path, cases_per_dataset: int = 2) -> Iterator[CheckSlice]:
    """The first cases of each dataset's evaluation split; for volumes the axial slice with the most label."""
    from ..data.nnunet_v2 import load_dataset
    from ..orientation import CanonicalView
    from ..preprocess import intensity_range

    for folder in sorted(Path(root).glob("Dataset*")):
        dataset = load_dataset(folder)
        names = {v: k for k, v in dataset.labels.items()}
        for case in dataset.cases(dataset.evaluation_split())[:cases_per_dataset]:
            image, labels = dataset.load(case)
            array, value_range = image.array, None
            if image.ndim == 3:
                view = CanonicalView.of(image.geometry, image.spatial_shape)
                array, labels = view.to_canonical(array), view.to_canonical(labels)
                k = int(np.argmax((labels > 0).reshape(labels.shape[0], -1).sum(1)))
                value_range = intensity_range(image.array, image.modality, image.is_rgb)
                array, labels = array[k], labels[k]
            window = "soft_tissue" if image.modality == "ct" else None
            x, _ = encoder_input(array, image.modality, image.is_rgb, value_range, window)
            yield f"{dataset.name}/{case.case_id}", x, _structures(labels, names)


@torch.no_grad()
def box_dice(lite_medsam: torch.nn.Module, embedding: torch.Tensor, mask: torch.Tensor) -> float:
    """LiteMedSAM's prompt encoder + mask decoder with the tight box of `mask` on `embedding` (1, 256, 64, 64);
    Dice against `mask` on the S×S grid."""
    from .metrics import dice

    rows, cols = torch.nonzero(mask, as_tuple=True)
    box = torch.tensor([[[cols.min(), rows.min(), cols.max(), rows.max()]]], dtype=torch.float32)
    sparse, dense = lite_medsam.prompt_encoder(points=None, boxes=box, masks=None)
    logits, _ = lite_medsam.mask_decoder(
        image_embeddings=embedding.float(), image_pe=lite_medsam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
    )
    return float(dice((logits[0, 0] > 0).numpy(), mask.numpy()))
