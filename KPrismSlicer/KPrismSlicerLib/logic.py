"""KPrism segmentation on MRML nodes: blocking runs for every mode and interactive sessions.

Plain Python over MRML (no Qt), importable before torch and kprism are installed: both are
imported on first use. This module only maps nodes to arrays and back: a blocking run becomes a
`kprism.pipeline.SegmentationRequest` run by `kprism.pipeline.run` (the path the command line
takes too), and each interactive session is its own `kprism.target.Target`.

The logic keeps one `EncodedImage` per volume node and modality (encoded slices are the expensive
part) and shares it between every run and session on that volume; each interactive session owns
its structure — prompts, 3D result, undo — so sessions never disturb each other.

Guarantees:
- every input is checked before any model work, and a failed, refused or cancelled run leaves the
  segmentation exactly as it was;
- results are written on the input volume's grid, named and coloured from the model's class
  catalog, with a ``KPrism.Provenance`` tag (JSON: mode, model, classes/references/prompts, quality);
- an interactive prompt rewrites only the box of the volume it changed.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import numpy as np
import slicer

from . import nodes
from .nodes import InputError

if TYPE_CHECKING:
    from kprism.encoded_image import EncodedImage
    from kprism.pipeline import PromptStep
    from kprism.target import Delta, Target

Progress = Callable[[float, str], None]  # (fraction done 0–1, message)
Cancel = Callable[[], bool]  # True asks the running segmentation to stop
MODES = ("semantic", "incontext", "interactive")
_MODE_ALIASES = {"in-context": "incontext", "in_context": "incontext", "context": "incontext"}
DEFAULT_NAME = "KPrism"
NEW_SEGMENT_COLOR = (0.35, 0.85, 0.35)
ENCODED_IMAGES_KEPT = 4  # volumes whose encoded slices stay cached (each cache is bounded by kprism)


class SegmentationCancelled(RuntimeError):
    """The user cancelled; nothing was written."""


class KPrismUnavailable(RuntimeError):
    """kprism, torch or the model weights are missing."""


@dataclass
class Prompt:
    """One prompt on the input volume. Build it with the class methods.

    - ``point``: a click at a world RAS position, or every control point of a markups node
      (positive unless the node's ``KPrism.Positive`` attribute is false);
    - ``box``: a markups ROI (any orientation), or two opposite RAS corners;
    - ``scribble``: a segment painted as a hint (positive or negative);
    - ``prior``: an existing segment to refine (the starting point, applied before the other prompts).

    ``axis`` is the canonical axis of the view a point was placed in (0 axial, 1 coronal,
    2 sagittal; see :func:`nodes.view_axis`); None uses the run's slicing axis.
    """

    kind: str
    node: Any = None
    segment_id: Optional[str] = None
    positive: Optional[bool] = True
    ras: Optional[Sequence[float]] = None
    ras_max: Optional[Sequence[float]] = None
    axis: Optional[int] = None

    @classmethod
    def point(cls, ras: Sequence[float], positive: bool = True, axis: Optional[int] = None) -> "Prompt":
        return cls("point", ras=tuple(float(v) for v in ras), positive=positive, axis=axis)

    @classmethod
    def points(cls, markups_node: Any, positive: Optional[bool] = None, axis: Optional[int] = None) -> "Prompt":
        return cls("point", node=markups_node, positive=positive, axis=axis)

    @classmethod
    def box(cls, roi_node: Any) -> "Prompt":
        return cls("box", node=roi_node)

    @classmethod
    def box_ras(cls, ras_min: Sequence[float], ras_max: Sequence[float]) -> "Prompt":
        return cls("box", ras=tuple(ras_min), ras_max=tuple(ras_max))

    @classmethod
    def scribble(cls, segmentation_node: Any, segment_id: str, positive: bool = True) -> "Prompt":
        return cls("scribble", node=segmentation_node, segment_id=segment_id, positive=positive)

    @classmethod
    def prior(cls, segmentation_node: Any, segment_id: str) -> "Prompt":
        return cls("prior", node=segmentation_node, segment_id=segment_id)

    @classmethod
    def of(cls, item: Any) -> "Prompt":
        """A Prompt, or a markups fiducial / ROI node standing for its points / its box."""
        if isinstance(item, Prompt):
            return item
        if isinstance(item, slicer.vtkMRMLMarkupsROINode):
            return cls.box(item)
        if isinstance(item, slicer.vtkMRMLMarkupsNode):
            return cls.points(item)
        raise InputError(f"Not a prompt: {item!r}. Use Prompt.point/points/box/scribble/prior or a markups node.")


@dataclass(frozen=True)
class PromptResult:
    """What one interactive prompt did to its segment."""

    segment_id: str
    voxels: int  # voxels in the segment now
    quality: float  # the model's predicted quality (Dice), averaged over the slices segmented so far
    region: tuple[slice, ...]  # the box of the volume, (k, j, i), that was rewritten (empty: nothing changed)
    axis: int  # the canonical axis the prompt was answered along
    slices: tuple[int, ...]  # the canonical slices recomputed, the prompted one first


class KPrismLogic:
    """Holds the model (loaded on first use) and the encoded volumes, and runs them on MRML nodes.

    Args:
        model: model name or .safetensors path; None for the bundled default.
        device: "auto", "cpu", "cuda" or "mps".
        threads: CPU threads (default: kprism's, two at most).
    """

    def __init__(self, model: Optional[str] = None, device: str = "auto", threads: Optional[int] = None):
        self.model, self.device, self.threads = model or None, device or "auto", threads
        self._session = None
        self._images: OrderedDict[tuple, tuple[tuple, "EncodedImage"]] = OrderedDict()
        self._last_run: Optional[tuple[tuple, "Target"]] = None  # (volume, segmentation, segment IDs), its structure

    # ------------------------------------------------------------------------------------- model
    def configure(self, model: Optional[str] = None, device: str = "auto", threads: Optional[int] = None) -> None:
        """Change model or device; the model is reloaded on next use only if something changed."""
        if (model or None, device or "auto", threads) != (self.model, self.device, self.threads):
            self.model, self.device, self.threads = model or None, device or "auto", threads
            self._session, self._last_run = None, None
            self._images.clear()

    @property
    def session(self):
        """The KPrismSession for blocking runs (loads torch, kprism and the weights on first use)."""
        if self._session is None:
            try:
                from kprism.session import KPrismSession
            except ImportError as error:
                raise _not_installed(error) from error
            try:
                self._session = KPrismSession(self.model, device=self.device, threads=self.threads)
            except (OSError, RuntimeError, ValueError) as error:
                raise KPrismUnavailable(f"No KPrism model available: {error}") from error
        return self._session

    def class_names(self) -> list[str]:
        """The model's classes: from kprism's manifest when it knows the model (torch stays unloaded)."""
        if self._session is None and self.model_name() in known_models():
            return known_models()[self.model_name()]
        return list(self.session.catalog.names)

    def model_name(self) -> str:
        return str(self.model or "kprism-tiny")

    @staticmethod
    def runtime_versions() -> str:
        """'torch 2.x (CUDA 12.x)' or why it is unavailable, without importing torch if it is missing."""
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            return "torch not installed"
        import torch

        cuda = f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)" if torch.cuda.is_available() else "no CUDA GPU"
        return f"torch {torch.__version__} ({cuda})"

    # ------------------------------------------------------------------------------------- encoded volumes
    def encoded_image(self, volume_node: Any, modality: Optional[str] = None, axis: int = 0) -> "EncodedImage":
        """The volume prepared for the model, shared by every run and session on it (one per volume and modality).

        Prepared again only when the voxels or the geometry changed; sessions holding the old one
        notice and start again from their segment.
        """
        from kprism.encoded_image import EncodedImage

        nodes.check_volume(volume_node)
        session = self.session
        key = (volume_node.GetID(), (modality or "").strip().lower() or None)
        state = (volume_node.GetImageData().GetMTime(), tuple(np.round(nodes.ijk_to_ras_matrix(volume_node), 9).ravel()))
        held = self._images.get(key)
        if held is not None and held[0] == state:
            self._images.move_to_end(key)
            return held[1]
        image = nodes.volume_to_image(volume_node, modality)
        encoded = EncodedImage(session.model, image, device=session.device, threads=session.threads,
                               default_axis=nodes.slicing_axis(image, axis))
        self._images[key] = (state, encoded)
        self._images.move_to_end(key)
        while len(self._images) > ENCODED_IMAGES_KEPT:
            self._images.popitem(last=False)
        return encoded

    # ------------------------------------------------------------------------------------- blocking runs
    def segment(
        self,
        volume_node: Any,
        segmentation_node: Any,
        mode: str,
        classes: Optional[Sequence[str]] = None,
        references: Optional[Sequence[tuple[Any, Any, str]]] = None,
        prompts: Optional[Sequence[Any]] = None,
        progress: Optional[Progress] = None,
        cancel: Optional[Cancel] = None,
        segment_id: Optional[str] = None,
        name: Optional[str] = None,
        modality: Optional[str] = None,
        axis: int = 0,
    ) -> dict[str, str]:
        """Segment `volume_node` into `segmentation_node`; returns {segment name: segment ID}.

        - ``semantic``: one segment per class name (an existing segment of that name is replaced);
        - ``incontext``: `references` are (volume node, segmentation node, segment ID) examples;
        - ``interactive``: `prompts` only (see :class:`Prompt`); with `segment_id` of a non-empty
          segment, that segment is refined.
        Prompts given with the other modes refine their (single) result. The result goes into
        `segment_id` if given, else a new segment (`name`, default: the class or reference name).
        """
        try:
            from kprism.pipeline import run
            from kprism.session import Cancelled
        except ImportError as error:
            raise _not_installed(error) from error

        mode = _MODE_ALIASES.get(str(mode).lower(), str(mode).lower())
        if mode not in MODES:
            raise InputError(f"Unknown mode {mode!r}; use one of {', '.join(MODES)}.")
        report = _Reporter(progress, cancel)
        nodes.check_volume(volume_node)
        if segmentation_node is None:
            raise InputError("No output segmentation: select or create one.")
        nodes.check_same_frame(volume_node, segmentation_node)
        prompts = [Prompt.of(p) for p in (prompts or [])]
        if mode == "interactive" and segment_id is None:  # refining a segment of this segmentation targets it
            segment_id = next((p.segment_id for p in prompts if p.kind == "prior" and p.node is segmentation_node), None)
        request, ref_data = self._request(mode, volume_node, segmentation_node, classes, references, prompts, segment_id,
                                          name, axis)

        report(0.0, "Loading the model")
        session = self.session
        request.check_classes(session.catalog)  # unknown names fail here, listing the known ones
        targets = self._targets(segmentation_node, mode, request.classes, ref_data, segment_id, name)
        for target_id, _, _ in targets:
            nodes.check_editable(segmentation_node, target_id)

        report(0.02, "Reading the volume")
        encoded = self.encoded_image(volume_node, modality, axis)
        session.attach(encoded, request.axis)  # the run's image: this volume's shared encoded slices
        provenance: dict[str, Any] = {"tool": "KPrismSlicer", "model": self.model_name(), "mode": mode,
                                      "volume": volume_node.GetName(), "modality": encoded.modality_choice.modality}
        report(0.04, f"Modality: {encoded.modality_choice}")
        try:
            outcome = run(request, session, progress=report.stage(0.05, 0.95, "Segmenting"), cancel=report.cancelled)
        except Cancelled:
            raise SegmentationCancelled("Segmentation cancelled; the segmentation was left unchanged.") from None
        provenance.update(outcome.provenance)
        if "init_mask" in provenance:  # Slicer's word for refining a segment
            provenance["refined"] = provenance.pop("init_mask")

        report(0.97, "Writing the segmentation")
        report.check()
        masks = [mask for _, mask in outcome.masks()]
        written = self._write(segmentation_node, volume_node, targets, masks, outcome.qualities, provenance)
        single = outcome.target is not None and len(written) == 1
        self._last_run = ((volume_node.GetID(), segmentation_node.GetID(), next(iter(written.values()))),
                          outcome.target) if single else None
        report(1.0, "Done")
        return written

    @staticmethod
    def _request(mode, volume_node, segmentation_node, classes, references, prompts, segment_id, name, axis):
        """The mode's nodes as a checked pipeline request (its messages name inputs in plain words), and the references.

        A mode takes only its own inputs: classes in semantic mode, references in in-context mode;
        in interactive mode a non-empty `segment_id` is the initial mask unless a prior prompt gives one.
        """
        from kprism.pipeline import SegmentationRequest
        from kprism.target import Reference

        classes = [c for c in (classes or []) if c and c.strip()] if mode == "semantic" else []
        references = list(references or []) if mode == "incontext" else []
        if mode == "semantic" and not classes:
            raise InputError("Semantic mode needs at least one class name.")
        if mode == "incontext" and not references:
            raise InputError("In-context mode needs a reference: a volume and a segment of the structure to find.")
        if mode == "interactive" and not prompts and segment_id is None:
            raise InputError("Interactive mode needs prompts: points, a box, a scribble or a segment to refine.")
        for prompt in prompts:
            _check_prompt(prompt, volume_node)
        ref_data = [_reference(volume, segmentation, sid) for volume, segmentation, sid in references]
        steps, recorded, prior = _steps(prompts, volume_node)
        if prior is None and mode == "interactive" and _has_segment(segmentation_node, segment_id):
            prior = (nodes.segment_mask(segmentation_node, segment_id, volume_node),
                     nodes.segment_name(segmentation_node, segment_id))
        if prior is not None and not prior[0].any():
            prior = None  # an empty segment is a place to write, not something to refine
        described: dict[str, Any] = {"prompts": recorded}
        if ref_data:
            described["references"] = [info for _, _, info in ref_data]
        if prior is not None:
            described["init_mask"] = prior[1]
        request = SegmentationRequest(
            classes=classes, references=[Reference(image, mask) for image, mask, _ in ref_data], prompts=steps,
            init_mask=None if prior is None else prior[0], axis=nodes.volume_slicing_axis(volume_node, axis),
            name=name or DEFAULT_NAME, provenance=described,
        )
        return request, ref_data

    def _targets(self, segmentation_node, mode, classes, ref_data, segment_id, name) -> list[tuple[Optional[str], str, Any]]:
        """(existing segment ID or None, name, colour) per result, before any work."""
        if mode == "semantic":
            if segment_id is not None and len(classes) == 1:
                return [(segment_id, name or classes[0], self.session.catalog.entry(classes[0]).color)]
            return [(nodes.segment_id_by_name(segmentation_node, c), c, self.session.catalog.entry(c).color) for c in classes]
        if mode == "incontext":
            default_name, color = ref_data[0][2]["segment"], ref_data[0][2]["color"]
        else:
            default_name, color = DEFAULT_NAME, None
        if _has_segment(segmentation_node, segment_id):
            return [(segment_id, nodes.segment_name(segmentation_node, segment_id), None)]
        return [(None, name or default_name, color)]

    @staticmethod
    def _write(segmentation_node, volume_node, targets, masks, qualities, provenance) -> dict[str, str]:
        """All masks, or (on any error) none: the segmentation is restored from a copy."""
        segmentation = segmentation_node.GetSegmentation()
        backup = slicer.vtkSegmentation()
        backup.DeepCopy(segmentation)
        written = {}
        was_modifying = segmentation_node.StartModify()
        try:
            for (target_id, name, color), quality, mask in zip(targets, qualities, masks):
                tags = {nodes.PROVENANCE_TAG: {**provenance, "quality": _finite(quality)}}
                written[name] = nodes.write_segment(segmentation_node, volume_node, mask, target_id, name, color, tags)
        except BaseException:
            segmentation.DeepCopy(backup)
            raise
        finally:
            segmentation_node.EndModify(was_modifying)
        return written

    def take_last_run(self, volume_node: Any, segmentation_node: Any, segment_id: Optional[str]) -> Optional["Target"]:
        """The structure of the last blocking run if it was written into this segment (handed over once)."""
        if self._last_run is None or segment_id is None:
            return None
        key, target = self._last_run
        if key != (volume_node.GetID(), segmentation_node.GetID(), segment_id):
            return None
        self._last_run = None
        return target

    # ------------------------------------------------------------------------------------- interactive
    def interactive(
        self, volume_node: Any, segmentation_node: Any, segment_id: Optional[str] = None, name: str = DEFAULT_NAME,
        modality: Optional[str] = None, axis: int = 0,
    ) -> "InteractiveSession":
        """A click-by-click session writing into `segment_id` (refined if non-empty) or a new segment."""
        return InteractiveSession(self, volume_node, segmentation_node, segment_id, name, modality, axis)


class InteractiveSession:
    """Clicks, boxes and scribbles on one volume, each result written into one segment at once.

    The session owns its structure (a `kprism.target.Target` on the logic's shared encoded
    volume): its prompts, 3D result and undo are its own, whatever other sessions and runs do on
    the same volume. A click segments the slice of the view it was placed in (`axis`) and the
    change travels through the neighbouring slices; only the box of the volume that changed is
    rewritten. The segment is checked for a lock before every write, and a refused prompt changes
    neither the segment nor the session.
    """

    def __init__(self, logic: KPrismLogic, volume_node: Any, segmentation_node: Any, segment_id: Optional[str] = None,
                 name: str = DEFAULT_NAME, modality: Optional[str] = None, axis: int = 0):
        nodes.check_volume(volume_node)
        if segmentation_node is None:
            raise InputError("No output segmentation: select or create one.")
        nodes.check_same_frame(volume_node, segmentation_node)
        if segment_id is not None and segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
            raise InputError(f"{segmentation_node.GetName()!r} has no segment {segment_id!r}.")
        self.logic, self.volume_node, self.segmentation_node = logic, volume_node, segmentation_node
        self.segment_id, self.name, self.modality = segment_id, name, modality
        self.axis = nodes.volume_slicing_axis(volume_node, axis)  # prompts without a view axis slice along it
        self.prompts: list[dict] = []  # what was done, as recorded in the segment's provenance tag
        self._taken: list[int] = []  # target steps per prompt (a cross-axes propagation takes two)
        self._undone: list[tuple[dict, int]] = []
        self._provenance: dict[str, Any] = {"tool": "KPrismSlicer", "model": logic.model_name(), "mode": "interactive",
                                            "volume": volume_node.GetName()}
        self._start()

    def _start(self) -> None:
        """Continue the last blocking run's structure written into this segment, or start from the segment."""
        from kprism.target import Target

        self.encoded = self.logic.encoded_image(self.volume_node, self.modality, self.axis)
        self._provenance.pop("refined", None)
        self._provenance.pop("continues", None)
        current = self._segment_mask()
        adopted = self.logic.take_last_run(self.volume_node, self.segmentation_node, self.segment_id)
        if adopted is not None and adopted.encoded is self.encoded and np.array_equal(adopted.result().mask, current):
            # The class or reference knowledge of that run stays in the prompts.
            previous = nodes.segment_tag(self.segmentation_node.GetSegmentation().GetSegment(self.segment_id), nodes.PROVENANCE_TAG)
            self._provenance["continues"] = json.loads(previous) if previous else None
            self.target = adopted
        else:
            self.target = Target(self.encoded, axis=self.axis, name=self.name)
            if current.any():
                self.target.set_prior(current)
                self._provenance["refined"] = nodes.segment_name(self.segmentation_node, self.segment_id)
        self._mask = current  # what this session last wrote (or found) in its segment, (k, j, i)
        self._voxels = int(np.count_nonzero(current))

    def _segment_mask(self) -> np.ndarray:
        if _has_segment(self.segmentation_node, self.segment_id):
            return nodes.segment_mask(self.segmentation_node, self.segment_id, self.volume_node)
        return np.zeros(tuple(reversed(self.volume_node.GetImageData().GetDimensions())), np.uint8)

    def _ensure_current(self) -> None:
        """If the volume changed since the session started, start again from the segment (the old history is gone)."""
        if self.logic.encoded_image(self.volume_node, self.modality, self.axis) is not self.encoded:
            self._forget_history()
            self._start()

    # ------------------------------------------------------------------------------------- prompts
    def add_click(self, ras: Sequence[float], positive: bool = True, axis: Optional[int] = None) -> PromptResult:
        """A click at a world RAS point; `axis`: the canonical axis of the view it was placed in (see `nodes.view_axis`)."""
        return self.add(Prompt.point(ras, positive, axis))

    def add_fiducial(self, markups_node: Any, index: int = -1, positive: Optional[bool] = None,
                     axis: Optional[int] = None) -> PromptResult:
        """Control point `index` (default: the last one) of a markups node as a click, along the view's `axis`."""
        points = nodes.control_points(markups_node)
        if not points:
            raise InputError(f"{markups_node.GetName()!r} has no placed control point.")
        ras, _ = points[index]
        return self.add(Prompt.point(ras, nodes.is_positive(markups_node) if positive is None else positive, axis))

    def add_box(self, roi_node: Any) -> PromptResult:
        return self.add(Prompt.box(roi_node))

    def add_scribble(self, segmentation_node: Any, segment_id: str, positive: bool = True) -> PromptResult:
        return self.add(Prompt.scribble(segmentation_node, segment_id, positive))

    def refine(self, segment_id: str) -> PromptResult:
        """Start again from the current content of a segment (which becomes the target)."""
        self.segment_id = segment_id
        self._mask = self._segment_mask()
        self._voxels = int(np.count_nonzero(self._mask))
        return self.add(Prompt.prior(self.segmentation_node, segment_id))

    def add(self, prompt: Any) -> PromptResult:
        """Apply one prompt and write what it changed; a markups node with several points is several clicks."""
        from kprism.pipeline import apply_step, check_steps

        prompt = Prompt.of(prompt)
        _check_prompt(prompt, self.volume_node)
        nodes.check_editable(self.segmentation_node, self.segment_id)
        self._ensure_current()
        if prompt.kind == "prior":
            mask = nodes.segment_mask(prompt.node, prompt.segment_id, self.volume_node)
            record = {"type": "prior", "segment": nodes.segment_name(prompt.node, prompt.segment_id)}
            return self._commit(record, lambda: self.target.set_prior(mask))
        steps, records, _ = _steps([prompt], self.volume_node, self._usable_axis)
        check_steps(steps, self.encoded, self.axis)
        result = None
        for step, record in zip(steps, records):
            result = self._commit(record, lambda step=step: apply_step(self.target, step))
        return result  # type: ignore[return-value]

    def propagate(self, start_ras: Optional[Sequence[float]] = None, axis: Optional[int] = None, *,
                  cross_axes: bool = False, min_quality: float = 0.15, min_area_ratio: float = 0.2,
                  stop_when_unchanged: Optional[float] = 0.97) -> PromptResult:
        """Carry the segment on the last prompted slice (or the slice through `start_ras`) to its neighbours.

        `axis` defaults to the last prompt's. A direction stops on low predicted quality
        (`min_quality`), when the structure shrinks below `min_area_ratio` of the previous slice,
        or when a slice comes out as it was (Dice ≥ `stop_when_unchanged`; None: never).
        `cross_axes=True` propagates again along the two other axes and averages the three.
        """
        from kprism.target import TravelRules

        nodes.check_editable(self.segmentation_node, self.segment_id)
        self._ensure_current()
        last = self.target.last_slice
        axis = self._usable_axis(axis if axis is not None else (last[0] if last else None))
        if start_ras is not None:
            start = self.encoded.locate(nodes.world_to_ijk(self.volume_node, start_ras).tolist(), "ijk", axis).index
        else:
            start = last[1] if last and last[0] == axis else None
        record = {"type": "propagate", "from_slice": start, "axis": axis, "cross_axes": cross_axes,
                  "min_quality": min_quality, "min_area_ratio": min_area_ratio, "stop_when_unchanged": stop_when_unchanged}
        if not cross_axes:
            rules = TravelRules(min_quality=min_quality, min_area_ratio=min_area_ratio, agreement=stop_when_unchanged)
            return self._commit(record, lambda: self.target.propagate(start, axis, rules=rules))
        from kprism.session import KPrismSession

        def fuse() -> _WholeVolume:
            helper = KPrismSession(self.encoded.model, device=self.encoded.device, threads=self.encoded.threads)
            helper.attach(self.encoded, axis)
            helper.target = self.target
            fused = helper.propagate(start, min_quality=min_quality, min_area_ratio=min_area_ratio,
                                     stop_when_unchanged=stop_when_unchanged, cross_axes=True)
            return _WholeVolume(tuple(slice(0, n) for n in fused.probability.shape), fused.probability, axis, ())

        return self._commit(record, fuse)

    def undo(self) -> Optional[PromptResult]:
        """Take back the last prompt; returns what that changed (None when nothing is left to undo)."""
        if not self.prompts:
            return None
        nodes.check_editable(self.segmentation_node, self.segment_id)
        record, taken = self.prompts.pop(), self._taken.pop()
        self._undone.append((record, taken))
        return self._replay(self.target.undo, taken)

    def redo(self) -> Optional[PromptResult]:
        """Put back the last prompt taken back (None when there is none)."""
        if not self._undone:
            return None
        nodes.check_editable(self.segmentation_node, self.segment_id)
        record, taken = self._undone.pop()
        self.prompts.append(record)
        self._taken.append(taken)
        return self._replay(self.target.redo, taken)

    def _replay(self, step: Callable[[], Optional["Delta"]], times: int) -> Optional[PromptResult]:
        result = None
        for _ in range(times):
            delta = step()
            if delta is not None:
                result = self._write(delta)
        return result

    def reset(self) -> None:
        """Forget every prompt; the next one starts a new segment."""
        from kprism.target import Target

        self.target = Target(self.encoded, axis=self.axis, name=self.name)
        self._forget_history()
        self.segment_id = None
        self._mask = np.zeros_like(self._mask)
        self._voxels = 0
        self._provenance.pop("refined", None)
        self._provenance.pop("continues", None)

    # ------------------------------------------------------------------------------------- writing
    def _usable_axis(self, axis: Optional[int]) -> int:
        """The view's axis when the volume can be sliced along it, else the session's (a picture has one slice)."""
        if axis is None or axis == self.axis:
            return self.axis
        try:
            self.encoded.check_axis(axis)
        except ValueError:  # slices too thin along that axis (a single-slice picture, a few thick slices)
            return self.axis
        return axis

    def _forget_history(self) -> None:
        self.prompts.clear()
        self._taken.clear()
        self._undone.clear()

    def _commit(self, record: dict, action: Callable[[], "Delta"]) -> PromptResult:
        """Apply one prompt to the target, record it and write what it changed; a failed write takes it back."""
        before = self.target.steps
        delta = action()  # a failing prompt leaves the target as it was
        taken = self.target.steps - before
        self.prompts.append(record)
        self._taken.append(taken)
        try:
            result = self._write(delta)
        except BaseException:
            self.prompts.pop()
            self._taken.pop()
            for _ in range(taken):
                self.target.undo()
            raise
        self._undone.clear()
        return result

    def _write(self, delta: "Delta") -> PromptResult:
        """Rewrite only the box where the segment's voxels changed (and the provenance tag)."""
        if self.segment_id is not None and not _has_segment(self.segmentation_node, self.segment_id):
            # The segment was deleted meanwhile: it comes back whole.
            whole = self.target.result()
            delta = _WholeVolume(tuple(slice(0, n) for n in self._mask.shape), whole.probability, delta.axis, delta.slices)
            self._mask[...], self._voxels = 0, 0
        new = delta.probability >= 0.5
        old = self._mask[delta.region]
        changed = new != old
        provenance = {**self._provenance, "prompts": list(self.prompts), "quality": _finite(self.target.quality)}
        tags = {nodes.PROVENANCE_TAG: provenance}
        color = None if _has_segment(self.segmentation_node, self.segment_id) else NEW_SEGMENT_COLOR
        region: tuple[slice, ...] = tuple(slice(0, 0) for _ in self._mask.shape)
        if changed.any():
            box = _bounding_box(changed)
            region = tuple(slice(outer.start + inner.start, outer.start + inner.stop)
                           for outer, inner in zip(delta.region, box))
            self.segment_id = nodes.write_segment_region(self.segmentation_node, self.volume_node, region, new[box],
                                                         self.segment_id, self.name, color, tags)
        elif color is not None:  # nothing inside yet (a first negative click): the segment still appears
            corner = tuple(slice(0, 1) for _ in self._mask.shape)
            self.segment_id = nodes.write_segment_region(self.segmentation_node, self.volume_node, corner,
                                                         self._mask[corner], self.segment_id, self.name, color, tags)
        else:
            nodes.set_tags(self.segmentation_node, self.segment_id, tags)
        self._voxels += int(np.count_nonzero(new)) - int(np.count_nonzero(old))
        self._mask[delta.region] = new
        return PromptResult(self.segment_id, self._voxels, self.target.quality, region, delta.axis, delta.slices)


@dataclass(frozen=True)
class _WholeVolume:
    """A change that covers the whole volume (a cross-axes propagation), shaped like a kprism Delta."""

    region: tuple[slice, ...]
    probability: np.ndarray
    axis: int
    slices: tuple[int, ...]


# ----------------------------------------------------------------------------------------------- helpers


def _not_installed(error: ImportError) -> KPrismUnavailable:
    return KPrismUnavailable(
        f"KPrism is not installed in this Python ({error}). In Slicer, open the KPrism module and press "
        "'Install dependencies'; elsewhere `pip install kprism`."
    )


def _has_segment(segmentation_node: Any, segment_id: Optional[str]) -> bool:
    return segment_id is not None and segmentation_node.GetSegmentation().GetSegment(segment_id) is not None


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """The smallest box holding every true voxel of a non-empty mask."""
    box = []
    for axis in range(mask.ndim):
        along = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(along[0]), int(along[-1]) + 1))
    return tuple(box)


