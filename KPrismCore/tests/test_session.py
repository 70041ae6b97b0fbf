"""KPrismSession: coordinates and geometry, every prompt kind, undo, and bad input."""

from __future__ import annotations

import numpy as np
import pytest

from kprism.catalog import UnknownClassError
from kprism.image import Geometry, ImageData
from kprism.session import KPrismSession, Reference


def noise(shape) -> np.ndarray:
    """A non-constant float image (constant images are refused, as they hold nothing to segment)."""
    return np.random.default_rng(len(shape)).normal(100, 30, shape).astype(np.float32)


def oblique_geometry() -> Geometry:
    """A rotated, anisotropic, left-handed-looking grid (rotation about two axes plus a flip of i)."""
    a, b = np.radians(25), np.radians(-10)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    direction = rz @ rx @ np.diag([-1.0, 1.0, 1.0])
    return Geometry((0.7, 0.9, 2.5), (-120.0, 35.5, 210.0), tuple(direction.ravel()))


@pytest.fixture()
def session(tiny_model):
    model, catalog = tiny_model
    return KPrismSession(model, catalog=catalog, device="cpu")


def test_ras_click_lands_on_the_intended_voxel_of_an_oblique_volume(session):
    geometry = oblique_geometry()
    volume = np.zeros((12, 40, 50), np.float32)
    k, j, i = 7, 23, 31
    volume[k, j, i] = 999.0  # a marker only this voxel carries
    session.set_image(volume, geometry=geometry, modality="ct")
    for coordinates, point in [("ijk", [i, j, k]), ("lps", geometry.index_to_lps([i, j, k])),
                               ("ras", geometry.index_to_ras([i, j, k]))]:
        index, (row, col) = session.locate(point, coordinates)
        assert session.canonical_slice(index)[int(row), int(col)] == 999.0, coordinates


def test_click_changes_only_the_clicked_slice_and_keeps_the_source_grid(session):
    geometry = oblique_geometry()
    volume = np.random.default_rng(0).normal(size=(12, 40, 50)).astype(np.float32)
    session.set_image(volume, geometry=geometry, modality="mri")
    point = geometry.index_to_ras([10, 20, 5])
    result = session.add_click(point, positive=True, coordinates="ras", propagate=False)
    assert result.probability.shape == volume.shape
    assert result.geometry == geometry
    changed = np.argwhere(result.probability > 0)
    assert changed.size and np.all(changed[:, 0] == 5)  # axial slice k = 5 (array axis 0)
    assert np.isfinite(result.slice_quality[5]) and np.isnan(result.slice_quality[4])


def test_every_prompt_kind_and_undo(session):
    image = np.random.default_rng(1).uniform(0, 255, (80, 100)).astype(np.float32)
    session.set_image(image, modality="x-ray")
    first = session.add_click([50, 40]).probability.copy()
    second = session.add_click([10, 10], positive=False).probability.copy()
    assert not np.array_equal(first, second)
    scribble = np.zeros_like(image)
    scribble[40, 30:60] = 1
    session.add_scribble(scribble)
    session.add_box([20, 20], [80, 60])
    assert session.target.steps == 4
    session.undo()
    session.undo()
    np.testing.assert_array_equal(session.result().probability, second)
    session.undo()
    np.testing.assert_array_equal(session.result().probability, first)
    session.reset()
    assert session.result() is None


def test_semantic_then_clicks_refines_the_class_result(session):
    image = np.random.default_rng(2).uniform(0, 255, (64, 64)).astype(np.float32)
    session.set_image(image)
    results = session.segment_semantic(["disk", "ring"])
    assert set(results) == {"disk", "ring"} and session.result() is None  # two classes: nothing to refine
    base = session.segment_semantic(["disk"])["disk"].probability.copy()
    refined = session.add_click([32, 32])
    assert session.target.knowledge is not None and session.target.knowledge.class_ids.tolist() == [0]
    assert not np.array_equal(base, refined.probability)


def test_prior_mask_can_be_refined(session):
    image = np.random.default_rng(3).uniform(0, 255, (64, 64)).astype(np.float32)
    session.set_image(image)
    prior = np.zeros((64, 64), np.uint8)
    prior[10:30, 10:30] = 1
    np.testing.assert_array_equal(session.set_prior_mask(prior).mask, prior)
    refined = session.add_click([50, 50])
    assert refined.probability.shape == (64, 64)


