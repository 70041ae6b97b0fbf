"""KPrismSlicer/KPrismSlicerLib/batch.py reliability (issue 10, items 6 and 10): audit rows B01a–c, B05–B07, B09, K01, K05.

The batch reads volumes through MRML storage nodes, so it needs kprism's reader in front of them
(B01), kprism's one prompts.json parser (B05–B07), a read-back of every output before it counts
(B09), a settings fingerprint inside every output (K05) and a clean Ctrl-C (K01).
"""

from __future__ import annotations

import gzip
import json
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel
import nrrd
import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
from test_reliability import BATCH_SCRIPT, SUBPROCESS_ENV, WorkStarted, run_batch, run_kprism, temporaries, write_ct

from KPrismSlicerLib import batch
from kprism import io
from kprism.model import KPrismModel
from kprism.prompt_file import MAX_POINTS_PER_SLICE
from kprism.samples import sample_path

CT = sample_path("ct", "ts_ct_001crop.nii.gz")  # 122 × 101 × 30: its labelmap needs about 8 kB


def semantic(cases: Path, out: Path, *extra) -> list:
    return ["--input", cases, "--output", out, "--mode", "semantic", "--classes", "liver", *extra]


def leftovers(folder: Path) -> list[str]:
    """Temporaries and the volume storage node's scratch folder: what a failed write could leave."""
    return temporaries(folder) + (["TempWrite"] if (folder / "TempWrite").exists() else [])


def reason_of(path: Path) -> str:
    """The one-line reason `kprism segment` gives for an unreadable input."""
    with pytest.raises((ValueError, OSError)) as error:
        io.read_image(path)
    return str(error.value)


# ----------------------------------------------------------------------------------------------- B01


