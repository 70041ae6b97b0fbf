"""Click, box and scribble simulators and the Dice / NoC metrics, on hand-computed cases."""

import numpy as np
import pytest
from scipy import ndimage

from kprism.data.interaction import (
    Click,
    box_from_mask,
    click_cvpr25,
    click_kprism,
    click_loop,
    click_random_error,
    click_ritm,
    dice,
    first_click,
    noc,
    scribble,
)


def _disk(shape, centre, radius):
    rows, columns = np.indices(shape)
    return (rows - centre[0]) ** 2 + (columns - centre[1]) ** 2 <= radius**2


def _ring(shape=(41, 41), centre=(20, 20), inner=8, outer=14):
    return _disk(shape, centre, outer) & ~_disk(shape, centre, inner)


# ----------------------------------------------------------------------------------------------- K-Prism clicks


def test_kprism_click_on_a_ring_lies_on_the_ring_not_in_its_hole():
    gt = _ring()
    assert not gt[20, 20]  # the centre of mass is in the hole
    click = click_kprism(np.zeros_like(gt), gt)
    assert click.positive
    assert gt[click.point]


def test_kprism_click_on_a_square_is_its_exact_centre():
    gt = np.zeros((32, 40), bool)
    gt[10:15, 20:25] = True  # 5 × 5, centre (12, 22)
    assert click_kprism(np.zeros_like(gt), gt) == Click((12, 22), True)
    assert first_click(gt) == Click((12, 22), True)


def test_kprism_prefers_the_larger_false_positive_with_a_negative_click():
    gt = np.zeros((40, 40), bool)
    gt[2:5, 2:5] = True  # 9 missed pixels
    pred = np.zeros_like(gt)
    pred[20:27, 20:27] = True  # 49 wrongly predicted pixels, centre (23, 23)
    assert click_kprism(pred, gt) == Click((23, 23), False)


def test_kprism_compares_components_not_whole_regions():
    gt = np.zeros((30, 30), bool)
    gt[0:3, 0:3] = gt[0:3, 10:13] = gt[0:3, 20:23] = True  # 27 missed pixels in three pieces of 9
    pred = np.zeros_like(gt)
    pred[20:24, 20:24] = True  # one false positive of 16 pixels
    assert click_kprism(pred, gt).positive is False


def test_kprism_uses_26_connectivity_in_3d():
    gt = np.zeros((5, 5, 5), bool)
    gt[0, 0, 0] = gt[1, 1, 1] = gt[2, 2, 2] = True  # touching only at corners: one 26-connected component of 3
    pred = np.zeros_like(gt)
    pred[4, 4, 3:5] = True  # a face-connected false positive of 2
    assert click_kprism(pred, gt) == Click((1, 1, 1), True)


def test_kprism_uses_8_connectivity_in_2d():
    gt = np.eye(6, dtype=bool)  # a diagonal line: one 8-connected component of 6
    pred = np.zeros_like(gt)
    pred[0, 3:6] = pred[1, 4:6] = True  # a false positive of 5
    click = click_kprism(pred, gt)
    assert click.positive and gt[click.point]


def test_kprism_tie_goes_to_the_false_negative():
    gt = np.zeros((20, 20), bool)
    gt[1:4, 1:4] = True
    pred = np.zeros_like(gt)
    pred[10:13, 10:13] = True
    assert click_kprism(pred, gt) == Click((2, 2), True)


# ----------------------------------------------------------------------------------------------- RITM clicks


def test_ritm_counts_the_image_border_as_boundary():
    gt = np.zeros((20, 20), bool)
    gt[0:5, 0:10] = True  # touches the top and left borders
    # Padded distances peak at 3 on row 2, columns 2..7; the first in C order is (2, 2).
    # Without padding the farthest pixel would be the corner (0, 0).
    assert click_ritm(np.zeros_like(gt), gt) == Click((2, 2), True)


def test_ritm_picks_the_region_farthest_from_its_boundary_and_ties_go_negative():
    gt = np.zeros((30, 30), bool)
    gt[2:9, 2:9] = True  # 7 × 7: distance 4 at its centre (5, 5)
    pred = np.zeros_like(gt)
    pred[20:25, 20:25] = True  # 5 × 5: distance 3
    assert click_ritm(pred, gt) == Click((5, 5), True)
    pred[15:22, 15:22] = True  # now a false positive as deep as the false negative
    assert click_ritm(pred, gt).positive is False


