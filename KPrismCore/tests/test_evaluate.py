"""Evaluation protocols and metrics: items, click curves, summaries, hand-computed metric cases."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kprism.cli import main
from kprism.data.interaction import Click, dice
from kprism.data.nnunet_v2 import load_dataset
from kprism.evaluate.metrics import dice_auc, nof, nsd
from kprism.evaluate.protocols import ReferencePicker, Timings, evaluate_dataset, summarise
from kprism.session import KPrismSession

from .synthetic import make_shapes_dataset


def test_every_mode_is_scored_on_every_label(tmp_path, tiny_model):
    model, catalog = tiny_model
    dataset = load_dataset(make_shapes_dataset(tmp_path / "Dataset900_Shapes", cases=4))
    session = KPrismSession(model, catalog=catalog, device="cpu")
    timings = Timings()
    items = evaluate_dataset(session, dataset, ("semantic", "incontext", "interactive", "scribble"),
                             max_clicks=3, references=(1, 2), timings=timings)
    assert {(i.case_id, i.label) for i in items} == {(c.case_id, label) for c in dataset.cases("train") for label in ("disk", "square")}
    disk = next(i for i in items if i.label == "disk")
    assert set(disk.scores) == {"semantic", "incontext_1", "incontext_2", "interactive", "scribble"}
    assert len(disk.scores["interactive"]["curve"]) == 3
    summary = summarise(items, timings, cap=3)
    interactive = summary["interactive"]
    assert interactive["cases"] == 4 and set(interactive["dice_at_clicks"]) == {"1", "3"}
    assert interactive["noc90"] is not None and 1 <= interactive["noc90"] <= 3
    for mode in summary.values():
        assert {"cases", "dice_mean", "latency_ms", "peak_rss_mb"} <= set(mode)
        assert mode["latency_ms"]["click_p50"] > 0 and mode["latency_ms"]["encode_p50"] > 0


def test_one_pass_mode_scores_every_label_from_one_label_map(tmp_path, tiny_model):
    import torch

    from kprism.catalog import ClassCatalog
    from kprism.model import build_model, preset

    dataset = load_dataset(make_shapes_dataset(tmp_path / "Dataset900_Shapes", cases=3))
    torch.manual_seed(0)
    model = build_model(preset("tiny", num_classes=2, class_head=True)).eval()
    with torch.no_grad():
        model.class_head.classify.bias[:] = torch.tensor([0.3, -0.2])  # some pixels of each class
    session = KPrismSession(model, catalog=ClassCatalog.from_names(["disk", "square"]), device="cpu")
    items = evaluate_dataset(session, dataset, ("onepass",))
    assert {i.label for i in items} == {"disk", "square"} and all("onepass" in i.scores for i in items)
    case = dataset.cases("train")[0]
    image, labels = dataset.load(case)
    session.set_image(image)
    expected = session.segment_semantic_labels(["disk", "square"], engine="one_pass").labels == 1
    disk = next(i for i in items if i.case_id == case.case_id and i.label == "disk")
    truth = labels == 1
    assert disk.scores["onepass"]["dice"] == pytest.approx(2 * (expected & truth).sum() / (expected.sum() + truth.sum()))
    model, catalog = tiny_model
    with pytest.raises(ValueError, match="class head"):
        evaluate_dataset(KPrismSession(model, catalog=catalog, device="cpu"), dataset, ("onepass",))


def test_noc_is_not_reported_without_the_full_click_budget(tmp_path, tiny_model):
    model, catalog = tiny_model
    dataset = load_dataset(make_shapes_dataset(tmp_path / "Dataset900_Shapes", cases=2))
    items = evaluate_dataset(KPrismSession(model, catalog=catalog, device="cpu"), dataset, ("interactive",), max_clicks=2)
    assert summarise(items, cap=20)["interactive"]["noc90"] is None


def test_references_are_other_cases_and_fixed(tmp_path):
    dataset = load_dataset(make_shapes_dataset(tmp_path / "Dataset900_Shapes", cases=5))
    cases = dataset.cases("train")
    first = ReferencePicker(dataset, cases, seed=3).references(cases[0].case_id, 1, 2)
    again = ReferencePicker(dataset, cases, seed=3).references(cases[0].case_id, 1, 2)
    assert len(first) == 2
    target = dataset.load(cases[0])[0].array
    for ref, same in zip(first, again):
        assert not np.array_equal(ref.image.array, target)
        np.testing.assert_array_equal(ref.image.array, same.image.array)


def test_eval_command_writes_json_and_report(tmp_path):
    root = make_shapes_dataset(tmp_path / "Dataset900_Shapes", cases=3)
    code = main(["eval", "--dataset", str(root), "--clicks", "2", "--json", str(tmp_path / "r.json"),
                 "--report", str(tmp_path / "report"), "--threads", "1"])
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    modes = report["datasets"]["Dataset900_Shapes"]["modes"]
    assert {"incontext_1", "interactive", "scribble"} <= set(modes)  # 'disk' is not a class of the bundled model
    assert (tmp_path / "report" / "dice_vs_clicks.png").exists() and "| Dataset900_Shapes |" in (tmp_path / "report" / "report.md").read_text(encoding="utf-8")


# ------------------------------------------------------------------ metrics on hand-computed cases
def test_nsd_of_a_square_shifted_within_and_beyond_tolerance():
    truth = np.zeros((40, 40), bool)
    truth[10:30, 10:30] = True
    assert nsd(truth, truth, (1.0, 1.0)) == pytest.approx(1.0)
    shifted = np.roll(truth, 1, axis=1)  # every boundary point within 1 px ≤ 2 px tolerance
    assert nsd(shifted, truth, (1.0, 1.0), tolerance=2.0) == pytest.approx(1.0)
    far = np.roll(truth, 10, axis=1)  # left and right edges 10 px away; top/bottom edges partly match
    assert nsd(far, truth, (1.0, 1.0), tolerance=2.0) < 0.7
    assert nsd(np.zeros_like(truth), truth, (1.0, 1.0)) == 0.0
    assert nsd(np.zeros_like(truth), np.zeros_like(truth), (1.0, 1.0)) == 1.0


def test_nsd_tolerance_is_in_physical_units():
    truth = np.zeros((40, 40), bool)
    truth[10:30, 10:30] = True
    shifted = np.roll(truth, 1, axis=1)
    assert nsd(shifted, truth, (3.0, 3.0), tolerance=2.0) < 1.0  # one 3 mm pixel is beyond 2 mm


def test_nof_and_dice_auc():
    assert nof([3, 20, 20, 7], cap=20) == 2
    assert dice_auc([0.5, 1.0]) == pytest.approx(0.75)
    assert dice_auc([0.2, 0.2, 0.2]) == pytest.approx(0.2)


# ------------------------------------------------------------------ chained mode and the slice clicker
def test_chained_mode_starts_from_the_class_result_then_clicks_on_its_slice(tmp_path, tiny_model):
    model, catalog = tiny_model
    dataset = load_dataset(make_shapes_dataset(tmp_path / "Dataset900_Shapes", cases=2))
    session = KPrismSession(model, catalog=catalog, device="cpu")
    items = evaluate_dataset(session, dataset, ("chained",), max_clicks=3)
    assert {i.label for i in items} == {"disk", "square"} and all("chained" in i.scores for i in items)
    disk = next(i for i in items if i.label == "disk")
    image, labels = dataset.load(next(c for c in dataset.cases("train") if c.case_id == disk.case_id))
    session.set_image(image)
    semantic = session.segment_semantic(["disk"], engine="auto")["disk"].mask > 0
    scores = disk.scores["chained"]
    assert scores["knowledge"] == "semantic" and scores["start"] == pytest.approx(dice(semantic, labels == 1))
    assert len(scores["curve"]) == 3
    summary = summarise(items, cap=3)["chained"]
    assert summary["knowledge"] == {"semantic": 4, "incontext": 0}
    assert summary["dice_start"] == pytest.approx(np.mean([i.scores["chained"]["start"] for i in items]))
    assert summary["dice_auc"] == pytest.approx(np.mean([dice_auc([i.scores["chained"]["start"], *i.scores["chained"]["curve"]]) for i in items]))


def test_chained_mode_segments_a_structure_that_is_no_class_from_a_reference(tmp_path, tiny_model):
    from kprism.catalog import ClassCatalog

    model, _ = tiny_model
    dataset = load_dataset(make_shapes_dataset(tmp_path / "Dataset900_Shapes", cases=3))
    session = KPrismSession(model, catalog=ClassCatalog.from_names(["liver", "lung", "heart"]), device="cpu")
    items = evaluate_dataset(session, dataset, ("chained",), max_clicks=2, labels=["disk"])
    item = items[0]
    reference = ReferencePicker(dataset, dataset.cases("train")).references(item.case_id, 1, 1)
    image, labels = dataset.load(next(c for c in dataset.cases("train") if c.case_id == item.case_id))
    session.set_image(image)
    start = session.segment_in_context(reference).mask > 0
    assert item.scores["chained"]["knowledge"] == "incontext"
    assert item.scores["chained"]["start"] == pytest.approx(dice(start, labels == 1))


def test_slice_clicker_maps_slice_points_to_the_source_voxel_of_a_flipped_volume(tiny_model):
    from kprism.evaluate.clickers import SliceClicker, source_slice
    from kprism.image import Geometry, ImageData

    model, catalog = tiny_model
    volume = np.random.default_rng(0).normal(100, 30, (10, 24, 28)).astype(np.float32)
    ras = Geometry((0.8, 0.9, 2.0), (10.0, -5.0, 3.0), (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))  # flips rows and columns
    session = KPrismSession(model, catalog=catalog, device="cpu", threads=1)
    session.set_image(ImageData(volume, ras))
    assert any(session.view.flips)
    axis, index = source_slice(session.view, 0, 3)
    clicker = SliceClicker(session.new_target(), axis, index)
    marker = np.zeros(volume.shape, bool)
    marker[3, 5, 20] = True  # source (k, j, i)
    row, column = np.argwhere(clicker.truth_of(marker))[0]
    assert clicker.source_ijk(row, column) == [20.0, 5.0, 3.0]
    answer = clicker(Click((int(row), int(column)), True))
    assert answer.shape == clicker.truth_of(marker).shape
    assert np.array_equal(answer, clicker.truth_of(clicker.target.result().mask > 0))  # this slice of the target's result
    assert clicker.target.anchors == {(axis, index)} and clicker.target.result().mask[[0, 1, 2, 4, 5]].sum() == 0  # kept to its slice


def test_per_slice_protocol_refuses_the_3d_click_rule(tmp_path, tiny_model):
    model, catalog = tiny_model
    dataset = load_dataset(make_shapes_dataset(tmp_path / "Dataset900_Shapes", cases=1))
    with pytest.raises(ValueError, match="kprism or ritm, not 'cvpr25'"):
        evaluate_dataset(KPrismSession(model, catalog=catalog, device="cpu"), dataset, ("interactive",), rule="cvpr25")


def test_eval_command_scores_the_chained_mode(tmp_path):
    root = make_shapes_dataset(tmp_path / "Dataset900_Shapes", cases=2)
    assert main(["eval", "--dataset", str(root), "--mode", "chained", "--clicks", "2", "--json", str(tmp_path / "r.json"),
                 "--threads", "1"]) == 0
    modes = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["datasets"]["Dataset900_Shapes"]["modes"]
    assert set(modes) == {"chained"} and modes["chained"]["targets"] == 4 and set(modes["chained"]["dice_at_clicks"]) == {"1"}


def test_eval_command_scores_only_the_named_case_from_any_split_and_refuses_unknown_ones(tmp_path, capsys):
    root = make_shapes_dataset(tmp_path / "Dataset900_Shapes", cases=3)
    dataset = load_dataset(root)
    held_out = dataset.cases("train")[1].case_id
    assert len(dataset.cases(dataset.evaluation_split())) == 3
    assert main(["eval", "--dataset", str(root), "--mode", "interactive", "--clicks", "1", "--case",
                 f"Dataset900_Shapes/{held_out}", "--json", str(tmp_path / "r.json"), "--threads", "1"]) == 0
    entry = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["datasets"]["Dataset900_Shapes"]
    assert entry["split"] == held_out and {item["case_id"] for item in entry["items"]} == {held_out}
    assert main(["eval", "--dataset", str(root), "--case", "Dataset900_Shapes/nobody", "--threads", "1"]) != 0
    assert "has no case nobody" in capsys.readouterr().err
    assert main(["eval", "--dataset", str(root), "--case", "Dataset999_Other/x", "--threads", "1"]) != 0
    assert "not among the --dataset folders" in capsys.readouterr().err
