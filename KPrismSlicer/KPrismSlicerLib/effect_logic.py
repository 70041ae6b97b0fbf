"""The KPrism Segment Editor effect without Qt: a gesture in a slice view → a prompt → the selected segment.

The effect's Qt class only turns mouse and key events into calls of :class:`EffectLogic`:
``click(ras, axis, positive)``, ``box(corners, axis)``, ``stroke(points, axis, radius, positive)``,
``undo()``, ``redo()``; ``axis`` is the canonical axis of the view (see `nodes.view_axis`), so a
sagittal click corrects sagittal slices and, through them, the 3D result.

- The prompts go to one `InteractiveSession` per selected segment: an empty segment becomes a new
  structure, a non-empty one is refined with its current mask as the prior.
- Every call returns at once. A refused gesture (off the volume) is reported in one line and
  places nothing. An accepted one places its marker (`effect_markers`) and queues its work; the
  work runs one prompt at a time on the shared model worker (`worker.shared_worker()`), and the
  result is written on the GUI thread when `deliver()` hands it back. Prompts placed while one is
  running wait in order (`pending` counts them).
- Undo takes back the last prompt and its marker; redo puts both back. Dragging a marker runs its
  prompt again from the new place: the prompts after it are taken back, it is re-run, and they
  are replayed on top.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import numpy as np
import slicer

from . import effect_geometry, nodes
from .effect_markers import Marker, Markers
from .logic import KPrismLogic
from .prefetch import SlicePrefetcher
from .prompts import Prompt, PromptResult, check_point
from .nodes import InputError
from .worker import JobCancelled, ModelWorker, shared_worker

if TYPE_CHECKING:
    from .interactive import InteractiveSession

Report = Callable[[str], None]
DEFAULT_BRUSH_MM = 3.0

_shared_logic: Optional[KPrismLogic] = None


def shared_logic() -> KPrismLogic:
    """The application's KPrismLogic: the module panel's once it is open, so the panel and the effect share one
    model, one device choice and one encoded copy of each volume (encoding is the expensive part)."""
    global _shared_logic
    if _shared_logic is None:
        _shared_logic = KPrismLogic()
    return _shared_logic


def set_shared_logic(logic: KPrismLogic) -> None:
    """Make `logic` the one the effect uses from its next gesture on (the module panel calls this at setup)."""
    global _shared_logic
    _shared_logic = logic


@dataclass(eq=False)
class _Entry:
    """One prompt of the effect: what to send, and its marker."""

    kind: str
    prompt: Prompt
    marker: Marker
    radius_mm: float = 0.0


class _SegmentState:
    """The prompts, markers and session of one (volume, segmentation, segment)."""

    def __init__(self, volume_node: Any, segmentation_node: Any, segment_id: str, scene: Any):
        self.volume_node, self.segmentation_node, self.segment_id = volume_node, segmentation_node, segment_id
        self.markers = Markers(scene)
        self.session: Optional["InteractiveSession"] = None
        self.starting = False
        self.failed: Optional[str] = None
        self.applied: list[_Entry] = []  # in the order the session holds them
        self.undone: list[_Entry] = []  # redo puts the last one back
        self.count = 0  # numbers the markers

    def key(self) -> tuple:
        return (self.volume_node, self.segmentation_node, self.segment_id)

    def entry_of(self, marker: Marker) -> Optional[_Entry]:
        return next((e for e in self.applied if e.marker is marker), None)


class EffectLogic:
    """Gestures → prompts → the selected segment, with markers, undo/redo and moved-marker re-runs.

    Args:
        logic: the KPrismLogic to use (default: one shared by every activation of the effect).
        worker: the model worker (default: the application's shared one).
        report: called with a one-line status after every result, refusal or error.
    """

    def __init__(self, logic: Optional[KPrismLogic] = None, worker: Optional[ModelWorker] = None,
                 report: Optional[Report] = None):
        self._logic = logic  # None: whatever `shared_logic()` is at each gesture
        self.worker = worker or shared_worker()
        self.report_callback = report
        self.status = ""
        self.state: Optional[_SegmentState] = None
        self._actions: collections.deque[tuple[str, Callable[[], Any]]] = collections.deque()
        self._running: Optional[str] = None
        self._observed: dict[int, tuple[Any, int]] = {}
        self.prefetcher = SlicePrefetcher(self.worker)  # the slices around the last prompt, in idle time

    @property
    def logic(self) -> KPrismLogic:
        return self._logic if self._logic is not None else shared_logic()

    # ------------------------------------------------------------------------------ binding
    def bind(self, volume_node: Any, segmentation_node: Any, segment_id: Optional[str]) -> None:
        """Work on this segment from now on; another segment than before starts a new prompt history."""
        if volume_node is None:
            raise InputError("Select a source volume in the Segment Editor first.")
        nodes.check_volume(volume_node, "source volume")
        if segmentation_node is None or not segment_id or not nodes.has_segment(segmentation_node, segment_id):
            raise InputError("Select a segment in the Segment Editor first (add one with 'Add').")
        if self.state is not None and self.state.key() == (volume_node, segmentation_node, segment_id):
            return
        self.release()
        self.state = _SegmentState(volume_node, segmentation_node, segment_id, volume_node.GetScene())

    def release(self) -> None:
        """Forget the current segment's prompts and remove their markers (queued work still finishes)."""
        self.prefetcher.stop()
        if self.state is not None:
            self._unobserve_all()
            self.state.markers.clear()
        self.state = None

    @property
    def pending(self) -> int:
        """Gestures and undo/redo steps not finished yet (the running one included)."""
        return len(self._actions) + (self._running is not None)

    @property
    def busy(self) -> bool:
        return self.pending > 0

    # ------------------------------------------------------------------------------ gestures
    def click(self, ras: Sequence[float], axis: Optional[int], positive: bool = True) -> bool:
        """A click at world RAS in a view cutting `axis`: include (positive) or exclude. False: refused."""
        return self._gesture(lambda state: self._click(state, ras, axis, positive))

    def box(self, corners_ras: Sequence[Sequence[float]], axis: int) -> bool:
        """A rectangle dragged in a view cutting `axis` (its 4 world corners in drawing order)."""
        return self._gesture(lambda state: self._box(state, corners_ras, axis))

    def stroke(self, points_ras: Sequence[Sequence[float]], axis: int, radius_mm: float = DEFAULT_BRUSH_MM,
               positive: bool = True) -> bool:
        """A painted stroke (world RAS points) in a view cutting `axis`, applied as a scribble."""
        return self._gesture(lambda state: self._stroke(state, points_ras, axis, radius_mm, positive))

    def undo(self) -> None:
        """Take back the last prompt and its marker (after the queued ones)."""
        state = self._require_state()
        if state is not None:
            self._enqueue("Undo", lambda: self._undo_step(state, replay=False))

    def redo(self) -> None:
        """Put back the last prompt taken back, and its marker."""
        state = self._require_state()
        if state is not None:
            self._enqueue("Redo", lambda: self._redo_step(state))

    def marker_moved(self, node: Any) -> None:
        """A marker on `node` was dragged: run its prompt again from its new place."""
        state = self.state
        if state is None:
            return
        for marker in state.markers.moved(node):
            entry = next((e for e in [*state.applied, *self._queued_entries()] if e.marker is marker), None)
            if entry is None:
                continue
            try:
                entry.prompt = self._prompt_from_marker(state, entry)
            except InputError as error:
                state.markers.restore(marker)
                self._report(str(error))
                continue
            if entry in state.applied:
                self._enqueue("Moving a prompt", lambda entry=entry: self._rerun(state, entry))
            # A queued prompt simply runs from the new place when its turn comes.

    # ------------------------------------------------------------------------------ tests and scripts
    def settle(self, timeout: float = 600.0) -> None:
        """Block until every queued gesture is finished and written (tests, scripts; never from Slicer's GUI)."""
        while self.busy:
            if not self.worker.wait(timeout):
                raise TimeoutError(f"KPrism's effect did not finish within {timeout} s.")
            self.worker.deliver()

    # ------------------------------------------------------------------------------ gesture → entry
    def _gesture(self, make: Callable[[_SegmentState], _Entry]) -> bool:
        state = self._require_state()
        if state is None:
            return False
        try:
            entry = make(state)
        except InputError as error:
            self._report(str(error))
            return False
        self._observe(entry.marker.node)
        self._enqueue(f"KPrism {entry.kind}", self._step(lambda: self._add_step(state, entry, replay=False), entry))
        return True

    def _click(self, state: _SegmentState, ras, axis, positive) -> _Entry:
        check_point(state.volume_node, ras)
        state.count += 1
        marker = state.markers.click(ras, positive, str(state.count))
        return _Entry("click", Prompt.point(ras, positive, axis), marker)

    def _box(self, state: _SegmentState, corners_ras, axis) -> _Entry:
        low, high = effect_geometry.box_corners(state.volume_node, corners_ras, axis)
        across = effect_geometry.index_axis(state.volume_node, axis)
        thickness = float(effect_geometry.voxel_spacing(state.volume_node)[across])
        state.count += 1
        marker = state.markers.box(corners_ras, thickness, str(state.count))
        marker.extra["axis"] = axis
        return _Entry("box", Prompt.box_ras(low, high, axis), marker)

    def _stroke(self, state: _SegmentState, points_ras, axis, radius_mm, positive) -> _Entry:
        mask = effect_geometry.stroke_mask(state.volume_node, points_ras, axis, radius_mm)
        state.count += 1
        marker = state.markers.stroke(points_ras, positive, str(state.count))
        marker.extra["axis"] = axis
        return _Entry("stroke", Prompt.scribble_mask(mask, positive, axis), marker, radius_mm)

    def _prompt_from_marker(self, state: _SegmentState, entry: _Entry) -> Prompt:
        """The entry's prompt from where its marker is now (refused like a new gesture when off the volume)."""
        where = state.markers.position(entry.marker)
        axis = entry.prompt.axis
        if entry.kind == "click":
            check_point(state.volume_node, where)
            return Prompt.point(where, entry.prompt.positive, axis)
        if entry.kind == "box":
            low, high = effect_geometry.box_corners(state.volume_node, where, axis)
            return Prompt.box_ras(low, high, axis)
        mask = effect_geometry.stroke_mask(state.volume_node, where, axis, entry.radius_mm)
        return Prompt.scribble_mask(mask, entry.prompt.positive, axis)

    # ------------------------------------------------------------------------------ the queue
    def _enqueue(self, label: str, step: Callable[[], Any]) -> None:
        self._actions.append((label, step))
        self._pump()

    def _pump(self) -> None:
        """Start queued steps one at a time; a step returns a Job (finishes later) or None (finished now)."""
        while self._running is None and self._actions:
            label, step = self._actions.popleft()
            self._running = label
            try:
                job = step()
            except Exception as error:  # a refusal found when its turn came
                self._report_error(error)
                job = None
            if job is None:
                self._running = None

    def _step_done(self) -> None:
        self._running = None
        self._pump()

    def _queued_entries(self) -> list[_Entry]:
        return [getattr(step, "entry") for _, step in self._actions if hasattr(step, "entry")]

    # ------------------------------------------------------------------------------ steps (GUI thread, in turn)
    def _session(self, state: _SegmentState) -> Optional["InteractiveSession"]:
        """The segment's session, started on first use: the volume is encoded and the model loaded by the
        first prompt's compute, on the worker (an empty segment is a new structure, a non-empty one the prior)."""
        if state.session is None and state.failed is None:
            try:
                name = nodes.segment_name(state.segmentation_node, state.segment_id)
                state.session = self.logic.interactive(state.volume_node, state.segmentation_node, state.segment_id,
                                                       name, start=False)
            except Exception as error:
                state.failed = _one_line(error)
                raise
        return state.session

    def _add_step(self, state: _SegmentState, entry: _Entry, replay: bool) -> Optional[Any]:
        try:
            session = self._session(state)
            if session is None:  # could not start (already reported)
                state.markers.discard(entry.marker)
                return None

            def done(result: Optional[PromptResult]) -> None:
                state.applied.append(entry)
                state.markers.sync(entry.marker)
                if not replay:
                    for dropped in state.undone:  # a new prompt ends what redo could bring back
                        state.markers.discard(dropped.marker)
                    state.undone.clear()
                self._report_result(state, result)
                self._step_done()  # the next gesture's job is queued first, the prefetch behind it
                if result is not None and result.slices and session.encoded is not None:
                    self.prefetcher.around(session.encoded, result.axis, result.slices[0])

            def failed(error: BaseException) -> None:
                state.markers.discard(entry.marker)
                self._report_error(error)
                self._step_done()

            return run_session_step(self.worker, f"KPrism {entry.kind}", session, "add", entry.prompt, done, failed)
        except BaseException:  # refused when its turn came: nothing was changed
            state.markers.discard(entry.marker)
            raise

    def _undo_step(self, state: _SegmentState, replay: bool) -> Optional[Any]:
        if state.session is None or not state.applied:
            if not replay:
                self._report("Nothing to undo.")
            return None

        def done(result: Optional[PromptResult]) -> None:
            entry = state.applied.pop()
            if not replay:  # a replay puts it back at once: its marker stays
                state.markers.hide(entry.marker)
                state.undone.append(entry)
            self._report_result(state, result, "Undone")
            self._step_done()

        return run_session_step(self.worker, "Undo", state.session, "undo", None, done, self._failed_step)

    def _redo_step(self, state: _SegmentState) -> Optional[Any]:
        if state.session is None or not state.undone:
            self._report("Nothing to redo.")
            return None

        def done(result: Optional[PromptResult]) -> None:
            entry = state.undone.pop()
            state.markers.show(entry.marker)
            if state is self.state:
                self._observe(entry.marker.node)
            state.applied.append(entry)
            self._report_result(state, result, "Redone")
            self._step_done()

        return run_session_step(self.worker, "Redo", state.session, "redo", None, done, self._failed_step)

    def _rerun(self, state: _SegmentState, entry: _Entry) -> None:
        """Take back `entry` and the prompts after it, then run it from its marker's new place and replay the rest.

        Planned when its turn comes (prompts queued before the move are applied by then), and put
        at the head of the queue, so gestures placed meanwhile come after the replay.
        """
        if entry not in state.applied:  # undone meanwhile: a redo brings it back from its new place
            return None
        later = state.applied[state.applied.index(entry) + 1:]
        steps = [("Moving a prompt", lambda: self._undo_step(state, replay=True)) for _ in range(len(later) + 1)]
        steps += [(f"KPrism {again.kind}", self._step(lambda again=again: self._add_step(state, again, replay=True), again))
                  for again in [entry, *later]]
        self._actions.extendleft(reversed(steps))
        return None

    @staticmethod
    def _step(call: Callable[[], Any], entry: _Entry) -> Callable[[], Any]:
        call.entry = entry  # type: ignore[attr-defined]  (lets a moved marker find its queued prompt)
        return call

    def _failed_step(self, error: BaseException) -> None:
        self._report_error(error)
        self._step_done()

    # ------------------------------------------------------------------------------ markers moved by the user
    def _observe(self, node: Any) -> None:
        if node is None or id(node) in self._observed:
            return
        tag = node.AddObserver(slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent, lambda caller, event: self.marker_moved(caller))
        self._observed[id(node)] = (node, tag)

    def _unobserve_all(self) -> None:
        for node, tag in self._observed.values():
            node.RemoveObserver(tag)
        self._observed.clear()

    # ------------------------------------------------------------------------------ status
    def _require_state(self) -> Optional[_SegmentState]:
        if self.state is None:
            self._report("Select a source volume and a segment in the Segment Editor first.")
        return self.state

    def _report_result(self, state: _SegmentState, result: Optional[PromptResult], verb: str = "") -> None:
        if result is None:
            self._report(f"{verb}." if verb else "Nothing changed.")
            return
        name = nodes.segment_name(state.segmentation_node, state.segment_id)
        quality = "" if not np.isfinite(result.quality) else f", predicted quality (Dice) {result.quality:.2f}"
        queued = f" ({len(self._actions)} more queued)" if self._actions else ""
        self._report(f"{verb + ': ' if verb else ''}{name}: {result.voxels} voxels{quality}{queued}")

    def _report_error(self, error: BaseException) -> None:
        if isinstance(error, JobCancelled):
            self._report(str(error))
        elif isinstance(error, (InputError, ValueError, RuntimeError)):
            self._report(_one_line(error))
        else:
            logging.error("KPrism effect: %s", error, exc_info=error)
            self._report(f"KPrism failed: {_one_line(error)}")

    def _report(self, message: str) -> None:
        self.status = message
        if self.report_callback is not None:
            self.report_callback(message)


def run_session_step(worker: ModelWorker, label: str, session: "InteractiveSession", operation: str,
                     prompt: Optional[Prompt], on_done: Callable[[Optional[PromptResult]], None],
                     on_error: Callable[[BaseException], None]) -> Any:
    """The one place the effect runs an InteractiveSession step ("add", "undo" or "redo") on the model worker.

    Reading MRML (`prepare*`) and writing it (`finish`) happen on the GUI thread, only `compute` on
    the worker. Returns the Job.
    """
    prepare = {"add": lambda: session.prepare(prompt), "undo": session.prepare_undo, "redo": session.prepare_redo}
    prepared = prepare[operation]()

    def finish(delta: Any) -> None:
        try:
            result = session.finish(prepared, delta)
        except BaseException as error:  # noqa: BLE001 (reported in one line, nothing left half-written)
            on_error(error)
            return
        on_done(result)

    return worker.submit(label, prepared.compute, finish, on_error)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
