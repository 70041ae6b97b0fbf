"""KPrismSession: the one inference API used by the CLI, the Slicer module and the benchmarks.

Set an image once; its slices are encoded lazily and cached, so every prompt after that only runs
the light decoder. Prompts accumulate on a *target* (one structure being segmented): a class or a
reference says what it is, clicks, scribbles, a box or a prior mask say where, and every
interaction feeds the previous result back as the dense prior. Results come back on the source
grid of the image.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch

from .catalog import ClassCatalog
from .image import CoordinateSystem, Geometry, ImageData
from .image_checks import check_informative, check_pixel_type
from .label_fusion import winning_labels
from .model import KPrismModel, Prompts, upsample_logits
from .model.encoder import ImageFeatures
from .modality import ModalityChoice, choose_modality
from .orientation import CanonicalView
from .data.interaction import dice
from .reference_agreement import Agreement, ReferenceMismatchWarning
from .preprocess import intensity_range, normalize_slice, resize_image, resize_mask, to_model_points
from .runtime import autocast, default_threads, resolve_device, torch_threads
from .slice_cache import FeatureCache

Progress = Callable[[int, int], None]
ENCODE_BATCH = 8
DECODE_BATCH = 16  # (slice, prompt) pairs per decoder call: bounds the stride-2 activations
PRIOR_LOGIT = 6.0  # a binary prior mask becomes logits of ±6 (probability 0.998)


@dataclass
class SegmentationResult:
    """A probability map on the source grid, its mask and the model's own quality estimate."""

    probability: np.ndarray  # float32, the image's spatial shape (array order)
    quality: float  # predicted Dice, averaged over the slices that were segmented
    geometry: Geometry
    threshold: float = 0.5
    slice_quality: Optional[np.ndarray] = None  # per slice along the session axis (3D only)
    quality_kind: str = "predicted quality (Dice)"  # or "mean confidence" from the one-pass class head

    @property
    def mask(self) -> np.ndarray:
        return (self.probability >= self.threshold).astype(np.uint8)


@dataclass
class LabelmapResult:
    """Several classes in one label map on the source grid: value i+1 is `names[i]`."""

    labels: np.ndarray
    names: list[str]
    quality: list[float]  # prompted: predicted Dice per class, averaged over slices; one pass: mean confidence inside it
    geometry: Geometry
    engine: str = "prompted"  # "prompted" or "one_pass"


def unique_class_names(class_names: Union[str, Sequence[str]]) -> list[str]:
    """The names in order with repeats removed (a repeat would only add an empty, same-named segment); warns."""
    names = [class_names] if isinstance(class_names, str) else list(class_names)
    unique = list(dict.fromkeys(names))
    if len(unique) < len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        warnings.warn(f"Repeated class names are segmented once: {', '.join(repeated)}.", stacklevel=3)
    return unique


class Cancelled(RuntimeError):
    """A long run was cancelled through its `cancel` callback; nothing was returned or written."""


def clean_labels(labels: np.ndarray, count: int, largest_component: bool, fill_holes: bool) -> np.ndarray:
    """Per class: keep the largest 3D connected component and/or fill enclosed holes (scipy.ndimage)."""
    from scipy import ndimage

    out = labels.copy()
    for value in range(1, count + 1):
        mask = labels == value
        if not mask.any():
            continue
        if largest_component:
            components, n = ndimage.label(mask)
            if n > 1:
                sizes = ndimage.sum_labels(mask, components, range(1, n + 1))
                mask = components == (1 + int(np.argmax(sizes)))
        if fill_holes:
            mask = ndimage.binary_fill_holes(mask)
        out[(labels == value) & ~mask] = 0
        out[mask & (out == 0)] = value
    return out


@dataclass
class Reference:
    """An in-context example: an image and a binary mask of the structure to find."""

    image: ImageData
    mask: np.ndarray
    slice_index: Optional[int] = None  # for a 3D reference; default the slice with the largest mask
    label: Optional[int] = None  # which value of a multi-label mask marks the structure (required then)


@dataclass
class _SliceState:
    points: list[tuple[float, float, int]] = field(default_factory=list)  # model-grid (x, y, label)
    scribbles: Optional[np.ndarray] = None  # (2, S, S) positive / negative
    box: Optional[tuple[float, float, float, float]] = None

    def copy(self) -> "_SliceState":
        return _SliceState(list(self.points), None if self.scribbles is None else self.scribbles.copy(), self.box)


