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
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import numpy as np
import slicer

from . import nodes
from .names import class_color, new_segment_color, next_segment_name
from .nodes import InputError
from .worker import JobCancelled, JobControl

if TYPE_CHECKING:
    from kprism.encoded_image import EncodedImage
    from kprism.pipeline import PromptStep
    from kprism.target import Target

Progress = Callable[[float, str], None]  # (fraction done 0–1, message)
Cancel = Callable[[], bool]  # True asks the running segmentation to stop
MODES = ("semantic", "incontext", "interactive")
_MODE_ALIASES = {"in-context": "incontext", "in_context": "incontext", "context": "incontext"}
DEFAULT_NAME = "KPrism"
ENCODED_IMAGES_KEPT = 4  # volumes whose encoded slices stay cached (each cache is bounded by kprism)


class SegmentationCancelled(JobCancelled):
    """The user cancelled; nothing was written."""

    def __init__(self, message: str = "Segmentation cancelled; the segmentation was left unchanged.") -> None:
        super().__init__(message)


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
    mask: Optional[np.ndarray] = None  # a scribble drawn on the volume's grid, (k, j, i), instead of a segment

    @classmethod
    def point(cls, ras: Sequence[float], positive: bool = True, axis: Optional[int] = None) -> "Prompt":
        return cls("point", ras=tuple(float(v) for v in ras), positive=positive, axis=axis)

    @classmethod
    def points(cls, markups_node: Any, positive: Optional[bool] = None, axis: Optional[int] = None) -> "Prompt":
        return cls("point", node=markups_node, positive=positive, axis=axis)

    @classmethod
    def box(cls, roi_node: Any, axis: Optional[int] = None) -> "Prompt":
        return cls("box", node=roi_node, axis=axis)

    @classmethod
    def box_ras(cls, ras_min: Sequence[float], ras_max: Sequence[float], axis: Optional[int] = None) -> "Prompt":
        return cls("box", ras=tuple(ras_min), ras_max=tuple(ras_max), axis=axis)

    @classmethod
    def scribble(cls, segmentation_node: Any, segment_id: str, positive: bool = True) -> "Prompt":
        return cls("scribble", node=segmentation_node, segment_id=segment_id, positive=positive)

    @classmethod
    def scribble_mask(cls, mask: np.ndarray, positive: bool = True, axis: Optional[int] = None) -> "Prompt":
        """A stroke painted in a view: a 0/1 mask on the volume's grid, (k, j, i)."""
        return cls("scribble", mask=np.asarray(mask), positive=positive, axis=axis)

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
        self._images_lock = threading.Lock()  # the GUI thread looks up, the worker thread adds
        self._last_run: Optional[tuple[tuple, "Target"]] = None  # (volume, segmentation, segment IDs), its structure

    # ------------------------------------------------------------------------------------- model
    def configure(self, model: Optional[str] = None, device: str = "auto", threads: Optional[int] = None) -> None:
        """Change model or device; the model is reloaded on next use only if something changed."""
        if (model or None, device or "auto", threads) != (self.model, self.device, self.threads):
            self.model, self.device, self.threads = model or None, device or "auto", threads
            self._session, self._last_run = None, None
            with self._images_lock:
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
    def volume_state(self, volume_node: Any, modality: Optional[str] = None) -> tuple[tuple, tuple]:
        """(key, state) of a volume as the model sees it (GUI thread; cheap: no voxel is read)."""
        nodes.check_volume(volume_node)
        key = (volume_node.GetID(), (modality or "").strip().lower() or None)
        state = (volume_node.GetImageData().GetMTime(), tuple(np.round(nodes.ijk_to_ras_matrix(volume_node), 9).ravel()))
        return key, state

    def cached_encoded(self, key: tuple, state: tuple) -> Optional["EncodedImage"]:
        """The encoded volume held for `key` if it was made from that `state` of the volume."""
        with self._images_lock:
            held = self._images.get(key)
            if held is None or held[0] != state:
                return None
            self._images.move_to_end(key)
            return held[1]

    def encode(self, key: tuple, state: tuple, image: Any, axis: int = 0) -> "EncodedImage":
        """Prepare a volume read from MRML (kprism ImageData) for the model and keep it (worker thread: loads the model)."""
        from kprism.encoded_image import EncodedImage

        held = self.cached_encoded(key, state)
        if held is not None:
            return held
        session = self.session
        encoded = EncodedImage(session.model, image, device=session.device, threads=session.threads,
                               default_axis=nodes.slicing_axis(image, axis))
        with self._images_lock:
            self._images[key] = (state, encoded)
            self._images.move_to_end(key)
            while len(self._images) > ENCODED_IMAGES_KEPT:
                self._images.popitem(last=False)
        return encoded

    def encoded_image(self, volume_node: Any, modality: Optional[str] = None, axis: int = 0) -> "EncodedImage":
        """The volume prepared for the model, shared by every run and session on it (one per volume and modality).

        Prepared again only when the voxels or the geometry changed; sessions holding the old one
        notice and start again from their segment.
        """
        key, state = self.volume_state(volume_node, modality)
        held = self.cached_encoded(key, state)
        return held if held is not None else self.encode(key, state, nodes.volume_to_image(volume_node, modality), axis)

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
        `prepare_segment` → `PreparedRun.compute` → `finish_segment` is the same in three steps
        (GUI thread, worker thread, GUI thread).
        """
        report = _Reporter(progress, cancel)
        prepared = self.prepare_segment(volume_node, segmentation_node, mode, classes, references, prompts,
                                        segment_id=segment_id, name=name, modality=modality, axis=axis)
        outcome = prepared.compute(report)
        return self.finish_segment(prepared, outcome, report)

    def prepare_segment(
        self, volume_node: Any, segmentation_node: Any, mode: str, classes: Optional[Sequence[str]] = None,
        references: Optional[Sequence[tuple[Any, Any, str]]] = None, prompts: Optional[Sequence[Any]] = None, *,
        segment_id: Optional[str] = None, name: Optional[str] = None, modality: Optional[str] = None, axis: int = 0,
    ) -> "PreparedRun":
        """GUI thread: read and check every input of a blocking run (see `segment`); raises InputError."""
        try:
            import kprism.pipeline  # noqa: F401 (a missing install is reported before anything is read)
        except ImportError as error:
            raise _not_installed(error) from error

        mode = _MODE_ALIASES.get(str(mode).lower(), str(mode).lower())
        if mode not in MODES:
            raise InputError(f"Unknown mode {mode!r}; use one of {', '.join(MODES)}.")
        nodes.check_volume(volume_node)
        if segmentation_node is None:
            raise InputError("No output segmentation: select or create one.")
        nodes.check_same_frame(volume_node, segmentation_node)
        prompts = [Prompt.of(p) for p in (prompts or [])]
        if mode == "interactive" and segment_id is None:  # refining a segment of this segmentation targets it
            segment_id = next((p.segment_id for p in prompts if p.kind == "prior" and p.node is segmentation_node), None)
        request, ref_data = self._request(mode, volume_node, segmentation_node, classes, references, prompts, segment_id,
                                          name, axis)
        targets = self._targets(segmentation_node, mode, request.classes, ref_data, segment_id, name)
        for target_id, _, _ in targets:
            nodes.check_editable(segmentation_node, target_id)
        key, state = self.volume_state(volume_node, modality)
        image = None if self.cached_encoded(key, state) is not None else nodes.volume_to_image(volume_node, modality)
        provenance: dict[str, Any] = {"tool": "KPrismSlicer", "model": self.model_name(), "mode": mode,
                                      "volume": volume_node.GetName()}
        return PreparedRun(self, mode, volume_node, segmentation_node, request, targets, (key, state, image), axis,
                           provenance)

    def finish_segment(self, prepared: "PreparedRun", outcome: Any, report: Optional[Any] = None) -> dict[str, str]:
        """GUI thread: write a computed run's segments (all or, on any error, none); returns {name: segment ID}."""
        report = report or _Reporter(None, None)
        report(0.97, "Writing the segmentation")
        provenance = {**prepared.provenance, "modality": prepared.modality, **outcome.provenance}
        if "init_mask" in provenance:  # Slicer's word for refining a segment
            provenance["refined"] = provenance.pop("init_mask")
        masks = [mask for _, mask in outcome.masks()]
        targets = [(target_id, name, color if color is not None else prepared.catalog_colors.get(name))
                   for target_id, name, color in prepared.targets]
        written = self._write(prepared.segmentation_node, prepared.volume_node, targets, masks, outcome.qualities, provenance)
        single = outcome.target is not None and len(written) == 1
        self._last_run = ((prepared.volume_node.GetID(), prepared.segmentation_node.GetID(), next(iter(written.values()))),
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
            # Slicer's anatomy colour where the class is known, else the model catalog's (filled in by compute).
            if segment_id is not None and len(classes) == 1:
                return [(segment_id, name or classes[0], class_color(classes[0], segmentation_node))]
            return [(nodes.segment_id_by_name(segmentation_node, c), c, class_color(c, segmentation_node)) for c in classes]
        if mode == "incontext":
            default_name, color = ref_data[0][2]["segment"], ref_data[0][2]["color"]
        else:
            default_name, color = next_segment_name(segmentation_node), new_segment_color(segmentation_node)
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
        modality: Optional[str] = None, axis: int = 0, start: bool = True,
    ) -> "InteractiveSession":
        """A click-by-click session writing into `segment_id` (refined if non-empty) or a new segment.

        `start=False` defers encoding the volume and loading the model to the first prompt's compute
        (the worker thread), so creating the session never blocks the GUI.
        """
        return InteractiveSession(self, volume_node, segmentation_node, segment_id, name, modality, axis, start)


