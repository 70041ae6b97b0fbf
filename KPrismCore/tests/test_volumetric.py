"""The 3D volumetric protocol runs box + 5 clicks per structure and scores the volume."""

from __future__ import annotations

import json

import numpy as np
import SimpleITK as sitk

from kprism.data.nnunet_v2 import load_dataset
from kprism.evaluate.volumetric import evaluate_volumes
from kprism.session import KPrismSession


def make_volume_dataset(root):
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    k, j, i = np.mgrid[:10, :40, :40]
    labels = (((i - 20) / 9) ** 2 + ((j - 18) / 7) ** 2 + ((k - 5) / 3) ** 2 <= 1).astype(np.uint8)
    image = np.where(labels > 0, 80, -50).astype(np.int16) + np.random.default_rng(0).integers(-5, 5, labels.shape).astype(np.int16)
    for array, folder, name in ((image, "imagesTr", "vol_0000.nii.gz"), (labels, "labelsTr", "vol.nii.gz")):
        itk = sitk.GetImageFromArray(array)
        itk.SetSpacing((1.0, 1.0, 2.5))
        sitk.WriteImage(itk, str(root / folder / name))
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "blob": 1},
                                                   "numTraining": 1, "file_ending": ".nii.gz"}), encoding="utf-8")
    return root


def test_box_then_five_clicks_scored_in_3d(tmp_path, tiny_model):
    model, catalog = tiny_model
    dataset = load_dataset(make_volume_dataset(tmp_path / "Dataset950_Blob"))
    items = evaluate_volumes(KPrismSession(model, catalog=catalog, device="cpu"), dataset)
    assert len(items) == 1
    item = items[0]
    assert len(item.curve) == 6 and 0 <= item.final_dice <= 1 and 0 <= item.nsd <= 1
    assert item.dice_auc == np.trapezoid(item.curve) / 5


def test_cvpr25_protocol_on_the_command_line(tmp_path):
    from kprism.cli import main

    root = make_volume_dataset(tmp_path / "Dataset950_Blob")
    assert main(["eval", "--dataset", str(root), "--protocol", "cvpr25", "--json", str(tmp_path / "r.json"), "--threads", "1"]) == 0
    mode = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["datasets"]["Dataset950_Blob"]["modes"]["interactive_3d"]
    assert mode["targets"] == 1 and set(mode["dice_at_interactions"]) == {"0", "1", "2", "3", "4", "5"}


def test_cvpr25_protocol_refuses_a_2d_dataset(tmp_path):
    from kprism.cli import main

    from .synthetic import make_shapes_dataset

    root = make_shapes_dataset(tmp_path / "Dataset900_Shapes", cases=2)
    assert main(["eval", "--dataset", str(root), "--protocol", "cvpr25", "--threads", "1"]) == 1