def test_ritm_in_3d_clicks_the_centre_of_a_cube():
    gt = np.zeros((9, 10, 11), bool)
    gt[2:7, 3:8, 4:9] = True
    assert click_ritm(np.zeros_like(gt), gt) == Click((4, 5, 6), True)


@pytest.mark.parametrize("rule", [click_kprism, click_ritm])
def test_no_click_when_the_prediction_is_right(rule):
    gt = _ring()
    assert rule(gt.copy(), gt) is None
    assert rule(np.zeros((8, 8), bool), np.zeros((8, 8), bool)) is None


def test_clicks_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        click_kprism(np.zeros((4, 4)), np.zeros((4, 5)))


# ----------------------------------------------------------------------------------------------- random clicks


def test_random_error_click_lands_in_the_larger_error_and_repeats_with_the_seed():
    gt = _ring()
    pred = np.zeros_like(gt)
    pred[0:3, 0:3] = True
    clicks = [click_random_error(pred, gt, np.random.default_rng(seed)) for seed in range(20)]
    assert all(c.positive and gt[c.point] for c in clicks)
    assert len({c.point for c in clicks}) > 1
    assert click_random_error(pred, gt, np.random.default_rng(3)) == clicks[3]
    assert click_random_error(gt, gt, np.random.default_rng(0)) is None


# ----------------------------------------------------------------------------------------------- boxes


def test_box_is_the_inclusive_bounding_box():
    gt = np.zeros((20, 30), bool)
    gt[3:8, 10:21] = True
    np.testing.assert_array_equal(box_from_mask(gt), [[3, 10], [7, 20]])


def test_jittered_box_stays_inside_the_image_and_ordered():
    gt = np.zeros((16, 16, 16), bool)
    gt[0:4, 10:16, 5:9] = True  # touches two borders
    rng = np.random.default_rng(0)
    for _ in range(200):
        box = box_from_mask(gt, rng, jitter=0.8)
        assert (box >= 0).all() and (box <= 15).all() and (box[0] <= box[1]).all()


def test_box_errors():
    with pytest.raises(ValueError, match="empty"):
        box_from_mask(np.zeros((5, 5), bool))
    with pytest.raises(ValueError, match="rng"):
        box_from_mask(np.ones((5, 5), bool), jitter=0.1)


# ----------------------------------------------------------------------------------------------- scribbles


_BLOB = _disk((64, 72), (30, 34), 16) | _disk((64, 72), (40, 50), 9)


@pytest.mark.parametrize("kind", ["line", "centerline", "contour"])
@pytest.mark.parametrize("positive", [True, False])
def test_scribbles_stay_on_their_side_and_repeat_with_the_seed(kind, positive):
    outside = ndimage.distance_transform_edt(~_BLOB)
    for seed in range(5):
        mask = scribble(_BLOB, np.random.default_rng(seed), kind, positive)
        assert mask.dtype == bool and mask.shape == _BLOB.shape and mask.any()
        if positive:
            assert not (mask & ~_BLOB).any()
        else:
            assert not (mask & _BLOB).any()
            assert outside[mask].min() > 2 and outside[mask].max() <= 20  # near the object, not touching it
        np.testing.assert_array_equal(mask, scribble(_BLOB, np.random.default_rng(seed), kind, positive))


def test_scribbles_vary_with_the_seed():
    masks = {scribble(_BLOB, np.random.default_rng(seed), "line").tobytes() for seed in range(5)}
    assert len(masks) > 1


def test_unwarped_contour_scribble_follows_the_boundary():
    inside = ndimage.distance_transform_edt(_BLOB)
    for seed in range(5):
        mask = scribble(_BLOB, np.random.default_rng(seed), "contour", True, thickness=1, warp=0, max_gaps=0)
        depth = inside[mask]
        assert depth.max() < 1 + 4 + 1  # within the contour depth of the boundary
        assert depth.max() - depth.min() < 1  # one level line, parallel to the boundary
        assert np.count_nonzero(mask) >= 20  # a stretch of outline, not a few pixels


