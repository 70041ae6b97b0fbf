"""Evaluation protocols: items, click curves and summaries on a generated dataset."""

from __future__ import annotations

import numpy as np

from kprism.data.nnunet_v2 import load_dataset
from kprism.evaluate.protocols import ReferencePicker, evaluate_dataset, summarise
from kprism.session import KPrismSession

from .synthetic import make_shapes_dataset


def test_every_mode_is_scored_on_every_label(tmp_path, tiny_model):
    model, catalog = tiny_model
    dataset = load_dataset(make_shapes_dataset(tmp_path / "Dataset900_Shapes", cases=4))
    session = KPrismSession(model, catalog=catalog, device="cpu")
    items = evaluate_dataset(session, dataset, max_clicks=3, references=(1, 2))
    assert {(i.case_id, i.label) for i in items} == {(c.case_id, l) for c in dataset.cases("train") for l in ("disk", "square")}
    disk = next(i for i in items if i.label == "disk")
    assert "semantic" in disk.scores and "incontext_1" in disk.scores and "incontext_2" in disk.scores
    assert len(disk.scores["clicks"]) == 3 and all(0 <= d <= 1 for d in disk.scores["clicks"])
    square = next(i for i in items if i.label == "square")
    assert "semantic" in square.scores  # 'square' is a class of this catalog as well
    summary = summarise(items)
    assert summary["cases"] == 4 and set(summary["dice_at_clicks"]) == {"1", "3"}


def test_references_are_other_cases_and_fixed(tmp_path):
    dataset = load_dataset(make_shapes_dataset(tmp_path / "Dataset900_Shapes", cases=5))
    cases = dataset.cases("train")
    picker = ReferencePicker(dataset, cases, seed=3)
    first = picker.references(cases[0].case_id, 1, 2)
    again = ReferencePicker(dataset, cases, seed=3).references(cases[0].case_id, 1, 2)
    assert len(first) == 2
    target = dataset.load(cases[0])[0].array
    for ref, same in zip(first, again):
        assert not np.array_equal(ref.image.array, target)
        np.testing.assert_array_equal(ref.image.array, same.image.array)
