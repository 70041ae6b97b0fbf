"""The nnU-Net v2 / Decathlon dataset reader, on small generated datasets and on the shared real ones."""

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from kprism.data.nnunet_v2 import Case, DatasetError, load_dataset, slice_index, take_slice

SHARED_DATASETS = Path(__file__).resolve().parents[3] / "shared" / "datasets"


def _write(path: Path, array: np.ndarray, spacing=None, rgb=False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array, isVector=rgb)
    if spacing is not None:
        image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


def _write_json(root: Path, description) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(description), encoding="utf-8")


def _edit_json(root: Path, **changes) -> None:
    description = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    description.update(changes)
    for key in [key for key, value in changes.items() if value is None]:
        del description[key]
    _write_json(root, description)


def _grey_label(shape=(8, 10)) -> np.ndarray:
    label = np.zeros(shape, np.uint8)
    label[2:5, 3:7] = 1
    return label


@pytest.fixture
def grey_dataset(tmp_path) -> Path:
    """2D grey PNGs, two training cases (one mask stored as 0/255) and no test split."""
    root = tmp_path / "Dataset001_Grey"
    image = np.arange(80, dtype=np.uint8).reshape(8, 10)
    _write(root / "imagesTr" / "b_0000.png", image)
    _write(root / "labelsTr" / "b.png", _grey_label())
    _write(root / "imagesTr" / "a_0000.png", image[::-1].copy())
    _write(root / "labelsTr" / "a.png", _grey_label() * 255)
    labels = {"background": 0, "lung": 1}
    _write_json(root, {"channel_names": {"0": "X-ray"}, "labels": labels, "numTraining": 2, "file_ending": ".png"})
    return root


# ----------------------------------------------------------------------------------------------- layouts


def test_grey_png_dataset(grey_dataset):
    ds = load_dataset(grey_dataset)
    assert (ds.root, ds.name, ds.modality, ds.dim, ds.is_rgb) == (grey_dataset, "Dataset001_Grey", "x-ray", 2, False)
    assert ds.labels == {"lung": 1}
    assert [c.case_id for c in ds.cases("train")] == ["a", "b"]
    assert ds.cases("test") == [] and ds.evaluation_split() == "train"
    image, labels = ds.load(ds.cases()[0])
    assert image.array.shape == (8, 10) and image.modality == "x-ray" and not image.is_rgb
    np.testing.assert_array_equal(labels, _grey_label())  # the 0/255 mask comes back as 0/1


def test_rgb_png_dataset_with_a_test_split(tmp_path):
    root = tmp_path / "Dataset003_Skin"
    rng = np.random.default_rng(0)
    for split, case_id in (("Tr", "c1"), ("Tr", "c2"), ("Ts", "t1")):
        colour = rng.integers(0, 255, (8, 10, 3), dtype=np.uint8)
        _write(root / f"images{split}" / f"{case_id}_0000.png", colour, rgb=True)
        _write(root / f"labels{split}" / f"{case_id}.png", _grey_label())
    channels = {"0": "R", "1": "G", "2": "B"}
    _write_json(root, {"channel_names": channels, "labels": {"background": 0, "lesion": 1}, "numTraining": 2,
                       "file_ending": ".png", "modality": "Dermoscopy", "tensor_image_size": "2D"})
    ds = load_dataset(root)
    assert (ds.modality, ds.dim, ds.is_rgb) == ("dermoscopy", 2, True)
    assert [c.case_id for c in ds.cases("test")] == ["t1"] and ds.evaluation_split() == "test"
    image, labels = ds.load(ds.cases("test")[0])
    assert image.is_rgb and image.array.shape == (8, 10, 3) and labels.shape == (8, 10)
    _edit_json(root, modality=None)
    assert load_dataset(root).modality == "unknown"  # "R" names a colour channel, not a modality


def test_3d_nifti_dataset_reads_channel_0_with_its_geometry(tmp_path):
    root = tmp_path / "Dataset006_CT"
    label = np.zeros((4, 6, 5), np.uint8)
    label[1:3, 2:4, 1:4] = 2
    label[0, 0, 0] = 1
    _write(root / "imagesTr" / "ct1_0000.nii.gz", np.full((4, 6, 5), -100, np.int16), spacing=(0.8, 0.8, 2.5))
    _write(root / "imagesTr" / "ct1_0001.nii.gz", np.full((4, 6, 5), 7, np.int16), spacing=(0.8, 0.8, 2.5))
    _write(root / "labelsTr" / "ct1.nii.gz", label, spacing=(0.8, 0.8, 2.5))
    _write_json(root, {"channel_names": {"0": "CT", "1": "PET"}, "labels": {"background": 0, "liver": 1, "spleen": 2},
                       "numTraining": 1, "file_ending": ".nii.gz"})
    ds = load_dataset(root)
    assert (ds.modality, ds.dim, ds.is_rgb, ds.labels) == ("ct", 3, False, {"liver": 1, "spleen": 2})
    image, labels = ds.load(ds.cases()[0])
    assert (image.array == -100).all()  # channel 0, not the PET channel
    assert image.geometry.spacing == pytest.approx((0.8, 0.8, 2.5))
    np.testing.assert_array_equal(labels, label)


