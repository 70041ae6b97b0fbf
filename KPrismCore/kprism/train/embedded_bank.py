"""Training slices paired with their cached foundation-encoder embeddings (the `medsam` preset).

The decoder side of `medsam` trains on the frozen TinyViT's embeddings read from the on-disk
cache (`embedding_cache.EmbeddingCache`) instead of running the encoder (seconds per slice on a
CPU). Each slice is prepared as inference prepares it: KPrism's own input (`kprism.preprocess`:
stretched to S², three CT windows) for the trainable stem, and from it the encoder input the model
derives (`model.foundation_input`), whose content hash is the cache key.

LiteMedSAM's own preprocessing letterboxes instead of stretching (`kprism.medsam_preprocess`), and
the cache fill (`scripts/fill_embedding_cache.py`) stores those inputs. For a square slice both are
the same picture, so the letterboxed entry is used; for any other slice it is not (the embedding of
a letterboxed slice, cropped and resized, differs from the stretched slice's by ~55 % in norm:
measured on TotalSeg CT), and the stretched input needs an entry of its own.

Slices without a usable entry are left out (or encoded on the spot with `encode_missing`), so
training can start while the cache is still being filled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..data.slices import SliceBank, _resize_labels, training_cases
from ..medsam_preprocess import encoder_input
from ..model.foundation_input import foundation_input
from ..preprocess import CT_NAMES, resize_image
from ..embedding_cache import EmbeddingCache

CT_WINDOW = "soft_tissue"  # the CT window `model.foundation_input` feeds the encoder (for letterboxed entries)


@dataclass
class EmbeddedSliceBank(SliceBank):
    """A `SliceBank` whose every slice has a cached TinyViT embedding."""

    cache: Optional[EmbeddingCache] = None
    keys: list[str] = field(default_factory=list)  # cache key of each slice's encoder input

    def embeddings(self, slice_ids: Sequence[int]) -> torch.Tensor:
        """(B, D, G, G) float32 embeddings of the slices."""
        out = []
        for i in slice_ids:
            entry = self.cache.load(self.keys[i]) if self.cache is not None else None
            if entry is None:
                raise FileNotFoundError(f"The cached embedding of slice {i} ({self.records[i]}) disappeared from "
                                        f"{self.cache.folder if self.cache else 'the cache'}; refill it with scripts/fill_embedding_cache.py.")
            out.append(entry.embedding.float())
        return torch.stack(out)


def cached_key(cache: EmbeddingCache, standard: torch.Tensor, letterboxed: torch.Tensor, square: bool) -> Optional[str]:
    """The key of a usable cache entry for a slice, or None: the model's own encoder input first, then,
    for a square slice, LiteMedSAM's letterboxed input (the same picture, as the fill stores it)."""
    for candidate, usable in ((foundation_input(standard[None])[0], True), (letterboxed, square)):
        if usable and cache.load(key := cache.key(candidate)) is not None:
            return key
    return None


def build_embedded_bank(
    roots: Sequence[str | Path],
    cache: EmbeddingCache,
    size: int,
    split: str = "train",
    axis: int = 0,
    label_scale: int = 1,
    held_out_cases: Sequence[str] = (),
    encode_missing: bool = False,
    rng: Optional[np.random.Generator] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> EmbeddedSliceBank:
    """Every training slice of the datasets whose embedding is cached (or encoded, with `encode_missing`).

    `held_out_cases` are case ids (or "dataset/case") kept out of training, for validation.
    """
    bank = EmbeddedSliceBank(size, label_scale, cache=cache)
    held_out = set(held_out_cases)
    skipped = 0
    for case in training_cases(roots, split, axis, rng):  # the fill script's walk: the same slices, the same draw
        name, image = case.dataset.name, case.image
        bank.modality[name] = case.dataset.modality
        if case.case_id in held_out or f"{name}/{case.case_id}" in held_out:
            continue  # after the draw, so the other cases' empty slices match the fill's
        window = CT_WINDOW if image.modality.lower() in CT_NAMES else None
        for index in case.indices:
            pixels, plane = case.plane(index)
            standard = resize_image(case.normalized(pixels), size)
            letterboxed, box = encoder_input(pixels, image.modality, image.is_rgb, case.value_range, window, size)
            key = cached_key(cache, standard, letterboxed, box.rows == box.columns == size)
            if key is None:
                if not encode_missing:
                    skipped += 1
                    continue
                model_input = foundation_input(standard[None])[0]
                key = cache.get(model_input, {"dataset": name, "case": case.case_id, "slice": str(index),
                                              "input": "stretched"}).key
            bank.add(standard, _resize_labels(plane, size * label_scale), case.record(index), case.names)
            bank.keys.append(key)
        if progress:
            progress(f"{name}/{case.case_id}: {len(bank.keys)} slices with embeddings, {skipped} not cached yet")
    if not bank.keys:
        raise ValueError(f"No training slice of {[Path(r).name for r in roots]} has a cached embedding in {cache.folder}; "
                         "fill the cache (scripts/fill_embedding_cache.py) or set encode_missing.")
    return bank