@dataclass
class PreparedRun:
    """A blocking run read and checked on the GUI thread (`KPrismLogic.prepare_segment`).

    `compute(control)` runs the model (worker thread, no MRML); `logic.finish_segment(prepared,
    outcome)` writes the result on the GUI thread.
    """

    logic: "KPrismLogic"
    mode: str
    volume_node: Any
    segmentation_node: Any
    request: Any  # kprism.pipeline.SegmentationRequest
    targets: list  # (existing segment ID or None, name, colour or None: the model's catalog colour)
    volume: tuple  # (key, state, ImageData or None when already encoded)
    axis: int
    provenance: dict
    modality: Optional[str] = None
    catalog_colors: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return {"semantic": "Semantic segmentation", "incontext": "In-context segmentation"}.get(self.mode, "Segmentation")

    def compute(self, control: Any = None) -> Any:
        """Load the model, encode the volume if needed and run the request; raises SegmentationCancelled on Cancel."""
        from kprism.pipeline import run
        from kprism.session import Cancelled

        report = control if isinstance(control, _Reporter) else _Reporter(
            None if control is None else control.progress, None if control is None else control.cancelled)
        try:
            report(0.0, "Loading the model")
        except JobCancelled:
            raise SegmentationCancelled() from None
        session = self.logic.session
        self.request.check_classes(session.catalog)  # unknown names fail here, listing the known ones
        self.catalog_colors = {name: session.catalog.entry(name).color for _, name, color in self.targets
                               if color is None and name in session.catalog}
        report(0.02, "Reading the volume")
        key, state, image = self.volume
        encoded = self.logic.encode(key, state, image, self.axis) if image is not None else self.logic.cached_encoded(key, state)
        if encoded is None:  # dropped from the cache meanwhile
            raise InputError("The volume changed while the run was queued; run it again.")
        session.attach(encoded, self.request.axis)  # the run's image: this volume's shared encoded slices
        self.modality = encoded.modality_choice.modality
        report(0.04, f"Modality: {encoded.modality_choice}")
        try:
            outcome = run(self.request, session, progress=report.stage(0.05, 0.95, "Segmenting"), cancel=report.cancelled)
            report.check()
        except (Cancelled, JobCancelled):  # one message whoever noticed the Cancel
            raise SegmentationCancelled() from None
        return outcome