def test_three_d_box_prompts_every_slice_in_range(session):
    volume = np.random.default_rng(4).normal(size=(10, 32, 32)).astype(np.float32)
    session.set_image(volume, modality="mri")
    result = session.add_box([5, 5, 2], [20, 25, 6], propagate=False)
    touched = np.unique(np.argwhere(result.probability > 0)[:, 0])
    np.testing.assert_array_equal(touched, np.arange(2, 7))
    session.undo()  # the whole 3D box is one interaction
    assert session.result().probability.max() == 0


def test_in_context_accepts_a_reference_of_another_size_and_spacing(session):
    target = np.random.default_rng(5).uniform(0, 255, (70, 90)).astype(np.float32)
    reference = ImageData(np.random.default_rng(6).uniform(0, 255, (40, 50)).astype(np.float32),
                          Geometry((0.5, 0.5), (3.0, 4.0), (1.0, 0.0, 0.0, 1.0)))
    mask = np.zeros((40, 50), np.uint8)
    mask[10:25, 15:35] = 1
    session.set_image(target)
    result = session.segment_in_context([Reference(reference, mask)])
    assert result.probability.shape == target.shape
    # A mask saved at another size is resampled onto its reference image, not rejected.
    result = session.segment_in_context([(reference, np.kron(mask, np.ones((2, 2), np.uint8)))])
    assert np.isfinite(result.probability).all()


def test_three_d_reference_uses_its_largest_slice(session):
    volume = np.random.default_rng(7).normal(size=(6, 32, 32)).astype(np.float32)
    mask = np.zeros(volume.shape, np.uint8)
    mask[4, 10:20, 10:20] = 1
    session.set_image(volume[3], modality="mri")
    result = session.segment_in_context([Reference(ImageData(volume, modality="mri"), mask)])
    assert result.probability.shape == (32, 32)


# --------------------------------------------------------------------------------------- bad input
def test_nan_and_inf_voxels_are_refused_naming_their_count(session):
    image = np.random.default_rng(8).normal(size=(48, 48)).astype(np.float32)
    image[5:10, 5:10] = np.nan
    image[20, :] = np.inf
    with pytest.raises(ValueError, match="has 73 of 2304 voxels that are NaN or infinite"):
        session.set_image(image)


def test_constant_image_is_refused(session):
    with pytest.raises(ValueError, match="no contrast: every voxel is 7.0"):
        session.set_image(np.full((40, 40), 7.0, np.float32))


@pytest.mark.parametrize("shape", [(50,), (2, 3, 4, 5)])
def test_one_d_and_four_d_input_are_refused(session, shape):
    with pytest.raises(ValueError, match="2D images and 3D volumes"):
        session.set_image(np.zeros(shape, np.float32))


def test_empty_reference_mask_is_refused(session):
    session.set_image(noise((32, 32)))
    with pytest.raises(ValueError, match="mask is empty"):
        session.segment_in_context([Reference(ImageData(np.ones((32, 32))), np.zeros((32, 32)))])


@pytest.mark.parametrize("point", [[-1, 5], [5, 40], [32, 0]])
def test_click_outside_the_image_is_refused(session, point):
    session.set_image(noise((40, 32)))
    with pytest.raises(ValueError, match="outside the image"):
        session.add_click(point)
    assert session.result() is None  # nothing changed


def test_unknown_class_lists_the_known_ones(session):
    session.set_image(noise((32, 32)))
    with pytest.raises(UnknownClassError, match="Known classes: disk, square, ring"):
        session.segment_semantic(["liver"])


def test_point_with_the_wrong_number_of_coordinates(session):
    session.set_image(noise((4, 32, 32)))
    with pytest.raises(ValueError, match="needs 3 coordinates"):
        session.add_click([3, 4])


def test_prompts_before_an_image_are_a_clear_error(session):
    with pytest.raises(RuntimeError, match="set_image"):
        session.add_click([1, 1])


