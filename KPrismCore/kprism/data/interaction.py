"""Simulated user interactions (clicks, boxes, scribbles) and the metrics that score them.

Training and evaluation both import this module, so a model is evaluated with exactly the clicks
it was trained with. `click_loop` is the one simulated user: evaluation (2D and 3D), the demo and
the benchmarks all click through it, each with its own segmenter (`kprism.evaluate.clickers`,
GrowCut). Masks are binary numpy arrays, 2D ``(rows, columns)`` or 3D ``(k, j, i)``; points are
index tuples in the same array order.

Distances are in voxels (not millimetres). Distances to the boundary of a region count the image
border as boundary: the distance transform runs on the region padded by one zero voxel. An error
region cut off by the border then gets its click in the middle of its visible part instead of on
the border, and a region filling the whole image still has a finite transform.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple, Optional, Sequence, Union

import numpy as np
from scipy import ndimage

ClickRuleName = Literal["kprism", "ritm", "cvpr25"]
ScribbleKind = Literal["line", "centerline", "contour"]

_CORE_FRACTION = 1 / 3  # K-Prism: the click goes to the core where the distance exceeds max/3
_RIDGE_FRACTION = 0.3  # centerline ridge points closer to the boundary than this (× max) are spurs
# Minimum of 2·d − d_before − d_after across a ridge pixel (d: distance to the boundary): it is 1–2
# where two boundaries meet, but only about 1/r on the spokes a digital disk would otherwise grow.
_RIDGE_CREASE = 0.75
_CONTOUR_DEPTH = 4.0  # a contour scribble runs at most this many pixels from the object boundary
# A polyline step spans up to this many times the region's inscribed radius, so a stroke in a thin
# region (a vessel, the background band) follows it instead of cutting across.
_LINE_REACH = 6.0
_PARTIAL_FRACTION = (0.3, 1.0)  # a contour or centerline stroke covers this fraction of the curve's extent
_PIXELS_PER_GAP = 20  # a short stroke gets fewer gaps, so it is not shredded
_WARP_SIGMA = 8.0  # smoothness (pixels) of the random displacement field that makes scribbles wobble
# The four line directions through a pixel; a ridge pixel is a maximum across at least one of them.
_RIDGE_FOOTPRINTS = [
    np.array(rows, bool)
    for rows in (
        [[0, 0, 0], [1, 0, 1], [0, 0, 0]],
        [[0, 1, 0], [0, 0, 0], [0, 1, 0]],
        [[1, 0, 0], [0, 0, 0], [0, 0, 1]],
        [[0, 0, 1], [0, 0, 0], [1, 0, 0]],
    )
]


class Click(NamedTuple):
    point: tuple[int, ...]  # array order: (row, column) or (k, j, i)
    positive: bool
    # 3D only: the array axis of the slice the click is placed on (the view a user would click in).
    # None leaves the choice to whoever answers the click.
    axis: Optional[int] = None


ClickRule = Callable[[np.ndarray, np.ndarray], Optional[Click]]  # (prediction, truth) → the next click


# ----------------------------------------------------------------------------------------------- clicks


def click_kprism(pred: np.ndarray, gt: np.ndarray) -> Click | None:
    """K-Prism's corrective click: the centre of the core of the largest connected error.

    The largest false-negative and the largest false-positive component (8-connected in 2D,
    26-connected in 3D) compete; the larger wins (a tie goes to the false negative, i.e. a positive
    click). Inside the winner, the core is where the distance to the component's boundary exceeds
    a third of its maximum; the click is the core voxel nearest to the core's centre of mass, so it
    lies inside the component even when the centre of mass does not (a ring, a crescent).
    """
    error = _largest_error(*_binary_pair(pred, gt))
    if error is None:
        return None
    component, positive = error
    return Click(_core_centre(component), positive)


def click_cvpr25(pred: np.ndarray, gt: np.ndarray, axes: Optional[Sequence[int]] = None) -> Click | None:
    """The CVPR 2025 interactive challenge's 3D click, placed in the view that shows the error best.

    The point is K-Prism's (the core centre of the largest 26-connected error component). Its
    `axis` is the array axis (among `axes`, default all three) whose slice through the point cuts
    that component widest: the 8-connected piece of the component on that slice, around the point,
    has the most voxels. A tie goes to the earlier axis. On a 2D mask this is `click_kprism`.
    """
    pred, gt = _binary_pair(pred, gt)
    error = _largest_error(pred, gt)
    if error is None:
        return None
    component, positive = error
    point = _core_centre(component)
    if gt.ndim != 3:
        return Click(point, positive)
    candidates = list(range(3) if axes is None else axes)
    if not candidates or any(a not in (0, 1, 2) for a in candidates):
        raise ValueError(f"axes must name some of the array axes 0, 1, 2; got {list(candidates)}.")
    areas = [_cross_section(component, point, a) for a in candidates]
    return Click(point, positive, candidates[int(np.argmax(areas))])


def _largest_error(pred: np.ndarray, gt: np.ndarray) -> Optional[tuple[np.ndarray, bool]]:
    """The larger of the largest false-negative and false-positive components (tie: the false
    negative), with True when it is a false negative; None when the prediction is right."""
    fn, fn_size = _largest_component(gt & ~pred)
    fp, fp_size = _largest_component(pred & ~gt)
    if fn_size == 0 and fp_size == 0:
        return None
    positive = fn_size >= fp_size
    return (fn if positive else fp), positive


def _cross_section(component: np.ndarray, point: tuple[int, ...], axis: int) -> int:
    """Voxels of the 8-connected piece of `component`, on its slice through `point` along `axis`, holding the point."""
    plane = np.take(component, point[axis], axis=axis)
    pieces, _ = ndimage.label(plane, structure=np.ones((3, 3), bool))
    piece = pieces[tuple(p for a, p in enumerate(point) if a != axis)]
    return int(np.count_nonzero(pieces == piece)) if piece else 0


def click_ritm(pred: np.ndarray, gt: np.ndarray) -> Click | None:
    """RITM's corrective click: the error voxel farthest from any boundary.

    The whole false-negative and false-positive regions (not components) are compared by their
    largest distance to a boundary; the false negative wins only when strictly farther, as in
    RITM's evaluation code. The click is the first voxel (C order) at that largest distance.
    """
    pred, gt = _binary_pair(pred, gt)
    if np.array_equal(pred, gt):
        return None
    fn_depth, fn_point = _deepest(gt & ~pred)
    fp_depth, fp_point = _deepest(pred & ~gt)
    positive = fn_depth > fp_depth
    return Click(fn_point if positive else fp_point, positive)


def click_random_error(pred: np.ndarray, gt: np.ndarray, rng: np.random.Generator) -> Click | None:
    """A uniformly random voxel of the larger error region (a tie goes to the false negative).

    Training mixes these with centred clicks so the model also copes with careless users.
    """
    pred, gt = _binary_pair(pred, gt)
    fn, fp = gt & ~pred, pred & ~gt
    positive = np.count_nonzero(fn) >= np.count_nonzero(fp)
    candidates = np.flatnonzero(fn if positive else fp)
    if candidates.size == 0:
        return None
    return Click(tuple(int(i) for i in np.unravel_index(rng.choice(candidates), gt.shape)), bool(positive))


def first_click(gt: np.ndarray) -> Click | None:
    """The first click on an object, with nothing predicted yet."""
    gt = np.asarray(gt, bool)
    return click_kprism(np.zeros_like(gt), gt)


CLICK_RULES: dict[str, ClickRule] = {"kprism": click_kprism, "ritm": click_ritm, "cvpr25": click_cvpr25}

Segmenter = Callable[[Click], np.ndarray]  # answers one more click with its whole new binary prediction


@dataclass
class ClickCurve:
    """What `click_loop` measured: Dice before the first click and after each click."""

    start_dice: float  # of the prediction the clicks started from (empty, a box, a semantic result…)
    dice: list[float]  # after click 1, 2, …, always `max_clicks` long
    clicks: list[Click]  # the clicks given: fewer than `max_clicks` when the prediction became exact
    prediction: np.ndarray  # the final prediction

    @property
    def with_start(self) -> list[float]:
        """The Dice curve including the start: [start, after click 1, …]."""
        return [self.start_dice, *self.dice]


def click_loop(
    segment: Segmenter,
    truth: np.ndarray,
    rule: Union[ClickRuleName, ClickRule] = "kprism",
    max_clicks: int = 5,
    start: Optional[np.ndarray] = None,
) -> ClickCurve:
    """The one simulated-user loop: click where the prediction is wrong, let `segment` answer, repeat.

    `segment` receives each click (its point in the array order of `truth`) and returns the whole new
    binary prediction, shaped like `truth`; it keeps its own state (a session, a target, GrowCut).
    `rule` is a name of `CLICK_RULES` or a function (prediction, truth) → click or None. The loop
    starts from `start` (default: nothing predicted). When the prediction equals the truth there is
    nothing left to click: the remaining entries repeat the last Dice and `segment` is not called.
    """
    if isinstance(rule, str) and rule not in CLICK_RULES:
        raise ValueError(f"Unknown click rule {rule!r}; choose from {', '.join(CLICK_RULES)}.")
    choose = CLICK_RULES[rule] if isinstance(rule, str) else rule
    truth = np.asarray(truth, bool)
    prediction = np.zeros_like(truth) if start is None else _checked(start, truth, "the start prediction")
    start_dice = dice(prediction, truth)
    curve: list[float] = []
    clicks: list[Click] = []
    for _ in range(max_clicks):
        click = choose(prediction, truth)
        if click is not None:
            clicks.append(click)
            prediction = _checked(segment(click), truth, "segment")
        curve.append(dice(prediction, truth))
    return ClickCurve(start_dice, curve, clicks, prediction)


def _checked(prediction: np.ndarray, truth: np.ndarray, what: str) -> np.ndarray:
    prediction = np.asarray(prediction, bool)
    if prediction.shape != truth.shape:
        raise ValueError(f"{what} gave a prediction of shape {prediction.shape}; the truth has shape {truth.shape}.")
    return prediction


def _binary_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape:
        raise ValueError(f"Prediction shape {pred.shape} differs from ground-truth shape {gt.shape}.")
    return pred, gt


def _largest_component(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """The largest connected component (full connectivity) and its size; the first in scan order on a tie."""
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    components, count = ndimage.label(mask, structure=structure)
    if count == 0:
        return mask, 0
    sizes = np.bincount(components.ravel())[1:]
    largest = int(np.argmax(sizes)) + 1
    return components == largest, int(sizes[largest - 1])


def _deepest(region: np.ndarray) -> tuple[float, tuple[int, ...] | None]:
    """The largest boundary distance in a region and its first voxel in C order; (0, None) if empty."""
    if not region.any():
        return 0.0, None
    box = _bounding_box(region)
    distance = _padded_distance(region[box])
    deepest = np.unravel_index(np.argmax(distance), distance.shape)  # C order in the box is C order overall
    return float(distance[deepest]), tuple(int(v + s.start) for v, s in zip(deepest, box))


def _core_centre(component: np.ndarray) -> tuple[int, ...]:
    box = _bounding_box(component)
    distance = _padded_distance(component[box])
    core = distance > distance.max() * _CORE_FRACTION
    centre = np.asarray(ndimage.center_of_mass(core))
    voxels = np.argwhere(core)
    nearest = voxels[np.argmin(((voxels - centre) ** 2).sum(axis=1))]
    return tuple(int(v + s.start) for v, s in zip(nearest, box))


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    # Distances computed inside the box are exact: the padding supplies the boundary at its edges.
    return ndimage.find_objects(mask.astype(np.uint8))[0]


def _padded_distance(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance to the nearest voxel outside ``mask``, the image border counting as outside."""
    inside = (slice(1, -1),) * mask.ndim
    return ndimage.distance_transform_edt(np.pad(mask, 1))[inside]