@dataclass
class _StartPlan:
    """What a (re)start of a session read on the GUI thread: the volume (only when not encoded yet) and the segment."""

    key: tuple
    state: tuple
    image: Any  # kprism ImageData to encode, or None when the logic holds it encoded (`encoded`) or the session does
    encoded: Optional["EncodedImage"]
    current: np.ndarray  # the segment as it is now, (k, j, i)
    segment: Optional[str]  # its name (what a refinement is recorded as)
    adopted: Optional["Target"]  # the last blocking run's structure, if it wrote this segment
    adopted_tag: Optional[str]  # that run's provenance tag


@dataclass
class PreparedPrompt:
    """A prompt (or undo, redo, propagation) read and checked on the GUI thread, ready for `compute`.

    `compute(control)` runs on the worker thread and touches only the session's target and the
    model; pass its result to `session.finish(prepared, delta)` on the GUI thread.
    """

    session: "InteractiveSession"
    kind: str  # "prompt", "prior", "propagate", "undo" or "redo"
    label: str  # what the panel shows while it waits or runs
    start: Optional[_StartPlan] = None
    steps: list = field(default_factory=list)  # kprism prompt steps, with their records
    records: list = field(default_factory=list)
    prior: Optional[np.ndarray] = None
    options: dict = field(default_factory=dict)  # propagation settings

    def compute(self, control: Optional[JobControl] = None) -> "SessionDelta":
        return self.session._compute(self, control or JobControl())


@dataclass
class SessionDelta:
    """What one prepared step did to the session's target (from `PreparedPrompt.compute`)."""

    changes: list  # kprism Deltas (or _WholeVolume), in the order they were made
    committed: list  # (record, target steps) added to the history by this step
    prompts: list  # the session's prompt records afterwards (what the provenance tag lists)
    origin: dict  # {"continues": tag} or {"refined": segment name} or {}: where the structure started
    quality: float
    version: int  # the session's compute counter after this step