def _decathlon(root: Path, **changes) -> Path:
    label = np.zeros((3, 4, 5), np.uint8)
    label[1, 1:3, 1:3] = 1
    for case_id in ("liver_1", "liver_0"):
        _write(root / "imagesTr" / f"{case_id}.nii.gz", np.ones((3, 4, 5), np.float32))
        _write(root / "labelsTr" / f"{case_id}.nii.gz", label)
    description = {
        "name": "Liver", "modality": {"0": "T2"}, "labels": {"0": "background", "1": "liver"}, "tensorImageSize": "3D",
        "numTraining": 2, "numTest": 1, "test": ["./imagesTs/liver_9.nii.gz"],
        "training": [
            {"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in ("liver_1", "liver_0")
        ],
    }
    _write_json(root, {**description, **changes})
    return root


def test_decathlon_dataset(tmp_path):
    ds = load_dataset(_decathlon(tmp_path / "Task03_Liver"))
    assert (ds.name, ds.modality, ds.dim, ds.is_rgb, ds.labels) == ("Task03_Liver", "mri", 3, False, {"liver": 1})
    assert ds.cases("train") == [
        Case("liver_0", ds.root / "imagesTr" / "liver_0.nii.gz", ds.root / "labelsTr" / "liver_0.nii.gz"),
        Case("liver_1", ds.root / "imagesTr" / "liver_1.nii.gz", ds.root / "labelsTr" / "liver_1.nii.gz"),
    ]
    assert ds.cases("test") == [] and ds.evaluation_split() == "train"  # Decathlon test images have no labels
    image, labels = ds.load(ds.cases()[0])
    assert image.array.shape == labels.shape == (3, 4, 5) and image.modality == "mri"


def test_unknown_split_is_rejected(grey_dataset):
    with pytest.raises(ValueError, match="split"):
        load_dataset(grey_dataset).cases("validation")


# ----------------------------------------------------------------------------------------------- bad input


def _raises(root: Path, *fragments: str, load_first: bool = False) -> None:
    with pytest.raises(DatasetError) as caught:
        ds = load_dataset(root)
        if load_first:
            ds.load(ds.cases()[0])
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)
    for fragment in (root.name, *fragments):
        assert fragment in message, message


def test_missing_dataset_json(tmp_path):
    (tmp_path / "Dataset009_Empty").mkdir()
    _raises(tmp_path / "Dataset009_Empty", "no dataset.json")


@pytest.mark.parametrize("text, fragment", [("{not json", "not valid JSON"), ("[1, 2]", "JSON object")])
def test_unreadable_dataset_json(tmp_path, text, fragment):
    root = tmp_path / "Dataset009_Broken"
    root.mkdir()
    (root / "dataset.json").write_text(text, encoding="utf-8")
    _raises(root, fragment)


def test_json_of_neither_layout(grey_dataset):
    _edit_json(grey_dataset, channel_names=None)
    _raises(grey_dataset, "'channel_names'", "'training'")


@pytest.mark.parametrize("field", ["labels", "numTraining", "file_ending"])
def test_missing_required_field(grey_dataset, field):
    _edit_json(grey_dataset, **{field: None})
    _raises(grey_dataset, f"no '{field}' field")


@pytest.mark.parametrize(
    "field, value",
    [
        ("channel_names", ["X-ray"]),
        ("channel_names", {}),
        ("labels", ["background", "lung"]),
        ("labels", {"background": 0, "lung": "1"}),
        ("labels", {"background": 0, "lung": 1, "both": [1, 2]}),  # nnU-Net region-based labels
        ("numTraining", "2"),
        ("numTraining", True),
        ("file_ending", 3),
        ("modality", 5),
    ],
)
def test_field_of_the_wrong_type(grey_dataset, field, value):
    _edit_json(grey_dataset, **{field: value})
    _raises(grey_dataset, f"'{field}'")


