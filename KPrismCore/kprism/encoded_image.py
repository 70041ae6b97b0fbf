"""EncodedImage: one image or volume, prepared once and encoded lazily, shared by every target on it.

Encoding a slice is the expensive step (tens of milliseconds per slice on a CPU); answering a
prompt on an encoded slice is cheap. An `EncodedImage` therefore owns everything that depends only
on the image — its canonical view, modality, intensity window and one feature cache per slicing
axis — and many `Target`s (one per structure) share it, as do the three axes. It is safe to use
from a worker thread: the caches and the model calls are guarded by one lock.

Frames. Public coordinates are those of the source image: IJK indices (fastest axis first, as
SimpleITK) or physical RAS/LPS points. Internally every volume is handled in its *canonical view*
(`view`, a `CanonicalView`: only axis permutations and flips of the source array, so the mapping
is exact): canonical array axis 0 runs inferior→superior (axial slices), 1 anterior→posterior
(coronal), 2 right→left (sagittal). `locate()` maps a source point to (axis, slice, row, column)
in that view; `source_region()` maps a canonical box back to a source array box.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from .image import CoordinateSystem, Geometry, ImageData
from .image_checks import MIN_SLICE_SIDE, UninformativeImageError, check_informative, check_pixel_type
from .model import KPrismModel, Prompts, upsample_logits
from .model.encoder import ImageFeatures
from .modality import ModalityChoice, choose_modality
from .orientation import CanonicalView
from .preprocess import intensity_range, normalize_slice, resize_image
from .runtime import autocast, default_threads, torch_threads
from .slice_cache import FeatureCache

Progress = Callable[[int, int], None]
ENCODE_BATCH = 8
DECODE_BATCH = 16  # (slice, prompt) pairs per decoder call: bounds the stride-2 activations


@dataclass(frozen=True)
class SlicePoint:
    """A point located on the canonical view: the slice it lies on (along `axis`) and its place there."""

    axis: int
    index: int
    row: float
    column: float


class EncodedImage:
    """The image side of segmentation: canonical view, normalisation and per-axis feature caches.

    Args:
        model: the loaded model (eval mode, on `device`).
        image: the image or volume; refused when it carries no information (`kprism.image_checks`).
        modality: overrides the image's own; without either it is inferred (`kprism.modality`).
        device, threads: where and how the model runs (decoding uses one CPU thread: measured faster).
        cache_mb: memory bound of each axis' feature cache; cache_float16 halves it (see `slice_cache`).
    """

    def __init__(
        self,
        model: KPrismModel,
        image: Union[ImageData, np.ndarray],
        *,
        modality: Optional[str] = None,
        device: Union[str, torch.device] = "cpu",
        threads: Optional[int] = None,
        cache_mb: float = 1024,
        cache_float16: bool = True,
        default_axis: int = 0,
    ):
        if not isinstance(image, ImageData):
            array = np.asarray(image)
            check_pixel_type(array)
            image = ImageData(array, None, modality or "unknown")
        if image.array.size == 0:
            raise ValueError(f"The image is empty (shape {image.array.shape}).")
        view = CanonicalView.of(image.geometry, image.spatial_shape)
        self.view = view
        self.ndim = image.ndim
        self.check_axis(default_axis)
        check_informative(image.array, self.slice_shape(default_axis))
        choice = choose_modality(image.array, modality or image.modality, image.is_rgb)
        if choice.modality != image.modality:
            image = ImageData(image.array, image.geometry, choice.modality, image.is_rgb)
        self.image: ImageData = image
        self.modality_choice: ModalityChoice = choice
        self.model = model
        self.device = torch.device(device)
        self.threads = threads or default_threads()
        self.size = model.config.image_size
        self.canonical = view.to_canonical(image.array)
        self.value_range = intensity_range(image.array, image.modality, image.is_rgb)
        self._cache_bytes = int(cache_mb * 2**20)
        self._cache_dtype = torch.float16 if cache_float16 else torch.float32
        self._caches: dict[int, FeatureCache] = {}
        self.lock = threading.RLock()

    # ----------------------------------------------------------------------------------- geometry
    @property
    def geometry(self) -> Geometry:
        return self.image.geometry

    @property
    def shape(self) -> tuple[int, ...]:
        """The source array's spatial shape (slowest axis first)."""
        return self.image.spatial_shape

    @property
    def canonical_shape(self) -> tuple[int, ...]:
        return self.view.canonical_shape

    def check_axis(self, axis: int) -> None:
        """Refuse an axis that does not exist or whose slices are too small to segment."""
        if axis not in (0, 1, 2) or (self.ndim == 2 and axis != 0):
            raise ValueError(f"axis must be 0, 1 or 2 for a volume (0 for a 2D image); got {axis}.")
        shape = self.slice_shape(axis)
        if min(shape) < MIN_SLICE_SIDE:
            raise UninformativeImageError(
                f"The image is too small to segment along axis {axis}: its slices are {'×'.join(map(str, shape))} "
                f"pixels, and KPrism needs at least {MIN_SLICE_SIDE}×{MIN_SLICE_SIDE}."
            )

    def num_slices(self, axis: int = 0) -> int:
        return 1 if self.ndim == 2 else self.canonical_shape[axis]

    def slice_shape(self, axis: int = 0) -> tuple[int, int]:
        shape = self.canonical_shape
        return shape if len(shape) == 2 else tuple(s for a, s in enumerate(shape) if a != axis)  # type: ignore[return-value]

    def canonical_slice(self, axis: int, index: int) -> np.ndarray:
        """Slice `index` along canonical `axis`, as the model sees it before normalisation."""
        return self.canonical if self.ndim == 2 else np.take(self.canonical, index, axis=axis)

    def locate(self, point: Sequence[float], coordinates: CoordinateSystem = "ijk", axis: int = 0) -> SlicePoint:
        """A source point (IJK index or RAS/LPS) → its slice along `axis` and (row, column) on it.

        Points outside the image, or with non-finite coordinates, are refused.
        """
        index = self.geometry.to_index(point, coordinates)  # [i, j(, k)] continuous
        if not np.isfinite(index).all():
            raise ValueError(f"The {coordinates.upper()} point {list(point)} has non-finite coordinates.")
        array_index = np.round(index[::-1]).astype(int)
        shape = np.asarray(self.shape)
        if (array_index < 0).any() or (array_index >= shape).any():
            raise ValueError(
                f"The {coordinates.upper()} point {list(point)} maps to voxel {np.round(index, 2).tolist()} (i, j, k), "
                f"outside the image of size {shape[::-1].tolist()}."
            )
        canonical = self.view.index_to_canonical(array_index)
        if self.ndim == 2:
            return SlicePoint(0, 0, float(canonical[0]), float(canonical[1]))
        in_plane = [float(c) for a, c in enumerate(canonical) if a != axis]
        return SlicePoint(axis, int(canonical[axis]), in_plane[0], in_plane[1])

    def canonical_box(self, axis: int, index: int, rows: slice, columns: slice) -> tuple[slice, ...]:
        """The canonical-view box of a (rows, columns) window on slice `index` along `axis`."""
        if self.ndim == 2:
            return (rows, columns)
        box = [rows, columns]
        box.insert(axis, slice(index, index + 1))
        return tuple(box)

    def source_region(self, canonical_box: Sequence[slice]) -> tuple[slice, ...]:
        """A box of the canonical view (one slice per canonical axis) → the same voxels' box in the source array."""
        first = self.view.index_from_canonical(np.asarray([s.start for s in canonical_box])).astype(int)
        last = self.view.index_from_canonical(np.asarray([s.stop - 1 for s in canonical_box])).astype(int)
        low, high = np.minimum(first, last), np.maximum(first, last)  # a flipped axis swaps the corners
        return tuple(slice(int(a), int(b) + 1) for a, b in zip(low, high))

    # ----------------------------------------------------------------------------------- encoding
    def cache(self, axis: int) -> FeatureCache:
        """The feature cache of one slicing axis (created on first use)."""
        if axis not in self._caches:
            self._caches[axis] = FeatureCache(self._cache_bytes, self._cache_dtype)
        return self._caches[axis]

    def is_encoded(self, axis: int, index: int) -> bool:
        """Whether slice `index` along `axis` is cached (its next prompt costs only the decoder)."""
        with self.lock:
            return index in self.cache(axis)

    def model_input(self, pixels: np.ndarray, modality: Optional[str] = None, is_rgb: Optional[bool] = None,
                    value_range=None) -> torch.Tensor:
        """One slice → the normalised (C, S, S) model input (by default with this image's normalisation)."""
        modality = self.image.modality if modality is None else modality
        is_rgb = self.image.is_rgb if is_rgb is None else is_rgb
        value_range = self.value_range if value_range is None and modality == self.image.modality else value_range
        return resize_image(normalize_slice(pixels, modality, is_rgb, value_range), self.size)

    def slice_inputs(self, axis: int, indices: Sequence[int]) -> torch.Tensor:
        """(B, C, S, S) normalised model inputs of the given slices."""
        return torch.stack([self.model_input(self.canonical_slice(axis, i)) for i in indices])

    def features(self, axis: int, indices: Sequence[int], progress: Optional[Progress] = None) -> list[ImageFeatures]:
        """Features of the given slices along `axis`, encoding the missing ones in batches."""
        with self.lock:
            cache = self.cache(axis)
            missing = list(dict.fromkeys(i for i in indices if i not in cache))
            for start in range(0, len(missing), ENCODE_BATCH):
                batch = missing[start : start + ENCODE_BATCH]
                encoded = self.encode(self.slice_inputs(axis, batch))
                for n, i in enumerate(batch):
                    cache.put(i, ImageFeatures(encoded.embedding[n : n + 1],
                                               tuple(s[n : n + 1] for s in encoded.skips)))  # type: ignore[arg-type]
                if progress:
                    progress(min(start + ENCODE_BATCH, len(missing)), len(missing))
            return [cache.get(i) for i in indices]

    @torch.inference_mode()
    def encode(self, inputs: torch.Tensor) -> ImageFeatures:
        with self.lock, torch_threads(self.threads), autocast(self.device):
            features = self.model.encode(inputs.to(self.device))
        return ImageFeatures(features.embedding.float(), tuple(s.float() for s in features.skips))  # type: ignore[arg-type]

    @torch.inference_mode()
    def decode(self, features: ImageFeatures, prompts: Prompts) -> tuple[np.ndarray, np.ndarray]:
        """→ mask logits at the model's output stride (B, S/2, S/2) and quality (B,), both numpy."""
        threads = 1 if self.device.type == "cpu" else self.threads
        with self.lock, torch_threads(threads), autocast(self.device):
            out = self.model.decode(features, prompts.to(self.device))
        return out.logits.float()[:, 0].cpu().numpy(), out.quality.float().cpu().numpy()

    def decode_slices(self, axis: int, indices: Sequence[int], prompts: Prompts,
                      progress: Optional[Progress] = None) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Yields (slice, logits, quality) for every slice, the same prompts on each, in batches."""
        per_slice = prompts.batch_size()
        step = max(1, DECODE_BATCH // per_slice)
        for start in range(0, len(indices), step):
            chunk = list(indices[start : start + step])
            features = self.features(axis, chunk)
            batch = ImageFeatures(
                torch.cat([f.embedding for f in features]).repeat_interleave(per_slice, 0),
                tuple(torch.cat([f.skips[k] for f in features]).repeat_interleave(per_slice, 0) for k in range(3)),  # type: ignore[arg-type]
            )
            logits, quality = self.decode(batch, prompts.tile(len(chunk)))
            for n, index in enumerate(chunk):
                yield index, logits[n * per_slice : (n + 1) * per_slice], quality[n * per_slice : (n + 1) * per_slice]
            if progress:
                progress(start + len(chunk), len(indices))

    @torch.inference_mode()
    def class_head_slices(self, axis: int, indices: Sequence[int], class_ids: Sequence[int],
                          progress: Optional[Progress] = None) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Yields (slice, logits (K, S/2, S/2), confidence (K,)) from the one-pass class head.

        Slices are encoded and classified in batches and not cached: a whole volume streams through.
        """
        select = torch.tensor(class_ids)
        for start in range(0, len(indices), ENCODE_BATCH):
            chunk = list(indices[start : start + ENCODE_BATCH])
            features = self.encode(self.slice_inputs(axis, chunk))
            with self.lock, torch_threads(self.threads), autocast(self.device):
                logits = self.model.segment_all(features)[:, select].float().cpu()
            probability = torch.sigmoid(logits)
            # Confidence: mean probability where the class wins (the head has no quality token).
            best, winner = logits.max(1)
            for n, index in enumerate(chunk):
                won = (best[n] >= 0)[None] & (winner[n][None] == torch.arange(len(class_ids))[:, None, None])
                area = won.flatten(1).sum(1)
                confidence = torch.where(area > 0, (probability[n] * won).flatten(1).sum(1) / area.clamp(min=1), torch.nan)
                yield index, logits[n].numpy(), confidence.numpy()
            if progress:
                progress(start + len(chunk), len(indices))

    def to_slice_grid(self, axis: int, logits: np.ndarray) -> np.ndarray:
        """Model-output logits (S/2, S/2) → probability on the canonical slice grid, in one resize."""
        tensor = torch.from_numpy(np.ascontiguousarray(logits))[None, None]
        return torch.sigmoid(upsample_logits(tensor, self.slice_shape(axis)))[0, 0].numpy()
