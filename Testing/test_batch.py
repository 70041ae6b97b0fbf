"""KPrismSlicer/KPrismSlicerLib/batch.py under plain Python: MRML storage nodes in and out, the module's logic between."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from slicer_fixture import SLICER_MODULE_DIR, blob_array, dice, oblique_ijk_to_ras

from KPrismSlicerLib import batch
from kprism.io import read_image, read_segmentation

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def run_batch(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(SLICER_MODULE_DIR / "KPrismSlicerLib" / "batch.py"), *args, "--threads", "1"],
                          capture_output=True, encoding="utf-8", env=env, timeout=300)


def write_blob(path: Path, shift: int = 0) -> sitk.Image:
    """The oblique, anisotropic blob volume as an image file (LPS for ITK)."""
    image = sitk.GetImageFromArray(np.roll(blob_array(), shift, axis=2))
    ijk_to_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ oblique_ijk_to_ras()
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((ijk_to_lps[:3, :3] / spacing).ravel().tolist())
    image.SetOrigin(ijk_to_lps[:3, 3].tolist())
    sitk.WriteImage(image, str(path))
    return image


def same_grid(image: sitk.Image, path: Path) -> bool:
    from kprism.image import Geometry

    _, geometry, _ = read_segmentation(path)
    return geometry.same_as(Geometry(image.GetSpacing(), image.GetOrigin(), image.GetDirection()))


def test_batch_script_end_to_end(tmp_path):
    image = write_blob(tmp_path / "blob.nii.gz")
    centre_ras = (oblique_ijk_to_ras() @ [24, 20, 6, 1])[:3].tolist()
    (tmp_path / "prompts.json").write_text(json.dumps({"coordinates": "ras", "points": [{"position": centre_ras}]}), encoding="utf-8")
    out = tmp_path / "out"
    result = run_batch("--input", str(tmp_path / "blob.nii.gz"), "--output", str(out), "--mode", "interactive",
                       "--prompts", str(tmp_path / "prompts.json"))
    assert result.returncode == 0, result.stderr
    written = out / "blob.seg.nrrd"
    assert [p.name for p in out.iterdir()] == ["blob.seg.nrrd"] and same_grid(image, written)
    labels, _, segments = read_segmentation(written)
    assert labels[6, 20, 24] == 1 and [s["name"] for s in segments] == ["KPrism 1"]  # item 5: numbered new segments
    tag = json.loads(segments[0]["tags"]["KPrism.Provenance"])
    assert tag["mode"] == "interactive" and tag["prompts"][0]["ras"] == np.round(centre_ras, 3).tolist()

    stamp = written.stat().st_mtime_ns
    again = run_batch("--input", str(tmp_path), "--output", str(out), "--mode", "interactive", "--prompts", str(tmp_path / "prompts.json"))
    assert again.returncode == 0 and "0 to segment, 1 already finished" in again.stdout
    assert written.stat().st_mtime_ns == stamp


def test_shards_split_the_inputs_and_finished_outputs_are_skipped(tmp_path, capsys):
    for n in range(3):
        write_blob(tmp_path / f"case{n}.nii.gz", shift=2 * n)
    out = tmp_path / "out"
    common = ["--input", str(tmp_path), "--output", str(out), "--mode", "semantic", "--classes", "liver", "--threads", "1"]
    assert batch.main([*common, "--shard", "1/2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["case1.seg.nrrd"]
    assert batch.main(["--", *common, "--shard", "0/2"]) == 0  # "--" as Slicer passes it
    assert sorted(p.name for p in out.iterdir()) == ["case0.seg.nrrd", "case1.seg.nrrd", "case2.seg.nrrd"]
    capsys.readouterr()
    assert batch.main([*common, "--shard", "0/1"]) == 0
    assert "0 to segment, 3 already finished" in capsys.readouterr().out
    labels, _, segments = read_segmentation(out / "case2.seg.nrrd")
    assert [s["name"] for s in segments] == ["liver"] and labels.shape == (12, 40, 48)
    with pytest.raises(SystemExit):
        batch.main([*common, "--shard", "2/2"])


def test_a_failing_input_gives_a_nonzero_exit_and_no_partial_file(tmp_path, capsys):
    write_blob(tmp_path / "good.nii.gz")
    (tmp_path / "broken.nii.gz").write_bytes(b"not an image at all")
    out = tmp_path / "out"
    code = batch.main(["--input", str(tmp_path), "--output", str(out), "--mode", "semantic", "--classes", "liver",
                       "--format", "nii.gz", "--threads", "1"])
    assert code == 1 and "broken.nii.gz: FAILED" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["good.nii.gz"]  # no output, no temporary for the broken one
    written = sitk.ReadImage(str(out / "good.nii.gz"))
    assert written.GetSize() == (48, 40, 12)


def test_batch_prompts_give_exactly_the_command_line_result(tmp_path):
    """Box, scribble file and click in IJK on an oblique volume: Slicer's path and the CLI's agree voxel for voxel."""
    from kprism.cli import main as cli

    image = write_blob(tmp_path / "blob.nii.gz")
    stroke = np.zeros((12, 40, 48), np.uint8)
    stroke[6, 18:22, 20:28] = 1
    scribble = sitk.GetImageFromArray(stroke)
    scribble.CopyInformation(image)
    sitk.WriteImage(scribble, str(tmp_path / "stroke.nii.gz"))
    (tmp_path / "prompts.json").write_text(json.dumps({
        "coordinates": "ijk", "boxes": [{"min": [14, 12, 5], "max": [34, 28, 7]}],
        "scribbles": [{"mask": "stroke.nii.gz", "positive": True}], "points": [{"position": [24, 20, 6]}]}), encoding="utf-8")
    assert batch.main(["--input", str(tmp_path / "blob.nii.gz"), "--output", str(tmp_path / "slicer"), "--mode", "interactive",
                       "--prompts", str(tmp_path / "prompts.json"), "--format", "nii.gz", "--threads", "1"]) == 0
    assert cli(["segment", str(tmp_path / "blob.nii.gz"), "--prompts", str(tmp_path / "prompts.json"),
                "--out", str(tmp_path / "cli.nii.gz"), "--threads", "1"]) == 0
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "slicer" / "blob.nii.gz"))) > 0
    theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "cli.nii.gz"))) > 0
    assert ours.any() and np.array_equal(ours, theirs)
    assert np.unique(np.nonzero(ours)[0]).tolist() == [5, 6, 7]  # the box's slices


def test_in_context_batch_with_a_reference_mask(tmp_path):
    from kprism.samples import sample_path

    def single_slice(name: str, target: Path) -> np.ndarray:
        picture = sitk.ReadImage(str(sample_path("chest_xray", name)))
        sitk.WriteImage(sitk.JoinSeries(picture), str(target))  # a one-slice volume, as a scanner would store it
        return sitk.GetArrayFromImage(picture)

    single_slice("MCUCXR_0001_0.png", tmp_path / "reference.nrrd")
    single_slice("MCUCXR_0001_0_lung.png", tmp_path / "reference_lung.nrrd")
    (tmp_path / "cases").mkdir()
    single_slice("MCUCXR_0013_0.png", tmp_path / "cases" / "patient.nrrd")
    code = batch.main(["--input", str(tmp_path / "cases"), "--output", str(tmp_path / "out"), "--mode", "incontext",
                       "--reference", str(tmp_path / "reference.nrrd"), str(tmp_path / "reference_lung.nrrd"),
                       "--modality", "x-ray", "--threads", "1"])
    assert code == 0
    labels, _, segments = read_segmentation(tmp_path / "out" / "patient.seg.nrrd")
    truth = read_image(sample_path("chest_xray", "MCUCXR_0013_0_lung.png")).array > 0
    assert segments[0]["name"] == "reference_lung" and dice(labels[0], truth) > 0.8


@pytest.mark.shared
def test_batch_segments_a_shared_dataset_volume(tmp_path):
    source = SHARED / "Dataset006_TotalSegCT" / "imagesTr" / "ts_ct_001crop_0000.nii.gz"
    if not source.exists():
        pytest.skip(f"shared dataset not available at {source}")
    result = run_batch("--input", str(source), "--output", str(tmp_path), "--mode", "semantic", "--classes", "liver,spleen")
    assert result.returncode == 0, result.stderr
    written = tmp_path / "ts_ct_001crop_0000.seg.nrrd"
    assert same_grid(sitk.ReadImage(str(source)), written)
    labels, _, segments = read_segmentation(written)
    assert [s["name"] for s in segments] == ["liver", "spleen"] and labels.shape == read_image(source).array.shape


def test_partial_files_of_a_killed_run_are_removed_on_the_rerun(tmp_path):
    out = tmp_path / "segs"
    out.mkdir()
    target = out / "case.seg.nrrd"
    partial = out / ".case.seg.nrrd.0123456789ab.tmp.seg.nrrd"
    partial.write_bytes(b"half a file")
    unrelated = out / ".other.seg.nrrd.0123456789ab.tmp.seg.nrrd"
    unrelated.write_bytes(b"another shard's")
    assert batch.remove_stale_temporaries(out, [target]) == 1
    assert not partial.exists() and unrelated.exists()


def test_CR4_the_batch_goes_through_the_pipeline_like_the_command_line(tmp_path, capsys):
    """Repeated classes: one segment and the same note as `kprism segment`; prompts with several classes: refused."""
    write_blob(tmp_path / "blob.nii.gz")
    code = batch.main(["--input", str(tmp_path / "blob.nii.gz"), "--output", str(tmp_path / "out"), "--mode", "semantic",
                       "--classes", "liver,spleen,liver", "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 0 and "kprism batch: warning: Repeated class names are segmented once: liver." in err
    _, _, segments = read_segmentation(tmp_path / "out" / "blob.seg.nrrd")
    assert [s["name"] for s in segments] == ["liver", "spleen"]

    (tmp_path / "prompts.json").write_text(json.dumps({"points": [{"position": [24, 20, 6]}]}), encoding="utf-8")
    code = batch.main(["--input", str(tmp_path / "blob.nii.gz"), "--output", str(tmp_path / "refused"), "--mode", "semantic",
                       "--classes", "liver,spleen", "--prompts", str(tmp_path / "prompts.json"), "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 1 and "blob.nii.gz: FAILED: Prompts and an initial mask refine one structure: give a single class" in err
    assert not (tmp_path / "refused" / "blob.seg.nrrd").exists()