def _steps(prompts: Sequence[Prompt], volume_node: Any, axis_of: Callable[[Optional[int]], int] = lambda axis: axis):
    """Slicer prompts → kprism prompt steps (voxel indices of the volume), their JSON records, and the prior.

    The prior (a segment to refine) is the starting point, returned apart as (mask, segment name);
    `axis_of` maps a point's view axis to the axis it is answered along.
    """
    from kprism.pipeline import BoxPrompt, ClickPrompt, ScribblePrompt

    steps: list["PromptStep"] = []
    records: list[dict] = []
    prior = None
    for prompt in prompts:
        if prompt.kind == "point":
            points = [(prompt.ras, None)] if prompt.node is None else nodes.control_points(prompt.node)
            positive = prompt.positive if prompt.positive is not None or prompt.node is None else nodes.is_positive(prompt.node)
            axis = None if prompt.axis is None else axis_of(prompt.axis)
            for position, _ in points:
                ras = np.round(np.asarray(position, float), 3).tolist()
                ijk = nodes.world_to_ijk(volume_node, position).tolist()
                steps.append(ClickPrompt(ijk, bool(positive), "ijk", axis, where=f"The click at RAS {ras}"))
                records.append({"type": "point", "ras": ras, "positive": bool(positive),
                                **({} if axis is None else {"axis": axis})})
        elif prompt.kind == "box":
            low, high = _box_indices(prompt, volume_node)
            steps.append(BoxPrompt(low.tolist(), high.tolist(), "ijk", where="The box"))
            records.append({"type": "box", "ras_min": np.round(nodes.volume_ras(volume_node, low), 3).tolist(),
                            "ras_max": np.round(nodes.volume_ras(volume_node, high), 3).tolist()})
        elif prompt.kind == "scribble":
            name = nodes.segment_name(prompt.node, prompt.segment_id)
            mask = nodes.segment_mask(prompt.node, prompt.segment_id, volume_node)
            steps.append(ScribblePrompt(mask, bool(prompt.positive), where=f"The scribble {name!r}"))
            records.append({"type": "scribble", "segment": name, "positive": bool(prompt.positive)})
        else:
            name = nodes.segment_name(prompt.node, prompt.segment_id)
            prior = (nodes.segment_mask(prompt.node, prompt.segment_id, volume_node), name)
            records.append({"type": "prior", "segment": name})
    return steps, records, prior


