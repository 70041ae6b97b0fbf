"""KPrism segmentation on MRML nodes: blocking runs for every mode and interactive sessions.

Plain Python over MRML (no Qt), importable before torch and kprism are installed: both are
imported on first use. Everything goes through :class:`kprism.session.KPrismSession`, the one
inference API of the project.

Guarantees:
- every input is checked before any model work, and a failed, refused or cancelled run leaves the
  segmentation exactly as it was;
- results are written on the input volume's grid, named and coloured from the model's class
  catalog, with a ``KPrism.Provenance`` tag (JSON: mode, model, classes/references/prompts, quality).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import slicer

from . import nodes
from .nodes import InputError

Progress = Callable[[float, str], None]  # (fraction done 0–1, message)
Cancel = Callable[[], bool]  # True asks the running segmentation to stop
MODES = ("semantic", "incontext", "interactive")
_MODE_ALIASES = {"in-context": "incontext", "in_context": "incontext", "context": "incontext"}
DEFAULT_NAME = "KPrism"


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
    - ``prior``: an existing segment to refine.
    """

    kind: str
    node: Any = None
    segment_id: Optional[str] = None
    positive: Optional[bool] = True
    ras: Optional[Sequence[float]] = None
    ras_max: Optional[Sequence[float]] = None

    @classmethod
    def point(cls, ras: Sequence[float], positive: bool = True) -> "Prompt":
        return cls("point", ras=tuple(float(v) for v in ras), positive=positive)

    @classmethod
    def points(cls, markups_node: Any, positive: Optional[bool] = None) -> "Prompt":
        return cls("point", node=markups_node, positive=positive)

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