def test_feature_cache_respects_its_memory_bound(tiny_model):
    model, catalog = tiny_model
    session = KPrismSession(model, catalog=catalog, device="cpu", cache_mb=3)
    session.set_image(np.random.default_rng(9).normal(size=(6, 32, 32)).astype(np.float32))
    session.features(list(range(6)))
    cache = session.encoded.cache(0)
    assert cache.nbytes <= 3 * 2**20 and len(cache) < 6


def test_float16_cache_holds_twice_the_slices_for_the_same_clicks(tiny_model):
    model, catalog = tiny_model
    volume = np.random.default_rng(4).normal(size=(8, 48, 48)).astype(np.float32)
    sessions = {half: KPrismSession(model, catalog=catalog, device="cpu", cache_mb=4, cache_float16=half) for half in (True, False)}
    results = {}
    for half, session in sessions.items():
        session.set_image(volume)
        session.features(list(range(8)))
        results[half] = session.add_click([20, 30, 5], propagate=False).probability
    assert len(sessions[True].encoded.cache(0)) >= 2 * len(sessions[False].encoded.cache(0)) > 0
    assert np.abs(results[True] - results[False]).max() < 1e-3


# --------------------------------------------------------------------------------------- propagation
def test_propagation_reaches_every_slice_when_nothing_stops_it_and_undoes_as_one(session):
    volume = np.random.default_rng(10).normal(size=(9, 32, 32)).astype(np.float32)
    session.set_image(volume, modality="mri")
    session.add_click([16, 16, 4])
    before = session.result().probability.copy()
    result = session.propagate(min_quality=0.0, min_area_ratio=0.0, stop_when_unchanged=None)
    touched = {int(k) for k in np.unique(np.argwhere(result.probability > 0)[:, 0])}
    assert touched == set(range(9))
    session.undo()
    np.testing.assert_array_equal(session.result().probability, before)


def test_cross_axis_fusion_averages_three_passes_and_undoes_with_the_propagation(session):
    volume = np.random.default_rng(13).normal(size=(8, 24, 28)).astype(np.float32)
    session.set_image(volume, modality="mri")
    session.add_click([12, 10, 3])
    before = session.result().probability.copy()
    single = session.propagate(min_quality=0.0, min_area_ratio=0.0, stop_when_unchanged=None).probability.copy()
    session.undo()
    fused = session.propagate(min_quality=0.0, min_area_ratio=0.0, stop_when_unchanged=None, cross_axes=True).probability
    assert fused.shape == volume.shape and 0 <= fused.min() and fused.max() <= 1
    # Each of the three passes is a probability, so the mean cannot stray further than 2/3 from the first.
    assert np.abs(fused - single).max() <= 2 / 3 + 1e-6 and not np.array_equal(fused, single)
    assert session.is_encoded(3) and session.axis == 0  # the helpers along other axes leave this session alone
    session.undo()  # one undo takes back the propagation and the fusion
    np.testing.assert_array_equal(session.result().probability, before)


def test_propagation_stops_where_the_quality_says_the_structure_ends(session):
    volume = np.random.default_rng(11).normal(size=(9, 32, 32)).astype(np.float32)
    session.set_image(volume, modality="mri")
    session.add_click([16, 16, 4], propagate=False)
    result = session.propagate(min_quality=1.01)  # no slice can be good enough
    assert {int(k) for k in np.unique(np.argwhere(result.probability > 0)[:, 0])} == {4}