class InteractiveSession:
    """Clicks, boxes and scribbles on one volume, each result written into one segment at once.

    The session owns its structure (a `kprism.target.Target` on the logic's shared encoded
    volume): its prompts, 3D result and undo are its own, whatever other sessions and runs do on
    the same volume. A click segments the slice of the view it was placed in (`axis`) and the
    change travels through the neighbouring slices; only the box of the volume that changed is
    rewritten. The segment is checked for a lock before every write, and a refused prompt changes
    neither the segment nor the session.

    Every step comes in three parts so that the model never runs on Slicer's GUI thread:
    ``prepare*`` (GUI thread: reads MRML, checks, raises InputError), ``PreparedPrompt.compute``
    (worker thread: target and model only, cancellable) and ``finish`` (GUI thread: writes the
    changed box and the provenance). ``add``, ``undo``, ``redo`` and ``propagate`` do all three at once.
    Steps prepared while earlier ones still compute are fine: computes and finishes each run in order.
    With ``start=False`` the volume is encoded and the model loaded by the first step's compute.
    """

    def __init__(self, logic: KPrismLogic, volume_node: Any, segmentation_node: Any, segment_id: Optional[str] = None,
                 name: str = DEFAULT_NAME, modality: Optional[str] = None, axis: int = 0, start: bool = True):
        nodes.check_volume(volume_node)
        if segmentation_node is None:
            raise InputError("No output segmentation: select or create one.")
        nodes.check_same_frame(volume_node, segmentation_node)
        if segment_id is not None and segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
            raise InputError(f"{segmentation_node.GetName()!r} has no segment {segment_id!r}.")
        self.logic, self.volume_node, self.segmentation_node = logic, volume_node, segmentation_node
        self.segment_id, self.name, self.modality = segment_id, name, modality
        self.axis = nodes.volume_slicing_axis(volume_node, axis)  # prompts without a view axis slice along it
        # GUI side: what was written.
        self.prompts: list[dict] = []  # what was done, as recorded in the segment's provenance tag
        # What this session last wrote (or found) in its segment, (k, j, i): read when the structure starts.
        self._mask = np.zeros(tuple(reversed(volume_node.GetImageData().GetDimensions())), np.uint8)
        self._voxels = 0
        self._provenance: dict[str, Any] = {"tool": "KPrismSlicer", "model": logic.model_name(), "mode": "interactive",
                                            "volume": volume_node.GetName()}
        self._state: Optional[tuple] = None  # (key, state) of the volume the session's structure was planned on
        self._fresh = False  # reset(): the next step starts an empty structure
        self._rewrite_whole = False  # a failed write left the segment behind the structure
        # Worker side: the structure and its history (touched only by computes, under `_model_lock`).
        self.encoded: Optional["EncodedImage"] = None
        self.target: Optional["Target"] = None
        self._history: list[tuple[dict, int]] = []  # (record, target steps) per prompt (a cross-axes propagation takes two)
        self._undone: list[tuple[dict, int]] = []
        self._origin: dict[str, Any] = {}
        self._version = 0
        self._model_lock = threading.RLock()
        if start:
            self._run(PreparedPrompt(self, "start", "Start", start=self._plan_start()))

    # ------------------------------------------------------------------------------------- GUI thread: prepare
    def prepare(self, prompt: Any) -> PreparedPrompt:
        """Read and check one prompt (a markups node with several points is several clicks); raises InputError."""
        prompt = Prompt.of(prompt)
        _check_prompt(prompt, self.volume_node)
        nodes.check_editable(self.segmentation_node, self.segment_id)
        start = self._plan_if_needed()
        if prompt.kind == "prior":
            mask = nodes.segment_mask(prompt.node, prompt.segment_id, self.volume_node)
            record = {"type": "prior", "segment": nodes.segment_name(prompt.node, prompt.segment_id)}
            return PreparedPrompt(self, "prior", "Refine", start, records=[record], prior=mask)
        steps, records, _ = _steps([prompt], self.volume_node)  # view axes are mapped by compute (needs the encoded volume)
        label = {"point": "Click", "box": "Box", "scribble": "Scribble"}[prompt.kind]
        return PreparedPrompt(self, "prompt", label, start, steps=steps, records=records)

    def prepare_undo(self) -> PreparedPrompt:
        nodes.check_editable(self.segmentation_node, self.segment_id)
        return PreparedPrompt(self, "undo", "Undo", self._plan_if_needed())

    def prepare_redo(self) -> PreparedPrompt:
        nodes.check_editable(self.segmentation_node, self.segment_id)
        return PreparedPrompt(self, "redo", "Redo", self._plan_if_needed())

    def prepare_propagate(self, start_ras: Optional[Sequence[float]] = None, axis: Optional[int] = None, *,
                          cross_axes: bool = False, min_quality: float = 0.15, min_area_ratio: float = 0.2,
                          stop_when_unchanged: Optional[float] = 0.97) -> PreparedPrompt:
        """See `propagate`; the slice through `start_ras` is found by compute."""
        nodes.check_editable(self.segmentation_node, self.segment_id)
        start_ijk = None if start_ras is None else nodes.world_to_ijk(self.volume_node, start_ras).tolist()
        options = {"start_ijk": start_ijk, "axis": axis, "cross_axes": cross_axes, "min_quality": min_quality,
                   "min_area_ratio": min_area_ratio, "stop_when_unchanged": stop_when_unchanged}
        return PreparedPrompt(self, "propagate", "Propagate", self._plan_if_needed(), options=options)

    def _plan_if_needed(self) -> Optional[_StartPlan]:
        """A (re)start when the session has none yet, the volume changed (its old history is gone) or after reset()."""
        key, state = self.logic.volume_state(self.volume_node, self.modality)
        if self._state == (key, state) and not self._fresh:
            return None
        return self._plan_start()

    def _plan_start(self) -> _StartPlan:
        key, state = self.logic.volume_state(self.volume_node, self.modality)
        encoded = self.logic.cached_encoded(key, state)
        same_volume = self._state == (key, state)
        image = None if encoded is not None or same_volume else nodes.volume_to_image(self.volume_node, self.modality)
        current = self._segment_mask()
        fresh, self._fresh = self._fresh, False
        adopted = None if fresh else self.logic.take_last_run(self.volume_node, self.segmentation_node, self.segment_id)
        tag = None
        if adopted is not None:
            tag = nodes.segment_tag(self.segmentation_node.GetSegmentation().GetSegment(self.segment_id), nodes.PROVENANCE_TAG)
        segment = nodes.segment_name(self.segmentation_node, self.segment_id) if current.any() else None
        self._state = (key, state)
        self._mask, self._voxels = current, int(np.count_nonzero(current))
        return _StartPlan(key, state, image, encoded, current, segment, adopted, tag)

    def _segment_mask(self) -> np.ndarray:
        if _has_segment(self.segmentation_node, self.segment_id):
            return nodes.segment_mask(self.segmentation_node, self.segment_id, self.volume_node)
        return np.zeros(tuple(reversed(self.volume_node.GetImageData().GetDimensions())), np.uint8)

    # ------------------------------------------------------------------------------------- worker thread: compute
    def _compute(self, prepared: PreparedPrompt, control: JobControl) -> SessionDelta:
        """Apply a prepared step to the target (never MRML); a failed or cancelled step leaves the target as it was."""
        with self._model_lock:
            control.check()
            if prepared.start is not None:
                try:
                    self._start_structure(prepared.start)
                except BaseException:
                    self._state = None  # the next step tries the start again
                    raise
            committed, changes = self._apply(prepared, control)
            self._version += 1
            return SessionDelta(changes, committed, [record for record, _ in self._history], dict(self._origin),
                                self.target.quality, self._version)

    def _start_structure(self, plan: _StartPlan) -> None:
        """Encode the volume (and load the model) if needed; continue the last run's structure or start from the segment."""
        from kprism.target import Target

        if plan.encoded is not None or plan.image is not None:
            self.encoded = plan.encoded or self.logic.encode(plan.key, plan.state, plan.image, self.axis)
        if plan.adopted is not None and plan.adopted.encoded is self.encoded and np.array_equal(plan.adopted.result().mask, plan.current):
            # The class or reference knowledge of that run stays in the prompts.
            self.target = plan.adopted
            self._origin = {"continues": json.loads(plan.adopted_tag) if plan.adopted_tag else None}
        else:
            self.target = Target(self.encoded, axis=self.axis, name=self.name)
            self._origin = {}
            if plan.segment is not None:
                self.target.set_prior(plan.current)
                self._origin = {"refined": plan.segment}
        self._history.clear()
        self._undone.clear()

    def _apply(self, prepared: PreparedPrompt, control: JobControl) -> tuple[list, list]:
        from kprism.pipeline import apply_step, check_steps

        target, kind = self.target, prepared.kind
        if kind == "start":
            return [], []
        if kind in ("undo", "redo"):
            source, destination = (self._history, self._undone) if kind == "undo" else (self._undone, self._history)
            if not source:
                return [], []
            record, taken = source.pop()
            destination.append((record, taken))
            step = target.undo if kind == "undo" else target.redo
            return [], [delta for delta in (step() for _ in range(taken)) if delta is not None]
        if kind == "prior":
            actions = [(prepared.records[0], lambda: target.set_prior(prepared.prior))]
        elif kind == "propagate":
            actions = [self._propagation(prepared.options, control)]
        else:
            steps, records = self._on_usable_axes(prepared.steps, prepared.records)
            check_steps(steps, self.encoded, self.axis)
            actions = [(record, lambda step=step: apply_step(target, step)) for step, record in zip(steps, records)]
        committed, changes = [], []
        try:
            for record, action in actions:
                control.check()
                before = target.steps
                changes.append(action())  # a failing step leaves the target as it was
                committed.append((record, target.steps - before))
                self._history.append(committed[-1])
        except BaseException:
            self._take_back(committed)
            raise
        self._undone.clear()
        return committed, changes

    def _take_back(self, committed: list) -> None:
        for _, taken in reversed(committed):
            self._history.pop()
            for _ in range(taken):
                self.target.undo()

    def _on_usable_axes(self, steps: list, records: list) -> tuple[list, list]:
        """Each click answered along its view's axis when the volume can be sliced along it (else the session's)."""
        from dataclasses import replace

        mapped_steps, mapped_records = [], []
        for step, record in zip(steps, records):
            if getattr(step, "axis", None) is not None:
                axis = self._usable_axis(step.axis)
                step, record = replace(step, axis=axis), {**record, "axis": axis}
            mapped_steps.append(step)
            mapped_records.append(record)
        return mapped_steps, mapped_records

    def _propagation(self, options: dict, control: JobControl) -> tuple[dict, Callable[[], Any]]:
        """(record, action) of a propagation, reporting progress per slice and stopping on Cancel."""
        from kprism.target import TravelRules

        target = self.target
        last = target.last_slice
        axis = self._usable_axis(options["axis"] if options["axis"] is not None else (last[0] if last else None))
        if options["start_ijk"] is not None:
            start = self.encoded.locate(options["start_ijk"], "ijk", axis).index
        else:
            start = last[1] if last and last[0] == axis else None
        cross_axes = options["cross_axes"]
        record = {"type": "propagate", "from_slice": start, "axis": axis, "cross_axes": cross_axes,
                  **{k: options[k] for k in ("min_quality", "min_area_ratio", "stop_when_unchanged")}}
        share = 0.34 if cross_axes else 1.0  # the two other axes take about as long again each

        def progress(done: int, total: int) -> None:
            control.progress(share * done / max(total, 1), f"Propagating ({done}/{total} slices)")

        if not cross_axes:
            rules = TravelRules(min_quality=options["min_quality"], min_area_ratio=options["min_area_ratio"],
                                agreement=options["stop_when_unchanged"])
            return record, lambda: target.propagate(start, axis, rules=rules, progress=progress)
        from kprism.session import KPrismSession

        def fuse() -> _WholeVolume:
            # KPrismSession takes a device name ("cpu", "cuda"), not the torch.device the encoded volume holds.
            helper = KPrismSession(self.encoded.model, device=self.encoded.device.type, threads=self.encoded.threads)
            helper.attach(self.encoded, axis)
            helper.target = target
            before = target.steps
            try:
                fused = helper.propagate(start, min_quality=options["min_quality"], min_area_ratio=options["min_area_ratio"],
                                         stop_when_unchanged=options["stop_when_unchanged"], cross_axes=True, progress=progress)
                control.check()
            except BaseException:
                while target.steps > before:  # the first pass was already kept: take it back too
                    target.undo()
                raise
            return _WholeVolume(tuple(slice(0, n) for n in fused.probability.shape), fused.probability, axis, ())

        return record, fuse

    def _usable_axis(self, axis: Optional[int]) -> int:
        """The view's axis when the volume can be sliced along it, else the session's (a picture has one slice)."""
        if axis is None or axis == self.axis:
            return self.axis
        try:
            self.encoded.check_axis(axis)
        except ValueError:  # slices too thin along that axis (a single-slice picture, a few thick slices)
            return self.axis
        return axis

    # ------------------------------------------------------------------------------------- GUI thread: finish
    def finish(self, prepared: PreparedPrompt, delta: SessionDelta) -> Optional[PromptResult]:
        """Write what a computed step changed (only its box) and the provenance; None when nothing was undone/redone.

        A write that fails takes the step back from the target when no later step was computed on
        top of it; otherwise the next write brings the whole segment in line with the target.
        """
        self.prompts = list(delta.prompts)
        for key in ("refined", "continues"):
            self._provenance.pop(key, None)
        self._provenance.update(delta.origin)
        if prepared.kind in ("undo", "redo", "start") and not delta.changes:
            return None
        result = None
        try:
            nodes.check_editable(self.segmentation_node, self.segment_id)  # it may have been locked meanwhile
            for change in delta.changes or [None]:
                result = self._write(change, delta.quality)
        except BaseException:
            self._after_failed_write(delta)
            raise
        return result

    def _after_failed_write(self, delta: SessionDelta) -> None:
        if delta.committed and self._model_lock.acquire(blocking=False):
            try:
                if self._version == delta.version:  # nothing was computed after it: take it back exactly
                    self._take_back(delta.committed)
                    self.prompts = [record for record, _ in self._history]
                    return
            finally:
                self._model_lock.release()
        self._rewrite_whole = bool(delta.changes)

    # ------------------------------------------------------------------------------------- all three at once
    def _run(self, prepared: PreparedPrompt) -> Optional[PromptResult]:
        return self.finish(prepared, prepared.compute())

    def add_click(self, ras: Sequence[float], positive: bool = True, axis: Optional[int] = None) -> PromptResult:
        """A click at a world RAS point; `axis`: the canonical axis of the view it was placed in (see `nodes.view_axis`)."""
        return self.add(Prompt.point(ras, positive, axis))

    def add_fiducial(self, markups_node: Any, index: int = -1, positive: Optional[bool] = None,
                     axis: Optional[int] = None) -> PromptResult:
        """Control point `index` (default: the last one) of a markups node as a click, along the view's `axis`."""
        return self.add(self.fiducial_prompt(markups_node, index, positive, axis))

    @staticmethod
    def fiducial_prompt(markups_node: Any, index: int = -1, positive: Optional[bool] = None,
                        axis: Optional[int] = None) -> Prompt:
        """Control point `index` of a markups node as a click prompt (read now, on the GUI thread)."""
        points = nodes.control_points(markups_node)
        if not points:
            raise InputError(f"{markups_node.GetName()!r} has no placed control point.")
        ras, _ = points[index]
        return Prompt.point(ras, nodes.is_positive(markups_node) if positive is None else positive, axis)

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
        return self._run(self.prepare(prompt))  # type: ignore[return-value]

    def propagate(self, start_ras: Optional[Sequence[float]] = None, axis: Optional[int] = None, *,
                  cross_axes: bool = False, min_quality: float = 0.15, min_area_ratio: float = 0.2,
                  stop_when_unchanged: Optional[float] = 0.97) -> PromptResult:
        """Carry the segment on the last prompted slice (or the slice through `start_ras`) to its neighbours.

        `axis` defaults to the last prompt's. A direction stops on low predicted quality
        (`min_quality`), when the structure shrinks below `min_area_ratio` of the previous slice,
        or when a slice comes out as it was (Dice ≥ `stop_when_unchanged`; None: never).
        `cross_axes=True` propagates again along the two other axes and averages the three.
        """
        return self._run(self.prepare_propagate(start_ras, axis, cross_axes=cross_axes, min_quality=min_quality,
                                                min_area_ratio=min_area_ratio, stop_when_unchanged=stop_when_unchanged))  # type: ignore[return-value]

    def undo(self) -> Optional[PromptResult]:
        """Take back the last prompt; returns what that changed (None when nothing is left to undo)."""
        return self._run(self.prepare_undo())

    def redo(self) -> Optional[PromptResult]:
        """Put back the last prompt taken back (None when there is none)."""
        return self._run(self.prepare_redo())

    def reset(self) -> None:
        """Forget every prompt; the next one starts a new segment."""
        self.segment_id = None
        self.prompts = []
        self._mask = np.zeros_like(self._mask)
        self._voxels = 0
        self._fresh = True
        for key in ("refined", "continues"):
            self._provenance.pop(key, None)

    # ------------------------------------------------------------------------------------- writing
    def _write(self, delta: Any, quality: float) -> PromptResult:
        """Rewrite only the box where the segment's voxels changed (and the provenance tag)."""
        if delta is None:  # a step that changed nothing on the target
            empty = tuple(slice(0, 0) for _ in self._mask.shape)
            delta = _WholeVolume(empty, np.zeros((0,) * self._mask.ndim, np.float32), self.axis, ())
        if self._rewrite_whole or (self.segment_id is not None and not _has_segment(self.segmentation_node, self.segment_id)):
            # The segment was deleted meanwhile (or a write failed): it comes back whole.
            with self._model_lock:
                whole = self.target.result()
            delta = _WholeVolume(tuple(slice(0, n) for n in self._mask.shape), whole.probability, delta.axis, delta.slices)
            if not _has_segment(self.segmentation_node, self.segment_id):
                self._mask[...], self._voxels = 0, 0
            self._rewrite_whole = False
        new = delta.probability >= 0.5
        old = self._mask[delta.region]
        changed = new != old
        provenance = {**self._provenance, "prompts": list(self.prompts), "quality": _finite(quality)}
        tags = {nodes.PROVENANCE_TAG: provenance}
        creating = not _has_segment(self.segmentation_node, self.segment_id)
        name, color = (self._new_segment_name(), new_segment_color(self.segmentation_node)) if creating else (self.name, None)
        region: tuple[slice, ...] = tuple(slice(0, 0) for _ in self._mask.shape)
        if changed.any():
            box = _bounding_box(changed)
            region = tuple(slice(outer.start + inner.start, outer.start + inner.stop)
                           for outer, inner in zip(delta.region, box))
            self.segment_id = nodes.write_segment_region(self.segmentation_node, self.volume_node, region, new[box],
                                                         self.segment_id, name, color, tags)
        elif creating:  # nothing inside yet (a first negative click): the segment still appears
            corner = tuple(slice(0, 1) for _ in self._mask.shape)
            self.segment_id = nodes.write_segment_region(self.segmentation_node, self.volume_node, corner,
                                                         self._mask[corner], self.segment_id, name, color, tags)
        else:
            nodes.set_tags(self.segmentation_node, self.segment_id, tags)
        self._voxels += int(np.count_nonzero(new)) - int(np.count_nonzero(old))
        self._mask[delta.region] = new
        return PromptResult(self.segment_id, self._voxels, quality, region, delta.axis, delta.slices)

    def _new_segment_name(self) -> str:
        """The session's name, or the next free "KPrism N" when it was left at the default."""
        return self.name if self.name != DEFAULT_NAME else next_segment_name(self.segmentation_node)


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
        "'Install dependencies'; elsewhere `pip install ./KPrismCore` from a checkout."
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
            axis = None if prompt.axis is None else axis_of(prompt.axis)
            steps.append(BoxPrompt(low.tolist(), high.tolist(), "ijk", axis, where="The box"))
            records.append({"type": "box", "ras_min": np.round(nodes.volume_ras(volume_node, low), 3).tolist(),
                            "ras_max": np.round(nodes.volume_ras(volume_node, high), 3).tolist(),
                            **({} if axis is None else {"axis": axis})})
        elif prompt.kind == "scribble":
            axis = None if prompt.axis is None else axis_of(prompt.axis)
            if prompt.mask is not None:  # a stroke painted in a view
                name, mask = "stroke", prompt.mask
            else:
                name = nodes.segment_name(prompt.node, prompt.segment_id)
                mask = nodes.segment_mask(prompt.node, prompt.segment_id, volume_node)
            steps.append(ScribblePrompt(mask, bool(prompt.positive), axis, where=f"The scribble {name!r}"))
            records.append({"type": "scribble", "segment": name, "positive": bool(prompt.positive),
                            **({} if axis is None else {"axis": axis})})
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
            raise SegmentationCancelled()

    def stage(self, start: float, end: float, message: str) -> Callable[[int, int], None]:
        return lambda done, total: self(start + (end - start) * done / max(total, 1), f"{message} ({done}/{total} slices)")