class KPrismLogic:
    """Holds the model (loaded on first use) and runs it on MRML nodes.

    Args:
        model: model name or .safetensors path; None for the bundled default.
        device: "auto", "cpu", "cuda" or "mps".
        threads: CPU threads (default: kprism's, two at most).
    """

    def __init__(self, model: Optional[str] = None, device: str = "auto", threads: Optional[int] = None):
        self.model, self.device, self.threads = model or None, device or "auto", threads
        self._session = None
        self._bound: Optional[tuple] = None  # (volume ID, image MTime, modality, axis) the session holds
        self._binding = 0  # increases whenever the session gets another image
        self._last_target: Optional[tuple] = None  # (volume ID, segmentation ID, segment ID, binding)
        self._owner: Optional["InteractiveSession"] = None  # whose target the session holds (None: a blocking run)

    # ------------------------------------------------------------------------------------- model
    def configure(self, model: Optional[str] = None, device: str = "auto", threads: Optional[int] = None) -> None:
        """Change model or device; the model is reloaded on next use only if something changed."""
        if (model or None, device or "auto", threads) != (self.model, self.device, self.threads):
            self.model, self.device, self.threads = model or None, device or "auto", threads
            self._session, self._bound, self._last_target, self._owner = None, None, None, None

    @property
    def session(self):
        """The KPrismSession (loads torch, kprism and the weights on first use)."""
        if self._session is None:
            try:
                from kprism.session import KPrismSession
            except ImportError as error:
                raise KPrismUnavailable(
                    f"KPrism is not installed in this Python ({error}). In Slicer, open the KPrism module and press "
                    "'Install dependencies'; elsewhere `pip install kprism`."
                ) from error
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

    # ------------------------------------------------------------------------------------- binding
    def bind(self, volume_node: Any, modality: Optional[str] = None, axis: int = 0):
        """The session with `volume_node` as its image (re-set only when the volume changed)."""
        nodes.check_volume(volume_node)
        key = (volume_node.GetID(), volume_node.GetImageData().GetMTime(), volume_node.GetMTime(), modality, axis)
        session = self.session
        if self._bound != key:
            image = nodes.volume_to_image(volume_node, modality)
            session.set_image(image, axis=nodes.slicing_axis(image, axis))
            self._bound, self._binding = key, self._binding + 1
        return session

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
        mode = _MODE_ALIASES.get(str(mode).lower(), str(mode).lower())
        if mode not in MODES:
            raise InputError(f"Unknown mode {mode!r}; use one of {', '.join(MODES)}.")
        report = _Reporter(progress, cancel)
        nodes.check_volume(volume_node)
        if segmentation_node is None:
            raise InputError("No output segmentation: select or create one.")
        nodes.check_same_frame(volume_node, segmentation_node)
        prompts = [Prompt.of(p) for p in (prompts or [])]
        classes = list(dict.fromkeys(c.strip() for c in (classes or []) if c and c.strip()))
        if mode == "interactive" and segment_id is None:  # refining a segment of this segmentation targets it
            segment_id = next((p.segment_id for p in prompts if p.kind == "prior" and p.node is segmentation_node), None)
        references = list(references or [])
        if mode == "semantic" and not classes:
            raise InputError("Semantic mode needs at least one class name.")
        if mode == "incontext" and not references:
            raise InputError("In-context mode needs a reference: a volume and a segment of the structure to find.")
        if mode == "interactive" and not prompts and segment_id is None:
            raise InputError("Interactive mode needs prompts: points, a box, a scribble or a segment to refine.")
        if prompts and len(classes) > 1:
            raise InputError("Prompts refine one structure: give a single class with them.")
        for prompt in prompts:
            _check_prompt(prompt, volume_node)
        ref_data = [_reference(volume, segmentation, sid) for volume, segmentation, sid in references]

        report(0.0, "Loading the model")
        session = self.session
        if mode == "semantic":
            for class_name in classes:
                session.catalog.index(class_name)  # unknown names fail here, listing the known ones
        targets = self._targets(segmentation_node, mode, classes, ref_data, segment_id, name)
        for target_id, _, _ in targets:
            nodes.check_editable(segmentation_node, target_id)

        report(0.02, "Reading the volume")
        session = self.bind(volume_node, modality, axis)
        _check_clicks_per_slice(session, prompts, volume_node)
        self._owner, self._last_target = None, None  # this run takes over the session's target
        provenance: dict[str, Any] = {"tool": "KPrismSlicer", "model": self.model_name(), "mode": mode,
                                      "volume": volume_node.GetName(), "modality": session.modality_choice.modality}
        report(0.04, f"Modality: {session.modality_choice}")
        encode = report.stage(0.05, 0.95, "Segmenting")
        labelmap = None
        if mode == "semantic" and len(classes) > 1:
            # Several classes: one label map (the one-pass class head when the model has it), so memory
            # does not grow with the class count and overlapping classes resolve to the most probable.
            labelmap = session.segment_semantic_labels(classes, progress=encode)
            results = {c: labelmap for c in classes}
            provenance["classes"] = classes
        elif mode == "semantic":
            results = session.segment_semantic(classes, progress=encode)
            provenance["classes"] = classes
        elif mode == "incontext":
            from kprism.session import Reference

            results = {"target": session.segment_in_context([Reference(image, mask) for image, mask, _ in ref_data],
                                                            progress=encode)}
            provenance["references"] = [info for _, _, info in ref_data]
        else:
            session.reset()
            results = {"target": None}
            if segment_id is not None and segmentation_node.GetSegmentation().GetSegment(segment_id) is not None:
                prior = nodes.segment_mask(segmentation_node, segment_id, volume_node)
                if prior.any():
                    results["target"] = session.set_prior_mask(prior)
                    provenance["refined"] = nodes.segment_name(segmentation_node, segment_id)
        if prompts:
            recorded = []
            for prompt in prompts:
                report.check()
                results = {key: _apply(session, prompt, volume_node, recorded) or value for key, value in results.items()}
            provenance["prompts"] = recorded
        if any(result is None for result in results.values()):
            raise InputError("Nothing to segment: the prompts gave no result.")

        report(0.97, "Writing the segmentation")
        report.check()
        if labelmap is not None:
            masks = [(labelmap.labels == n + 1).astype(np.uint8) for n in range(len(classes))]
            qualities = labelmap.quality
        else:
            masks, qualities = [r.mask for r in results.values()], [r.quality for r in results.values()]
        written = self._write(segmentation_node, volume_node, targets, masks, qualities, provenance)
        single = len(written) == 1
        self._last_target = (volume_node.GetID(), segmentation_node.GetID(), next(iter(written.values())), self._binding) if single else None
        report(1.0, "Done")
        return written

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
        if segment_id is not None and segmentation_node.GetSegmentation().GetSegment(segment_id) is not None:
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

    # ------------------------------------------------------------------------------------- interactive
    def interactive(
        self, volume_node: Any, segmentation_node: Any, segment_id: Optional[str] = None, name: str = DEFAULT_NAME,
        modality: Optional[str] = None, axis: int = 0,
    ) -> "InteractiveSession":
        """A click-by-click session writing into `segment_id` (refined if non-empty) or a new segment."""
        return InteractiveSession(self, volume_node, segmentation_node, segment_id, name, modality, axis)