def test_B01a_truncated_nifti_in_a_batch_fails_with_the_cli_reason(tmp_path, capfd):
    cases = tmp_path / "cases"
    cases.mkdir()
    write_ct(cases / "a_good.nrrd")
    write_ct(tmp_path / "whole.nii.gz")
    whole = (tmp_path / "whole.nii.gz").read_bytes()
    (cases / "b_cut.nii.gz").write_bytes(whole[: len(whole) // 2])
    raw = gzip.decompress(whole)
    (cases / "c_cut_raw.nii").write_bytes(raw[: len(raw) // 2])
    out = tmp_path / "out"

    code, stdout, err = run_batch(capfd, *semantic(cases, out))

    assert code == 1
    assert f"b_cut.nii.gz: FAILED: {reason_of(cases / 'b_cut.nii.gz')}" in err.splitlines()
    assert f"c_cut_raw.nii: FAILED: {reason_of(cases / 'c_cut_raw.nii')}" in err.splitlines()
    assert "truncated" in reason_of(cases / "c_cut_raw.nii")
    assert sorted(p.name for p in out.iterdir()) == ["a_good.seg.nrrd"] and "2 failed" in stdout


def test_B01b_4d_and_complex_inputs_fail_in_one_line_each_without_vtk_dumps(tmp_path, capfd):
    cases = tmp_path / "cases"
    cases.mkdir()
    nibabel.save(nibabel.Nifti1Image(np.random.default_rng(0).normal(size=(16, 16, 8, 3)).astype(np.float32), np.eye(4)),
                 cases / "four_d.nii.gz")
    ct = nibabel.load(CT)
    nibabel.save(nibabel.Nifti1Image(np.asarray(ct.dataobj).astype(np.complex64), ct.affine), cases / "complex.nii.gz")
    out = tmp_path / "out"

    code, _, err = run_batch(capfd, *semantic(cases, out))  # capfd: VTK and ITK write to file descriptor 2

    assert code == 1
    assert err.splitlines() == [f"complex.nii.gz: FAILED: {reason_of(cases / 'complex.nii.gz')}",
                                f"four_d.nii.gz: FAILED: {reason_of(cases / 'four_d.nii.gz')}"]
    assert "4D" in err and "complex" in err
    assert not out.exists() or list(out.iterdir()) == []


def test_B01b_a_file_only_the_storage_node_refuses_still_fails_in_one_line(tmp_path, capfd, monkeypatch):
    from kprism import io as kprism_io

    cases = tmp_path / "cases"
    cases.mkdir()
    (cases / "odd.nrrd").write_text("NRRD0004\ntype: nonsense\ndimension: 3\nsizes: 4 4 4\nencoding: raw\n\n", encoding="utf-8")
    monkeypatch.setattr(kprism_io, "read_image", lambda *args, **kwargs: None)  # as if kprism's reader accepted it

    code, _, err = run_batch(capfd, *semantic(cases, tmp_path / "out"))

    assert code == 1 and len(err.splitlines()) == 1
    assert err.startswith(f"odd.nrrd: FAILED: Could not read {cases / 'odd.nrrd'} as a volume")


def test_B01c_constant_volume_fails_with_no_contrast_and_writes_nothing(tmp_path, capsys):
    cases = tmp_path / "cases"
    cases.mkdir()
    write_ct(cases / "a_good.nrrd")
    constant = sitk.Image([40, 32, 6], sitk.sitkInt16)
    constant.SetSpacing((0.8, 0.9, 2.5))
    sitk.WriteImage(constant, str(cases / "b_constant.nrrd"))
    out = tmp_path / "out"

    code, _, err = run_batch(capsys, *semantic(cases, out))

    assert code == 1
    failed = [line for line in err.splitlines() if line.startswith("b_constant.nrrd: FAILED: ")]
    assert len(failed) == 1 and ("contrast" in failed[0] or "constant" in failed[0])
    assert sorted(p.name for p in out.iterdir()) == ["a_good.seg.nrrd"]


# ----------------------------------------------------------------------------------------------- B05–B07


@pytest.mark.parametrize(("audit", "content", "expected"), [
    ("B05", '{"points": [{"position": [20, 16, 3], "positive": true}', "is not valid JSON: Expecting ',' delimiter"),
    ("B06", '{"points": {"position": [20, 16, 3]}}', "points: expected a list of points"),
    ("B07", '{"points": [{"pos": [20, 16, 3]}]}', "points[0]: unknown key 'pos'; allowed: position, positive"),
    ("P11", '{"points": [{"position": [20, 16, 3], "positive": "false"}]}', "points[0].positive: expected true or false"),
])
def test_B05_B06_B07_bad_prompt_files_give_the_cli_message_naming_file_and_path(tmp_path, capsys, audit, content, expected):
    cases = tmp_path / "cases"
    cases.mkdir()
    write_ct(cases / "a.nrrd")
    prompts = tmp_path / f"{audit}.json"
    prompts.write_text(content, encoding="utf-8")
    out = tmp_path / "out"

    code, _, err = run_batch(capsys, "--input", cases, "--output", out, "--mode", "interactive", "--prompts", prompts)
    _, _, cli_err = run_kprism(capsys, "segment", cases / "a.nrrd", "--prompts", prompts, "--out", tmp_path / "x.nii.gz")

    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    message = err.strip().removeprefix("kprism batch: error: ")
    assert message.startswith(f"Prompt file {prompts}") and expected in message
    assert cli_err.strip() == f"kprism: error: {message}"  # one parser: the same words in the CLI
    assert not out.exists()


def test_P09_batch_refuses_more_clicks_on_a_slice_than_the_limit_before_any_model_work(tmp_path, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise WorkStarted("the model ran before the clicks were counted")

    monkeypatch.setattr(KPrismModel, "encode", no_model)
    monkeypatch.setattr(KPrismModel, "decode", no_model)
    cases = tmp_path / "cases"
    cases.mkdir()
    write_ct(cases / "a.nrrd")  # 40 × 32 × 6
    rng = np.random.default_rng(1)
    points = [{"position": [int(rng.integers(0, 40)), int(rng.integers(0, 32)), 3]} for _ in range(MAX_POINTS_PER_SLICE + 1)]
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"points": points}), encoding="utf-8")

    code, _, err = run_batch(capsys, "--input", cases, "--output", tmp_path / "out", "--mode", "interactive", "--prompts", prompts)

    assert code == 1 and f"a.nrrd: FAILED: {MAX_POINTS_PER_SLICE + 1} clicks fall on slice" in err and "WorkStarted" not in err


# ----------------------------------------------------------------------------------------------- B09


def _short_write(original):
    """A storage node write that reports success but leaves half the file (a full disk under gzip)."""
    def write(scene, segmentation, volume, path):
        original(scene, segmentation, volume, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    return write


@pytest.mark.parametrize("output_format", ["nii.gz", "nrrd", "seg.nrrd"])
def test_B09_a_short_write_reported_as_success_fails_the_input_and_a_rerun_redoes_it(tmp_path, capsys, monkeypatch, output_format):
    cases = tmp_path / "cases"
    cases.mkdir()
    write_ct(cases / "a.nrrd")
    out = tmp_path / "out"
    common = semantic(cases, out, "--format", output_format)
    monkeypatch.setattr(batch, "_write_with_storage_node", _short_write(batch._write_with_storage_node))

    code, stdout, err = run_batch(capsys, *common)

    assert code == 1 and err.startswith(f"a.nrrd: FAILED: Could not write {out / f'a.{output_format}'}") and "0 written, 1 failed" in stdout
    assert list(out.iterdir()) == []  # no output, no temporary
    monkeypatch.undo()
    code, stdout, _ = run_batch(capsys, *common)
    assert code == 0 and "1 to segment, 0 already finished" in stdout
    assert batch.read_back(out / f"a.{output_format}")[1] == (40, 32, 6)


@pytest.fixture
def full_disk(tmp_path):
    """A 16 kB tmpfs with 12 kB taken: a CT labelmap (about 8 kB) no longer fits."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mount)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {result.stderr.strip()}")
    try:
        (mount / "filler").write_bytes(b"\0" * 12 * 1024)
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.parametrize("output_format", ["nii.gz", "nrrd", "seg.nrrd"])
def test_B09_writing_into_a_full_disk_fails_the_input_leaves_nothing_and_a_rerun_redoes_it(tmp_path, capfd, full_disk, output_format):
    cases = tmp_path / "cases"
    cases.mkdir()
    shutil.copy(CT, cases / "x.nii.gz")
    common = ["--input", cases, "--output", full_disk, "--mode", "semantic", "--classes", "liver,spleen", "--format", output_format]

    code, stdout, err = run_batch(capfd, *common)

    assert code == 1 and "0 written, 1 failed" in stdout
    assert err.splitlines() == [line for line in err.splitlines() if line.startswith(f"x.nii.gz: FAILED: Could not write {full_disk}")]
    assert len(err.splitlines()) == 1  # no VTK or ITK dump
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]  # nothing partial, no TempWrite folder

    (full_disk / "filler").unlink()
    code, stdout, _ = run_batch(capfd, *common)
    assert code == 0 and "1 to segment, 0 already finished" in stdout
    assert batch.read_back(full_disk / f"x.{output_format}")[1] == (122, 101, 30)


# ----------------------------------------------------------------------------------------------- K05


@pytest.mark.parametrize("output_format", ["seg.nrrd", "nii.gz", "nrrd"])
def test_K05_the_settings_fingerprint_survives_inside_every_format(tmp_path, capsys, output_format):
    cases = tmp_path / "cases"
    cases.mkdir()
    source = write_ct(cases / "a.nrrd")
    out = tmp_path / "out"
    common = semantic(cases, out, "--format", output_format)

    assert run_batch(capsys, *common)[0] == 0
    target = out / f"a.{output_format}"
    expected = batch.settings_fingerprint(batch.parse_args([str(a) for a in common]), None)
    assert batch.read_back(target) == (expected, (40, 32, 6))
    if output_format == "seg.nrrd":  # a tag on each segment, which Slicer keeps when it loads and saves the file
        segments = slicerio.read_segmentation(str(target))["segments"]
        assert [s["tags"][batch.SETTINGS_TAG] for s in segments] == [expected]
    elif output_format == "nrrd":
        assert nrrd.read_header(str(target))[batch.SETTINGS_FIELD] == expected
    else:
        assert nibabel.load(target).header["descrip"].tobytes().rstrip(b"\0").decode() == f"kprism:{expected}"
    if output_format != "seg.nrrd":  # the stamp leaves the labelmap and its geometry as the storage node wrote them
        written = sitk.ReadImage(str(target))
        assert written.GetSize() == source.GetSize() and np.allclose(written.GetOrigin(), source.GetOrigin())
        assert np.allclose(written.GetSpacing(), source.GetSpacing()) and sitk.GetArrayFromImage(written).any()

    stamp = target.stat().st_mtime_ns
    code, stdout, _ = run_batch(capsys, *common)
    assert code == 0 and "0 to segment, 1 already finished" in stdout and target.stat().st_mtime_ns == stamp


def test_K05_rerun_with_other_classes_reports_the_output_and_keeps_it_until_overwrite(tmp_path, capsys):
    cases = tmp_path / "cases"
    cases.mkdir()
    write_ct(cases / "a.nrrd")
    out = tmp_path / "out"
    assert run_batch(capsys, *semantic(cases, out))[0] == 0
    before = (out / "a.seg.nrrd").read_bytes()
    other = ["--input", cases, "--output", out, "--mode", "semantic", "--classes", "lung"]

    code, stdout, err = run_batch(capsys, *other)

    assert code == 1 and "a.nrrd: a.seg.nrrd was made with other settings; --overwrite to redo" in err
    assert "0 to segment, 0 already finished, 1 made with other settings" in stdout
    assert (out / "a.seg.nrrd").read_bytes() == before
    code, stdout, _ = run_batch(capsys, *other, "--overwrite")
    assert code == 0 and [s["name"] for s in io.read_segmentation(out / "a.seg.nrrd")[2]] == ["lung"]
    code, stdout, _ = run_batch(capsys, *other)
    assert code == 0 and "0 to segment, 1 already finished" in stdout


def test_K05_an_output_that_does_not_read_back_is_redone(tmp_path, capsys):
    cases = tmp_path / "cases"
    cases.mkdir()
    write_ct(cases / "a.nrrd")
    out = tmp_path / "out"
    common = semantic(cases, out, "--format", "nii.gz")
    assert run_batch(capsys, *common)[0] == 0
    whole = (out / "a.nii.gz").read_bytes()
    (out / "a.nii.gz").write_bytes(whole[: len(whole) - 40])  # the end of the gzip stream is missing

    code, stdout, _ = run_batch(capsys, *common)

    assert code == 0 and "a.nrrd: the existing a.nii.gz does not read back completely" in stdout
    assert "1 to segment, 0 already finished" in stdout and "1 written, 0 failed" in stdout
    assert batch.read_back(out / "a.nii.gz")[1] == (40, 32, 6)


def test_K05_fingerprint_changes_with_each_setting_and_files_count_by_content(tmp_path):
    from kprism.weights import BUNDLED_DIR

    write_ct(tmp_path / "ref.nrrd")
    (tmp_path / "mask.nrrd").write_bytes(b"mask one")
    (tmp_path / "stroke.nii.gz").write_bytes(b"stroke one")
    (tmp_path / "p.json").write_text(json.dumps({"points": [{"position": [1, 2, 3]}], "scribbles": [{"mask": "stroke.nii.gz"}]}),
                                     encoding="utf-8")
    shutil.copy(BUNDLED_DIR / "kprism-tiny.safetensors", tmp_path / "copy.safetensors")
    base = ["--input", str(tmp_path), "--output", str(tmp_path / "out"), "--mode", "incontext",
            "--reference", str(tmp_path / "ref.nrrd"), str(tmp_path / "mask.nrrd"), "--prompts", str(tmp_path / "p.json")]

    def fingerprint(*extra: str) -> str:
        args = batch.parse_args([*base, *extra])
        return batch.settings_fingerprint(args, batch.load_prompts(Path(args.prompts)))

    first = fingerprint()
    assert fingerprint("--shard", "1/2", "--threads", "3", "--device", "cpu") == first  # how, not what
    assert fingerprint("--model", str(tmp_path / "copy.safetensors")) == first  # the model by content, not by name
    changed = {fingerprint(*extra) for extra in (["--modality", "ct"], ["--axis", "1"], ["--format", "nrrd"])}
    assert len(changed) == 3 and first not in changed
    for path, content in [("mask.nrrd", b"mask two"), ("stroke.nii.gz", b"stroke two"),
                          ("p.json", json.dumps({"points": [{"position": [1, 2, 3], "positive": False}],
                                                 "scribbles": [{"mask": "stroke.nii.gz"}]}).encode())]:
        (tmp_path / path).write_bytes(content)
        assert fingerprint() != first, path
        first = fingerprint()
    (tmp_path / "p.json").write_text(json.dumps(json.loads((tmp_path / "p.json").read_text()), indent=4), encoding="utf-8")
    assert fingerprint() == first  # layout of the JSON does not matter


# ----------------------------------------------------------------------------------------------- K01


def test_K01_ctrl_c_mid_run_prints_one_line_exits_130_and_leaves_only_whole_outputs(tmp_path):
    cases = tmp_path / "cases"
    cases.mkdir()
    for n in range(5):
        write_ct(cases / f"case{n}.nrrd", shape=(24, 64, 64), spacing=(1.0, 1.0, 2.0))
    out = tmp_path / "out"
    # Each input after the first takes at least 3 s more, so Ctrl-C always lands mid-run, however fast the machine.
    # A shell that starts a job in the background makes it ignore SIGINT, and the child would inherit that:
    # restore Python's own handler so the test sees what a user's Ctrl-C does.
    slow_batch = ("import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
                  f"import sys, time; sys.path.insert(0, {str(BATCH_SCRIPT.parent.parent)!r}); from KPrismSlicerLib import batch\n"
                  "from KPrismSlicerLib.logic import KPrismLogic\n"
                  "segment, calls = KPrismLogic.segment, []\n"
                  "def slow(*args, **kwargs):\n"
                  "    calls.append(1)\n"
                  "    time.sleep(3 if len(calls) > 1 else 0)\n"
                  "    return segment(*args, **kwargs)\n"
                  "KPrismLogic.segment = slow\n"
                  "sys.exit(batch.main(sys.argv[1:]))\n")
    command = [sys.executable, "-c", slow_batch, *map(str, semantic(cases, out, "--threads", "1", "--device", "cpu"))]
    with open(tmp_path / "stderr.txt", "w+", encoding="utf-8") as errors:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, env=SUBPROCESS_ENV, encoding="utf-8")
        try:
            seen, deadline = "", time.monotonic() + 240
            while "→" not in seen and process.poll() is None and time.monotonic() < deadline:
                if select.select([process.stdout], [], [], 1.0)[0]:
                    seen += process.stdout.readline()
            assert "→" in seen, seen  # the first input is written; the others are still to do
            process.send_signal(signal.SIGINT)
            stdout, _ = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        errors.seek(0)
        stderr = errors.read()

    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and stderr.strip().splitlines() == [batch.INTERRUPTED]
    finished = sorted(p.name for p in out.iterdir())
    assert 1 <= len(finished) < 5 and leftovers(out) == []
    for name in finished:
        assert batch.read_back(out / name)[1] == (64, 64, 24)


# ----------------------------------------------------------------------------------------------- command line


@pytest.mark.parametrize("threads", ["-1", "0", "two", "1.5"])
def test_X01_batch_threads_must_be_a_positive_integer(tmp_path, capsys, threads):
    with pytest.raises(SystemExit) as exit_:
        batch.main(["--input", str(tmp_path), "--output", str(tmp_path / "o"), "--mode", "semantic", "--classes", "liver",
                    f"--threads={threads}"])

    assert exit_.value.code == 2 and f"--threads must be a positive integer, got {threads}" in capsys.readouterr().err


def test_unexpected_batch_error_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    def broken_plan(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(batch, "plan", broken_plan)
    write_ct(tmp_path / "a.nrrd")
    common = semantic(tmp_path / "a.nrrd", tmp_path / "out")

    code, _, err = run_batch(capsys, *common)
    assert code == 1 and err.splitlines() == [
        "kprism batch: unexpected error: ZeroDivisionError: division by zero; run with --debug for details"]
    code, _, err = run_batch(capsys, *common, "--debug")
    assert code == 1 and "Traceback" in err and "broken_plan" in err