class _Reporter:
    """Progress and cancellation: the progress callback also lets the UI process a Cancel click."""

    def __init__(self, progress: Optional[Progress], cancel: Optional[Cancel]):
        self.progress, self.cancel = progress, cancel

    def __call__(self, fraction: float, message: str) -> None:
        if self.progress:
            self.progress(float(fraction), message)
        self.check()

    def cancelled(self) -> bool:
        return bool(self.cancel and self.cancel())

    def check(self) -> None:
        if self.cancelled():
            raise SegmentationCancelled("Segmentation cancelled; the segmentation was left unchanged.")

    def stage(self, start: float, end: float, message: str) -> Callable[[int, int], None]:
        return lambda done, total: self(start + (end - start) * done / max(total, 1), f"{message} ({done}/{total} slices)")


def _check_prompt(prompt: Prompt, volume_node: Any) -> None:
    """Refuse a prompt before any work: points outside the volume, empty boxes or scribbles."""
    if prompt.kind == "point":
        points = [(prompt.ras, "point")] if prompt.node is None else nodes.control_points(prompt.node)
        if not points:
            raise InputError(f"{prompt.node.GetName()!r} has no placed control point.")
        for ras, label in points:
            ijk = nodes.world_to_ijk(volume_node, ras)
            if not nodes.index_inside(volume_node, ijk):
                size = list(volume_node.GetImageData().GetDimensions())
                raise InputError(
                    f"The click {label!r} at RAS {np.round(ras, 2).tolist()} is outside the volume {volume_node.GetName()!r} "
                    f"(voxel {np.round(ijk, 1).tolist()}, size {size}). Place it on the volume."
                )
    elif prompt.kind == "box":
        _box_indices(prompt, volume_node)
    elif prompt.kind in ("scribble", "prior"):
        if prompt.node is None or prompt.node.GetSegmentation().GetSegment(prompt.segment_id or "") is None:
            raise InputError(f"The {prompt.kind} segment {prompt.segment_id!r} does not exist.")
        nodes.check_same_frame(volume_node, prompt.node)
        if prompt.kind == "scribble" and not nodes.segment_mask(prompt.node, prompt.segment_id, volume_node).any():
            raise InputError(f"The scribble segment {nodes.segment_name(prompt.node, prompt.segment_id)!r} is empty on this volume.")
    else:
        raise InputError(f"Unknown prompt kind {prompt.kind!r}.")