def test_propagation_needs_a_volume_and_a_seed(session):
    session.set_image(noise((32, 32)))
    with pytest.raises(ValueError, match="needs a 3D volume"):
        session.propagate()
    session.set_image(noise((5, 32, 32)))
    with pytest.raises(RuntimeError, match="Nothing to propagate"):
        session.propagate()
    session.set_prior_mask(np.zeros((5, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="slice to propagate from"):
        session.propagate()
    with pytest.raises(ValueError, match="no segmentation"):
        session.propagate(2)


# --------------------------------------------------------------------------------------- label maps
def test_many_classes_go_straight_into_one_label_map(session):
    volume = np.random.default_rng(12).normal(size=(4, 40, 48)).astype(np.float32)
    session.set_image(volume, modality="mri")
    separate = session.segment_semantic(["disk", "square", "ring"])
    combined = session.segment_semantic_labels(["disk", "square", "ring"])
    probabilities = np.stack([separate[n].probability for n in combined.names])
    expected = np.where(probabilities.max(0) >= 0.5, probabilities.argmax(0) + 1, 0)
    assert combined.labels.shape == volume.shape
    assert (combined.labels == expected).mean() > 0.999  # equal but for float ties at exactly 0.5
    assert len(combined.quality) == 3


@pytest.fixture(scope="module")
def one_pass_session():
    import torch

    from kprism.catalog import ClassCatalog
    from kprism.model import build_model, preset

    torch.manual_seed(1)
    model = build_model(preset("tiny", num_classes=3, class_head=True)).eval()
    with torch.no_grad():  # a random head is almost never confident; shift one class so labels appear
        model.class_head.classify.bias[:] = torch.tensor([0.0, 0.1, -0.1])
    return KPrismSession(model, catalog=ClassCatalog.from_names(["disk", "square", "ring"]), device="cpu")


def test_one_pass_label_map_is_the_class_heads_argmax_on_the_source_grid(one_pass_session):
    import torch

    from kprism.model import upsample_logits

    session = one_pass_session
    volume = np.random.default_rng(3).normal(size=(3, 36, 44)).astype(np.float32)
    session.set_image(volume, geometry=oblique_geometry(), modality="mri")
    result = session.segment_semantic_labels(["ring", "disk"], engine="one_pass")
    assert result.labels.shape == volume.shape and result.names == ["ring", "disk"] and result.engine == "one_pass"
    canonical = np.zeros(session.view.canonical_shape, np.int64)
    for index in range(session.num_slices):
        inputs = session.encoded.model_input(session.canonical_slice(index), "mri", False, session.encoded.value_range)[None]
        with torch.no_grad():
            logits = session.model.segment_all(session.model.encode(inputs))[:, [2, 0]]
        grid = upsample_logits(logits, session.encoded.slice_shape(0))[0]
        best, winner = grid.max(0)
        canonical[index] = np.where(best.numpy() >= 0, winner.numpy() + 1, 0)
    expected = session.view.from_canonical(canonical)
    assert 0 < (expected > 0).mean() < 1  # a meaningful comparison: some voxels labelled, some not
    assert (result.labels == expected).mean() > 0.999
    assert all(0.5 <= q <= 1 for q in result.quality if np.isfinite(q))
    assert not session.is_encoded(0)  # the whole-volume pass streams; it does not fill the click cache


def test_engine_choice_is_checked(session, one_pass_session):
    session.set_image(noise((2, 16, 16)))
    with pytest.raises(ValueError, match="no one-pass class head"):
        session.segment_semantic_labels(["disk"], engine="one_pass")
    with pytest.raises(ValueError, match="engine must be"):
        session.segment_semantic_labels(["disk"], engine="fast")
    one_pass_session.set_image(noise((2, 16, 16)))
    prompted = one_pass_session.segment_semantic_labels(["disk"], engine="prompted")
    assert prompted.labels.shape == (2, 16, 16) and prompted.engine == "prompted"


def test_one_pass_run_can_be_cancelled(one_pass_session):
    from kprism.session import Cancelled

    one_pass_session.set_image(noise((20, 32, 32)))
    with pytest.raises(Cancelled):
        one_pass_session.segment_semantic_labels(["disk"], cancel=lambda: True)


def test_label_map_run_can_be_cancelled(session):
    from kprism.session import Cancelled

    session.set_image(noise((20, 32, 32)))
    with pytest.raises(Cancelled):
        session.segment_semantic_labels(["disk"], cancel=lambda: True)


def test_clean_labels_keeps_the_largest_component_and_fills_holes():
    from kprism.session import clean_labels

    labels = np.zeros((5, 20, 20), np.uint8)
    labels[1:4, 2:12, 2:12] = 1
    labels[2, 6, 6] = 0  # an enclosed hole
    labels[1:3, 15:18, 15:18] = 1  # a smaller separate piece
    cleaned = clean_labels(labels, 1, largest_component=True, fill_holes=True)
    assert cleaned[2, 6, 6] == 1 and cleaned[1:3, 15:18, 15:18].sum() == 0 and cleaned[1:4, 2:12, 2:12].all()
