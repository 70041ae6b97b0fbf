"""Reliability round 2 (issue 10): images without information, modality, classes, references, the Python API.

Each test is named after its row of the December reliability audit (I02 … X01). Outcomes must be a
correct result or a one-line refusal that names the problem; nothing is written for a refused input.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import slicerio
import SimpleITK as sitk
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays
from PIL import Image
from test_reliability import blob, run_kprism, segment, write_image

from kprism import cli
from kprism.catalog import ClassCatalog
from kprism.image import ImageData
from kprism.image_checks import MIN_SLICE_SIDE, UninformativeImageError
from kprism.io import read_image, read_mask
from kprism.modality import choose_modality
from kprism.reference_agreement import ReferenceMismatchWarning
from kprism.samples import sample_path
from kprism.session import KPrismSession, Reference

CT = sample_path("ct", "ts_ct_001crop.nii.gz")
CT_LABELS = sample_path("ct", "ts_ct_001crop_labels.nii.gz")
XRAY = sample_path("chest_xray", "MCUCXR_0001_0.png")
XRAY_LUNG = sample_path("chest_xray", "MCUCXR_0001_0_lung.png")
FETAL = sample_path("fetal_head", "hc18_013.png")
FETAL_TRUTH = sample_path("fetal_head", "hc18_013_fetal_head.png")
FETAL_REF = sample_path("fetal_head", "hc18_023.png")
FETAL_REF_MASK = sample_path("fetal_head", "hc18_023_fetal_head.png")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    from kprism.data.interaction import dice as kprism_dice

    return kprism_dice(np.asarray(a) > 0, np.asarray(b) > 0)


def labels_of(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def ct_truth(name: str) -> np.ndarray:
    values = json.loads(CT_LABELS.with_name("labels.json").read_text())
    return read_mask(CT_LABELS).array == values[name]


@pytest.fixture(scope="module")
def tiny_session() -> KPrismSession:
    """An untrained tiny model (64 px input): fast, and any output is possible."""
    from kprism.model import build_model, preset

    torch.manual_seed(0)
    model = build_model(preset("tiny", image_size=64, num_classes=2)).eval()
    return KPrismSession(model, catalog=ClassCatalog.from_names(["a", "b"]), device="cpu", threads=1)


@pytest.fixture(scope="module")
def bundled_session() -> KPrismSession:
    return KPrismSession(device="cpu", threads=1)


# ----------------------------------------------------------------------------------------------- no information


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".mha"])
def test_I02_all_nan_volume_is_refused_naming_the_voxel_count(tmp_path, capsys, suffix):
    array = np.full((12, 20, 24), np.nan, np.float32)
    array[0, 0, :3] = [np.inf, -np.inf, np.nan]
    write_image(tmp_path / f"nan{suffix}", array)

    code, _, err = segment(capsys, tmp_path / f"nan{suffix}", "--classes", "liver", "--out", tmp_path / "out.nii.gz")

    assert code == 1
    assert f"{array.size} of {array.size} voxels that are NaN or infinite" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.nii.gz").exists()


def test_I02_a_few_non_finite_voxels_are_refused_and_the_previous_image_is_kept(tiny_session):
    good = np.random.default_rng(0).normal(100, 30, (32, 32)).astype(np.float32)
    tiny_session.set_image(good)
    bad = good.copy()
    bad[3, 4], bad[5, 6], bad[7, 8] = np.nan, np.inf, -np.inf

    with pytest.raises(UninformativeImageError, match="has 3 of 1024 voxels that are NaN or infinite"):
        tiny_session.set_image(bad)
    assert tiny_session.image.array is good


@pytest.mark.parametrize(("name", "value"), [("const0.nii.gz", 0), ("const40.nii.gz", 40), ("const.png", 128)])
@pytest.mark.parametrize("classes", ["liver", "liver,spleen"])  # the prompted path and the one-pass head (I03d)
def test_I03_constant_image_is_refused_not_segmented(tmp_path, capsys, name, value, classes):
    if name.endswith(".png"):
        Image.fromarray(np.full((64, 64), value, np.uint8)).save(tmp_path / name)
    else:
        write_image(tmp_path / name, np.full((10, 30, 40), value, np.int16))

    code, _, err = segment(capsys, tmp_path / name, "--classes", classes, "--out", tmp_path / "out.nrrd")

    assert code == 1 and f"has no contrast: every voxel is {value}" in err
    assert not (tmp_path / "out.nrrd").exists()


def test_I05_single_voxel_volume_is_refused_as_too_small(tmp_path, capsys):
    write_image(tmp_path / "one.nii.gz", np.array([[[40]]], np.int16))

    code, _, err = segment(capsys, tmp_path / "one.nii.gz", "--classes", "liver", "--out", tmp_path / "out.nii.gz")

    assert code == 1 and "too small to segment" in err and "its slices are 1×1 pixels" in err
    assert f"at least {MIN_SLICE_SIDE}×{MIN_SLICE_SIDE}" in err


@pytest.mark.parametrize("shape", [(256, 1), (1, 256), (7, 300)])
def test_I06_pictures_under_the_minimum_side_are_refused(tmp_path, capsys, shape):
    ramp = np.linspace(0, 255, int(np.prod(shape))).astype(np.uint8).reshape(shape)
    Image.fromarray(ramp).save(tmp_path / "strip.png")

    code, _, err = segment(capsys, tmp_path / "strip.png", "--classes", "lung", "--out", tmp_path / "out.png")

    assert code == 1 and "too small to segment" in err and not (tmp_path / "out.png").exists()


def test_I06_the_minimum_side_itself_is_segmented(tiny_session):
    picture = np.random.default_rng(1).random((MIN_SLICE_SIDE, MIN_SLICE_SIDE + 3)).astype(np.float32)
    tiny_session.set_image(picture)

    result = tiny_session.add_click([2, 3])

    assert result.probability.shape == picture.shape and np.isfinite(result.probability).all()


def test_I06_slices_along_a_thin_axis_are_refused_for_that_axis_only(tiny_session):
    volume = np.random.default_rng(2).normal(size=(4, 20, 24)).astype(np.float32)
    tiny_session.set_image(volume, axis=0)  # 20×24 slices: fine
    with pytest.raises(UninformativeImageError, match="its slices are 4×24 pixels"):
        tiny_session.set_image(volume, axis=1)


# ----------------------------------------------------------------------------------------------- modality


def test_C07_readme_single_class_on_the_bundled_ct_finds_the_liver(tmp_path, capsys):
    out = tmp_path / "liver.seg.nrrd"

    code, stdout, err = segment(capsys, CT, "--classes", "liver", "--out", out)

    assert code == 0, err
    assert "modality: ct (inferred:" in stdout
    segmentation = slicerio.read_segmentation(str(out))
    labels = np.ascontiguousarray(segmentation["voxels"].transpose(2, 1, 0))
    assert dice(labels == 1, ct_truth("liver")) > 0.8  # was 0.0007 before the modality was inferred
    provenance = json.loads(segmentation["segments"][0]["tags"]["KPrism.Provenance"])
    assert provenance["modality"] == "ct"


def test_C07_explicit_modality_overrides_the_inference(tmp_path, capsys):
    code, stdout, _ = segment(capsys, CT, "--classes", "liver", "--modality", "MRI", "--out", tmp_path / "l.nii.gz")

    assert code == 0 and "modality: mri (given)" in stdout


def _synthetic_ct(with_air: bool) -> np.ndarray:
    rng = np.random.default_rng(3)
    volume = rng.normal(40, 15, (10, 64, 64))  # soft tissue
    volume[:, 20:30] = rng.normal(-100, 15, (10, 10, 64))  # fat
    if with_air:
        volume[:, :8] = rng.normal(-1000, 10, (10, 8, 64))
        volume[:, :, :3] = -3024  # outside the field of view
    return volume.astype(np.int16)


@pytest.mark.parametrize(("array", "declared", "expected"), [
    (_synthetic_ct(with_air=True), None, "ct"),
    (_synthetic_ct(with_air=False), None, "ct"),  # cropped inside the body: fat beside soft tissue
    (np.random.default_rng(4).gamma(2, 80, (10, 64, 64)).astype(np.int16), None, "unknown"),  # MR-like
    (np.random.default_rng(5).integers(0, 255, (64, 64)).astype(np.uint8), None, "unknown"),  # a picture
    (np.random.default_rng(6).normal(-1000, 300, (10, 64, 64)), None, "unknown"),  # no single air peak
    (_synthetic_ct(with_air=True), "mri", "mri"),
    (np.random.default_rng(4).gamma(2, 80, (10, 64, 64)), " CT ", "ct"),
])
def test_C07_modality_is_inferred_from_hounsfield_evidence(array, declared, expected):
    assert choose_modality(array, declared).modality == expected


def test_C07_the_session_applies_the_same_inference_for_every_caller(tiny_session):
    tiny_session.set_image(ImageData(_synthetic_ct(with_air=True)))

    assert tiny_session.image.modality == "ct" and "air" in tiny_session.modality_choice.reason


# ----------------------------------------------------------------------------------------------- classes


def test_C03_repeated_classes_are_segmented_once_with_a_note(tmp_path, capsys):
    out = tmp_path / "organs.seg.nrrd"

    code, stdout, err = segment(capsys, CT, "--classes", "liver,spleen,liver,liver", "--out", out)

    assert code == 0, err
    assert "Repeated class names are segmented once: liver" in err
    names = [s["name"] for s in slicerio.read_segmentation(str(out))["segments"]]
    assert names == ["liver", "spleen"] and stdout.count("liver:") == 1


def test_C03_two_identical_names_give_one_segment(tmp_path, capsys):
    code, _, err = segment(capsys, CT, "--classes", "liver,liver", "--out", tmp_path / "l.seg.nrrd")

    assert code == 0 and "segmented once: liver" in err
    assert [s["name"] for s in slicerio.read_segmentation(str(tmp_path / "l.seg.nrrd"))["segments"]] == ["liver"]


@pytest.mark.parametrize("absent", ["prostate", "liver", "aorta", "retinal_vessel"])
def test_C06_a_class_absent_from_the_picture_is_not_found(tmp_path, capsys, absent):
    out = tmp_path / "x.png"

    code, stdout, err = segment(capsys, XRAY, "--classes", absent, "--out", out)

    assert code == 0, err
    assert f"{absent}: not found (0 voxels)" in stdout and not labels_of(out).any()


def test_C06_the_class_that_is_there_is_still_found(tmp_path, capsys):
    code, stdout, err = segment(capsys, XRAY, "--classes", "lung", "--out", tmp_path / "lung.png")

    assert code == 0, err
    assert dice(labels_of(tmp_path / "lung.png"), read_mask(XRAY_LUNG).array) > 0.9


def test_C06_prompted_engine_is_still_available_and_refinable(bundled_session):
    bundled_session.set_image(read_image(XRAY))
    result = bundled_session.segment_semantic(["lung"], engine="prompted")["lung"]
    row, column = np.argwhere(result.mask)[len(np.argwhere(result.mask)) // 2]
    refined = bundled_session.add_click([column, row], positive=False)

    assert result.quality_kind == "predicted quality (Dice)" and dice(result.mask, read_mask(XRAY_LUNG).array) > 0.9
    assert refined.mask[row, column] == 0  # the negative click took its pixel out of the lung


# ----------------------------------------------------------------------------------------------- references


@pytest.fixture
def fetal_mask_012(tmp_path) -> Path:
    """The fetal-head reference mask with a second label (2) as a band at the top."""
    mask = read_mask(FETAL_REF_MASK).array.astype(np.uint8)
    mask[:100] = 2
    path = tmp_path / "mask_012.png"
    Image.fromarray(mask).save(path)
    return path


def test_R04_multi_label_reference_mask_needs_a_label(tmp_path, capsys, fetal_mask_012):
    code, _, err = segment(capsys, FETAL, "--reference", FETAL_REF, fetal_mask_012, "--out", tmp_path / "o.png")

    assert code == 1 and "holds 2 labels (1, 2)" in err and "--reference-label" in err
    assert not (tmp_path / "o.png").exists()


def test_R04_reference_label_picks_the_structure(tmp_path, capsys, fetal_mask_012):
    code, _, err = segment(capsys, FETAL, "--reference", FETAL_REF, fetal_mask_012, "--reference-label", "1",
                           "--out", tmp_path / "picked.png")
    assert code == 0, err
    code, _, err = segment(capsys, FETAL, "--reference", FETAL_REF, FETAL_REF_MASK, "--out", tmp_path / "binary.png")
    assert code == 0, err

    assert np.array_equal(labels_of(tmp_path / "picked.png"), labels_of(tmp_path / "binary.png"))


def test_R04_a_label_that_the_mask_lacks_is_refused_listing_the_labels(tmp_path, capsys, fetal_mask_012):
    code, _, err = segment(capsys, FETAL, "--reference", FETAL_REF, fetal_mask_012, "--reference-label", "7",
                           "--out", tmp_path / "o.png")

    assert code == 1 and "no voxel of label 7; its labels are 1, 2" in err


def test_R04_multi_label_ct_map_as_a_reference_is_refused(tiny_session):
    tiny_session.set_image(ImageData(_synthetic_ct(with_air=True)))
    labels = read_mask(CT_LABELS).array

    with pytest.raises(ValueError, match=r"holds \d+ labels \(1, 2, 3"):
        tiny_session.segment_in_context([Reference(read_image(CT), labels)])


@pytest.mark.parametrize("reference", ["lung_xray", "corner_box"])
def test_R07_a_reference_the_result_does_not_follow_is_not_trusted(tmp_path, capsys, reference):
    if reference == "lung_xray":
        image, mask = XRAY, XRAY_LUNG
    else:
        box = np.zeros(read_mask(FETAL_REF_MASK).array.shape, np.uint8)
        box[: box.shape[0] // 5, : box.shape[1] // 5] = 1
        image, mask = FETAL_REF, tmp_path / "corner.png"
        Image.fromarray(box * 255).save(mask)

    code, stdout, err = segment(capsys, FETAL, "--reference", image, mask, "--out", tmp_path / "o.png")

    assert code == 0, err
    assert "In-context result not trusted: it does not depend on the reference" in err
    assert "not trusted, see the warning" in stdout and "0.9" not in stdout.split("segment:")[1]


def test_R07_the_right_reference_keeps_its_quality(bundled_session):
    bundled_session.set_image(read_image(FETAL))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReferenceMismatchWarning)
        result = bundled_session.segment_in_context([Reference(read_image(FETAL_REF), read_mask(FETAL_REF_MASK).array)])

    assert result.quality > 0.9 and bundled_session.reference_agreement.problem() is None
    assert dice(result.mask, read_mask(FETAL_TRUTH).array) > 0.85


def test_R01c_api_reference_mask_of_another_aspect_ratio_is_refused(tiny_session):
    tiny_session.set_image(np.random.default_rng(0).random((40, 60)).astype(np.float32))
    image = ImageData(np.random.default_rng(1).random((40, 60)).astype(np.float32))
    half = np.pad(np.ones((10, 10), np.uint8), ((5, 5), (10, 10)))
    cropped = np.pad(np.ones((5, 20), np.uint8), ((5, 5), (20, 20)))

    tiny_session.segment_in_context([Reference(image, half)])  # a uniform scale is accepted
    with pytest.raises(ValueError, match="15×60 but its image is 40×60, another aspect ratio"):
        tiny_session.segment_in_context([Reference(image, cropped)])


# ----------------------------------------------------------------------------------------------- Python API


def test_A02_fresh_session_answers_none(tiny_session):
    fresh = KPrismSession(tiny_session.model, catalog=tiny_session.catalog, device="cpu", threads=1)

    assert fresh.undo() is None and fresh.result() is None and fresh.last_slice is None


def test_A05_reference_without_a_mask_is_refused_by_name(tiny_session):
    tiny_session.set_image(np.random.default_rng(0).random((32, 32)).astype(np.float32))
    image = ImageData(np.random.default_rng(1).random((32, 32)).astype(np.float32))

    with pytest.raises(ValueError, match="Reference 1: the mask is None"):
        tiny_session.segment_in_context([Reference(image, None)])
    with pytest.raises(TypeError, match="Reference 1: the image must be a kprism ImageData"):
        tiny_session.segment_in_context([Reference(np.zeros((32, 32)), np.ones((32, 32)))])


@pytest.mark.parametrize("positive", ["false", "true", 1, 0, None])
def test_A06_positive_must_be_a_boolean(tiny_session, positive):
    tiny_session.set_image(np.random.default_rng(0).random((32, 32)).astype(np.float32))
    scribble = np.zeros((32, 32), bool)
    scribble[10:12, 10:20] = True

    with pytest.raises(TypeError, match="positive must be True or False"):
        tiny_session.add_click([5, 5], positive=positive)
    with pytest.raises(TypeError, match="positive must be True or False"):
        tiny_session.add_scribble(scribble, positive=positive)
    assert tiny_session.result() is None  # nothing was applied
    assert tiny_session.add_click([5, 5], positive=np.bool_(False)) is not None


@pytest.mark.parametrize("dtype", [np.complex64, np.bool_])
def test_I08a_complex_and_boolean_arrays_are_refused_by_name(tiny_session, dtype):
    with pytest.raises(UninformativeImageError, match="complex values|boolean"):
        tiny_session.set_image(np.ones((32, 32), dtype))


# ----------------------------------------------------------------------------------------------- CLI messages


@pytest.mark.parametrize("value", ["-1", "0", "two"])
def test_X01_threads_is_validated_by_name(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as stop:
        cli.main(["segment", str(XRAY), "--classes", "lung", "--threads", value, "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err

    assert stop.value.code == 2 and f"--threads must be a positive whole number, got '{value}'" in err


def test_unexpected_error_is_one_line_naming_the_input_with_a_debug_hint(tmp_path, capsys, monkeypatch):
    def broken(self, *args, **kwargs):
        raise KeyError("internal")

    monkeypatch.setattr(KPrismSession, "segment_semantic", broken)
    code, _, err = segment(capsys, XRAY, "--classes", "lung", "--out", tmp_path / "o.png")

    assert code == 1
    assert err.strip().splitlines() == [f"kprism: error: {XRAY}: unexpected KeyError: 'internal' (run with --debug for details)"]
    code, _, err = segment(capsys, XRAY, "--classes", "lung", "--out", tmp_path / "o.png", "--debug")
    assert code == 1 and "Traceback (most recent call last)" in err


# ----------------------------------------------------------------------------------------------- fuzzing set_image

_DTYPES = st.sampled_from([np.float16, np.float32, np.float64, np.int8, np.uint8, np.int16, np.uint16, np.int32,
                           np.int64, np.uint64, np.bool_, np.complex64])


@settings(max_examples=1000, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(array=_DTYPES.flatmap(lambda dtype: arrays(dtype, st.one_of(
           array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=12),  # mostly refused: too small or 1D/4D
           array_shapes(min_dims=2, max_dims=3, min_side=MIN_SLICE_SIDE, max_side=14),  # mostly accepted
           st.tuples(st.integers(8, 14), st.integers(8, 14), st.just(3))))),  # RGB pictures
       axis=st.one_of(st.just(0), st.integers(-1, 3)), rgb=st.booleans())
def test_fuzz_set_image_gives_a_clear_error_or_a_usable_image(tiny_session, array, axis, rgb):
    try:
        tiny_session.set_image(array, axis=axis, is_rgb=rgb)
    except (ValueError, TypeError) as error:
        message = str(error)
        assert message and "\n" not in message and "Traceback" not in message
        event(f"refused: {message.split(':')[0][:40]}")
        return
    event("accepted")
    # Accepted: every slice is at least 8×8, finite and not constant, and a click answers on the image grid.
    assert np.isfinite(array).all() and array.min() != array.max()
    shape = tiny_session.image.spatial_shape
    result = tiny_session.add_click([n // 2 for n in shape[::-1]])
    assert result.probability.shape == shape and np.isfinite(result.probability).all()
