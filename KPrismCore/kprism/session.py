"""KPrismSession: the simple facade over `EncodedImage` (one per image) and `Target` (one per structure).

The CLI, the demo, the benchmarks and scripts use this one object: set an image, then segment by
class, by reference, or by prompts that refine the current target. Behind it, the image is encoded
once (`EncodedImage`, shareable by many targets and by the three axes) and each structure is a
`Target` with its own prompts, 3D result and undo. Callers that keep several structures on one
image, or that want only what changed after each prompt (the Slicer module), use those two
objects directly: `session.encoded`, `session.new_target()`.

Results returned here are copies on the source grid: nothing a caller holds changes later.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch

from .catalog import ClassCatalog
from .encoded_image import EncodedImage, Progress
from .image import CoordinateSystem, Geometry, ImageData
from .image_checks import check_pixel_type
from .in_context import as_reference, check_agreement, reference_knowledge
from .label_fusion import winning_labels
from .model import KPrismModel, Prompts
from .model.encoder import ImageFeatures
from .modality import ModalityChoice
from .orientation import CanonicalView
from .reference_agreement import Agreement
from .runtime import default_threads, resolve_device
from .target import Delta, Reference, SegmentationResult, Target, TravelRules

__all__ = ["KPrismSession", "SegmentationResult", "LabelmapResult", "Reference", "Cancelled", "Delta",
           "EncodedImage", "Target", "TravelRules", "clean_labels", "unique_class_names"]


@dataclass
class LabelmapResult:
    """Several classes in one label map on the source grid: value i+1 is `names[i]`."""

    labels: np.ndarray
    names: list[str]
    quality: list[float]  # prompted: predicted Dice per class, averaged over slices; one pass: mean confidence inside it
    geometry: Geometry
    engine: str = "prompted"  # "prompted" or "one_pass"


class Cancelled(RuntimeError):
    """A long run was cancelled through its `cancel` callback; nothing was returned or written."""


def unique_class_names(class_names: Union[str, Sequence[str]]) -> list[str]:
    """The names in order with repeats removed (a repeat would only add an empty, same-named segment); warns."""
    names = [class_names] if isinstance(class_names, str) else list(class_names)
    unique = list(dict.fromkeys(names))
    if len(unique) < len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        warnings.warn(f"Repeated class names are segmented once: {', '.join(repeated)}.", stacklevel=3)
    return unique


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


class KPrismSession:
    """Segment one image or volume with any mix of semantic, in-context and interactive prompts.

    Args:
        model: a loaded `KPrismModel`, a checkpoint path, a known model name, or None for the
            bundled default.
        device: "auto", "cpu", "cuda" or "mps".
        threads: CPU threads for encoding (default: 2 at most). Decoding a click uses one thread,
            which measures faster than two for its many small operations.
        cache_mb: memory bound for cached slice features (per slicing axis).
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
        self._cache_options = {"cache_mb": cache_mb, "cache_float16": cache_float16}
        self.encoded: Optional[EncodedImage] = None
        self.target: Optional[Target] = None
        self.axis = 0
        self.reference_agreement: Optional[Agreement] = None

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

        `axis` (3D only) is the canonical array axis slices are taken along by default: 0 axial,
        1 coronal, 2 sagittal. Without a modality (argument or the image's own) it is inferred from
        the intensities (`kprism.modality`); `modality_choice` says which and why. Images without
        information are refused (`kprism.image_checks`); a refused image leaves the session as it was.
        """
        if not isinstance(image, ImageData):
            array = np.asarray(image)
            check_pixel_type(array)
            image = ImageData(array, geometry, modality or "unknown", is_rgb)
        encoded = EncodedImage(self.model, image, modality=modality, device=self.device, threads=self.threads,
                               default_axis=axis, **self._cache_options)
        self.encoded, self.axis, self.target, self.reference_agreement = encoded, axis, None, None

    def attach(self, encoded: EncodedImage, axis: int = 0) -> None:
        """Work on an image encoded elsewhere (shared with other sessions or targets)."""
        encoded.check_axis(axis)
        self.encoded, self.axis, self.target, self.reference_agreement = encoded, axis, None, None

    @property
    def image(self) -> Optional[ImageData]:
        return None if self.encoded is None else self.encoded.image

    @property
    def modality_choice(self) -> Optional[ModalityChoice]:
        return None if self.encoded is None else self.encoded.modality_choice

    @property
    def view(self) -> CanonicalView:
        """The canonical view: how source array indices map to the slices the model sees."""
        return self._encoded().view

    @property
    def num_slices(self) -> int:
        return self._encoded().num_slices(self.axis)

    @property
    def last_slice(self) -> Optional[int]:
        """Canonical slice (along the session axis) of the last prompt; where `propagate()` starts."""
        if self.target is None or self.target.last_slice is None or self.target.last_slice[0] != self.axis:
            return None
        return self.target.last_slice[1]

    def is_encoded(self, index: int) -> bool:
        """Whether slice `index` is in the feature cache (its next prompt costs only the decoder)."""
        return self._encoded().is_encoded(self.axis, index)

    def canonical_slice(self, index: int) -> np.ndarray:
        """Slice `index` of the image as the model sees it (canonical LPS view, before normalisation)."""
        return self._encoded().canonical_slice(self.axis, index)

    def features(self, indices: Sequence[int], progress: Optional[Progress] = None) -> list[ImageFeatures]:
        """Features of the given slices, encoding the missing ones in batches."""
        return self._encoded().features(self.axis, indices, progress)

    def locate(self, point: Sequence[float], coordinates: CoordinateSystem = "ijk") -> tuple[int, tuple[float, float]]:
        """A point → (slice index, (row, column) on that slice of the canonical view); outside points are refused."""
        where = self._encoded().locate(point, coordinates, self.axis)
        return where.index, (where.row, where.column)

    def new_target(self, name: str = "segment", axis: Optional[int] = None) -> Target:
        """A new, empty target on this image (does not replace the session's own)."""
        return Target(self._encoded(), axis=self.axis if axis is None else axis, name=name)

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
        encoded = self._encoded()
        class_names = self._unique_classes(class_names)
        one_pass = self._use_one_pass(engine)
        class_ids = [self.catalog.index(name) for name in class_names]
        indices = self._indices(slices)
        per_class: dict[str, dict[int, tuple[np.ndarray, float]]] = {name: {} for name in class_names}
        source = (encoded.class_head_slices(self.axis, indices, class_ids, progress) if one_pass
                  else encoded.decode_slices(self.axis, indices, Prompts(class_ids=torch.tensor(class_ids)), progress))
        for index, logits, quality in source:
            for n, name in enumerate(class_names):
                per_class[name][index] = (encoded.to_slice_grid(self.axis, logits[n]), float(quality[n]))
        kind = "mean confidence" if one_pass else "predicted quality (Dice)"
        results = {}
        for n, name in enumerate(class_names):
            target = Target(encoded, axis=self.axis, name=name)
            target.fill(per_class[name], Prompts(class_ids=torch.tensor([class_ids[n]])), kind,
                        {"classes": [name], "engine": "one_pass" if one_pass else "prompted"})
            results[name] = target.result()
            if len(class_names) == 1:
                self.target = target
        return results

    def segment_semantic_labels(
        self, class_names: Sequence[str], slices: Optional[Iterable[int]] = None, progress: Optional[Progress] = None,
        cancel: Optional[Callable[[], bool]] = None, largest_component: bool = False, fill_holes: bool = False,
        engine: str = "auto",
    ) -> LabelmapResult:
        """Many classes straight into one label map (value i+1 = class i).

        `engine`: "one_pass" runs the model's class head, all classes from one pass per slice (the
        only way a whole CT with dozens of organs takes seconds, not minutes); "prompted" decodes
        each class with its class token; "auto" takes the class head when the model has one. Memory
        stays bounded whatever the number of classes: only the label map and one batch of logits are
        kept, and the one-pass engine streams slices without caching their features. Where classes
        overlap, the most probable wins. `cancel()` is polled between batches and raises
        `Cancelled`; nothing is returned then. Optional 3D clean-up per class: keep the largest
        connected component, fill enclosed holes. `quality` is the quality head's predicted Dice
        (prompted) or the class head's mean confidence inside the class (one pass).
        """
        encoded = self._encoded()
        class_names = self._unique_classes(class_names)
        one_pass = self._use_one_pass(engine)
        class_ids = [self.catalog.index(name) for name in class_names]
        labels = np.zeros(encoded.canonical_shape, dtype=np.uint8 if len(class_names) < 255 else np.uint16)
        quality = np.full((len(class_names), self.num_slices), np.nan, dtype=np.float32)
        indices = self._indices(slices)
        source = (encoded.class_head_slices(self.axis, indices, class_ids, progress) if one_pass
                  else encoded.decode_slices(self.axis, indices, Prompts(class_ids=torch.tensor(class_ids)), progress))
        for index, logits, slice_quality in source:
            if cancel and cancel():
                raise Cancelled("Segmentation cancelled; nothing was written.")
            _slice_view(labels, self.axis, index, encoded.ndim)[...] = winning_labels(
                logits, encoded.slice_shape(self.axis)).astype(labels.dtype)
            quality[:, index] = slice_quality
        if largest_component or fill_holes:
            labels = clean_labels(labels, len(class_names), largest_component, fill_holes)
        with np.errstate(invalid="ignore"):
            mean_quality = [float(np.nanmean(q)) if np.isfinite(q).any() else float("nan") for q in quality]
        return LabelmapResult(encoded.view.from_canonical(labels).copy(), class_names, mean_quality, encoded.geometry,
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

    # ----------------------------------------------------------------------------- in-context
    def segment_in_context(
        self, references: Sequence[Union[Reference, tuple[ImageData, np.ndarray]]],
        slices: Optional[Iterable[int]] = None, progress: Optional[Progress] = None,
    ) -> SegmentationResult:
        """Segment what the reference (image, mask) pairs show; becomes the target to refine.

        When the result does not depend on the references (`kprism.reference_agreement`), its
        quality is NaN and a `ReferenceMismatchWarning` says why; `reference_agreement` keeps the measure.
        """
        encoded = self._encoded()
        refs = [as_reference(r, n) for n, r in enumerate(references)]
        knowledge = reference_knowledge(encoded, refs, self.axis)
        slices_out: dict[int, tuple[np.ndarray, float]] = {}
        for index, logits, quality in encoded.decode_slices(self.axis, self._indices(slices), knowledge, progress):
            slices_out[index] = (encoded.to_slice_grid(self.axis, logits[0]), float(quality[0]))
        self.reference_agreement = check_agreement(encoded, knowledge, {i: p for i, (p, _) in slices_out.items()}, self.axis)
        if self.reference_agreement.problem():  # a predicted Dice of 0.98 would say "trust me" where nothing supports it
            slices_out = {i: (p, float("nan")) for i, (p, _) in slices_out.items()}
        target = Target(encoded, axis=self.axis)
        target.fill(slices_out, knowledge, "predicted quality (Dice)", {"references": len(refs)})
        self.target = target
        return target.result()  # type: ignore[return-value]

    # ----------------------------------------------------------------------------- interactive
    def add_click(self, point: Sequence[float], positive: bool = True, coordinates: CoordinateSystem = "ijk",
                  *, axis: Optional[int] = None, propagate: Optional[bool] = None) -> SegmentationResult:
        """A click at a point: IJK index ([column, row] on a 2D image) or a physical RAS/LPS point.

        In 3D the change travels to neighbouring slices (`propagate=False`: this slice only);
        `axis` is the slicing axis of the view the click was placed in (default: the session's).
        """
        self._current_target().click(point, positive, coordinates, axis=axis, propagate=propagate)
        return self.result()  # type: ignore[return-value]

    def add_scribble(self, mask: np.ndarray, positive: bool = True, *, axis: Optional[int] = None,
                     propagate: Optional[bool] = None) -> SegmentationResult:
        """A scribble given as a binary mask on the image grid (every slice it touches is updated)."""
        self._current_target().scribble(mask, positive, axis=axis, propagate=propagate)
        return self.result()  # type: ignore[return-value]

    def add_box(self, minimum: Sequence[float], maximum: Sequence[float], coordinates: CoordinateSystem = "ijk",
                *, axis: Optional[int] = None, propagate: Optional[bool] = None) -> SegmentationResult:
        """A box from two opposite corners; in 3D every slice between them gets the rectangle."""
        self._current_target().box(minimum, maximum, coordinates, axis=axis, propagate=propagate)
        return self.result()  # type: ignore[return-value]

    def set_prior_mask(self, mask: np.ndarray) -> SegmentationResult:
        """Start refining an existing mask (any source: a manual segment, another tool)."""
        self._encoded()
        self._current_target().set_prior(mask)
        return self.result()  # type: ignore[return-value]

    def propagate(
        self, start: Optional[int] = None, *, min_quality: float = 0.15, min_area_ratio: float = 0.2,
        stop_when_unchanged: Optional[float] = 0.97, progress: Optional[Progress] = None, cross_axes: bool = False,
        from_point: Optional[Sequence[float]] = None, coordinates: CoordinateSystem = "ijk",
    ) -> SegmentationResult:
        """Carry the target's mask on one slice through its neighbours: the slice through `from_point`
        (a source point), else canonical slice `start` of `view` along `axis`, else the last prompted one.

        A direction stops on low predicted quality, when the mask shrinks below `min_area_ratio` of
        the previous slice's, when it grows like a leak, or — after a correction — when a slice comes
        out as it already was (Dice ≥ `stop_when_unchanged`). One `undo()` takes it all back.
        `cross_axes=True` then propagates again along the two other axes, each from the slice that
        cuts the structure widest, and averages the three probability volumes (two more passes).
        """
        encoded = self._encoded()
        if encoded.ndim != 3:
            raise ValueError("Propagation needs a 3D volume; this image is 2D.")
        if self.target is None or self.target.result() is None:
            raise RuntimeError("Nothing to propagate: segment, click or set a prior mask on a slice first.")
        rules = TravelRules(min_quality=min_quality, min_area_ratio=min_area_ratio, agreement=stop_when_unchanged)
        start = self.last_slice if start is None and from_point is None else start
        self.target.propagate(start, self.axis, rules=rules, progress=progress, from_point=from_point, coordinates=coordinates)
        if cross_axes:
            self._fuse_cross_axes(rules)
            self.target.merge_steps(2, {"propagate": {"axis": self.axis, "start": start}, "cross_axes": True})
        return self.result()  # type: ignore[return-value]

    def _fuse_cross_axes(self, rules: TravelRules) -> None:
        """Averages the target with its re-propagation along the two other axes (merged into the propagation's undo step)."""
        target = self.target
        current = target.result()  # one whole-volume copy, not two
        mask = current.mask
        probabilities = [current.probability]
        for axis in (a for a in range(3) if a != self.axis):
            helper = Target(self._encoded(), axis=axis)
            helper.set_prior(mask)
            canonical = self._encoded().view.to_canonical(mask)
            widest = int(np.argmax(canonical.sum(axis=tuple(a for a in range(3) if a != axis))))
            helper.propagate(widest, axis, rules=TravelRules(rules.min_quality, rules.min_area_ratio, agreement=None))
            probabilities.append(helper.result().probability)
        fused = np.mean(probabilities, axis=0, dtype=np.float32)
        canonical = self._encoded().view.to_canonical(fused)
        slices = {i: (np.take(canonical, i, axis=self.axis).astype(np.float32), float("nan"))
                  for i in range(self.num_slices)}
        target.fill(slices, target.knowledge, target.quality_kind, {"cross_axes": True})

    def undo(self) -> Optional[SegmentationResult]:
        """Take back the last interaction (a multi-slice box or scribble counts as one)."""
        if self.target is None:
            return None
        self.target.undo()
        return self.result()

    def redo(self) -> Optional[SegmentationResult]:
        """Put back the last undone interaction."""
        if self.target is None:
            return None
        self.target.redo()
        return self.result()

    def reset(self) -> None:
        """Forget the target and every prompt (the cached image features are kept)."""
        self.target = None

    def result(self) -> Optional[SegmentationResult]:
        """The current target's result on the source grid (a copy; None before any prompt)."""
        return None if self.target is None else self.target.result()

    # ----------------------------------------------------------------------------- internals
    def _encoded(self) -> EncodedImage:
        if self.encoded is None:
            raise RuntimeError("No image set: call set_image(...) first.")
        return self.encoded

    def _current_target(self) -> Target:
        if self.target is None:
            self.target = Target(self._encoded(), axis=self.axis)
        return self.target

    def _indices(self, slices: Optional[Iterable[int]]) -> list[int]:
        return list(range(self.num_slices)) if slices is None else list(slices)


def _slice_view(volume: np.ndarray, axis: int, index: int, ndim: int) -> np.ndarray:
    if ndim == 2:
        return volume
    box = [slice(None)] * 3
    box[axis] = index
    return volume[tuple(box)]