def test_centerline_scribble_of_a_bar_runs_along_its_middle():
    bar = np.zeros((21, 60), bool)
    bar[5:16, 5:55] = True  # 11 rows: the medial line is row 10
    mask = scribble(bar, np.random.default_rng(0), "centerline", True, thickness=1, warp=0, max_gaps=0)
    rows = np.argwhere(mask)[:, 0]
    assert np.bincount(rows).argmax() == 10 and np.count_nonzero(mask[10]) >= 10


def test_thin_structure_gets_a_positive_scribble():
    vessel = np.zeros((30, 30), bool)
    vessel[15, 2:28] = True
    for kind in ("line", "centerline", "contour"):
        mask = scribble(vessel, np.random.default_rng(1), kind, True)
        assert mask.any() and not (mask & ~vessel).any()


def test_scribble_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="2D"):
        scribble(np.ones((3, 3, 3), bool), rng)
    with pytest.raises(ValueError, match="non-empty"):
        scribble(np.zeros((8, 8), bool), rng)
    with pytest.raises(ValueError, match="no background"):
        scribble(np.ones((8, 8), bool), rng, positive=False)
    with pytest.raises(ValueError, match="kind"):
        scribble(_BLOB, rng, "zigzag")


# ----------------------------------------------------------------------------------------------- metrics


def test_dice_on_hand_counted_masks():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[0, 0:4] = True
    b[0, 2:4] = b[1, 2:4] = True  # overlap 2 of 4 + 4 pixels
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(a, a) == 1.0
    assert dice(a, np.zeros_like(a)) == 0.0
    assert dice(np.zeros_like(a), np.zeros_like(a)) == 1.0


def test_noc_counts_clicks_to_the_threshold():
    assert noc([0.5, 0.85, 0.9, 0.95], 0.9) == 3
    assert noc([0.91], 0.9) == 1
    assert noc([0.89] * 20, 0.9) == 20  # never reaches 90 %
    assert noc([0.5] * 30 + [1.0], 0.9) == 20  # reached only after the cap
    assert noc([0.5, 0.95], 0.9, cap=1) == 1


# ----------------------------------------------------------------------------------------------- correction loop


def _disk_segmenter(gt, radius):
    """A toy stateful segmenter: the ground truth inside disks around the positive clicks so far,
    minus disks around the negative ones; it also records every click it is given."""
    positive = np.zeros_like(gt)
    negative = np.zeros_like(gt)
    given = []

    def segment(click):
        given.append(click)
        (positive if click.positive else negative)[...] |= _disk(gt.shape, click.point, radius)
        return gt & positive & ~negative

    segment.given = given
    return segment


@pytest.mark.parametrize("rule", ["kprism", "ritm"])
def test_click_loop_improves_dice_until_perfect_then_repeats_it(rule):
    gt = _disk((60, 60), (20, 20), 12) | _disk((60, 60), (45, 42), 8)
    segment = _disk_segmenter(gt, 7)
    curve = click_loop(segment, gt, rule, 20)
    assert len(curve.dice) == 20 and curve.start_dice == 0.0
    assert all(later >= earlier for earlier, later in zip(curve.dice, curve.dice[1:]))
    assert curve.dice[0] < 0.5 and curve.dice[-1] == 1.0
    reached = curve.dice.index(1.0)
    assert len(curve.clicks) == reached + 1 == len(segment.given)  # no click once the prediction is exact
    assert np.array_equal(curve.prediction, gt)
    assert noc(curve.dice, 0.9) <= reached + 1


def test_click_loop_that_never_reaches_90_percent():
    gt = _ring()
    calls = []

    def stubborn(click):
        calls.append(click)
        return np.zeros_like(gt)

    curve = click_loop(stubborn, gt, "kprism", 20)
    assert noc(curve.dice, 0.9) == 20 and curve.dice == [0.0] * 20
    assert len(calls) == 20 and all(c.positive for c in calls)