def check_point(volume_node: Any, ras: Sequence[float], label: str = "click") -> None:
    """Refuse, in one line, a point off the volume (the panel's points and the effect's clicks alike)."""
    ijk = nodes.world_to_ijk(volume_node, ras)
    if not nodes.index_inside(volume_node, ijk):
        size = list(volume_node.GetImageData().GetDimensions())
        raise InputError(
            f"The {label!r} at RAS {np.round(np.asarray(ras, float), 2).tolist()} is outside the volume "
            f"{volume_node.GetName()!r} (voxel {np.round(ijk, 1).tolist()}, size {size}). Place it on the volume."
        )


def _check_prompt(prompt: Prompt, volume_node: Any) -> None:
    """Refuse a prompt before any work: points outside the volume, empty boxes or scribbles."""
    if prompt.kind == "point":
        points = [(prompt.ras, "point")] if prompt.node is None else nodes.control_points(prompt.node)
        if not points:
            raise InputError(f"{prompt.node.GetName()!r} has no placed control point.")
        for ras, label in points:
            check_point(volume_node, ras, label)
    elif prompt.kind == "box":
        _box_indices(prompt, volume_node)
    elif prompt.kind == "scribble" and prompt.mask is not None:
        shape = tuple(reversed(volume_node.GetImageData().GetDimensions()))
        if prompt.mask.shape != shape or not prompt.mask.any():
            raise InputError(f"The stroke is empty on the volume {volume_node.GetName()!r} (mask {prompt.mask.shape}, volume {shape}).")
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