# ----------------------------------------------------------------------------------------------- boxes


def box_from_mask(gt: np.ndarray, rng: np.random.Generator | None = None, jitter: float = 0.0) -> np.ndarray:
    """Bounding box of a mask: shape ``(2, ndim)``, row 0 the first and row 1 the last index per axis (inclusive).

    With ``jitter`` > 0 each edge moves by a uniform random amount of up to ``jitter`` × the box's
    extent along that axis (users draw loose or tight boxes); the result stays inside the image.
    """
    gt = np.asarray(gt, bool)
    if not gt.any():
        raise ValueError("Cannot draw a box around an empty mask.")
    voxels = np.argwhere(gt)
    box = np.stack([voxels.min(axis=0), voxels.max(axis=0)])
    if jitter > 0:
        if rng is None:
            raise ValueError("A jittered box needs a random generator (rng).")
        extent = box[1] - box[0] + 1
        shift = rng.uniform(-jitter, jitter, size=box.shape) * extent
        box = np.clip(np.rint(box + shift).astype(np.int64), 0, np.asarray(gt.shape) - 1)
        box = np.sort(box, axis=0)  # a large jitter can move an edge past the opposite one
    return box


# ----------------------------------------------------------------------------------------------- scribbles


def scribble(
    gt: np.ndarray,
    rng: np.random.Generator,
    kind: ScribbleKind = "line",
    positive: bool = True,
    *,
    thickness: int | None = None,
    band: tuple[float, float] = (2.0, 20.0),
    warp: float = 4.0,
    max_gaps: int = 3,
) -> np.ndarray:
    """A simulated scribble on a 2D mask, in the manner of ScribblePrompt (Wong et al. 2024).

    Positive scribbles lie inside ``gt``; negative ones in the background band between ``band[0]``
    and ``band[1]`` pixels from the object, so they sit near it without touching it.
    ``kind``: ``"line"`` a polyline between random points of that region; ``"centerline"`` the
    region's medial ridge (pixels where the distance to its boundary peaks across some direction);
    ``"contour"`` a curve parallel to the object's boundary, a few pixels inside (positive) or
    outside (negative). The curve is then broken by up to ``max_gaps`` gaps, thickened to
    ``thickness`` pixels (random 1–3 when None), wobbled by a smooth random displacement of at most
    ``warp`` pixels, and clipped to its region. Only 2D: volumes are scribbled slice by slice.
    """
    gt = np.asarray(gt, bool)
    if gt.ndim != 2:
        raise ValueError(f"Scribbles are simulated on 2D slices; got a mask of shape {gt.shape}.")
    if not gt.any():
        raise ValueError("A scribble needs a non-empty mask to be drawn inside or around.")
    if band[1] - band[0] < 2:
        raise ValueError(f"The negative band {band} must be at least 2 pixels wide.")
    region = gt if positive else _background_band(gt, band)
    if not region.any():
        raise ValueError("The mask leaves no background within the band around it for a negative scribble.")
    curve = _base_curve(gt, region, rng, kind, positive, band) & region
    if not curve.any():
        raise ValueError(f"The region is too small for a {kind!r} scribble.")
    if kind != "line":
        curve = _partial(curve, rng)
    width = int(rng.integers(1, 4)) if thickness is None else thickness
    drawn = ndimage.binary_dilation(_break(curve, rng, max_gaps), structure=np.ones((width, width), bool))
    warped = _warp(drawn, rng, warp) & region
    # The warp may push a tiny scribble out of its region; the unwarped one is always inside.
    return warped if warped.any() else drawn & region