def test_click_loop_starts_from_the_given_prediction():
    gt = _disk((40, 40), (20, 20), 10)
    start = gt.copy()
    start[:, :20] = False  # half the disk already found (by a box, a class, a reference…)
    segment = _disk_segmenter(gt, 30)
    curve = click_loop(segment, gt, "kprism", 2, start=start)
    assert curve.start_dice == pytest.approx(dice(start, gt)) and curve.with_start[0] == curve.start_dice
    assert segment.given[0].positive and not start[segment.given[0].point]  # the first click fixes what the start missed
    assert curve.dice == [1.0, 1.0] and len(curve.clicks) == 1
    assert click_loop(lambda click: pytest.fail("no click expected"), gt, "kprism", 3, start=gt).dice == [1.0] * 3


def test_click_loop_on_an_empty_object_never_calls_the_segmenter():
    gt = np.zeros((10, 10), bool)
    curve = click_loop(lambda click: pytest.fail("no click expected"), gt, "kprism", 3)
    assert curve.dice == [1.0] * 3 and not curve.clicks and not curve.prediction.any()


def test_click_loop_checks_the_prediction_shape():
    with pytest.raises(ValueError, match="shape"):
        click_loop(lambda click: np.zeros((3, 3), bool), _ring(), "kprism", 2)
    with pytest.raises(ValueError, match="start prediction.*shape"):
        click_loop(lambda click: click, _ring(), "kprism", 2, start=np.zeros((3, 3), bool))


def test_click_loop_refuses_an_unknown_rule_and_takes_a_function():
    with pytest.raises(ValueError, match="Unknown click rule 'nearest'.*kprism"):
        click_loop(lambda click: click, _ring(), "nearest", 1)
    gt = _disk((20, 20), (10, 10), 4)
    fixed = Click((10, 10), True)
    curve = click_loop(lambda click: gt, gt, lambda pred, truth: None if pred.any() else fixed, 2)
    assert curve.clicks == [fixed] and curve.dice == [1.0, 1.0]


# ----------------------------------------------------------------------------------------------- CVPR25 3D clicks


def test_cvpr25_click_goes_to_the_view_that_cuts_the_error_widest():
    gt = np.zeros((20, 20, 20), bool)
    gt[2:18, 2:18, 8:11] = True  # a plate three voxels thick along array axis 2
    click = click_cvpr25(np.zeros_like(gt), gt)
    assert click.point == click_kprism(np.zeros_like(gt), gt).point and click.positive
    assert click.axis == 2  # its slice along axis 2 shows 16 × 16 voxels; along 0 or 1 only 16 × 3
    flat = np.zeros_like(gt)
    flat[9:11, 3:17, 3:17] = True  # now thin along axis 0
    assert click_cvpr25(np.zeros_like(gt), flat).axis == 0


def test_cvpr25_cross_section_is_the_piece_around_the_click_not_the_whole_slice():
    gt = np.zeros((11, 40, 40), bool)
    gt[:, 15:25, 15:25] = True  # a block: 100 voxels on its axis-0 slice through the click, 110 on axes 1 and 2
    gt[5, 0:3, :] = True  # a bar on the click's axis-0 slice (120 voxels), apart from the block there…
    gt[6, 3:15, 15] = True  # …joined to it in 3D through slice 6, so it is one 26-connected component
    click = click_cvpr25(np.zeros_like(gt), gt)
    assert click.point[0] == 5 and gt[click.point]
    # Counting the whole slice (220 voxels) would pick axis 0; the piece holding the click has 100.
    assert click.axis == 1  # 110 voxels, tied with axis 2: the earlier axis wins


def test_cvpr25_click_keeps_to_the_allowed_axes_and_is_kprism_in_2d():
    gt = np.zeros((20, 20, 20), bool)
    gt[2:18, 2:18, 8:11] = True
    assert click_cvpr25(np.zeros_like(gt), gt, axes=[0, 1]).axis in (0, 1)
    with pytest.raises(ValueError, match="axes"):
        click_cvpr25(np.zeros_like(gt), gt, axes=[3])
    square = np.zeros((32, 40), bool)
    square[10:15, 20:25] = True
    assert click_cvpr25(np.zeros_like(square), square) == click_kprism(np.zeros_like(square), square) == Click((12, 22), True)
    assert click_cvpr25(gt, gt) is None