"""KPrism segmentation on MRML nodes: the model, the encoded volumes and the blocking runs.

Plain Python over MRML (no Qt), importable before torch and kprism are installed: both are
imported on first use. This module only maps nodes to arrays and back: a blocking run becomes a
`kprism.pipeline.SegmentationRequest` run by `kprism.pipeline.run` (the path the command line
takes too). Interactive sessions live in `interactive.py`, prompts on MRML nodes in `prompts.py`.

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
from .prompts import Prompt, check_prompt, prompt_steps
from .worker import JobCancelled

if TYPE_CHECKING:
    from kprism.encoded_image import EncodedImage
    from kprism.target import Target

    from .interactive import InteractiveSession

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
        known = known_models().get(self.model_name()) if self._session is None else None
        return known if known is not None else list(self.session.catalog.names)

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
            check_prompt(prompt, volume_node)
        ref_data = [_reference(volume, segmentation, sid) for volume, segmentation, sid in references]
        steps, recorded, prior = prompt_steps(prompts, volume_node)
        if prior is None and mode == "interactive" and nodes.has_segment(segmentation_node, segment_id):
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
        if nodes.has_segment(segmentation_node, segment_id):
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
                tags = {nodes.PROVENANCE_TAG: {**provenance, "quality": finite_or_none(quality)}}
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
        from .interactive import InteractiveSession

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


def _not_installed(error: ImportError) -> KPrismUnavailable:
    return KPrismUnavailable(
        f"KPrism is not installed in this Python ({error}). In Slicer, open the KPrism module and press "
        "'Install dependencies'; elsewhere `pip install ./KPrismCore` from a checkout."
    )


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


def _reference(volume_node: Any, segmentation_node: Any, segment_id: str):
    """A checked in-context reference → (ImageData, mask, description)."""
    nodes.check_volume(volume_node, "reference volume")
    if segmentation_node is None or not nodes.segment_ids(segmentation_node):
        raise InputError("The reference segmentation has no segments: mark the structure to find on the reference volume.")
    nodes.check_same_frame(volume_node, segmentation_node)
    if not nodes.has_segment(segmentation_node, segment_id):
        raise InputError(f"The reference segmentation {segmentation_node.GetName()!r} has no segment {segment_id!r}.")
    mask = nodes.segment_mask(segmentation_node, segment_id, volume_node)
    name = nodes.segment_name(segmentation_node, segment_id)
    if not mask.any():
        raise InputError(f"The reference segment {name!r} is empty on the reference volume {volume_node.GetName()!r}.")
    info = {"volume": volume_node.GetName(), "segment": name, "color": nodes.segment_color(segmentation_node, segment_id)}
    return nodes.volume_to_image(volume_node), mask, info


def finite_or_none(value: float) -> Optional[float]:
    """A quality for a provenance tag: rounded, or None when unknown (JSON has no NaN)."""
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