def _background_band(gt: np.ndarray, band: tuple[float, float]) -> np.ndarray:
    outside = _distance_to_object(gt)
    return (outside > band[0]) & (outside <= band[1])


def _distance_to_object(gt: np.ndarray) -> np.ndarray:
    """Distance of each background pixel to the (non-empty) object; here the image border is not a boundary."""
    return ndimage.distance_transform_edt(~gt)


def _base_curve(
    gt: np.ndarray,
    region: np.ndarray,
    rng: np.random.Generator,
    kind: ScribbleKind,
    positive: bool,
    band: tuple[float, float],
) -> np.ndarray:
    if kind == "line":
        return _polyline(region, rng)
    if kind == "centerline":
        return _ridge(region)
    if kind == "contour":
        return _contour(gt, rng, positive, band)
    raise ValueError(f"Unknown scribble kind {kind!r}; use 'line', 'centerline' or 'contour'.")


def _polyline(region: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """2–4 vertices in the region, each a random step from the last, snapped to the nearest region pixel."""
    reach = _LINE_REACH * float(_padded_distance(region).max())
    _, nearest = ndimage.distance_transform_edt(~region, return_indices=True)
    pixels = np.argwhere(region)
    vertices = [pixels[rng.integers(len(pixels))]]
    for _ in range(int(rng.integers(1, 4))):
        angle = rng.uniform(0, 2 * np.pi)
        step = rng.uniform(0.5, 1.0) * reach * np.array([np.sin(angle), np.cos(angle)])
        target = np.clip(np.rint(vertices[-1] + step).astype(np.int64), 0, np.asarray(region.shape) - 1)
        vertices.append(nearest[:, target[0], target[1]])
    curve = np.zeros_like(region)
    for start, end in zip(vertices[:-1], vertices[1:]):
        steps = int(np.abs(end - start).max()) + 1
        points = np.rint(np.linspace(start, end, steps)).astype(np.int64)
        curve[points[:, 0], points[:, 1]] = True
    return curve


def _ridge(region: np.ndarray) -> np.ndarray:
    """A skeleton-like medial line: pixels where the distance to the boundary peaks across some direction."""
    distance = _padded_distance(region)
    ridge = np.zeros_like(region)
    for footprint in _RIDGE_FOOTPRINTS:
        higher = ndimage.maximum_filter(distance, footprint=footprint, mode="constant")
        crease = 2 * distance - ndimage.correlate(distance, footprint.astype(float), mode="constant")
        ridge |= (distance >= higher) & (crease >= _RIDGE_CREASE)
    ridge &= distance >= _RIDGE_FRACTION * distance.max()
    return _largest_component(ridge)[0]  # one stroke, as a user would draw


def _contour(gt: np.ndarray, rng: np.random.Generator, positive: bool, band: tuple[float, float]) -> np.ndarray:
    """A one-pixel level line of the distance to the object boundary: an eroded or dilated outline."""
    if positive:
        distance = _padded_distance(gt)
        low, high = 1.0, float(np.clip(distance.max() / 2, 1.0, _CONTOUR_DEPTH))
    else:
        distance = _distance_to_object(gt)
        low, high = band[0] + 1, min(band[0] + _CONTOUR_DEPTH, band[1] - 1)
    level = rng.uniform(low, high)
    return (distance >= level) & (distance < level + 1)


def _partial(curve: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The part of a curve within a random radius of one of its pixels: users rarely trace a whole outline."""
    pixels = np.argwhere(curve)
    extent = float((pixels.max(axis=0) - pixels.min(axis=0)).max()) + 1
    centre = pixels[rng.integers(len(pixels))]
    kept = pixels[np.hypot(*(pixels - centre).T) <= rng.uniform(*_PARTIAL_FRACTION) * extent]
    partial = np.zeros_like(curve)
    partial[tuple(kept.T)] = True
    return partial


def _break(curve: np.ndarray, rng: np.random.Generator, max_gaps: int) -> np.ndarray:
    """Cut a few gaps into the curve, as a user lifts the pen; never erases it entirely."""
    pixels = np.argwhere(curve)
    gaps = min(int(rng.integers(0, max_gaps + 1)), len(pixels) // _PIXELS_PER_GAP)
    if gaps == 0:
        return curve
    cuts = np.ones_like(curve)
    cuts[tuple(pixels[rng.choice(len(pixels), size=gaps, replace=False)].T)] = False
    broken = curve & (ndimage.distance_transform_edt(cuts) > rng.uniform(1.5, 4.0))
    return broken if broken.any() else curve


def _warp(mask: np.ndarray, rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """Resample through a smooth random displacement field of at most ``amplitude`` pixels."""
    field = np.stack([ndimage.gaussian_filter(rng.standard_normal(mask.shape), _WARP_SIGMA) for _ in range(mask.ndim)])
    field *= amplitude / max(float(np.abs(field).max()), 1e-12)
    coordinates = np.indices(mask.shape, dtype=np.float64) + field
    return ndimage.map_coordinates(mask.astype(np.uint8), coordinates, order=0, mode="constant").astype(bool)


# ----------------------------------------------------------------------------------------------- metrics


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice overlap of two binary masks; two empty masks agree perfectly (1.0)."""
    pred, gt = _binary_pair(pred, gt)
    total = np.count_nonzero(pred) + np.count_nonzero(gt)
    if total == 0:
        return 1.0
    return 2.0 * np.count_nonzero(pred & gt) / total


def noc(dices: list[float], threshold: float, cap: int = 20) -> int:
    """Number of clicks: the first 1-based click count whose Dice reaches ``threshold``; ``cap`` if none does."""
    for count, value in enumerate(dices[:cap], start=1):
        if value >= threshold:
            return count
    return cap