class InteractiveSession:
    """Clicks, boxes and scribbles on one volume, each result written into one segment at once.

    Undo takes back the last prompt. The segment is checked for a lock before every write, and a
    refused prompt changes neither the segment nor the session.
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
        self.segment_id, self.name, self.modality, self.axis = segment_id, name, modality, axis
        self.prompts: list[dict] = []
        self._provenance: dict[str, Any] = {"tool": "KPrismSlicer", "model": logic.model_name(), "mode": "interactive",
                                            "volume": volume_node.GetName()}
        self._start()

    def _start(self) -> None:
        """Take over the logic's session: continue the last blocking run's result, or start from the segment."""
        logic, session = self.logic, self.logic.bind(self.volume_node, self.modality, self.axis)
        target = (self.volume_node.GetID(), self.segmentation_node.GetID(), self.segment_id, logic._binding)
        continues = logic._owner is None and self.segment_id is not None and logic._last_target == target
        self._binding, logic._owner, logic._last_target = logic._binding, self, None
        if continues and session.result() is not None:
            # The class or reference knowledge of that run stays in the prompts.
            previous = nodes.segment_tag(self.segmentation_node.GetSegmentation().GetSegment(self.segment_id), nodes.PROVENANCE_TAG)
            self._provenance["continues"] = json.loads(previous) if previous else None
            return
        session.reset()
        if self.segment_id is not None:
            prior = nodes.segment_mask(self.segmentation_node, self.segment_id, self.volume_node)
            if prior.any():
                session.set_prior_mask(prior)
                self._provenance["refined"] = nodes.segment_name(self.segmentation_node, self.segment_id)

    @property
    def session(self):
        """The logic's session, holding this session's target (restarted from the segment if another run took it)."""
        logic = self.logic
        if logic._owner is not self or logic._binding != self._binding or logic._bound is None:
            self._start()
        return logic.session

    # ------------------------------------------------------------------------------------- prompts
    def add_click(self, ras: Sequence[float], positive: bool = True):
        return self.add(Prompt.point(ras, positive))

    def add_fiducial(self, markups_node: Any, index: int = -1, positive: Optional[bool] = None):
        """Control point `index` (default: the last one) of a markups node as a click."""
        points = nodes.control_points(markups_node)
        if not points:
            raise InputError(f"{markups_node.GetName()!r} has no placed control point.")
        ras, _ = points[index]
        return self.add(Prompt.point(ras, nodes.is_positive(markups_node) if positive is None else positive))

    def add_box(self, roi_node: Any):
        return self.add(Prompt.box(roi_node))

    def add_scribble(self, segmentation_node: Any, segment_id: str, positive: bool = True):
        return self.add(Prompt.scribble(segmentation_node, segment_id, positive))

    def refine(self, segment_id: str):
        """Start again from the current content of a segment (which becomes the target)."""
        self.segment_id = segment_id
        return self.add(Prompt.prior(self.segmentation_node, segment_id))

    def add(self, prompt: Any):
        """Apply one prompt and write the result; returns the kprism SegmentationResult."""
        prompt = Prompt.of(prompt)
        _check_prompt(prompt, self.volume_node)
        nodes.check_editable(self.segmentation_node, self.segment_id)
        recorded: list[dict] = []
        result = _apply(self.session, prompt, self.volume_node, recorded)
        self.prompts.extend(recorded)
        self._write(result)
        return result

    def propagate(self, start_ras: Optional[Sequence[float]] = None, **options: Any):
        """Carry the segment on the last prompted slice (or the slice through `start_ras`) to its neighbours.

        `options` go to `KPrismSession.propagate` (stopping rules: min_quality, min_area_ratio, ...).
        """
        nodes.check_editable(self.segmentation_node, self.segment_id)
        session = self.session
        start = session.locate(start_ras, "ras")[0] if start_ras is not None else session.last_slice
        result = session.propagate(start, **options)
        self.prompts.append({"type": "propagate", "from_slice": start, **options})
        self._write(result)
        return result

    def undo(self):
        """Take back the last prompt; returns the result after it (None when nothing is left to undo)."""
        if not self.prompts:
            return None
        nodes.check_editable(self.segmentation_node, self.segment_id)
        result = self.session.undo()
        self.prompts.pop()
        self._write(result)
        return result

    def reset(self) -> None:
        """Forget every prompt; the next one starts a new segment."""
        self.session.reset()
        self.prompts.clear()
        self.segment_id = None
        self._provenance.pop("refined", None)
        self._provenance.pop("continues", None)

    def _write(self, result) -> None:
        if result is None:
            return
        provenance = {**self._provenance, "prompts": list(self.prompts), "quality": _finite(result.quality)}
        color = None if self.segment_id else (0.35, 0.85, 0.35)
        self.segment_id = nodes.write_segment(self.segmentation_node, self.volume_node, result.mask, self.segment_id,
                                              self.name, color, {nodes.PROVENANCE_TAG: provenance})


# ----------------------------------------------------------------------------------------------- helpers


class _Reporter:
    """Progress and cancellation: the progress callback also lets the UI process a Cancel click."""

    def __init__(self, progress: Optional[Progress], cancel: Optional[Cancel]):
        self.progress, self.cancel = progress, cancel

    def __call__(self, fraction: float, message: str) -> None:
        if self.progress:
            self.progress(float(fraction), message)
        self.check()

    def check(self) -> None:
        if self.cancel and self.cancel():
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


def _check_clicks_per_slice(session, prompts: Sequence[Prompt], volume_node: Any) -> None:
    """Refuse more clicks on one slice than kprism's limit: each click re-decodes all clicks of its slice."""
    from kprism.prompt_file import MAX_POINTS_PER_SLICE, crowded_slice

    clicks = [ras for p in prompts if p.kind == "point"
              for ras, _ in ([(p.ras, None)] if p.node is None else nodes.control_points(p.node))]
    crowded = crowded_slice(session.locate(nodes.world_to_ijk(volume_node, ras).tolist(), "ijk")[0] for ras in clicks)
    if crowded is not None:
        raise InputError(
            f"{crowded[1]} clicks fall on slice {crowded[0]} of {volume_node.GetName()!r}; at most {MAX_POINTS_PER_SLICE} "
            "clicks per slice are accepted (each click re-decodes every click of its slice). Use fewer, or a box or scribble."
        )


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


