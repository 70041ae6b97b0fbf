"""The 3D CVPR25 protocol: a 3D box, then clicks on the largest 3D error in the view that shows it widest."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from kprism.data.interaction import Click, box_from_mask, click_cvpr25, click_loop, dice
from kprism.data.nnunet_v2 import load_dataset
from kprism.evaluate.clickers import VolumeClicker
from kprism.evaluate.metrics import nsd
from kprism.evaluate.volumetric import box_then_clicks, evaluate_volumes, summarise_volumes
from kprism.image import Geometry, ImageData
from kprism.orientation import CanonicalView
from kprism.session import KPrismSession, Reference

# Index axis i points to patient superior, j to left, k to posterior: stored "sideways", so the canonical
# view permutes and flips the source axes and a mix-up of source and canonical axes shows.
SIDEWAYS = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0, 1.0, 0.0, 0.0)


def blob_volume(shift: int = 0) -> tuple[np.ndarray, np.ndarray]:
    k, j, i = np.mgrid[:12, :40, :36]
    labels = (((i - 18 - shift) / 9) ** 2 + ((j - 18) / 7) ** 2 + ((k - 6) / 4) ** 2 <= 1).astype(np.uint8)
    image = np.where(labels > 0, 80, -50).astype(np.int16) + np.random.default_rng(shift).integers(-5, 5, labels.shape).astype(np.int16)
    return image, labels


def make_volume_dataset(root, cases: int = 1, direction=None):
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for n in range(cases):
        image, labels = blob_volume(shift=2 * n)
        for array, folder, name in ((image, "imagesTr", f"vol{n}_0000.nii.gz"), (labels, "labelsTr", f"vol{n}.nii.gz")):
            itk = sitk.GetImageFromArray(array)
            itk.SetSpacing((1.0, 1.0, 2.5))
            if direction is not None:
                itk.SetDirection(direction)
            sitk.WriteImage(itk, str(root / folder / name))
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "blob": 1},
                                                   "numTraining": cases, "file_ending": ".nii.gz"}), encoding="utf-8")
    return root


def test_cvpr25_curve_is_the_box_then_each_click_replayed_on_an_independent_target(tmp_path, tiny_model):
    model, catalog = tiny_model
    dataset = load_dataset(make_volume_dataset(tmp_path / "Dataset950_Blob", direction=SIDEWAYS))
    items = evaluate_volumes(KPrismSession(model, catalog=catalog, device="cpu", threads=1), dataset, clicks=3)
    assert len(items) == 1 and len(items[0].curve) == 4 and len(items[0].click_axes) == 3

    image, labels = dataset.load(dataset.cases("train")[0])
    truth = labels == 1
    replay = KPrismSession(model, catalog=catalog, device="cpu", threads=1)
    replay.set_image(image)
    target, view = replay.new_target(), replay.view
    (k0, j0, i0), (k1, j1, i1) = box_from_mask(truth)
    target.box([i0, j0, k0], [i1, j1, k1], "ijk", propagate=False)
    curve = [dice(target.result().mask > 0, truth)]
    for _ in range(3):
        click = click_cvpr25(target.result().mask > 0, truth)
        k, j, i = click.point
        target.click([i, j, k], click.positive, "ijk", axis=view.permutation.index(click.axis))
        curve.append(dice(target.result().mask > 0, truth))
    assert items[0].curve == pytest.approx(curve)
    assert items[0].final_dice == items[0].curve[-1]
    assert items[0].nsd == pytest.approx(nsd(target.result().mask > 0, truth, image.geometry.spacing[::-1], 2.0))


def test_volume_clicker_keeps_its_mask_equal_to_the_target_result(tiny_model):
    model, catalog = tiny_model
    image, labels = blob_volume()
    session = KPrismSession(model, catalog=catalog, device="cpu", threads=1)
    session.set_image(ImageData(image, geometry=sideways_geometry()))
    clicker = VolumeClicker(session.new_target())
    corners = []
    original_box = clicker.target.box
    clicker.target.box = lambda first, last, *args, **kwargs: corners.append((first, last)) or original_box(first, last, *args, **kwargs)
    truth = labels > 0
    first, last = box_from_mask(truth)
    after_box = clicker.box(first, last)

    canonical_truth = session.view.to_canonical(truth)
    spanned = [n for n in range(canonical_truth.shape[0]) if canonical_truth[n].any()]
    (minimum, maximum), = corners
    located = [session.encoded.locate(corner, "ijk", 0) for corner in (minimum, maximum)]
    voxels = np.argwhere(canonical_truth)
    for dimension, field in enumerate(("index", "row", "column")):  # the box is the structure's, in the canonical view
        assert sorted(getattr(where, field) for where in located) == [voxels[:, dimension].min(), voxels[:, dimension].max()]
    assert voxels[:, 0].min() == spanned[0] and voxels[:, 0].max() == spanned[-1]
    outside = [n for n in range(canonical_truth.shape[0]) if n not in spanned]
    assert not session.view.to_canonical(after_box)[outside].any()  # and nothing travelled beyond them
    assert np.array_equal(after_box, clicker.target.result().mask > 0)
    for positive, point in ((True, (6, 18, 18)), (False, (6, 18, 10)), (True, (3, 20, 18))):
        for axis in (0, 2):
            answer = clicker(Click(point, positive, axis))
            assert np.array_equal(answer, clicker.target.result().mask > 0)
            answer[...] = False  # a copy: the clicker's own mask is not the caller's
            assert np.array_equal(clicker.mask, clicker.target.result().mask > 0)


def sideways_geometry() -> Geometry:
    return Geometry((1.0, 1.0, 2.5), (0.0, 0.0, 0.0), SIDEWAYS)


def test_each_click_goes_to_the_canonical_view_of_its_source_axis(tiny_model):
    model, catalog = tiny_model
    image, _ = blob_volume()
    session = KPrismSession(model, catalog=catalog, device="cpu", threads=1)
    session.set_image(ImageData(image, geometry=sideways_geometry()))
    view = session.view
    assert view.permutation != (0, 1, 2)
    plate = np.zeros(image.shape, bool)
    plate[2:10, 5:35, 16:19] = True  # thin along source array axis 2: its widest cut is a slice along axis 2
    target = session.new_target()
    placed = []
    original = target.click

    def spy(point, positive=True, coordinates="ijk", axis=None, propagate=None):
        placed.append((point, axis))
        return original(point, positive, coordinates, axis=axis, propagate=propagate)

    target.click = spy
    clicker = VolumeClicker(target)
    assert click_cvpr25(np.zeros_like(plate), plate).axis == 2
    click_loop(clicker, plate, lambda pred, truth: click_cvpr25(pred, truth), 1)
    (point, axis), = placed
    assert axis == view.permutation.index(2) != 2
    where = session.encoded.locate(point, "ijk", axis)
    canonical = view.index_to_canonical(np.array(point[::-1]))
    assert (where.index, where.row, where.column) == tuple(canonical[a] for a in (axis, *[b for b in range(3) if b != axis]))
    assert plate[tuple(int(v) for v in point[::-1])]


def test_clicks_keep_to_the_allowed_views(tiny_model):
    model, catalog = tiny_model
    image, labels = blob_volume()
    session = KPrismSession(model, catalog=catalog, device="cpu", threads=1)
    session.set_image(ImageData(image, geometry=sideways_geometry()))
    curve = box_then_clicks(session, labels > 0, clicks=3, click_axes=[0])
    assert {c.axis for c in curve.clicks} <= {session.view.permutation[0]}
    with pytest.raises(ValueError, match="canonical axes"):
        VolumeClicker(session.new_target(), axes=[3])


def test_chained_3d_starts_from_in_context_then_clicks(tmp_path):
    from kprism.cli import main

    root = make_volume_dataset(tmp_path / "Dataset951_Blobs", cases=2)
    out = tmp_path / "r.json"
    assert main(["eval", "--dataset", str(root), "--protocol", "cvpr25", "--mode", "chained", "--clicks", "2",
                 "--json", str(out), "--report", str(tmp_path / "report"), "--threads", "1"]) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    mode = report["datasets"]["Dataset951_Blobs"]["modes"]["chained_3d"]
    assert mode["targets"] == 2 and mode["knowledge"] == {"semantic": 0, "incontext": 2}  # 'blob' is no class: a reference
    assert set(mode["dice_at_interactions"]) == {"0", "1", "2"} and report["clicks"] == 2
    first = report["datasets"]["Dataset951_Blobs"]["items"][0]

    dataset = load_dataset(root)
    target_case, other = dataset.cases("train")
    image, labels = dataset.load(target_case)
    reference_image, reference_labels = dataset.load(other)
    session = KPrismSession(device="cpu", threads=1)
    session.set_image(image)
    start = session.segment_in_context([Reference(reference_image, reference_labels == 1)]).mask > 0
    assert first["curve"][0] == pytest.approx(dice(start, labels == 1))
    table = (tmp_path / "report" / "report.md").read_text(encoding="utf-8")
    assert "| Dataset951_Blobs | train | chained_3d | 2 |" in table and "2 clicks" in table


def test_cvpr25_protocol_on_the_command_line(tmp_path):
    from kprism.cli import main

    root = make_volume_dataset(tmp_path / "Dataset950_Blob")
    assert main(["eval", "--dataset", str(root), "--protocol", "cvpr25", "--json", str(tmp_path / "r.json"),
                 "--mode", "interactive", "--threads", "1"]) == 0
    report = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    mode = report["datasets"]["Dataset950_Blob"]["modes"]["interactive_3d"]
    assert report["clicks"] == 5  # the protocol's own default
    assert mode["targets"] == 1 and set(mode["dice_at_interactions"]) == {"0", "1", "2", "3", "4", "5"}
    assert sum(mode["click_axes"].values()) == len(report["datasets"]["Dataset950_Blob"]["items"][0]["click_axes"])

    # A rerun beside the previous results (the file it replaces): the report gives previous → this run.
    assert main(["eval", "--dataset", str(root), "--protocol", "cvpr25", "--mode", "interactive", "--threads", "1",
                 "--json", str(tmp_path / "r.json"), "--compare", str(tmp_path / "r.json"), "--report", str(tmp_path / "report")]) == 0
    first, last = mode["dice_at_interactions"]["0"], mode["dice_at_interactions"]["5"]
    text = (tmp_path / "report" / "report.md").read_text(encoding="utf-8")
    assert "## Previous run → this run" in text
    assert f"| Dataset950_Blob | interactive_3d | {first:.3f} → {first:.3f} | {last:.3f} → {last:.3f} |" in text


def test_cvpr25_protocol_refuses_a_2d_dataset_and_a_2d_mode(tmp_path, capsys):
    from kprism.cli import main

    from .synthetic import make_shapes_dataset

    root = make_shapes_dataset(tmp_path / "Dataset900_Shapes", cases=2)
    assert main(["eval", "--dataset", str(root), "--protocol", "cvpr25", "--threads", "1"]) == 1
    volume = make_volume_dataset(tmp_path / "Dataset950_Blob")
    capsys.readouterr()
    assert main(["eval", "--dataset", str(volume), "--protocol", "cvpr25", "--mode", "scribble", "--threads", "1"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "--protocol cvpr25" in error and "interactive, chained" in error


def test_summary_means_each_interaction_per_mode():
    from kprism.evaluate.volumetric import VolumeItem

    items = [VolumeItem("a", "x", "interactive", [0.2, 0.4], 0.4, 0.3, 0.5, click_axes=[0], click_ms=[10.0]),
             VolumeItem("b", "x", "interactive", [0.4, 0.8], 0.8, 0.6, 0.7, click_axes=[2], click_ms=[30.0]),
             VolumeItem("a", "x", "chained", [0.9, 0.7], 0.7, 0.8, 0.1, knowledge="semantic", click_axes=[0])]
    summary = summarise_volumes(items)
    assert summary["interactive_3d"]["dice_at_interactions"] == pytest.approx({"0": 0.3, "1": 0.6})
    assert summary["interactive_3d"]["click_axes"] == {"0": 1, "1": 0, "2": 1}
    assert summary["interactive_3d"]["latency_ms"]["click_p50"] == pytest.approx(20.0)
    assert summary["chained_3d"]["targets"] == 1 and summary["chained_3d"]["knowledge"] == {"semantic": 1, "incontext": 0}


def test_source_slice_is_the_same_voxels_in_the_canonical_view():
    from kprism.evaluate.clickers import source_slice

    shape = (12, 40, 36)
    view = CanonicalView.of(sideways_geometry(), shape)
    assert view.permutation != (0, 1, 2) and any(view.flips)
    for source_axis in range(3):
        for index in (0, 3, shape[source_axis] - 1):
            slab = np.zeros(shape, bool)
            np.moveaxis(slab, source_axis, 0)[index] = True
            axis, canonical_index = source_slice(view, source_axis, index)
            canonical = view.to_canonical(slab)
            assert np.take(canonical, canonical_index, axis=axis).all() and canonical.sum() == slab.sum()