def _box_indices(prompt: Prompt, volume_node: Any) -> tuple[np.ndarray, np.ndarray]:
    """A box → its voxel bounding box on the volume (clipped), as two IJK corners."""
    if prompt.node is not None:
        corners = nodes.roi_corners(prompt.node)  # a box in space, possibly rotated
    else:
        corners = np.array([prompt.ras, prompt.ras_max], float)  # two opposite voxel corners, as in prompts.json
    ijk = np.array([nodes.world_to_ijk(volume_node, c) for c in corners])
    size = np.asarray(volume_node.GetImageData().GetDimensions()) - 1
    low, high = np.clip(np.round(ijk.min(0)), 0, size), np.clip(np.round(ijk.max(0)), 0, size)
    if (np.round(ijk.max(0)) < 0).any() or (np.round(ijk.min(0)) > size).any():
        raise InputError(f"The box does not overlap the volume {volume_node.GetName()!r}.")
    return low, high


def _reference(volume_node: Any, segmentation_node: Any, segment_id: str):
    """A checked in-context reference → (ImageData, mask, description)."""
    nodes.check_volume(volume_node, "reference volume")
    if segmentation_node is None or not nodes.segment_ids(segmentation_node):
        raise InputError("The reference segmentation has no segments: mark the structure to find on the reference volume.")
    nodes.check_same_frame(volume_node, segmentation_node)
    if segment_id is None or segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
        raise InputError(f"The reference segmentation {segmentation_node.GetName()!r} has no segment {segment_id!r}.")
    mask = nodes.segment_mask(segmentation_node, segment_id, volume_node)
    name = nodes.segment_name(segmentation_node, segment_id)
    if not mask.any():
        raise InputError(f"The reference segment {name!r} is empty on the reference volume {volume_node.GetName()!r}.")
    info = {"volume": volume_node.GetName(), "segment": name, "color": nodes.segment_color(segmentation_node, segment_id)}
    return nodes.volume_to_image(volume_node), mask, info


def _finite(value: float) -> Optional[float]:
    return round(float(value), 4) if value is not None and np.isfinite(value) else None


def known_models() -> dict[str, list[str]]:
    """{model name: class names} from kprism's model manifest, read without importing torch."""
    import importlib.resources
    import json

    try:
        entries = json.loads((importlib.resources.files("kprism") / "models.json").read_text(encoding="utf-8"))
    except (ImportError, OSError, ValueError):
        return {}
    return {entry["name"]: list(entry.get("classes", [])) for entry in entries}


_default_logic: Optional[KPrismLogic] = None


def segment(volume_node: Any, segmentation_node: Any, mode: str, classes=None, references=None, prompts=None,
            progress: Optional[Progress] = None, cancel: Optional[Cancel] = None, **options: Any) -> dict[str, str]:
    """:meth:`KPrismLogic.segment` with a shared logic (the model stays loaded between calls)."""
    global _default_logic
    if _default_logic is None:
        _default_logic = KPrismLogic()
    logging.debug("KPrism %s segmentation of %s", mode, volume_node.GetName() if volume_node else None)
    return _default_logic.segment(volume_node, segmentation_node, mode, classes, references, prompts, progress, cancel, **options)