def test_numtraining_must_match_the_label_files(grey_dataset):
    _edit_json(grey_dataset, numTraining=3)
    _raises(grey_dataset, "'numTraining' is 3", "2 label files")


def test_label_without_image(grey_dataset):
    _write(grey_dataset / "labelsTr" / "orphan.png", _grey_label())
    _edit_json(grey_dataset, numTraining=3)
    _raises(grey_dataset, "'orphan'", "orphan_0000.png")


def test_undeclared_label_values(grey_dataset):
    label = _grey_label()
    label[0, 0], label[7, 9] = 7, 3
    _write(grey_dataset / "labelsTr" / "a.png", label)
    _raises(grey_dataset, "'a'", "[3, 7]", load_first=True)


def test_image_and_label_of_different_size(grey_dataset):
    _write(grey_dataset / "labelsTr" / "a.png", _grey_label((8, 12)))
    _raises(grey_dataset, "'a'", "(8, 10)", "(8, 12)", load_first=True)


def test_grey_image_in_a_colour_dataset(grey_dataset):
    _edit_json(grey_dataset, channel_names={"0": "R", "1": "G", "2": "B"})
    _raises(grey_dataset, "'a'", "R, G, B", load_first=True)


def test_decathlon_case_without_image(tmp_path):
    root = _decathlon(tmp_path / "Task03_Liver")
    (root / "imagesTr" / "liver_0.nii.gz").unlink()
    _raises(root, "'liver_0'", "no image")


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"labels": {"background": 0, "liver": 1}}, "'labels'"),  # nnU-Net direction in a Decathlon file
        ({"training": []}, "'training'"),
        ({"training": ["./imagesTr/liver_0.nii.gz"]}, "'training'"),
        ({"tensorImageSize": "4D"}, "4D"),
    ],
)
def test_bad_decathlon_description(tmp_path, changes, fragment):
    root = _decathlon(tmp_path / "Task03_Liver", **changes)
    _raises(root, fragment)


# ----------------------------------------------------------------------------------------------- slices


def test_slice_index_along_each_axis():
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[1, 2, 3] = 1
    labels[3, 0:2, 5] = 2
    assert {v: a.tolist() for v, a in slice_index(labels, 0, [1, 2, 9]).items()} == {1: [1], 2: [3], 9: []}
    assert {v: a.tolist() for v, a in slice_index(labels, 1, [1, 2]).items()} == {1: [2], 2: [0, 1]}
    assert {v: a.tolist() for v, a in slice_index(labels, 2, [1, 2]).items()} == {1: [3], 2: [5]}
    with pytest.raises(ValueError, match="3D"):
        slice_index(labels[0], 0, [1])


def test_take_slice_along_each_axis():
    volume = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    np.testing.assert_array_equal(take_slice(volume, 0, 2), volume[2])
    np.testing.assert_array_equal(take_slice(volume, 1, 3), volume[:, 3])
    np.testing.assert_array_equal(take_slice(volume, 2, 5), volume[:, :, 5])
    assert take_slice(volume, 2, 0).shape == (4, 5)
    with pytest.raises(ValueError, match="axis"):
        take_slice(volume, 3, 0)
    with pytest.raises(IndexError):
        take_slice(volume, 0, 4)
    with pytest.raises(IndexError):
        take_slice(volume, 0, -1)


# ----------------------------------------------------------------------------------------------- real datasets


@pytest.mark.shared
def test_every_shared_dataset_loads():
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"the shared datasets are not at {SHARED_DATASETS} (present in CI, not in a fresh clone)")
    roots = sorted(p for p in SHARED_DATASETS.iterdir() if (p / "dataset.json").is_file())
    assert roots, f"no dataset folders in {SHARED_DATASETS}"
    for root in roots:
        ds = load_dataset(root)
        description = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
        assert ds.dim == int(description["tensor_image_size"][0]), root.name
        assert ds.modality == description["modality"].lower(), root.name
        assert len(ds.cases("train")) == description["numTraining"], root.name
        assert ds.labels and 0 not in ds.labels.values(), root.name
        image, labels = ds.load(ds.cases(ds.evaluation_split())[0])
        assert image.ndim == ds.dim and image.is_rgb == ds.is_rgb, root.name
        assert labels.shape == image.spatial_shape and np.issubdtype(labels.dtype, np.integer), root.name
        assert set(np.unique(labels).tolist()) <= {0, *ds.labels.values()}, root.name
        assert labels.max() > 0, root.name
        if ds.dim == 3:
            present = slice_index(labels, 0, list(ds.labels.values()))
            assert any(len(slices) for slices in present.values()), root.name
