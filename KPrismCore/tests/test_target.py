"""EncodedImage + Target: many structures on one encoded image, 3D interaction, deltas, undo and redo."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from kprism.encoded_image import EncodedImage
from kprism.image import Geometry, ImageData
from kprism.model import Prompts
from kprism.model_grid import PRIOR_LOGIT_LIMIT
from kprism.target import Target, TravelRules
from kprism.train.interactions import correction_clicks, first_prompts


def oblique_geometry() -> Geometry:
    """RAS-ordered (as most NIfTI files): the canonical view flips the first two axes."""
    return Geometry((0.8, 0.9, 2.0), (10.0, -5.0, 3.0), (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))


@pytest.fixture(scope="module")
def model():
    from kprism.model import build_model, preset

    torch.manual_seed(0)
    return build_model(preset("tiny", image_size=64, num_classes=2)).eval()


@pytest.fixture
def encoded(model) -> EncodedImage:
    volume = np.random.default_rng(0).normal(100, 30, (10, 24, 28)).astype(np.float32)
    return EncodedImage(model, ImageData(volume, oblique_geometry()), device="cpu", threads=1)


def buffer_from_deltas(shape, deltas) -> np.ndarray:
    buffer = np.zeros(shape, np.float32)
    for delta in deltas:
        delta.apply_to(buffer)
    return buffer


# ----------------------------------------------------------------------------------------------- targets


def test_two_targets_on_one_encoded_image_keep_their_own_results_and_undo(encoded):
    first, second = Target(encoded), Target(encoded)
    first.click([10, 12, 5], propagate=False)
    first.click([14, 12, 5], positive=False, propagate=False)
    after_two = first.result().probability
    second.click([6, 6, 2], propagate=False)

    assert np.array_equal(first.result().probability, after_two)  # the other target changed nothing here
    first.undo()
    assert first.steps == 1 and not np.array_equal(first.result().probability, after_two)
    assert second.steps == 1 and second.result().probability[2].any()
    assert encoded.is_encoded(0, 5) and encoded.is_encoded(0, 2)  # both used one feature cache


def test_a_held_result_and_delta_never_change(encoded):
    target = Target(encoded)
    delta = target.click([10, 12, 5])
    held = target.result()
    held_copy, delta_copy = held.probability.copy(), delta.probability.copy()
    target.click([20, 4, 5], positive=False)
    target.undo()
    target.undo()

    assert np.array_equal(held.probability, held_copy) and np.array_equal(delta.probability, delta_copy)
    assert not delta.probability.flags.writeable
    with pytest.raises(ValueError):
        delta.probability[...] = 0


def test_deltas_rebuild_exactly_the_full_result(encoded):
    target = Target(encoded)
    deltas = [target.click([10, 12, 5]), target.click([3, 20, 1], axis=2), target.box([2, 2, 7], [12, 14, 8]),
              target.click([10, 12, 5], positive=False, axis=1), target.undo(), target.redo()]

    rebuilt = buffer_from_deltas(encoded.shape, deltas)
    assert np.array_equal(rebuilt, target.result().probability)
    assert all(d.probability.shape == tuple(s.stop - s.start for s in d.region) for d in deltas)


def test_a_click_on_a_sagittal_slice_changes_that_slice_and_the_3d_result(encoded):
    target = Target(encoded, rules=TravelRules(min_quality=0.0, min_area_ratio=0.0, max_area_ratio=1e9, agreement=None))
    i, j, k = 9, 12, 5
    where = encoded.locate([i, j, k], "ijk", axis=2)
    delta = target.click([i, j, k], axis=2)

    canonical = encoded.view.to_canonical(target.result().probability)
    assert delta.axis == 2 and delta.slices[0] == where.index
    assert canonical[:, :, where.index].any()  # the clicked sagittal slice
    assert len(delta.slices) > 1 and all(canonical[:, :, s].any() for s in delta.slices)  # and its neighbours
    source_columns = {int(c) for c in range(encoded.shape[2]) if target.result().probability[:, :, c].any()}
    assert i in source_columns  # sagittal slices are columns i of the RAS-ordered source


def test_anchors_are_never_overwritten_by_travel(encoded):
    rules = TravelRules(min_quality=0.0, min_area_ratio=0.0, max_area_ratio=1e9, agreement=None)
    target = Target(encoded, rules=rules)
    target.click([10, 12, 2], propagate=False)
    target.click([10, 12, 8], propagate=False)
    target.click([5, 20, 0], axis=1, propagate=False)  # a coronal anchor crossing every axial slice
    coronal = encoded.locate([5, 20, 0], "ijk", axis=1).index
    canonical = encoded.view.to_canonical
    before = canonical(target.result().probability).copy()

    delta = target.click([10, 12, 5])  # travels through slices 3–7 and must stop at the anchors 2 and 8
    after = canonical(target.result().probability)
    axial = {encoded.locate([10, 12, k], "ijk").index for k in (2, 8)}
    for index in axial:
        assert np.array_equal(after[index], before[index])
    assert set(delta.slices) <= set(range(min(axial) + 1, max(axial)))
    assert np.array_equal(after[:, coronal, :][list(delta.slices)], before[:, coronal, :][list(delta.slices)])


def test_a_refused_or_failing_prompt_leaves_the_target_unchanged(encoded, monkeypatch):
    target = Target(encoded)
    target.click([10, 12, 5])
    before, steps = target.result().probability, target.steps

    with pytest.raises(ValueError, match="outside the image"):
        target.click([500, 12, 5])
    calls = {"n": 0}
    decode = encoded.decode

    def fails_while_travelling(features, prompts):
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("out of memory")
        return decode(features, prompts)

    monkeypatch.setattr(encoded, "decode", fails_while_travelling)
    with pytest.raises(RuntimeError, match="out of memory"):
        target.click([20, 4, 5], positive=False)
    assert np.array_equal(target.result().probability, before) and target.steps == steps
    assert len(target.provenance) == steps


def test_travel_stops_where_the_area_jumps_like_a_leak(encoded, monkeypatch):
    target = Target(encoded)
    seed = np.zeros(encoded.canonical_shape, np.uint8)
    seed[5, 10:14, 10:14] = 1
    target.set_prior(encoded.view.from_canonical(seed))
    flood = np.full((1, encoded.size // 2, encoded.size // 2), 8.0, np.float32)  # every pixel, every slice

    def floods(features, prompts):
        return flood, np.array([0.9], np.float32)

    monkeypatch.setattr(encoded, "decode", floods)
    delta = target.propagate(5, 0)

    assert delta.empty or set(delta.slices) == set()  # nothing written: 16 pixels → the whole slice is a leak
    assert np.array_equal(encoded.view.to_canonical(target.result().mask), seed)


def _answers_by_box(encoded, monkeypatch):
    """A decoder that floods the whole slice when a box is in the prompt, else marks the slice's centre."""
    half = encoded.size // 2
    flood = np.full((1, half, half), 8.0, np.float32)
    centre = np.full((1, half, half), -8.0, np.float32)
    centre[:, half // 4: 3 * half // 4, half // 4: 3 * half // 4] = 8.0

    def answer(features, prompts):
        return (flood if prompts.boxes is not None else centre), np.array([0.9], np.float32)

    monkeypatch.setattr(encoded, "decode", answer)


def test_a_3d_box_limits_the_result_and_its_travel_until_a_positive_click_outside(encoded, monkeypatch):
    _answers_by_box(encoded, monkeypatch)
    target = Target(encoded, rules=TravelRules(min_similarity=None, agreement=None))
    inside = np.zeros(encoded.shape, bool)
    inside[4:7, 2:15, 2:13] = True  # IJK corners (2, 2, 4) and (12, 14, 6), in array order
    target.box([2, 2, 4], [12, 14, 6])
    assert target.result().mask[inside].all() and not target.result().mask[~inside].any()  # the flood stops at the box

    target.click([7, 8, 5])  # a positive click inside: its change travels, never out of the box
    assert target.result().mask.any() and not target.result().mask[~inside].any()

    before = target.result().mask
    target.click([20, 20, 8])  # a positive click outside: the box was too small
    assert target.result().mask[~inside].any()
    target.undo()
    assert np.array_equal(target.result().mask, before)
    target.click([7, 12, 5], positive=False)  # the limit is back after the undo
    assert not target.result().mask[~inside].any()


def test_a_positive_click_redoes_box_only_slices_and_a_negative_one_keeps_them(encoded, monkeypatch):
    _answers_by_box(encoded, monkeypatch)
    rows, columns = slice(2, 22), slice(2, 26)  # the box's in-plane extent (array order)
    boxed = Target(encoded, rules=TravelRules(min_similarity=None, agreement=None))
    boxed.box([2, 2, 3], [25, 21, 7])
    box_only = boxed.result().mask
    assert all(box_only[z, rows, columns].all() for z in range(3, 8))

    negative = Target(encoded, rules=TravelRules(min_similarity=None, agreement=None))
    negative.box([2, 2, 3], [25, 21, 7])
    negative.click([3, 3, 5], positive=False)  # its slice follows the click; the box-only slices stay
    mask = negative.result().mask
    assert not mask[5, rows, columns].all() and np.array_equal(mask[[3, 4, 6, 7]], box_only[[3, 4, 6, 7]])

    boxed.click([13, 12, 5])  # a positive click's answer travels through the slices only the box filled
    mask = boxed.result().mask
    assert all(mask[z].any() and not mask[z, rows, columns].all() for z in range(3, 8))


def test_undo_and_redo_restore_results_and_provenance(encoded):
    target = Target(encoded)
    target.click([10, 12, 5])
    one = target.result().probability
    target.box([2, 2, 4], [12, 14, 6])
    two = target.result().probability

    target.undo()
    assert np.array_equal(target.result().probability, one) and len(target.provenance) == 1
    target.redo()
    assert np.array_equal(target.result().probability, two) and "box" in target.provenance[-1]
    assert target.redo() is None


def test_targets_in_two_threads_match_the_same_prompts_in_one(model):
    volume = np.random.default_rng(3).normal(100, 30, (6, 24, 24)).astype(np.float32)
    clicks = {"a": [[5, 5, 1], [12, 12, 2]], "b": [[18, 6, 4], [8, 16, 3]]}

    def run(encoded, name, out):
        target = Target(encoded)
        for point in clicks[name]:
            target.click(point)
        out[name] = target.result().probability

    serial, parallel = {}, {}
    shared = EncodedImage(model, volume, device="cpu", threads=1)
    for name in clicks:
        run(EncodedImage(model, volume, device="cpu", threads=1), name, serial)
    threads = [threading.Thread(target=run, args=(shared, name, parallel)) for name in clicks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(np.allclose(serial[n], parallel[n], atol=1e-5) for n in clicks)


# ----------------------------------------------------------------------------------------------- one encoding


def test_training_and_inference_place_click_box_scribble_and_prior_identically(model):
    size = model.config.image_size
    truth = np.zeros((size, size), bool)
    truth[20:40, 16:30] = True
    picture = np.random.default_rng(4).normal(100, 30, (size, size)).astype(np.float32)
    target = Target(EncodedImage(model, picture, device="cpu", threads=1))
    rng = np.random.default_rng(0)

    # Clicks: training's first click and a correction click vs the same pixels clicked at inference.
    trained = Prompts()
    clicks = first_prompts(trained, truth[None], "click", np.random.default_rng(1))
    x, y, _ = clicks[0][0]
    target.click([x - 0.5, y - 0.5], propagate=False)
    assert torch.equal(target._slice_prompts(target._states[(0, 0)], np.zeros_like(picture)).points, trained.points)

    # Box: training's box edges for corner pixels vs a box with the same corners at inference.
    trained = Prompts()
    first_prompts(trained, truth[None], "box", rng)
    x0, y0, x1, y1 = trained.boxes[0].tolist()
    target.box([x0, y0], [x1 - 1, y1 - 1], propagate=False)
    assert target._states[(0, 0)].box == pytest.approx((x0, y0, x1, y1), abs=1e-6)

    # Scribble: training's binary stroke map on the model grid vs the same stroke at inference.
    stroke = np.zeros((size, size), bool)
    stroke[30, 10:50] = True
    target.scribble(stroke, propagate=False)
    assert np.array_equal(target._states[(0, 0)].scribbles[0], stroke.astype(np.float32))

    # Prior: training feeds its logits back clamped to ±20; inference feeds its last answer the same way.
    logits = torch.from_numpy(target._logits[(0, 0)])[None, None] * 1000  # wide range, so the clamp matters
    target._logits[(0, 0)] = logits[0, 0].numpy()
    trained = Prompts()
    correction_clicks(trained, torch.nn.functional.interpolate(logits, size=(size, size), mode="bilinear",
                                                               align_corners=False), truth[None], [[]], rng)
    inferred = target._slice_prompts(target._states[(0, 0)], np.ones_like(picture), (0, 0)).prior_logits
    assert torch.equal(inferred, trained.prior_logits) and inferred.abs().max() == PRIOR_LOGIT_LIMIT


# ----------------------------------------------------------------------------------------------- the bundled model


def test_one_click_segments_a_ct_ellipsoid_in_3d_without_leaking():
    from kprism.session import KPrismSession

    shape = (64, 128, 128)
    rng = np.random.default_rng(0)
    volume = rng.normal(-900, 20, shape)
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    ellipsoid = ((z - 32) / 19.2) ** 2 + ((y - 64) / 28.2) ** 2 + ((x - 64) / 32) ** 2 <= 1
    volume[ellipsoid] = 60 + rng.normal(0, 20, int(ellipsoid.sum()))
    session = KPrismSession(device="cpu", threads=1)
    session.set_image(volume.astype(np.int16))

    result = session.add_click([64, 64, 32]).mask > 0  # one click at the centre; no propagate step

    dice = 2 * (result & ellipsoid).sum() / (result.sum() + ellipsoid.sum())
    assert dice >= 0.9  # was 0.05 when propagation leaked into 86 % of every slice
    assert (result & ~ellipsoid).sum() <= 0.1 * result.sum()


def test_propagation_can_start_from_a_source_point(encoded):
    rules = TravelRules(min_quality=0.0, min_area_ratio=0.0, max_area_ratio=1e9, agreement=None)
    by_point, by_index = Target(encoded, rules=rules), Target(encoded, rules=rules)
    for target in (by_point, by_index):
        target.click([10, 12, 5], propagate=False)
    ras = encoded.geometry.index_to_ras([10, 12, 5])

    from_point = by_point.propagate(from_point=ras, coordinates="ras", rules=rules)
    from_index = by_index.propagate(encoded.locate([10, 12, 5]).index, 0, rules=rules)

    assert from_point.slices == from_index.slices and len(from_point.slices) > 1
    assert np.array_equal(by_point.result().probability, by_index.result().probability)


@pytest.mark.shared
def test_one_click_segments_the_liver_of_a_shared_ct_in_3d(shared_datasets):
    import json

    from scipy import ndimage

    from kprism.io import read_image, read_mask
    from kprism.session import KPrismSession

    folder = shared_datasets / "Dataset006_TotalSegCT"
    liver = read_mask(folder / "labelsTr" / "ts_ct_002.nii.gz").array == json.loads(
        (folder / "dataset.json").read_text())["labels"]["liver"]
    k = int(np.argmax(liver.sum(axis=(1, 2))))
    row, column = np.unravel_index(np.argmax(ndimage.distance_transform_edt(liver[k])), liver[k].shape)
    session = KPrismSession(device="cpu", threads=1)
    session.set_image(read_image(folder / "imagesTr" / "ts_ct_002_0000.nii.gz"))

    result = session.add_click([column, row, k]).mask > 0  # the deepest point of its largest slice

    assert 2 * (result & liver).sum() / (result.sum() + liver.sum()) >= 0.8