def _apply(session, prompt: Prompt, volume_node: Any, recorded: list[dict]):
    """Send one prompt to the session; append what was done (RAS, JSON-ready) to `recorded`."""
    if prompt.kind == "point":
        points = [(prompt.ras, None)] if prompt.node is None else nodes.control_points(prompt.node)
        positive = prompt.positive if prompt.positive is not None or prompt.node is None else nodes.is_positive(prompt.node)
        result = None
        for ras, _ in points:
            ijk = nodes.world_to_ijk(volume_node, ras)
            result = session.add_click(ijk.tolist(), positive=bool(positive), coordinates="ijk")
            recorded.append({"type": "point", "ras": np.round(ras, 3).tolist(), "positive": bool(positive)})
        return result
    if prompt.kind == "box":
        low, high = _box_indices(prompt, volume_node)
        recorded.append({"type": "box", "ras_min": np.round(nodes.volume_ras(volume_node, low), 3).tolist(),
                         "ras_max": np.round(nodes.volume_ras(volume_node, high), 3).tolist()})
        return session.add_box(low.tolist(), high.tolist(), coordinates="ijk")
    mask = nodes.segment_mask(prompt.node, prompt.segment_id, volume_node)
    name = nodes.segment_name(prompt.node, prompt.segment_id)
    if prompt.kind == "scribble":
        recorded.append({"type": "scribble", "segment": name, "positive": bool(prompt.positive)})
        return session.add_scribble(mask, positive=bool(prompt.positive))
    recorded.append({"type": "prior", "segment": name})
    return session.set_prior_mask(mask)


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
