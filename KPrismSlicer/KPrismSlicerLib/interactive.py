"""Interactive sessions: clicks, boxes and scribbles on one volume, each result written into one segment.

Each session owns its structure (a `kprism.target.Target` on the logic's shared encoded volume). A step is
split for Slicer's threads: `prepare` (GUI thread: reads the prompt from MRML), `compute` (the model worker:
kprism only, never MRML), `finish` (GUI thread: writes only the box of the segment that changed).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import numpy as np

from . import nodes
from .logic import DEFAULT_NAME, finite_or_none
from .names import new_segment_color, next_segment_name
from .nodes import InputError
from .prompts import Prompt, PromptResult, check_prompt, prompt_steps
from .worker import JobControl

if TYPE_CHECKING:
    from kprism.encoded_image import EncodedImage
    from kprism.target import Target

    from .logic import KPrismLogic


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
        if segment_id is not None and not nodes.has_segment(segmentation_node, segment_id):
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
        check_prompt(prompt, self.volume_node)
        nodes.check_editable(self.segmentation_node, self.segment_id)
        start = self._plan_if_needed()
        if prompt.kind == "prior":
            mask = nodes.segment_mask(prompt.node, prompt.segment_id, self.volume_node)
            record = {"type": "prior", "segment": nodes.segment_name(prompt.node, prompt.segment_id)}
            return PreparedPrompt(self, "prior", "Refine", start, records=[record], prior=mask)
        steps, records, _ = prompt_steps([prompt], self.volume_node)  # view axes are mapped by compute (needs the encoded volume)
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
        volume = self.logic.volume_state(self.volume_node, self.modality)
        if self._state == volume and not self._fresh:
            return None
        return self._plan_start(volume)

    def _plan_start(self, volume: Optional[tuple] = None) -> _StartPlan:
        """`volume`: the (key, state) the caller just read, else read here."""
        key, state = volume or self.logic.volume_state(self.volume_node, self.modality)
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
        if nodes.has_segment(self.segmentation_node, self.segment_id):
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
        if self._rewrite_whole or (self.segment_id is not None and not nodes.has_segment(self.segmentation_node, self.segment_id)):
            # The segment was deleted meanwhile (or a write failed): it comes back whole.
            with self._model_lock:
                whole = self.target.result()
            delta = _WholeVolume(tuple(slice(0, n) for n in self._mask.shape), whole.probability, delta.axis, delta.slices)
            if not nodes.has_segment(self.segmentation_node, self.segment_id):
                self._mask[...], self._voxels = 0, 0
            self._rewrite_whole = False
        new = delta.probability >= 0.5
        old = self._mask[delta.region]
        changed = new != old
        provenance = {**self._provenance, "prompts": list(self.prompts), "quality": finite_or_none(quality)}
        tags = {nodes.PROVENANCE_TAG: provenance}
        creating = not nodes.has_segment(self.segmentation_node, self.segment_id)
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



def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """The smallest box holding every true voxel of a non-empty mask."""
    box = []
    for axis in range(mask.ndim):
        along = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(along[0]), int(along[-1]) + 1))
    return tuple(box)
