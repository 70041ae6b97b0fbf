"""One path from a segmentation request to session calls, for the CLI, the Slicer logic and the batch.

A `SegmentationRequest` says *what* to segment — class names or in-context references — and
*where* — prompts (a parsed prompts.json or prompt steps) and an initial (prior) mask — plus the
3D options. It is checked when it is built, before any file is read or any model work is done,
with the one set of messages every tool gives. `run(request, session)` then turns it into calls
on a `KPrismSession` whose image is set:

1. several classes go straight into one label map (the one-pass class head when the model has it);
2. one class, or the references, give the structure's knowledge (class token or examples);
3. the initial mask, if any, replaces the result and becomes the starting point;
4. the prompts refine it, in order (a prompts.json: boxes, then scribbles, then points);
5. `propagate` carries the last prompted slice through the volume (`cross_axes`: along all three axes).

Everything a run needs — reference files, the initial mask, scribble masks, prompt positions — is
read and checked before the first model call, so a bad input costs no model work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

from .image import CoordinateSystem

if TYPE_CHECKING:
    from .catalog import ClassCatalog
    from .encoded_image import EncodedImage
    from .image import ImageData
    from .prompt_file import PromptFile
    from .session import KPrismSession, LabelmapResult
    from .target import Delta, Reference, SegmentationResult, Target

Progress = Callable[[int, int], None]  # (slices done, slices in all)
Cancel = Callable[[], bool]  # True asks the run to stop
PathLike = Union[str, os.PathLike]
ENGINES = ("auto", "one_pass", "prompted")


class RequestError(ValueError):
    """A request that cannot be run as given; the message says which inputs clash and what to give."""


# ----------------------------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class ClickPrompt:
    """A click at a source point (IJK index, or a physical RAS/LPS point)."""

    position: Sequence[float]
    positive: bool = True
    coordinates: CoordinateSystem = "ijk"
    axis: Optional[int] = None  # canonical axis of the view it was placed in; None: the request's axis
    where: str = "a click"  # how messages name it, e.g. "Prompt file p.json: points[3].position"


@dataclass(frozen=True)
class BoxPrompt:
    """A box from two opposite corners; in 3D every slice between them is prompted."""

    minimum: Sequence[float]
    maximum: Sequence[float]
    coordinates: CoordinateSystem = "ijk"
    axis: Optional[int] = None
    where: str = "a box"


@dataclass(frozen=True)
class ScribblePrompt:
    """A scribble: a binary mask on the image grid, or a function reading it (masks are image-sized)."""

    mask: Union[np.ndarray, Callable[[], np.ndarray]]
    positive: bool = True
    axis: Optional[int] = None
    where: str = "a scribble"

    def load(self) -> np.ndarray:
        return np.asarray(self.mask() if callable(self.mask) else self.mask)


PromptStep = Union[ClickPrompt, BoxPrompt, ScribblePrompt]


@dataclass(frozen=True)
class ReferenceFiles:
    """An in-context example as files: an image and a mask of the structure (`label`: which value marks it)."""

    image: PathLike
    mask: PathLike
    label: Optional[int] = None


# ----------------------------------------------------------------------------------------------- request


@dataclass(frozen=True)
class InputNames:
    """How a tool's user names each input, so a refusal speaks the tool's language."""

    classes: str = "classes"
    references: str = "references"
    prompts: str = "prompts"
    init_mask: str = "an initial mask"
    propagate: str = "propagate"
    cross_axes: str = "cross_axes"
    clicks: str = "clicks"


CLI_NAMES = InputNames("--classes", "--reference", "--prompts", "--init-mask", "--propagate", "--cross-axes", "points")


@dataclass(frozen=True)
class SegmentationRequest:
    """What to segment and where, checked as it is built (see the module documentation).

    Args:
        classes: class names (semantic); repeats are segmented once, with a warning.
        references: in-context examples, as `Reference`s (arrays) or `ReferenceFiles`.
        prompts: a parsed prompts.json (`PromptFile`) or prompt steps, applied in order.
        init_mask: a mask to refine, on the image grid (array) or a file resampled onto it.
        propagate, cross_axes: 3D: carry the last prompted slice through the volume (along all axes).
        engine: for classes: "one_pass" (class head), "prompted" (class tokens) or "auto".
        axis: canonical axis slices are taken along (0 axial, 1 coronal, 2 sagittal); prompts
            without an axis of their own use it.
        name: the result's name when it is not a class.
        provenance: how to describe each input in the provenance record, by key ("references",
            "init_mask", "prompts"); files are described by their path, arrays by their count.
        names: how messages name the inputs (`CLI_NAMES` for the command line).
    """

    classes: Sequence[str] = ()
    references: Sequence[Union["Reference", ReferenceFiles]] = ()
    prompts: Union["PromptFile", Sequence[PromptStep], None] = None
    init_mask: Union[np.ndarray, PathLike, None] = None
    propagate: bool = False
    cross_axes: bool = False
    engine: str = "auto"
    axis: int = 0
    name: str = "segment"
    provenance: Mapping[str, Any] = field(default_factory=dict)
    names: InputNames = InputNames()

    def __post_init__(self) -> None:
        from .session import unique_class_names

        classes = [str(c).strip() for c in self.classes if c is not None and str(c).strip()]
        object.__setattr__(self, "classes", unique_class_names(classes) if classes else [])
        object.__setattr__(self, "references", list(self.references))
        self._check()

    # ------------------------------------------------------------------------------- checks
    @property
    def refines(self) -> bool:
        """True when prompts or an initial mask refine the structure."""
        return self.init_mask is not None or _has_prompts(self.prompts)

    def _check(self) -> None:
        n = self.names
        if self.classes and self.references:
            raise RequestError(f"Use either {n.classes} (semantic) or {n.references} (in-context), not both.")
        if len(self.classes) > 1 and self.refines:
            raise RequestError(f"Prompts and {n.init_mask} refine one structure: give a single class with them.")
        if self.cross_axes and not self.propagate:
            raise RequestError(f"{n.cross_axes} refines {n.propagate}: give both.")
        if not (self.classes or self.references or self.refines):
            raise RequestError(f"Nothing to segment: give {n.classes}, {n.references}, {n.prompts} or {n.init_mask}.")
        if self.propagate and len(self.classes) > 1:
            raise RequestError(f"{n.propagate} carries one structure: use it with prompts, {n.init_mask} or a single class.")
        if self.engine not in ENGINES:
            raise RequestError(f"engine must be 'auto', 'one_pass' or 'prompted', not {self.engine!r}.")
        if self.axis not in (0, 1, 2):
            raise RequestError(f"axis must be 0 (axial), 1 (coronal) or 2 (sagittal); got {self.axis!r}.")

    def check_classes(self, catalog: "ClassCatalog") -> None:
        """Unknown class names fail here, each message listing the known classes."""
        for name in self.classes:
            catalog.index(name)

    @property
    def structure_name(self) -> str:
        """The name of the one structure this request segments (a class, else `name`)."""
        return self.classes[0] if len(self.classes) == 1 else self.name


def _has_prompts(prompts: Union["PromptFile", Sequence[PromptStep], None]) -> bool:
    if prompts is None:
        return False
    is_empty = getattr(prompts, "is_empty", None)
    return not is_empty() if callable(is_empty) else len(prompts) > 0


# ----------------------------------------------------------------------------------------------- outcome


@dataclass
class SegmentationOutcome:
    """What a run made: one structure (`results`, a copy on the source grid) or a label map of several classes."""

    results: dict[str, "SegmentationResult"]
    labelmap: Optional["LabelmapResult"]
    provenance: dict[str, Any]
    target: Optional["Target"] = None  # the one structure, ready for more prompts; None for a label map

    @property
    def names(self) -> list[str]:
        return list(self.labelmap.names) if self.labelmap is not None else list(self.results)

    @property
    def qualities(self) -> list[float]:
        if self.labelmap is not None:
            return list(self.labelmap.quality)
        return [result.quality for result in self.results.values()]

    @property
    def quality_kind(self) -> str:
        if self.labelmap is not None:
            return "mean confidence" if self.labelmap.engine == "one_pass" else "predicted quality (Dice)"
        return next(iter(self.results.values())).quality_kind

    def labels(self) -> np.ndarray:
        """One label map on the source grid: value i+1 marks `names[i]`."""
        if self.labelmap is not None:
            return self.labelmap.labels
        return next(iter(self.results.values())).mask

    def masks(self) -> Iterator[tuple[str, np.ndarray]]:
        """(name, 0/1 mask on the source grid) per structure, in `names` order."""
        if self.labelmap is not None:
            for value, name in enumerate(self.labelmap.names, start=1):
                yield name, (self.labelmap.labels == value).astype(np.uint8)
            return
        for name, result in self.results.items():
            yield name, result.mask


# ----------------------------------------------------------------------------------------------- run


def run(request: SegmentationRequest, session: "KPrismSession", progress: Optional[Progress] = None,
        cancel: Optional[Cancel] = None) -> SegmentationOutcome:
    """Run `request` on the image set on `session`, as a new structure; returns the results and their provenance.

    `progress(done, total)` is called per slice of long runs; `cancel()` is polled between slices
    and between prompts and raises `kprism.session.Cancelled`, with nothing returned.
    """
    from .session import Cancelled

    if session.encoded is None:
        raise RuntimeError("No image set: call session.set_image(...) first.")
    request.check_classes(session.catalog)
    session.attach(session.encoded, request.axis)  # a new structure on this image
    guard = _Guard(progress, cancel, Cancelled)
    steps = _prompt_steps(request.prompts, session.encoded)
    _check_steps(steps, session.encoded, request.axis, request.names.clicks, _file_prefix(request.prompts))
    references = [_load_reference(reference) for reference in request.references]
    init_mask = _load_init_mask(request.init_mask, session.encoded)
    provenance = _provenance(request)
    guard.check()

    if len(request.classes) > 1:
        labelmap = session.segment_semantic_labels(request.classes, progress=guard, cancel=guard.cancelled,
                                                   engine=request.engine)
        return SegmentationOutcome({}, labelmap, provenance)
    name = request.structure_name
    results: dict[str, SegmentationResult] = {}
    if request.classes:
        results = session.segment_semantic(request.classes, progress=guard, engine=request.engine)
    elif references:
        results = {name: session.segment_in_context(references, progress=guard)}
    if session.target is None:
        session.target = session.new_target(name=name)
    target = session.target
    if init_mask is not None:
        target.set_prior(init_mask)
    for step in steps:
        guard.check()
        apply_step(target, step)
    if request.propagate:
        guard.check()
        # Cancel is polled per slice; progress is not shown (a propagation's length is not known ahead).
        session.propagate(cross_axes=request.cross_axes, progress=lambda done, total: guard.check())
    if init_mask is not None or steps or request.propagate:
        results = {name: target.result()}
    return SegmentationOutcome(results, None, provenance, target)  # type: ignore[arg-type]


class _Guard:
    """Progress that also polls `cancel` (every long call reports progress per batch of slices)."""

    def __init__(self, progress: Optional[Progress], cancel: Optional[Cancel], error: type[Exception]):
        self.progress, self.cancel, self.error = progress, cancel, error

    def __call__(self, done: int, total: int) -> None:
        if self.progress:
            self.progress(done, total)
        self.check()

    def cancelled(self) -> bool:
        return bool(self.cancel and self.cancel())

    def check(self) -> None:
        if self.cancelled():
            raise self.error("Segmentation cancelled; nothing was written.")


def apply_step(target: "Target", step: PromptStep) -> "Delta":
    """One prompt step → the target call it stands for; returns what changed."""
    if isinstance(step, ClickPrompt):
        return target.click(step.position, step.positive, step.coordinates, axis=step.axis)
    if isinstance(step, BoxPrompt):
        return target.box(step.minimum, step.maximum, step.coordinates, axis=step.axis)
    return target.scribble(step.load(), step.positive, axis=step.axis)


def check_steps(steps: Sequence[PromptStep], encoded: "EncodedImage", axis: int = 0) -> None:
    """Refuse prompt steps before any model work: off the image, too many clicks on a slice, empty scribbles."""
    _check_steps(steps, encoded, axis, InputNames.clicks, "")


# ----------------------------------------------------------------------------------------------- inputs


def _prompt_steps(prompts: Union["PromptFile", Sequence[PromptStep], None], encoded: "EncodedImage") -> list[PromptStep]:
    """A prompts.json → steps in its order (boxes, scribbles, points); steps pass through."""
    from .prompt_file import PromptFile

    if prompts is None:
        return []
    if not isinstance(prompts, PromptFile):
        return list(prompts)
    label, system = _file_prefix(prompts).removesuffix(": "), prompts.coordinates
    steps: list[PromptStep] = []
    for n, box in enumerate(prompts.boxes):
        steps.append(BoxPrompt(box.min, box.max, system, where=f"{label}: boxes[{n}]"))
    for n, scribble in enumerate(prompts.scribbles):
        where = f"{label}: scribbles[{n}]"
        steps.append(ScribblePrompt(_scribble_reader(scribble.mask, where, encoded.image), scribble.positive, where=where))
    for n, point in enumerate(prompts.points):
        steps.append(ClickPrompt(point.position, point.positive, system, where=f"{label}: points[{n}].position"))
    return steps


def _scribble_reader(path: Path, where: str, image: "ImageData") -> Callable[[], np.ndarray]:
    """Reads a scribble file onto the image grid when called: masks are image-sized, so they are not kept."""

    def read() -> np.ndarray:
        from .io import read_mask
        from .prompt_file import PromptFileError

        try:
            mask = read_mask(path, reference=image)
        except (ValueError, OSError) as error:
            raise PromptFileError(f"{where} ({path.name}): {error}") from None
        if not mask.array.any():
            raise PromptFileError(f"{where}: {path} marks nothing on the image's grid (empty, or outside the image).")
        return mask.array

    return read


def _file_prefix(prompts: Any) -> str:
    """How messages start for a prompts.json ("Prompt file PATH: "); nothing for steps given in code."""
    from .prompt_file import PromptFile

    if not isinstance(prompts, PromptFile):
        return ""
    return f"Prompt file {prompts.source}: " if prompts.source is not None else "Prompts: "


def _check_steps(steps: Sequence[PromptStep], encoded: "EncodedImage", axis: int, clicks: str, prefix: str) -> None:
    """Every prompt lands on the image, no slice is crowded with clicks, every scribble marks something.

    `clicks` is the caller's word for them ("points" in a prompts.json); `prefix` starts the crowding message.
    """
    from .prompt_file import MAX_POINTS_PER_SLICE, PromptFileError, crowded_slice

    def locate(point: Sequence[float], coordinates: CoordinateSystem, step_axis: Optional[int], where: str):
        try:
            encoded.check_axis(axis if step_axis is None else step_axis)
            return encoded.locate(point, coordinates, axis if step_axis is None else step_axis)
        except ValueError as error:
            raise PromptFileError(f"{where}: {error}") from None

    for step in steps:
        if isinstance(step, BoxPrompt):
            locate(step.minimum, step.coordinates, step.axis, f"{step.where}.min")
            locate(step.maximum, step.coordinates, step.axis, f"{step.where}.max")
    clicked = [locate(s.position, s.coordinates, s.axis, s.where) for s in steps if isinstance(s, ClickPrompt)]
    crowded = crowded_slice((where.axis, where.index) for where in clicked)
    if crowded is not None:
        (_, index), count = crowded
        raise PromptFileError(
            f"{prefix}{count} {clicks} fall on slice {index}; at most {MAX_POINTS_PER_SLICE} {clicks} per slice are "
            "accepted (each click re-decodes every click of its slice). Spread them out or use a box or scribble."
        )
    for step in steps:
        if isinstance(step, ScribblePrompt):
            mask = step.load()
            if mask.shape != encoded.shape:
                raise PromptFileError(f"{step.where}: the mask has shape {mask.shape}; the image has {encoded.shape}.")
            if not mask.any():
                raise PromptFileError(f"{step.where}: the mask marks nothing on the image.")
            if step.axis is not None:
                encoded.check_axis(step.axis)


def _load_reference(reference: Union["Reference", ReferenceFiles]) -> "Reference":
    from .target import Reference

    if isinstance(reference, Reference):
        return reference
    from .io import read_image, read_mask

    image = read_image(reference.image)
    return Reference(image, read_mask(reference.mask, reference=image).array, label=reference.label)


def _load_init_mask(mask: Union[np.ndarray, PathLike, None], encoded: "EncodedImage") -> Optional[np.ndarray]:
    if mask is None:
        return None
    if isinstance(mask, (str, os.PathLike)):
        from .io import read_mask

        return read_mask(mask, reference=encoded.image).array
    mask = np.asarray(mask)
    if mask.shape != encoded.shape:
        raise RequestError(f"The initial mask has shape {mask.shape}; the image has {encoded.shape}.")
    return mask


def _provenance(request: SegmentationRequest) -> dict[str, Any]:
    """What was asked, JSON-ready: files by path, arrays by count (the request's own descriptions first)."""
    described = dict(request.provenance)
    record: dict[str, Any] = {}
    if request.classes:
        record["classes"] = list(request.classes)
    if request.references:
        record["references"] = described.get("references", [
            [str(r.image), str(r.mask)] if isinstance(r, ReferenceFiles) else "array" for r in request.references])
        labels = {r.label for r in request.references if r.label is not None}
        if labels:
            record["reference_label"] = labels.pop() if len(labels) == 1 else sorted(labels)
    if request.init_mask is not None:
        record["init_mask"] = described.get("init_mask", str(request.init_mask)
                                             if isinstance(request.init_mask, (str, os.PathLike)) else True)
    if _has_prompts(request.prompts):
        source = getattr(request.prompts, "source", None)
        record["prompts"] = described.get("prompts", str(source) if source is not None else len(request.prompts))  # type: ignore[arg-type]
    if request.propagate:
        record["propagate"] = "cross_axes" if request.cross_axes else True
    return record

