"""`kprism` end to end, as a user runs it: real files in, real files out, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from kprism.cli import main
from kprism.io import read_image, read_segmentation


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "kprism.cli", *args], capture_output=True, encoding="utf-8", env=env, timeout=300)


def oblique_ct(path: Path) -> sitk.Image:
    """A bright ellipsoid in an oblique, anisotropic CT volume."""
    size = (48, 40, 12)  # i, j, k
    k, j, i = np.mgrid[: size[2], : size[1], : size[0]]
    array = np.where(((i - 24) / 10) ** 2 + ((j - 20) / 8) ** 2 + ((k - 6) / 4) ** 2 <= 1, 60, -900).astype(np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 1.1, 3.0))
    image.SetOrigin((-30.0, 12.5, 88.0))
    a = np.radians(20)
    image.SetDirection(tuple((np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])).ravel()))
    sitk.WriteImage(image, str(path))
    return image


def test_segment_with_ras_prompts_keeps_geometry_and_hits_the_clicked_voxel(tmp_path):
    image = oblique_ct(tmp_path / "ct.nii.gz")
    voxel = (24, 20, 6)  # the ellipsoid's centre, i j k
    lps = np.array(image.TransformIndexToPhysicalPoint(voxel))
    ras = (lps * [-1, -1, 1]).tolist()
    (tmp_path / "prompts.json").write_text(json.dumps(
        {"coordinates": "ras", "points": [{"position": ras, "positive": True}]}), encoding="utf-8")
    out = tmp_path / "out" / "seg.nii.gz"
    result = run("segment", str(tmp_path / "ct.nii.gz"), "--prompts", str(tmp_path / "prompts.json"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    written = sitk.ReadImage(str(out))
    assert written.GetSize() == image.GetSize()
    np.testing.assert_allclose(written.GetSpacing(), image.GetSpacing())
    np.testing.assert_allclose(written.GetOrigin(), image.GetOrigin())
    np.testing.assert_allclose(written.GetDirection(), image.GetDirection())
    labels = sitk.GetArrayFromImage(written)
    assert labels[voxel[2], voxel[1], voxel[0]] == 1  # the positive click is inside the result
    assert set(np.unique(labels[voxel[2]]).tolist()) <= {0, 1}


def test_semantic_classes_write_a_named_coloured_slicer_segmentation(tmp_path):
    from kprism.samples import sample_path

    out = tmp_path / "lung.seg.nrrd"
    assert main(["segment", str(sample_path("chest_xray", "MCUCXR_0013_0.png")), "--classes", "lung", "--out", str(out)]) == 0
    labels, geometry, segments = read_segmentation(out)
    assert [s["name"] for s in segments] == ["lung"]
    assert "KPrism.Provenance" in segments[0]["tags"]
    truth = read_image(sample_path("chest_xray", "MCUCXR_0013_0_lung.png")).array > 0
    predicted = labels[0] > 0
    assert 2 * (predicted & truth).sum() / (predicted.sum() + truth.sum()) > 0.8


def test_in_context_reference_on_the_command_line(tmp_path):
    from kprism.samples import sample_path

    out = tmp_path / "head.png"
    code = main(["segment", str(sample_path("fetal_head", "hc18_013.png")),
                 "--reference", str(sample_path("fetal_head", "hc18_023.png")), str(sample_path("fetal_head", "hc18_023_fetal_head.png")),
                 "--out", str(out), "--overlay", str(tmp_path / "look.png")])
    assert code == 0
    assert read_image(out).array.max() == 1 and (tmp_path / "look.png").stat().st_size > 10_000


def test_demo_writes_segmentations_and_an_overview(tmp_path):
    result = run("demo", "--out", str(tmp_path / "demo"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "demo" / "overview.png").stat().st_size > 50_000
    assert len(list((tmp_path / "demo").glob("*.seg.nrrd"))) == 4  # the bundled model has the one-pass class head
    assert "semantic: lung" in result.stdout and "CT classes in one pass" in result.stdout
    labels, _, segments = read_segmentation(tmp_path / "demo" / "ct_all_classes.seg.nrrd")
    assert len(segments) == 66 and len(np.unique(labels)) > 10  # many organs, one label map


def test_output_equal_to_input_is_refused(tmp_path):
    image = tmp_path / "ct.nii.gz"
    oblique_ct(image)
    before = image.read_bytes()
    result = run("segment", str(image), "--classes", "liver", "--out", str(image))
    assert result.returncode == 1 and "Refusing to overwrite the input" in result.stderr
    assert image.read_bytes() == before


def test_unwritable_output_is_reported_before_any_work(tmp_path):
    image = tmp_path / "ct.nii.gz"
    oblique_ct(image)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder", encoding="utf-8")
    result = run("segment", str(image), "--classes", "liver", "--out", str(blocker / "seg.nii.gz"))
    assert result.returncode == 1 and "Cannot create the output folder" in result.stderr


def test_unknown_class_lists_the_known_classes(tmp_path):
    image = tmp_path / "ct.nii.gz"
    oblique_ct(image)
    result = run("segment", str(image), "--classes", "livr", "--out", str(tmp_path / "x.nii.gz"))
    assert result.returncode == 1
    assert "Unknown class 'livr'" in result.stderr and "Did you mean liver" in result.stderr
    assert not (tmp_path / "x.nii.gz").exists()


def test_bad_prompt_file_names_the_problem(tmp_path):
    image = tmp_path / "ct.nii.gz"
    oblique_ct(image)
    (tmp_path / "p.json").write_text('{"points": [{"positive": true}]}', encoding="utf-8")
    result = run("segment", str(image), "--prompts", str(tmp_path / "p.json"), "--out", str(tmp_path / "x.nii.gz"))
    assert result.returncode == 1 and "p.json: points[0]: the key 'position' is missing" in result.stderr


def test_click_outside_the_volume_is_a_clear_error(tmp_path):
    image = tmp_path / "ct.nii.gz"
    oblique_ct(image)
    (tmp_path / "p.json").write_text('{"points": [{"position": [500, 5, 5], "positive": true}]}', encoding="utf-8")
    result = run("segment", str(image), "--prompts", str(tmp_path / "p.json"), "--out", str(tmp_path / "x.nii.gz"))
    assert result.returncode == 1 and "outside the image" in result.stderr


def test_models_list_and_verify():
    listed = run("models", "list")
    assert listed.returncode == 0 and "kprism-tiny" in listed.stdout and "lung" in listed.stdout
    verified = run("models", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_corrupt_model_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(os.urandom(1000))
    result = run("segment", str(tmp_path / "missing.png"), "--classes", "lung", "--model", str(bad), "--out", str(tmp_path / "o.png"))
    assert result.returncode == 1


@pytest.mark.parametrize("command", [[], ["segment"], ["demo"], ["models"], ["models", "list"], ["models", "verify"],
                                     ["models", "download"], ["train"]])
def test_help_everywhere(command):
    result = run(*command, "--help")
    assert result.returncode == 0 and "usage: kprism" in result.stdout


def test_propagate_carries_a_clicked_slice_into_its_neighbours(tmp_path):
    oblique_ct(tmp_path / "ct.nii.gz")
    (tmp_path / "p.json").write_text(json.dumps({"points": [{"position": [24, 20, 6], "positive": True}]}), encoding="utf-8")
    single, spread = tmp_path / "single.nii.gz", tmp_path / "spread.nii.gz"
    assert run("segment", str(tmp_path / "ct.nii.gz"), "--prompts", str(tmp_path / "p.json"), "--out", str(single)).returncode == 0
    result = run("segment", str(tmp_path / "ct.nii.gz"), "--prompts", str(tmp_path / "p.json"), "--propagate", "--out", str(spread))
    assert result.returncode == 0, result.stderr
    one = sitk.GetArrayFromImage(sitk.ReadImage(str(single)))
    many = sitk.GetArrayFromImage(sitk.ReadImage(str(spread)))
    assert np.array_equal(one[6], many[6])
    slices = np.nonzero(one.any(axis=(1, 2)))[0].tolist()  # a click on a volume already gives a 3D run of slices
    assert 6 in slices and slices == list(range(slices[0], slices[-1] + 1))
    assert many.any(axis=(1, 2)).sum() >= len(slices)


def test_cross_axes_propagation_writes_a_volume_and_needs_propagate(tmp_path):
    oblique_ct(tmp_path / "ct.nii.gz")
    (tmp_path / "p.json").write_text(json.dumps({"points": [{"position": [24, 20, 6], "positive": True}]}), encoding="utf-8")
    out = tmp_path / "fused.nii.gz"
    code = main(["segment", str(tmp_path / "ct.nii.gz"), "--prompts", str(tmp_path / "p.json"), "--propagate", "--cross-axes",
                 "--out", str(out), "--threads", "1"])
    assert code == 0 and sitk.ReadImage(str(out)).GetSize() == sitk.ReadImage(str(tmp_path / "ct.nii.gz")).GetSize()
    result = run("segment", str(tmp_path / "ct.nii.gz"), "--prompts", str(tmp_path / "p.json"), "--cross-axes", "--out", str(tmp_path / "x.nii.gz"))
    assert result.returncode != 0 and "--cross-axes refines --propagate" in result.stderr and not (tmp_path / "x.nii.gz").exists()


def test_several_classes_make_one_label_map_with_named_segments(tmp_path):
    from kprism.samples import sample_path

    out = tmp_path / "organs.seg.nrrd"
    code = main(["segment", str(sample_path("ct", "ts_ct_001crop.nii.gz")), "--classes", "liver,spleen,aorta", "--out", str(out)])
    assert code == 0
    labels, geometry, segments = read_segmentation(out)
    assert [s["name"] for s in segments] == ["liver", "spleen", "aorta"] and [s["value"] for s in segments] == [1, 2, 3]
    assert labels.shape == (30, 101, 122) and set(np.unique(labels).tolist()) <= {0, 1, 2, 3}


def test_CR4_several_classes_cannot_be_propagated(tmp_path, capsys):
    oblique_ct(tmp_path / "ct.nii.gz")
    out = tmp_path / "x.nii.gz"
    code = main(["segment", str(tmp_path / "ct.nii.gz"), "--classes", "liver,spleen", "--propagate", "--out", str(out)])
    assert code == 1 and not out.exists()
    assert "--propagate carries one structure: use it with prompts, --init-mask or a single class." in capsys.readouterr().err


def test_CR4_segment_writes_what_the_pipeline_computes_with_its_provenance(tmp_path, capsys):
    """`kprism segment` is arguments → SegmentationRequest → pipeline.run → file: nothing else decides the result."""
    from kprism.pipeline import SegmentationRequest, run as run_request
    from kprism.prompt_file import load_prompt_file
    from kprism.samples import sample_path
    from kprism.session import KPrismSession

    picture = sample_path("chest_xray", "MCUCXR_0013_0.png")
    (tmp_path / "p.json").write_text(json.dumps({"points": [{"position": [300, 250], "positive": False}]}), encoding="utf-8")
    out = tmp_path / "lung.seg.nrrd"
    assert main(["segment", str(picture), "--classes", "lung", "--prompts", str(tmp_path / "p.json"), "--out", str(out),
                 "--threads", "1"]) == 0
    labels, _, segments = read_segmentation(out)

    session = KPrismSession(threads=1)
    session.set_image(read_image(picture))
    outcome = run_request(SegmentationRequest(classes=["lung"], prompts=load_prompt_file(tmp_path / "p.json")), session)
    assert np.array_equal(labels[0], outcome.labels()) and labels.any()
    assert json.loads(segments[0]["tags"]["KPrism.Provenance"]) == {
        "model": "kprism-tiny", "modality": "unknown", "classes": ["lung"], "prompts": str(tmp_path / "p.json")}
    assert f"lung: {int(outcome.labels().sum())} voxels" in capsys.readouterr().out