class KPrismSession:
    """Segment one image or volume with any mix of semantic, in-context and interactive prompts.

    Args:
        model: a loaded `KPrismModel`, a checkpoint path, a known model name, or None for the
            bundled default.
        device: "auto", "cpu", "cuda" or "mps".
        threads: CPU threads for encoding (default: 2 at most). Decoding a click uses one thread,
            which measures faster than two for its many small operations.
        cache_mb: memory bound for cached slice features.
        cache_float16: keep cached features in float16 (half the memory; see `slice_cache`).
        catalog: the class catalog when `model` is a `KPrismModel` object.
    """

    def __init__(
        self,
        model: Union[KPrismModel, str, os.PathLike, None] = None,
        *,
        device: str = "auto",
        threads: Optional[int] = None,
        cache_mb: float = 1024,
        cache_float16: bool = True,
        catalog: Optional[ClassCatalog] = None,
        allow_download: bool = False,
    ):
        self.device = resolve_device(device)
        self.threads = threads or default_threads()
        if isinstance(model, KPrismModel):
            self.model, self.catalog = model, catalog or ClassCatalog.from_names([])
        else:
            from .weights import load_model, resolve_weights

            path = resolve_weights(model, allow_download=allow_download)
            self.model, self.catalog, _ = load_model(path, device="cpu")
        self.model = self.model.to(self.device).eval()
        self.size = self.model.config.image_size
        self._cache = FeatureCache(int(cache_mb * 2**20), torch.float16 if cache_float16 else torch.float32)
        self.image: Optional[ImageData] = None
        self.axis = 0
        self.modality_choice: Optional[ModalityChoice] = None
        self.reset()  # a fresh session answers undo(), result() and last_slice with None

    # ----------------------------------------------------------------------------- image
    def set_image(
        self,
        image: Union[ImageData, np.ndarray],
        geometry: Optional[Geometry] = None,
        modality: Optional[str] = None,
        axis: int = 0,
        is_rgb: bool = False,
    ) -> None:
        """Set the 2D image or 3D volume to segment; nothing is encoded until a prompt needs it.

        `axis` (3D only) is the canonical array axis slices are taken along: 0 axial, 1 coronal,
        2 sagittal. Without a modality (argument or the image's own), it is inferred from the
        intensities (`kprism.modality`: Hounsfield-like values → CT); `modality_choice` says which
        and why. Images without information are refused (`kprism.image_checks`): NaN or infinite
        voxels, a constant image, slices under 8×8 pixels, complex or boolean arrays. A refused
        image leaves the session as it was.
        """
        if not isinstance(image, ImageData):
            array = np.asarray(image)
            check_pixel_type(array)
            image = ImageData(array, geometry, modality or "unknown", is_rgb)
        if image.array.size == 0:
            raise ValueError(f"The image is empty (shape {image.array.shape}).")
        if axis not in (0, 1, 2) or (image.ndim == 2 and axis != 0):
            raise ValueError(f"axis must be 0, 1 or 2 for a volume (0 for a 2D image); got {axis}.")
        view = CanonicalView.of(image.geometry, image.spatial_shape)
        shape = view.canonical_shape
        check_informative(image.array, shape if len(shape) == 2 else [s for a, s in enumerate(shape) if a != axis])
        choice = choose_modality(image.array, modality or image.modality, image.is_rgb)
        if choice.modality != image.modality:
            image = ImageData(image.array, image.geometry, choice.modality, image.is_rgb)
        self.image, self.axis, self.modality_choice = image, axis, choice
        self._view = view
        self._canonical = self._view.to_canonical(image.array)
        self._range = intensity_range(image.array, image.modality, image.is_rgb)
        self._cache.clear()
        self.reset()

    @property
    def num_slices(self) -> int:
        self._require_image()
        return 1 if self.image.ndim == 2 else self._canonical.shape[self.axis]

    @property
    def last_slice(self) -> Optional[int]:
        """The slice of the last click, scribble or box (where `propagate()` starts by default)."""
        return self._last_slice

    def is_encoded(self, index: int) -> bool:
        """Whether slice `index` is in the feature cache (its next prompt costs only the decoder)."""
        return index in self._cache

    def canonical_slice(self, index: int) -> np.ndarray:
        """Slice `index` of the image as the model sees it (canonical LPS view, before normalisation)."""
        if self.image.ndim == 2:
            return self._canonical
        return np.take(self._canonical, index, axis=self.axis)

    def _slice_shape(self) -> tuple[int, int]:
        shape = self._view.canonical_shape
        return shape if len(shape) == 2 else tuple(s for a, s in enumerate(shape) if a != self.axis)  # type: ignore[return-value]

    def _model_input(self, image: np.ndarray, modality: str, is_rgb: bool, value_range) -> torch.Tensor:
        return resize_image(normalize_slice(image, modality, is_rgb, value_range), self.size)

    def _slice_inputs(self, indices: Sequence[int]) -> torch.Tensor:
        """(B, C, S, S) normalised model inputs of the given slices."""
        return torch.stack([self._model_input(self.canonical_slice(i), self.image.modality, self.image.is_rgb, self._range)
                            for i in indices])

    def features(self, indices: Sequence[int], progress: Optional[Progress] = None) -> list[ImageFeatures]:
        """Features of the given slices, encoding the missing ones in batches."""
        self._require_image()
        missing = [i for i in indices if i not in self._cache]
        for start in range(0, len(missing), ENCODE_BATCH):
            batch = missing[start : start + ENCODE_BATCH]
            encoded = self._encode(self._slice_inputs(batch))
            for n, i in enumerate(batch):
                self._cache.put(i, ImageFeatures(encoded.embedding[n : n + 1],
                                                 tuple(s[n : n + 1] for s in encoded.skips)))  # type: ignore[arg-type]
            if progress:
                progress(min(start + ENCODE_BATCH, len(missing)), len(missing))
        return [self._cache.get(i) for i in indices]

    @torch.inference_mode()
    def _encode(self, inputs: torch.Tensor) -> ImageFeatures:
        with torch_threads(self.threads), autocast(self.device):
            features = self.model.encode(inputs.to(self.device))
        return ImageFeatures(features.embedding.float(), tuple(s.float() for s in features.skips))  # type: ignore[arg-type]

    @torch.inference_mode()
    def _decode(self, features: ImageFeatures, prompts: Prompts) -> tuple[np.ndarray, np.ndarray]:
        """→ mask logits at the model's output stride (B, S/2, S/2) and quality (B,), both numpy."""
        threads = 1 if self.device.type == "cpu" else self.threads
        with torch_threads(threads), autocast(self.device):
            out = self.model.decode(features, prompts.to(self.device))
        return out.logits.float()[:, 0].cpu().numpy(), out.quality.float().cpu().numpy()

    def _decode_slices(self, indices: Sequence[int], prompts: Prompts, progress: Optional[Progress] = None):
        """Yields (slice, logits, quality) for every slice, the same prompts on each.

        Slices are encoded and decoded in batches: far fewer, larger operations than slice by slice.
        """
        per_slice = prompts.batch_size()
        step = max(1, DECODE_BATCH // per_slice)
        for start in range(0, len(indices), step):
            chunk = list(indices[start : start + step])
            features = self.features(chunk)
            batch = ImageFeatures(
                torch.cat([f.embedding for f in features]).repeat_interleave(per_slice, 0),
                tuple(torch.cat([f.skips[k] for f in features]).repeat_interleave(per_slice, 0) for k in range(3)),  # type: ignore[arg-type]
            )
            logits, quality = self._decode(batch, prompts.tile(len(chunk)))
            for n, index in enumerate(chunk):
                yield index, logits[n * per_slice : (n + 1) * per_slice], quality[n * per_slice : (n + 1) * per_slice]
            if progress:
                progress(start + len(chunk), len(indices))

    def _to_slice_grid(self, logits: np.ndarray) -> np.ndarray:
        """Model-output logits (S/2, S/2) → probability on the canonical slice grid, in one resize."""
        tensor = torch.from_numpy(np.ascontiguousarray(logits))[None, None]
        return torch.sigmoid(upsample_logits(tensor, self._slice_shape()))[0, 0].numpy()

    # ----------------------------------------------------------------------------- semantic
    def segment_semantic(
        self, class_names: Sequence[str], slices: Optional[Iterable[int]] = None, progress: Optional[Progress] = None,
        engine: str = "auto",
    ) -> dict[str, SegmentationResult]:
        """One result per class name. With a single class, it becomes the target to refine.

        `engine` as in `segment_semantic_labels`; "auto" takes the one-pass class head when the model
        has one. The head was trained to say "absent" (a class no dataset of the image's modality
        labels, e.g. the prostate on a chest X-ray) where the class-token decoder, which always finds
        *something*, marked the lungs with a predicted quality of 0.98. Its `quality` is then the
        mean confidence inside the class (NaN where the class was not found). Refinement by clicks
        keeps the class token as the knowledge prompt either way.
        """
        self._require_image()
        class_names = self._unique_classes(class_names)
        one_pass = self._use_one_pass(engine)
        class_ids = [self.catalog.index(name) for name in class_names]
        indices = list(range(self.num_slices)) if slices is None else list(slices)
        volumes = {name: self._empty_volume() for name in class_names}
        qualities = {name: np.full(self.num_slices, np.nan, dtype=np.float32) for name in class_names}
        source = (self._class_head_slices(indices, class_ids, progress) if one_pass
                  else self._decode_slices(indices, Prompts(class_ids=torch.tensor(class_ids)), progress))
        for index, logits, quality in source:
            for n, name in enumerate(class_names):
                self._write_slice(volumes[name], index, self._to_slice_grid(logits[n]))
                qualities[name][index] = quality[n]
        results = {name: self._result(volumes[name], qualities[name]) for name in class_names}
        if one_pass:
            for result in results.values():
                result.quality_kind = "mean confidence"
        if len(class_names) == 1:
            self._start_target(Prompts(class_ids=torch.tensor(class_ids)), volumes[class_names[0]], qualities[class_names[0]])
        return results

    def segment_semantic_labels(
        self, class_names: Sequence[str], slices: Optional[Iterable[int]] = None, progress: Optional[Progress] = None,
        cancel: Optional[Callable[[], bool]] = None, largest_component: bool = False, fill_holes: bool = False,
        engine: str = "auto",
    ) -> LabelmapResult:
        """Many classes straight into one label map (value i+1 = class i).

        `engine`: "one_pass" runs the model's class head, all classes from one pass per slice (the
        only way a whole CT with dozens of organs takes seconds, not minutes); "prompted" decodes
        each class with its class token, as `segment_semantic` does; "auto" takes the class head
        when the model has one. Memory stays bounded whatever the number of classes: only the label
        map and one batch of logits are kept, and the one-pass engine streams slices without caching
        their features. Where classes overlap, the most probable wins. `cancel()` is polled between
        batches and raises `Cancelled`; nothing is returned then. Optional 3D clean-up per class:
        keep the largest connected component, fill enclosed holes. `quality` is the quality head's
        predicted Dice (prompted) or the class head's mean confidence inside the class (one pass).
        """
        self._require_image()
        class_names = self._unique_classes(class_names)
        one_pass = self._use_one_pass(engine)
        class_ids = [self.catalog.index(name) for name in class_names]
        labels = np.zeros(self._view.canonical_shape, dtype=np.uint8 if len(class_names) < 255 else np.uint16)
        quality = np.full((len(class_names), self.num_slices), np.nan, dtype=np.float32)
        indices = list(range(self.num_slices)) if slices is None else list(slices)
        source = (self._class_head_slices(indices, class_ids, progress) if one_pass
                  else self._decode_slices(indices, Prompts(class_ids=torch.tensor(class_ids)), progress))
        for index, logits, slice_quality in source:
            if cancel and cancel():
                raise Cancelled("Segmentation cancelled; nothing was written.")
            self._write_slice(labels, index, winning_labels(logits, self._slice_shape()).astype(labels.dtype))
            quality[:, index] = slice_quality
        if largest_component or fill_holes:
            labels = clean_labels(labels, len(class_names), largest_component, fill_holes)
        with np.errstate(invalid="ignore"):
            mean_quality = [float(np.nanmean(q)) if np.isfinite(q).any() else float("nan") for q in quality]
        return LabelmapResult(self._view.from_canonical(labels), class_names, mean_quality, self.image.geometry,
                              "one_pass" if one_pass else "prompted")

    def _unique_classes(self, class_names: Union[str, Sequence[str]]) -> list[str]:
        names = unique_class_names(class_names)
        if not names:
            raise ValueError(f"Give at least one class name; known classes: {', '.join(self.catalog.names)}.")
        return names

    def _use_one_pass(self, engine: str) -> bool:
        if engine not in ("auto", "one_pass", "prompted"):
            raise ValueError(f"engine must be 'auto', 'one_pass' or 'prompted', not {engine!r}.")
        if engine == "one_pass" and self.model.class_head is None:
            raise ValueError("This model has no one-pass class head; use engine='prompted' (or 'auto').")
        return engine == "one_pass" or (engine == "auto" and self.model.class_head is not None)

    @torch.inference_mode()
    def _class_head_slices(self, indices: Sequence[int], class_ids: Sequence[int], progress: Optional[Progress] = None):
        """Yields (slice, logits (K, S/2, S/2), confidence (K,)) from the one-pass class head.

        Slices are encoded and classified in batches and not cached: a whole volume streams through.
        """
        select = torch.tensor(class_ids)
        for start in range(0, len(indices), ENCODE_BATCH):
            chunk = list(indices[start : start + ENCODE_BATCH])
            features = self._encode(self._slice_inputs(chunk))
            with torch_threads(self.threads), autocast(self.device):
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

    # ----------------------------------------------------------------------------- in-context
    def segment_in_context(
        self, references: Sequence[Union[Reference, tuple[ImageData, np.ndarray]]],
        slices: Optional[Iterable[int]] = None, progress: Optional[Progress] = None,
    ) -> SegmentationResult:
        """Segment what the reference (image, mask) pairs show; becomes the target to refine."""
        self._require_image()
        refs = [r if isinstance(r, Reference) else Reference(*r) for r in references]
        if not refs:
            raise ValueError("Give at least one reference (image, mask) pair.")
        if len(refs) > self.model.config.max_references:
            raise ValueError(f"At most {self.model.config.max_references} references are supported; got {len(refs)}.")
        ref_inputs, ref_masks = zip(*(self._reference_input(r, n) for n, r in enumerate(refs)))
        ref_features = self._encode(torch.stack(ref_inputs)).embedding.unsqueeze(0)
        knowledge = Prompts(ref_features=ref_features, ref_masks=torch.stack(ref_masks)[None, :, None])
        indices = list(range(self.num_slices)) if slices is None else list(slices)
        volume, qualities = self._empty_volume(), np.full(self.num_slices, np.nan, dtype=np.float32)
        for index, logits, quality in self._decode_slices(indices, knowledge, progress):
            self._write_slice(volume, index, self._to_slice_grid(logits[0]))
            qualities[index] = quality[0]
        self.reference_agreement = self._check_reference_agreement(knowledge, volume, indices)
        if self.reference_agreement.problem():
            qualities[:] = np.nan  # a predicted Dice of 0.98 would say "trust me" where nothing supports it
        self._start_target(knowledge, volume, qualities)
        return self._result(volume, qualities)

    def _check_reference_agreement(self, knowledge: Prompts, volume: np.ndarray, indices: Sequence[int]) -> Agreement:
        """Ask again with the reference masks inverted, on the slice where the result is largest."""
        areas = [int((self._slice_of(volume, i) >= 0.5).sum()) for i in indices]
        index = indices[int(np.argmax(areas))]
        inverted_masks = 1 - knowledge.ref_masks
        if areas[int(np.argmax(areas))] == 0 or not bool((inverted_masks > 0).any()):
            return Agreement(float("nan"), index)  # nothing claimed, or a reference marking everything
        inverted = Prompts(ref_features=knowledge.ref_features, ref_masks=inverted_masks)
        logits, _ = self._decode(self.features([index])[0], inverted)
        agreement = Agreement(dice(self._slice_of(volume, index) >= 0.5, self._to_slice_grid(logits[0]) >= 0.5), index)
        problem = agreement.problem()
        if problem:
            warnings.warn(f"In-context result not trusted: {problem}.", ReferenceMismatchWarning, stacklevel=3)
        return agreement

    def _reference_input(self, reference: Reference, number: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = reference.image
        if not isinstance(image, ImageData):
            raise TypeError(f"Reference {number + 1}: the image must be a kprism ImageData (kprism.io.read_image), "
                            f"not {type(image).__name__}.")
        mask = _reference_mask(reference, number)
        if mask.shape != image.spatial_shape:
            # A mask saved at another size is scaled onto the reference image, but only a uniform scale:
            # stretching a mask of another aspect ratio would mark the wrong place.
            _check_uniform_scale(mask.shape, image.spatial_shape, f"Reference {number + 1}")
            mask = _resize_nearest(mask, image.spatial_shape)
        view = CanonicalView.of(image.geometry, image.spatial_shape)
        array, mask = view.to_canonical(image.array), view.to_canonical(mask)
        if image.ndim == 3:
            axis = self.axis if self.image.ndim == 3 else 0
            areas = mask.sum(axis=tuple(a for a in range(3) if a != axis))
            index = reference.slice_index if reference.slice_index is not None else int(np.argmax(areas))
            array, mask = np.take(array, index, axis=axis), np.take(mask, index, axis=axis)
            if not mask.any():
                raise ValueError(f"Reference {number + 1}: slice {index} of the mask is empty.")
        check_informative(array, array.shape[:2], what=f"Reference {number + 1}'s image (on the masked slice)")
        modality = choose_modality(image.array, image.modality, image.is_rgb).modality
        value_range = intensity_range(image.array, modality, image.is_rgb)
        return (self._model_input(array, modality, image.is_rgb, value_range), resize_mask(mask, self.size))

    # ----------------------------------------------------------------------------- interactive
    def add_click(self, point: Sequence[float], positive: bool = True, coordinates: CoordinateSystem = "ijk") -> SegmentationResult:
        """A click at a point: IJK index ([column, row] on a 2D image) or a physical RAS/LPS point."""
        _require_bool(positive, "positive")
        index, (row, col) = self.locate(point, coordinates)
        x, y = to_model_points(np.array([[row, col]]), self._slice_shape(), self.size)[0]
        return self._interact(index, lambda state: state.points.append((float(x), float(y), int(positive))))

    def add_scribble(self, mask: np.ndarray, positive: bool = True) -> SegmentationResult:
        """A scribble given as a binary mask on the image grid (every slice it touches is updated)."""
        self._require_image()
        _require_bool(positive, "positive")
        mask = np.asarray(mask)
        if mask.shape != self.image.spatial_shape:
            raise ValueError(f"The scribble mask has shape {mask.shape}; the image has {self.image.spatial_shape}.")
        canonical = self._view.to_canonical(mask > 0)
        touched = [i for i in range(self.num_slices) if self._slice_of(canonical, i).any()]
        if not touched:
            raise ValueError("The scribble mask is empty.")
        channel = 0 if positive else 1
        result = None
        for index in touched:
            stroke = resize_mask(self._slice_of(canonical, index), self.size).numpy()

            def paint(state: _SliceState, stroke=stroke) -> None:
                if state.scribbles is None:
                    state.scribbles = np.zeros((2, self.size, self.size), dtype=np.float32)
                state.scribbles[channel] = np.maximum(state.scribbles[channel], stroke > 0)

            result = self._interact(index, paint, group=len(touched) > 1 and index != touched[0])
        return result  # type: ignore[return-value]

    def add_box(self, minimum: Sequence[float], maximum: Sequence[float], coordinates: CoordinateSystem = "ijk") -> SegmentationResult:
        """A box from two opposite corners; in 3D every slice between them gets the rectangle."""
        first, (r0, c0) = self.locate(minimum, coordinates)
        last, (r1, c1) = self.locate(maximum, coordinates)
        corners = to_model_points(np.array([[min(r0, r1), min(c0, c1)], [max(r0, r1), max(c0, c1)]]), self._slice_shape(), self.size)
        half = self.size / (2 * max(self._slice_shape()))  # reach the outer edge of the corner pixels
        box = (corners[0, 0] - half, corners[0, 1] - half, corners[1, 0] + half, corners[1, 1] + half)
        result = None
        for n, index in enumerate(range(min(first, last), max(first, last) + 1)):
            result = self._interact(index, lambda state: setattr(state, "box", box), group=n > 0)
        return result  # type: ignore[return-value]

    def set_prior_mask(self, mask: np.ndarray) -> SegmentationResult:
        """Start refining an existing mask (any source: a manual segment, another tool)."""
        self._require_image()
        mask = np.asarray(mask)
        if mask.shape != self.image.spatial_shape:
            raise ValueError(f"The prior mask has shape {mask.shape}; the image has {self.image.spatial_shape}.")
        volume = self._view.to_canonical(mask > 0).astype(np.float32)
        self._start_target(None, np.ascontiguousarray(volume), np.full(self.num_slices, np.nan, dtype=np.float32))
        return self.result()

    def propagate(
        self, start: Optional[int] = None, *, min_quality: float = 0.15, min_area_ratio: float = 0.2,
        stop_when_unchanged: Optional[float] = 0.97, progress: Optional[Progress] = None, cross_axes: bool = False,
    ) -> SegmentationResult:
        """Carry the target's mask on slice `start` through the neighbouring slices, both ways.

        Each next slice is segmented in-context with two references: the last accepted slice and
        the start slice (so the structure can change shape gradually without drifting away from
        what the user marked). A direction stops when the predicted quality drops below
        `min_quality`, when the mask shrinks below `min_area_ratio` of the previous slice's, or —
        after a correction — when a slice comes out as it already was (Dice ≥ `stop_when_unchanged`),
        so that only the affected range is redone. One `undo()` takes the whole propagation back.

        `cross_axes=True` then propagates the result again along the two other canonical axes, each
        from its slice that cuts the structure widest, and averages the three probability volumes: a
        coronal or sagittal slice shows the structure's whole cranio-caudal extent, so ends that the
        first pass stopped short of can still be reached. It costs two more passes of encoding.
        """
        self._require_image()
        if self.image.ndim != 3:
            raise ValueError("Propagation needs a 3D volume; this image is 2D.")
        if self._volume is None:
            raise RuntimeError("Nothing to propagate: segment, click or set a prior mask on a slice first.")
        start = self._last_slice if start is None else start
        if start is None or not 0 <= start < self.num_slices:
            raise ValueError(f"Give the slice to propagate from (0–{self.num_slices - 1}).")
        seed = self._slice_of(self._volume, start) >= 0.5
        if not seed.any():
            raise ValueError(f"Slice {start} holds no segmentation to propagate.")
        anchor = (self.features([start])[0].embedding, resize_mask(seed, self.size))
        group, done = False, 0
        for direction in (1, -1):
            previous, previous_area = anchor, int(seed.sum())
            index = start + direction
            while 0 <= index < self.num_slices:
                references = [previous] if previous is anchor else [previous, anchor]
                prompts = Prompts(ref_features=torch.cat([f for f, _ in references])[None],
                                  ref_masks=torch.stack([m for _, m in references])[None, :, None])
                logits, quality = self._decode(self.features([index])[0], prompts)
                probability = self._to_slice_grid(logits[0])
                mask = probability >= 0.5
                if quality[0] < min_quality or mask.sum() < max(1, min_area_ratio * previous_area):
                    break
                old = self._slice_of(self._volume, index)
                self._history.append((index, self._slices.get(index), old.copy(), self._quality[index], group))
                group = True
                unchanged = stop_when_unchanged is not None and old.any() and dice(old >= 0.5, mask) >= stop_when_unchanged
                self._write_slice(self._volume, index, probability)
                self._quality[index] = quality[0]
                if unchanged:
                    break
                previous, previous_area = (self.features([index])[0].embedding, resize_mask(mask, self.size)), int(mask.sum())
                index += direction
                done += 1
                if progress:
                    progress(done, self.num_slices - 1)
        if cross_axes:
            self._fuse_cross_axes(min_quality, min_area_ratio, first_in_group=not group)
        return self.result()  # type: ignore[return-value]

    def _fuse_cross_axes(self, min_quality: float, min_area_ratio: float, first_in_group: bool) -> None:
        """Averages the current volume with its re-propagation along the other two axes (one undo step)."""
        mask = self._volume >= 0.5
        probabilities = [self._volume]
        for axis in (a for a in range(3) if a != self.axis):
            helper = KPrismSession(self.model, catalog=self.catalog, device=str(self.device), threads=self.threads)
            helper.set_image(self.image, axis=axis)
            helper.set_prior_mask(self._view.from_canonical(mask))
            widest = int(np.argmax(mask.sum(axis=tuple(a for a in range(3) if a != axis))))
            helper.propagate(widest, min_quality=min_quality, min_area_ratio=min_area_ratio, stop_when_unchanged=None)
            probabilities.append(helper._volume)  # the same canonical view, so the same array layout
        fused = np.mean(probabilities, axis=0, dtype=np.float32)
        for index in range(self.num_slices):
            old = self._slice_of(self._volume, index)
            if not np.array_equal(old, np.take(fused, index, axis=self.axis)):
                self._history.append((index, self._slices.get(index), old.copy(), self._quality[index], not first_in_group))
                first_in_group = False
        self._volume[...] = fused

    def undo(self) -> Optional[SegmentationResult]:
        """Take back the last interaction (a multi-slice box or scribble counts as one)."""
        while self._history:
            index, state, previous, quality, grouped = self._history.pop()
            if state is None:
                self._slices.pop(index, None)
            else:
                self._slices[index] = state
            self._write_slice(self._volume, index, previous)
            self._quality[index] = quality
            if not grouped:
                break
        return self.result()

    def reset(self) -> None:
        """Forget the target and every prompt (the cached image features are kept)."""
        self._knowledge: Optional[Prompts] = None
        self._volume: Optional[np.ndarray] = None
        self._quality = np.full(self.num_slices if self.image is not None else 1, np.nan, dtype=np.float32)
        self._slices: dict[int, _SliceState] = {}
        self._history: list = []
        self._last_slice: Optional[int] = None

    def result(self) -> Optional[SegmentationResult]:
        """The current target's result on the source grid (None before any prompt)."""
        return None if self._volume is None else self._result(self._volume, self._quality)

    # ----------------------------------------------------------------------------- internals
    def _require_image(self) -> None:
        if self.image is None:
            raise RuntimeError("No image set: call set_image(...) first.")

    def locate(self, point: Sequence[float], coordinates: CoordinateSystem = "ijk") -> tuple[int, tuple[float, float]]:
        """A point → (slice index, (row, column) on that slice of the canonical view); outside points are refused."""
        self._require_image()
        index = self.image.geometry.to_index(point, coordinates)  # [i, j(, k)] continuous
        if not np.isfinite(index).all():
            raise ValueError(f"The {coordinates.upper()} point {list(point)} has non-finite coordinates.")
        array_index = np.round(index[::-1]).astype(int)
        shape = np.asarray(self.image.spatial_shape)
        if (array_index < 0).any() or (array_index >= shape).any():
            raise ValueError(
                f"The {coordinates.upper()} point {list(point)} maps to voxel {np.round(index, 2).tolist()} (i, j, k), "
                f"outside the image of size {shape[::-1].tolist()}."
            )
        canonical = self._view.index_to_canonical(array_index)
        if self.image.ndim == 2:
            return 0, (float(canonical[0]), float(canonical[1]))
        in_plane = [float(c) for a, c in enumerate(canonical) if a != self.axis]
        return int(canonical[self.axis]), (in_plane[0], in_plane[1])

    def _slice_of(self, volume: np.ndarray, index: int) -> np.ndarray:
        return volume if self.image.ndim == 2 else np.take(volume, index, axis=self.axis)

    def _empty_volume(self) -> np.ndarray:
        return np.zeros(self._view.canonical_shape, dtype=np.float32)

    def _write_slice(self, volume: np.ndarray, index: int, values: np.ndarray) -> None:
        if self.image.ndim == 2:
            volume[...] = values
        else:
            slicer = [slice(None)] * 3
            slicer[self.axis] = index
            volume[tuple(slicer)] = values

    def _start_target(self, knowledge: Optional[Prompts], volume: np.ndarray, quality: np.ndarray) -> None:
        self.reset()
        self._knowledge, self._volume, self._quality = knowledge, volume, quality

    def _interact(self, index: int, change: Callable[[_SliceState], None], group: bool = False) -> SegmentationResult:
        if self._volume is None:
            self._volume = self._empty_volume()
        previous_state = self._slices.get(index)
        state = previous_state.copy() if previous_state else _SliceState()
        change(state)
        previous = self._slice_of(self._volume, index).copy()
        self._history.append((index, previous_state, previous, self._quality[index], group))
        self._slices[index] = state
        self._last_slice = index
        logits, quality = self._decode(self.features([index])[0], self._slice_prompts(state, previous))
        self._write_slice(self._volume, index, self._to_slice_grid(logits[0]))
        self._quality[index] = quality[0]
        return self.result()  # type: ignore[return-value]

    def _slice_prompts(self, state: _SliceState, previous: np.ndarray) -> Prompts:
        """Knowledge (class / references) + this slice's interactions + the previous result as prior."""
        prompts = Prompts() if self._knowledge is None else Prompts(**vars(self._knowledge))
        if state.points:
            pts = torch.tensor([[p[:2] for p in state.points]], dtype=torch.float32)
            prompts.points, prompts.point_labels = pts, torch.tensor([[p[2] for p in state.points]])
        if state.scribbles is not None:
            prompts.scribbles = torch.from_numpy(state.scribbles)[None]
        if state.box is not None:
            prompts.boxes, prompts.box_valid = torch.tensor([state.box], dtype=torch.float32), torch.tensor([True])
        if previous.any():
            prob = resize_mask(previous, self.size).clamp(1e-3, 1 - 1e-3)
            prompts.prior_logits = torch.logit(prob).clamp(-PRIOR_LOGIT, PRIOR_LOGIT)[None, None]
        return prompts

    def _result(self, volume: np.ndarray, quality: np.ndarray) -> SegmentationResult:
        valid = quality[np.isfinite(quality)]
        return SegmentationResult(
            probability=self._view.from_canonical(volume),
            quality=float(valid.mean()) if valid.size else float("nan"),
            geometry=self.image.geometry,
            slice_quality=quality.copy() if self.image.ndim == 3 else None,
        )


def _require_bool(value: object, name: str) -> None:
    # int("false") fails with an unclear message and bool("false") is True: accept real booleans only.
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False; got {value!r} ({type(value).__name__}).")


def _reference_mask(reference: Reference, number: int) -> np.ndarray:
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
    if mask.ndim != len(shape):
        raise ValueError(f"The mask has {mask.ndim} dimensions but its image has {len(shape)}.")
    index = np.ix_(*[np.minimum((np.arange(n) + 0.5) * m / n, m - 1).astype(int) for n, m in zip(shape, mask.shape)])
    return mask[index]
