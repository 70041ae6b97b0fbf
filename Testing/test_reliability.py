"""Reliability: every bad input ends in a correct result or a clear error, and nothing written is lost.

Project issue 6, item 3. Each case drives a user-facing entry point (the `kprism` command line run
in-process, `KPrismSession`, or `KPrismSlicer/KPrismSlicerLib/batch.py`) with a damaged, odd or hostile input and
checks three things: the outcome is either a correct result or an error that names the file or value
to fix; no output is ever partial (outputs appear whole or not at all, temporaries are cleaned up);
and nothing that existed before (the input, an earlier output) is changed by a failed run.

All data is generated here, small, under tmp_path.
"""

from __future__ import annotations

import errno
import functools
import gzip
import json
import math
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import nibabel
import nrrd
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image
from slicer_fixture import SLICER_MODULE_DIR

from KPrismSlicerLib import batch
from kprism import cli, io, weights
from kprism.catalog import ClassCatalog, UnknownClassError
from kprism.image import ImageData
from kprism.session import KPrismSession, Reference

BATCH_SCRIPT = SLICER_MODULE_DIR / "KPrismSlicerLib" / "batch.py"
SUBPROCESS_ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
VOLUME_SHAPE = (6, 32, 40)  # k, j, i
VOLUME_SPACING = (0.8, 0.9, 2.5)  # i, j, k
PROPERTY_SETTINGS = settings(max_examples=25, deadline=None, database=None)


def noise(shape) -> np.ndarray:
    """A non-constant float image (constant images are refused, as they hold nothing to segment)."""
    return np.random.default_rng(len(shape)).normal(100, 30, shape).astype(np.float32)


class WorkStarted(Exception):
    """Raised by a stand-in for the model: the command got past its checks and started working."""


# ----------------------------------------------------------------------------------------------- helpers


def run_kprism(capsys, *args) -> tuple[int, str, str]:
    """`kprism ARGS` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def segment(capsys, *args) -> tuple[int, str, str]:
    return run_kprism(capsys, "segment", *args, "--device", "cpu", "--threads", "1")


def run_batch(capsys, *args) -> tuple[int, str, str]:
    """`KPrismSlicer/KPrismSlicerLib/batch.py ARGS` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = batch.main([str(a) for a in args] + ["--threads", "1", "--device", "cpu"])
    out, err = capsys.readouterr()
    return code, out, err


def blob(shape=VOLUME_SHAPE, dtype=np.int16) -> np.ndarray:
    """A bright box in a dark, slightly noisy background."""
    array = np.random.default_rng(sum(shape)).normal(-800, 20, shape)
    inner = tuple(slice(n // 4, max(n // 4 + 1, 3 * n // 4)) for n in shape)
    array[inner] = 60
    return array.astype(dtype)


def write_image(path: Path, array: np.ndarray, spacing=None, origin=None, direction=None) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    if spacing is not None:
        image.SetSpacing(spacing)
    if origin is not None:
        image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    sitk.WriteImage(image, str(path))
    return image


def write_ct(path: Path, shape=VOLUME_SHAPE, spacing=VOLUME_SPACING, dtype=np.int16) -> sitk.Image:
    return write_image(path, blob(shape, dtype), spacing=spacing, origin=(-20.0, 10.0, 50.0))


def write_picture(path: Path, shape=(40, 50)) -> np.ndarray:
    pixels = (np.random.default_rng(3).random(shape) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def same_grid(written: Path, image: sitk.Image) -> bool:
    other = sitk.ReadImage(str(written))
    return (other.GetSize() == image.GetSize()
            and np.allclose(other.GetSpacing(), image.GetSpacing())
            and np.allclose(other.GetOrigin(), image.GetOrigin())
            and np.allclose(other.GetDirection(), image.GetDirection()))


def temporaries(folder: Path) -> list[str]:
    """Hidden or temporary files: what an interrupted write would leave behind."""
    if not folder.exists():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or ".tmp" in p.name)


def snapshot(result):
    """A comparable copy of a session result (None before any prompt)."""
    return None if result is None else (result.probability.copy(), result.quality)


def same_snapshot(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return np.array_equal(a[0], b[0]) and (a[1] == b[1] or (math.isnan(a[1]) and math.isnan(b[1])))


def assert_valid(result, shape) -> None:
    assert result is not None
    probability = result.probability
    assert probability.shape == tuple(shape)  # on the image grid: nothing outside the volume
    assert np.isfinite(probability).all()
    assert probability.min() >= 0.0 and probability.max() <= 1.0


def write_dicom_series(folder: Path, shape=(6, 16, 20), skip=(), duplicate=None, direction=None) -> sitk.Image:
    """A CT series, one file per slice; `skip` leaves slices out, `duplicate` repeats a slice position."""
    folder.mkdir(parents=True)
    volume = write_image(folder.parent / f"{folder.name}_source.nrrd", blob(shape), spacing=(0.8, 0.8, 2.5),
                         origin=(-5.0, 3.0, 40.0), direction=direction)
    d = volume.GetDirection()
    orientation = "\\".join(f"{v:.8g}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(shape[0]):
        if k in skip:
            continue
        position = volume.TransformIndexToPhysicalPoint((0, 0, k - 1 if duplicate is not None and k == duplicate + 1 else k))
        piece = volume[:, :, k]
        for tag, value in {"0008|0060": "CT", "0020|000d": "1.2.826.0.1.3680043.2.1125.7",
                           "0020|000e": "1.2.826.0.1.3680043.2.1125.7.1", "0008|0018": f"1.2.826.0.1.3680043.2.1125.7.1.{k + 1}",
                           "0020|0013": str(k + 1), "0020|0037": orientation,
                           "0020|0032": "\\".join(f"{v:.8g}" for v in position)}.items():
            piece.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"IM{k:04d}.dcm"))
        writer.Execute(piece)
    return volume


# ------------------------------------------------------------------ header-only files claiming huge sizes


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def header_only(path: Path, side: int) -> None:
    """A file whose header claims side × side (× side) voxels but that holds (almost) no data."""
    name = path.name
    if name.endswith(".png"):
        header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
        body = _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b"")
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    elif name.endswith((".nii", ".nii.gz")):
        header = nibabel.Nifti1Header()
        header.set_data_shape((side, side, side))
        header.set_data_dtype(np.int16)
        header["vox_offset"] = 352
        data = header.binaryblock + b"\0" * 4
        path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    elif name.endswith(".nrrd"):
        path.write_bytes(f"NRRD0004\ntype: short\ndimension: 3\nsizes: {side} {side} {side}\n"
                         "encoding: raw\nendian: little\n\n".encode())
    elif name.endswith(".mha"):
        path.write_bytes(f"ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
                         f"DimSize = {side} {side} {side}\nElementType = MET_SHORT\nElementDataFile = LOCAL\n".encode())
    else:
        raise ValueError(name)


# Reads each file in a separate interpreter (kprism.io only, no torch) under an address-space limit,
# so a reader that tries to allocate what a header claims fails there instead of exhausting this machine.
# Reports the peak memory growth of each read, measured from /proc after resetting the peak.
_MEMORY_PROBE = r"""
import json, re, resource, sys
from kprism.io import read_image

def status(key):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) // 1024

limit = (status("VmSize") + 3072) * 2**20
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
for path in sys.argv[1:]:
    try:
        open("/proc/self/clear_refs", "w", encoding="utf-8").write("5")  # resets VmHWM, the peak resident size
        measurable = True
    except OSError:
        measurable = False
    before = status("VmRSS")
    try:
        image = read_image(path)
        outcome = {"error": None, "shape": list(image.array.shape)}
    except BaseException as error:
        outcome = {"error": type(error).__name__, "message": str(error)}
    outcome["growth_mb"] = status("VmHWM") - before if measurable else None
    print("RESULT " + json.dumps({"path": path, **outcome}), flush=True)
"""

_HUGE_FORMATS = [".png", ".nii", ".nii.gz", ".nrrd", ".mha"]
# "giant": more than any machine holds (NRRD and MHA 2 PB, beyond the address space; NIfTI 54 TB, as its
# dimensions stop at 32767; PNG 10 GB); "large": 0.4 to 0.7 GB, small enough to be allocated and filled.
_CLAIMS = {"giant": {".png": 100_000, ".nii": 30_000, ".nii.gz": 30_000, ".nrrd": 100_000, ".mha": 100_000},
           "large": {".png": 20_000, ".nii": 700, ".nii.gz": 700, ".nrrd": 700, ".mha": 700}}


@pytest.fixture(scope="module")
def huge_header_reads(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("huge")
    paths = []
    for claim, sides in _CLAIMS.items():
        for suffix, side in sides.items():
            path = folder / f"{claim}{suffix}"
            header_only(path, side)
            paths.append(str(path))
    done = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, *paths], capture_output=True, encoding="utf-8",
                          env=SUBPROCESS_ENV, timeout=120)
    results = {}
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            outcome = json.loads(line[len("RESULT "):])
            results[Path(outcome["path"]).name] = outcome
    results["__stderr__"] = done.stderr
    return results


@pytest.mark.parametrize(("suffix", "claim"), [
    (suffix, claim)
    for claim in _CLAIMS for suffix in _HUGE_FORMATS
])
def test_header_claiming_a_huge_image_without_data_is_a_clear_error_without_allocating_it(huge_header_reads, suffix, claim):
    name = f"{claim}{suffix}"
    assert name in huge_header_reads, f"the reader process died on {name}: {huge_header_reads['__stderr__'][-2000:]}"
    outcome = huge_header_reads[name]
    assert outcome["error"] in ("ImageReadError", "ValueError"), outcome
    assert name in outcome["message"]
    if outcome["growth_mb"] is not None:
        assert outcome["growth_mb"] < 200, f"reading {name} took {outcome['growth_mb']} MB"


# ----------------------------------------------------------------------------------------------- bad image files


def _damage(path: Path, how: str) -> None:
    """Write a damaged image at `path`: 'empty' (0 bytes), 'truncated' (first half) or 'corrupt'."""
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    if how == "empty":
        path.write_bytes(b"")
        return
    whole = path.with_name(f"whole{suffix}")
    if suffix == ".png":
        write_picture(whole)
    else:
        write_ct(whole, shape=(8, 24, 30))
    data = whole.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif suffix == ".png":  # a valid signature and header, then scrambled image data
        path.write_bytes(data[:60] + bytes(b ^ 0xA5 for b in data[60:200]) + data[200:])
    elif suffix == ".nii.gz":  # a damaged gzip stream
        path.write_bytes(data[:40] + bytes(b ^ 0x55 for b in data[40:90]) + data[90:])
    elif suffix == ".nrrd":
        path.write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 4 0 2\nencoding: raw\n\n" + bytes(range(64)))
    else:
        path.write_bytes(b"ObjectType = Image\nNDims = three\nDimSize = a b c\nElementDataFile = LOCAL\n" + bytes(range(64)))


@pytest.mark.parametrize("how", ["empty", "truncated", "corrupt"])
@pytest.mark.parametrize("suffix", [".png", ".nii.gz", ".nrrd", ".mha"])
def test_damaged_input_is_a_clear_error_naming_it_and_writes_nothing(tmp_path, capsys, suffix, how):
    source = tmp_path / f"scan_{how}{suffix}"
    _damage(source, how)
    out = tmp_path / "out" / "result.nii.gz"

    code, _, err = segment(capsys, source, "--classes", "liver", "--out", out)

    assert code == 1 and source.name in err
    assert "Traceback" not in err
    assert not out.exists() and temporaries(out.parent) == []


@pytest.mark.parametrize("suffix", [".png", ".nii.gz", ".nrrd", ".mha"])
def test_empty_input_file_is_reported_as_empty(tmp_path, capsys, suffix):
    source = tmp_path / f"scan{suffix}"
    source.write_bytes(b"")

    code, _, err = segment(capsys, source, "--classes", "liver", "--out", tmp_path / "out.nii.gz")

    reason = err.replace(str(source), "")  # the path itself may contain "empty"
    assert code == 1 and source.name in err and ("empty" in reason or "0 bytes" in reason)


def test_damaged_mha_is_not_reported_as_missing(tmp_path, capsys):
    source = tmp_path / "scan.mha"
    _damage(source, "corrupt")

    code, _, err = segment(capsys, source, "--classes", "liver", "--out", tmp_path / "out.nii.gz")

    assert code == 1 and source.name in err
    assert "No such file" not in err


@pytest.mark.parametrize(("name", "make", "dimension"), [
    ("line.nrrd", lambda p: nrrd.write(str(p), np.arange(10, dtype=np.int16)), "1D"),
    ("line.nii.gz", lambda p: nibabel.save(nibabel.Nifti1Image(np.arange(10, dtype=np.int16), np.eye(4)), p), "1D"),
    ("dynamic.nii.gz", lambda p: nibabel.save(nibabel.Nifti1Image(np.zeros((8, 9, 5, 3), np.int16), np.eye(4)), p), "4D"),
])
def test_one_d_and_four_d_inputs_are_refused_naming_the_file(tmp_path, capsys, name, make, dimension):
    make(tmp_path / name)

    code, _, err = segment(capsys, tmp_path / name, "--classes", "liver", "--out", tmp_path / "out.nii.gz")

    assert code == 1 and f"{name} is a {dimension} image" in err and "2D images and 3D volumes" in err
    assert not (tmp_path / "out.nii.gz").exists()


@pytest.mark.parametrize("content", ["nan_and_inf", "all_nan", "constant"])
def test_non_finite_and_constant_volumes_are_refused_and_write_nothing(tmp_path, capsys, content):
    # Issue 10 (I01–I03): a model answers even a flat grey input, so these are refused, not segmented.
    array = blob(dtype=np.float32)
    if content == "nan_and_inf":
        array[0, :5] = np.nan
        array[1] = np.inf
        array[2, 3] = -np.inf
    elif content == "all_nan":
        array[:] = np.nan
    else:
        array[:] = 7.0
    write_image(tmp_path / "scan.nrrd", array, spacing=VOLUME_SPACING)
    out = tmp_path / "liver.nii.gz"

    code, _, err = segment(capsys, tmp_path / "scan.nrrd", "--classes", "liver", "--out", out)

    assert code == 1
    assert ("NaN or infinite" if content != "constant" else "no contrast") in err
    assert not out.exists()


# ----------------------------------------------------------------------------------------------- session edge cases


@pytest.fixture(scope="module")
def tiny_session() -> KPrismSession:
    """An untrained tiny model (64 px input, classes a and b): fast, and any output is possible."""
    from kprism.model import build_model, preset

    torch.manual_seed(0)
    model = build_model(preset("tiny", image_size=64, num_classes=2)).eval()
    return KPrismSession(model, catalog=ClassCatalog.from_names(["a", "b"]), device="cpu", threads=1)


def _nan_picture(shape=(30, 40)) -> np.ndarray:
    image = np.random.default_rng(5).normal(size=shape).astype(np.float32)
    image[2:6, 3:9] = np.nan
    image[10, :] = np.inf
    image[20, :] = -np.inf
    return image


def test_nan_and_inf_pixels_are_refused_for_the_image_and_for_a_reference(tiny_session):
    tiny_session.set_image(np.random.default_rng(4).normal(size=(30, 40)).astype(np.float32))
    clean = tiny_session.add_click([12, 10])

    with pytest.raises(ValueError, match="voxels that are NaN or infinite"):
        tiny_session.set_image(_nan_picture())
    with pytest.raises(ValueError, match="Reference 1's image .* voxels that are NaN or infinite"):
        tiny_session.segment_in_context([Reference(ImageData(_nan_picture((24, 24))), np.pad(np.ones((10, 10)), 7))])
    assert same_snapshot(snapshot(tiny_session.result()), snapshot(clean))  # the refusals changed nothing


@pytest.mark.parametrize("shape", [(1, 1), (1, 50), (3, 1, 1), (2, 300)])
def test_degenerate_shapes_are_refused_as_too_small(tiny_session, shape):
    with pytest.raises(ValueError, match="too small to segment"):
        tiny_session.set_image(np.random.default_rng(2).random(shape).astype(np.float32))


@pytest.mark.parametrize("shape", [(8, 8), (8, 300), (3, 8, 8), (1, 8, 9)])
def test_smallest_accepted_shapes_are_segmented_on_their_own_grid(tiny_session, shape):
    tiny_session.set_image(np.random.default_rng(2).random(shape).astype(np.float32))

    assert_valid(tiny_session.segment_semantic(["b"])["b"], shape)
    assert_valid(tiny_session.add_click([0] * len(shape)), shape)
    assert_valid(tiny_session.add_box([0] * len(shape), [n - 1 for n in shape[::-1]]), shape)


def test_unknown_class_in_a_session_lists_the_known_ones(tiny_session):
    tiny_session.set_image(noise((16, 16)))
    before = snapshot(tiny_session.result())

    with pytest.raises(UnknownClassError, match=r"Unknown class 'c'.*Known classes: a, b"):
        tiny_session.segment_semantic(["a", "c"])
    assert same_snapshot(snapshot(tiny_session.result()), before)


@pytest.mark.parametrize("method", ["add_scribble", "set_prior_mask"])
def test_session_masks_of_another_shape_are_refused_and_change_nothing(tiny_session, method):
    tiny_session.set_image(noise((20, 24)))
    tiny_session.add_click([5, 5])
    before = snapshot(tiny_session.result())

    with pytest.raises(ValueError, match=r"shape \(10, 12\); the image has \(20, 24\)"):
        getattr(tiny_session, method)(np.ones((10, 12), bool))
    assert same_snapshot(snapshot(tiny_session.result()), before)


# ----------------------------------------------------------------------------------------------- mismatched grids


def _other_grid_mask(path: Path) -> None:
    """A mask on a coarser grid (2×2×1.6 the spacing), shifted, overlapping the blob of write_ct."""
    mask = np.zeros((4, 16, 20), np.uint8)
    mask[1:3, 5:11, 6:14] = 1
    write_image(path, mask, spacing=(1.6, 1.8, 4.0), origin=(-19.6, 10.45, 50.75))


def test_scribble_file_on_another_grid_is_resampled_onto_the_image(tmp_path, capsys):
    image = write_ct(tmp_path / "ct.nii.gz")
    _other_grid_mask(tmp_path / "stroke.nrrd")
    (tmp_path / "prompts.json").write_text(json.dumps({"scribbles": [{"mask": "stroke.nrrd"}]}), encoding="utf-8")
    out = tmp_path / "out.nii.gz"

    code, _, err = segment(capsys, tmp_path / "ct.nii.gz", "--prompts", tmp_path / "prompts.json", "--out", out)

    assert code == 0, err
    assert same_grid(out, image)


def test_init_mask_on_another_grid_is_resampled_onto_the_image(tmp_path, capsys):
    image = write_ct(tmp_path / "ct.nii.gz")
    _other_grid_mask(tmp_path / "draft.nrrd")
    out = tmp_path / "out.nii.gz"

    code, _, err = segment(capsys, tmp_path / "ct.nii.gz", "--init-mask", tmp_path / "draft.nrrd", "--out", out)

    assert code == 0, err
    assert same_grid(out, image)
    expected = io.read_mask(tmp_path / "draft.nrrd", reference=io.read_image(tmp_path / "ct.nii.gz")).array > 0
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(out))) > 0
    assert expected.any() and np.array_equal(written, expected)  # an init mask alone comes back as itself


def test_png_init_mask_of_another_size_is_scaled_onto_the_picture(tmp_path, capsys):
    write_picture(tmp_path / "photo.png", (40, 50))
    small = np.zeros((20, 25), np.uint8)
    small[5:15, 5:20] = 255
    Image.fromarray(small).save(tmp_path / "draft.png")
    out = tmp_path / "out.png"

    code, _, err = segment(capsys, tmp_path / "photo.png", "--init-mask", tmp_path / "draft.png", "--out", out)

    assert code == 0, err
    with Image.open(out) as picture:
        written = np.asarray(picture)
    assert np.array_equal(written > 0, (small > 0).repeat(2, 0).repeat(2, 1))


@pytest.mark.parametrize("mask_grid", ["reference", "smaller"])
def test_reference_of_another_size_and_spacing_is_accepted(tmp_path, capsys, mask_grid):
    image = write_ct(tmp_path / "ct.nii.gz")
    write_ct(tmp_path / "ref.nrrd", shape=(4, 50, 60), spacing=(0.5, 0.5, 3.0))
    shape, spacing = ((4, 50, 60), (0.5, 0.5, 3.0)) if mask_grid == "reference" else ((2, 25, 30), (1.0, 1.0, 6.0))
    mask = np.zeros(shape, np.uint8)
    mask[:, shape[1] // 4: 3 * shape[1] // 4, shape[2] // 4: 3 * shape[2] // 4] = 1
    write_image(tmp_path / "ref_mask.nrrd", mask, spacing=spacing, origin=(-20.0, 10.0, 50.0))
    out = tmp_path / "out.nii.gz"

    code, _, err = segment(capsys, tmp_path / "ct.nii.gz", "--reference", tmp_path / "ref.nrrd", tmp_path / "ref_mask.nrrd",
                           "--out", out)

    assert code == 0, err
    assert same_grid(out, image)


def test_init_mask_of_another_dimension_is_refused_naming_it(tmp_path, capsys):
    write_ct(tmp_path / "ct.nii.gz")
    Image.fromarray((np.eye(20) * 255).astype(np.uint8)).save(tmp_path / "flat.png")

    code, _, err = segment(capsys, tmp_path / "ct.nii.gz", "--init-mask", tmp_path / "flat.png", "--out", tmp_path / "o.nii.gz")

    assert code == 1 and "flat.png is 2D but the image is 3D" in err
    assert not (tmp_path / "o.nii.gz").exists()


def test_scribble_file_outside_the_image_is_named(tmp_path, capsys):
    write_ct(tmp_path / "ct.nii.gz")
    stroke = np.ones((3, 8, 8), np.uint8)
    write_image(tmp_path / "far.nrrd", stroke, origin=(500.0, 500.0, 500.0))
    (tmp_path / "prompts.json").write_text(json.dumps({"scribbles": [{"mask": "far.nrrd"}]}), encoding="utf-8")

    code, _, err = segment(capsys, tmp_path / "ct.nii.gz", "--prompts", tmp_path / "prompts.json", "--out", tmp_path / "o.nii.gz")

    assert code == 1 and "far.nrrd" in err


@pytest.mark.parametrize(("prompts", "message"), [
    ('{"scribbles": [{"mask": "missing.nii.gz"}]}', "missing.nii.gz"),
    ('{"scribbles": [{"mask": "empty.nii.gz"}]}', "empty.nii.gz"),
    ('{"points": [{"position": [3, 4, 1]}', "not valid JSON"),
    ('{"boxes": [{"min": [0, 0, 0], "max": [400, 20, 3]}]}', "outside the image"),
    ('{"points": [{"position": [3, 4]}]}', "needs 3 coordinates"),
])
def test_bad_prompt_files_are_clear_errors(tmp_path, capsys, prompts, message):
    write_ct(tmp_path / "ct.nii.gz")
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    (tmp_path / "prompts.json").write_text(prompts, encoding="utf-8")

    code, _, err = segment(capsys, tmp_path / "ct.nii.gz", "--prompts", tmp_path / "prompts.json", "--out", tmp_path / "o.nii.gz")

    assert code == 1 and message in err
    assert not (tmp_path / "o.nii.gz").exists()


# ----------------------------------------------------------------------------------------------- DICOM


@pytest.mark.parametrize(("damage", "gap"), [
    ("missing", ("IM0002.dcm", "IM0004.dcm")),
    ("missing_oblique", ("IM0002.dcm", "IM0004.dcm")),
    ("duplicated", ("IM0002.dcm", "IM0003.dcm")),
    ("truncated_slice", ("IM0002.dcm", "IM0004.dcm")),
])
def test_dicom_series_with_a_gap_is_refused_naming_the_gap(tmp_path, capsys, damage, gap):
    oblique = None
    if damage == "missing_oblique":
        a = np.radians(25)
        oblique = tuple(np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]]).ravel())
    folder = tmp_path / "series"
    write_dicom_series(folder, skip=(3,) if damage.startswith("missing") else (),
                       duplicate=2 if damage == "duplicated" else None, direction=oblique)
    if damage == "truncated_slice":
        data = (folder / "IM0003.dcm").read_bytes()
        (folder / "IM0003.dcm").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out.nii.gz"

    code, _, err = segment(capsys, folder, "--classes", "liver", "--out", out)

    assert code == 1 and "irregular slice spacing" in err
    assert f"{gap[0]} and {gap[1]}" in err and "missing or duplicated slice" in err
    assert not out.exists()


def test_complete_dicom_series_is_segmented_on_its_own_grid(tmp_path, capsys):
    volume = write_dicom_series(tmp_path / "series")
    out = tmp_path / "out.nii.gz"

    code, _, err = segment(capsys, tmp_path / "series", "--classes", "liver", "--out", out)

    assert code == 0, err
    assert same_grid(out, volume)


# ----------------------------------------------------------------------------------------------- unknown classes


@pytest.mark.parametrize(("classes", "unknown", "suggestion"), [
    ("livr", "livr", "Did you mean liver"),
    ("Liver", "Liver", "Did you mean liver"),
    ("spleen,kidny", "kidny", "Did you mean kidney_left"),
    ("xyzzy", "xyzzy", None),
])
def test_unknown_class_names_list_the_known_ones_and_suggest_close_names(tmp_path, capsys, classes, unknown, suggestion):
    write_ct(tmp_path / "ct.nii.gz")
    out = tmp_path / "out.nii.gz"

    code, _, err = segment(capsys, tmp_path / "ct.nii.gz", "--classes", classes, "--out", out)

    assert code == 1 and f"Unknown class {unknown!r}" in err and "Known classes: " in err and "liver" in err
    assert suggestion is None or suggestion in err
    assert suggestion is not None or "Did you mean" not in err
    assert not out.exists()


def test_unknown_class_in_a_batch_writes_nothing(tmp_path, capsys):
    (tmp_path / "cases").mkdir()
    write_ct(tmp_path / "cases" / "a.nrrd")

    code, _, err = run_batch(capsys, "--input", tmp_path / "cases", "--output", tmp_path / "out", "--mode", "semantic",
                             "--classes", "livr")

    assert code != 0 and "Unknown class 'livr'" in err and "Did you mean liver" in err
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


# ----------------------------------------------------------------------------------------------- weights


@pytest.fixture
def bundled_bytes() -> bytes:
    return (weights.BUNDLED_DIR / "kprism-tiny.safetensors").read_bytes()


@pytest.mark.parametrize(("damage", "message"), [
    ("random", "not a readable safetensors file"),
    ("truncated", "not a readable safetensors file"),
    ("empty", "not a readable safetensors file"),
    ("plain_safetensors", "not a KPrism checkpoint"),
    ("missing", "not found"),
])
def test_bad_weights_file_is_a_clear_error_before_any_output(tmp_path, capsys, bundled_bytes, damage, message):
    write_ct(tmp_path / "ct.nii.gz")
    model = tmp_path / "model.safetensors"
    if damage == "random":
        model.write_bytes(np.random.default_rng(0).bytes(5000))
    elif damage == "truncated":
        model.write_bytes(bundled_bytes[: len(bundled_bytes) // 2])
    elif damage == "empty":
        model.write_bytes(b"")
    elif damage == "plain_safetensors":
        from safetensors.torch import save_file

        save_file({"weight": torch.zeros(3)}, str(model))
    out = tmp_path / "out.nii.gz"

    started = time.monotonic()
    code, _, err = segment(capsys, tmp_path / "ct.nii.gz", "--classes", "liver", "--model", model, "--out", out)

    assert code == 1 and message in err and "model.safetensors" in err
    assert time.monotonic() - started < 5
    assert not out.exists()


@pytest.mark.parametrize("model_option", [["--model", "kprism-tiny"], []])
def test_bundled_weights_with_a_wrong_hash_are_refused(tmp_path, capsys, monkeypatch, bundled_bytes, model_option):
    damaged = bytearray(bundled_bytes)
    damaged[len(damaged) // 2] ^= 0xFF  # one flipped bit in a tensor: loadable, but not the published file
    (tmp_path / "bundled").mkdir()
    (tmp_path / "bundled" / "kprism-tiny.safetensors").write_bytes(bytes(damaged))
    monkeypatch.setattr(weights, "BUNDLED_DIR", tmp_path / "bundled")
    write_ct(tmp_path / "ct.nii.gz")

    code, _, err = segment(capsys, tmp_path / "ct.nii.gz", "--classes", "liver", *model_option, "--out", tmp_path / "o.nii.gz")

    assert code == 1 and "sha256 mismatch" in err and "kprism models download kprism-tiny" in err
    assert not (tmp_path / "o.nii.gz").exists()


@pytest.fixture
def offline_manifest(tmp_path, monkeypatch):
    """The shipped manifest plus a model that is not bundled, an empty Hugging Face cache, offline mode on."""
    import huggingface_hub
    import huggingface_hub.constants

    entries = json.loads(weights.MANIFEST_PATH.read_text(encoding="utf-8"))
    entries.append({**entries[0], "name": "kprism-base", "repo_id": "kprism/kprism-base",
                    "filename": "kprism-base.safetensors", "sha256": "", "bundled": False})
    manifest = tmp_path / "models.json"
    manifest.write_text(json.dumps(entries), encoding="utf-8")
    monkeypatch.setattr(weights, "MANIFEST_PATH", manifest)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    real_download = huggingface_hub.hf_hub_download

    def local_only(*args, **kwargs):
        if not kwargs.get("local_files_only"):
            pytest.fail(f"network access attempted: hf_hub_download{args}")
        return real_download(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", local_only)


@pytest.mark.parametrize("command", ["segment", "download"])
def test_offline_model_without_a_cached_copy_fails_fast_with_advice(tmp_path, capsys, offline_manifest, command):
    write_ct(tmp_path / "ct.nii.gz")

    started = time.monotonic()
    if command == "segment":
        code, _, err = segment(capsys, tmp_path / "ct.nii.gz", "--classes", "liver", "--model", "kprism-base",
                               "--out", tmp_path / "o.nii.gz")
    else:
        code, _, err = run_kprism(capsys, "models", "download", "kprism-base")
    elapsed = time.monotonic() - started

    assert code == 1 and elapsed < 5
    assert "kprism-base" in err and "offline" in err.lower() and "--model" in err
    assert not (tmp_path / "o.nii.gz").exists()


def test_unknown_model_name_lists_the_known_models(tmp_path, capsys):
    write_ct(tmp_path / "ct.nii.gz")

    code, _, err = segment(capsys, tmp_path / "ct.nii.gz", "--classes", "liver", "--model", "kprism-huge",
                           "--out", tmp_path / "o.nii.gz")

    assert code == 1 and "Unknown model 'kprism-huge'" in err and "Known models: kprism-tiny" in err


def test_models_verify_reports_a_corrupt_file(tmp_path, capsys, bundled_bytes):
    (tmp_path / "cut.safetensors").write_bytes(bundled_bytes[:1000])

    code, out, _ = run_kprism(capsys, "models", "verify", tmp_path / "cut.safetensors")

    assert code == 1 and "cut.safetensors" in out and "truncated" in out


def test_corrupt_weights_stop_a_batch_before_any_output(tmp_path, capsys):
    (tmp_path / "cases").mkdir()
    write_ct(tmp_path / "cases" / "a.nrrd")
    (tmp_path / "noise.safetensors").write_bytes(np.random.default_rng(1).bytes(4096))

    code, _, err = run_batch(capsys, "--input", tmp_path / "cases", "--output", tmp_path / "out", "--mode", "semantic",
                             "--classes", "liver", "--model", tmp_path / "noise.safetensors")

    assert code == 2 and "noise.safetensors" in err and "not a readable safetensors file" in err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


# ----------------------------------------------------------------------------------------------- output paths


def _no_model(*args, **kwargs):
    raise WorkStarted("the model was loaded although the output cannot be written")


@pytest.mark.parametrize("case", [
    "parent_is_a_file", "is_a_folder", "same_as_input", "same_as_input_via_dotdot", "symlink_to_input", "png_same_as_input",
    "unsupported_extension",
    "overlay_parent_is_a_file",
])
def test_unwritable_output_is_refused_before_any_work(tmp_path, capsys, monkeypatch, case):
    monkeypatch.setattr(cli, "_session", _no_model)
    source = tmp_path / "ct.nii.gz"
    write_ct(source)
    (tmp_path / "a_file").write_text("not a folder", encoding="utf-8")
    (tmp_path / "a_folder").mkdir()
    extra = []
    if case == "parent_is_a_file":
        out, expected = tmp_path / "a_file" / "sub" / "seg.nii.gz", "Cannot create the output folder"
    elif case == "is_a_folder":
        out, expected = tmp_path / "a_folder", "The output path is a folder"
    elif case == "same_as_input":
        out, expected = source, "Refusing to overwrite the input"
    elif case == "same_as_input_via_dotdot":
        out, expected = tmp_path / "a_folder" / ".." / "ct.nii.gz", "Refusing to overwrite the input"
    elif case == "symlink_to_input":
        out, expected = tmp_path / "link.nii.gz", "Refusing to overwrite the input"
        out.symlink_to(source)
    elif case == "png_same_as_input":
        source = tmp_path / "photo.png"
        write_picture(source)
        out, expected = source, "Refusing to overwrite the input"
    elif case == "unsupported_extension":
        out, expected = tmp_path / "result.txt", "use one of the extensions"
    else:
        out, expected = tmp_path / "seg.nii.gz", "a_file"
        extra = ["--overlay", tmp_path / "a_file" / "look.png"]
    before = source.read_bytes()

    code, _, err = segment(capsys, source, "--classes", "liver", "--out", out, *extra)

    assert code == 1 and expected in err
    assert source.read_bytes() == before
    assert temporaries(tmp_path) == []


def test_a_volume_result_is_not_squashed_into_a_png(tmp_path, capsys):
    write_ct(tmp_path / "ct.nii.gz")
    out = tmp_path / "result.png"

    code, _, err = segment(capsys, tmp_path / "ct.nii.gz", "--classes", "liver", "--out", out)

    assert code == 1 and "2D" in err and not out.exists()


def test_hard_link_to_the_input_as_output_leaves_the_input_intact(tmp_path, capsys):
    source = tmp_path / "ct.nii.gz"
    image = write_ct(source)
    before = source.read_bytes()
    os.link(source, tmp_path / "alias.nii.gz")

    code, _, err = segment(capsys, source, "--classes", "liver", "--out", tmp_path / "alias.nii.gz")

    assert code == 0, err
    assert source.read_bytes() == before and same_grid(tmp_path / "alias.nii.gz", image)


def test_read_only_output_folder_is_refused_or_written_completely(tmp_path, capsys):
    write_ct(tmp_path / "ct.nii.gz")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        writable = os.access(locked, os.W_OK)  # root may write anyway
        code, _, err = segment(capsys, tmp_path / "ct.nii.gz", "--classes", "liver", "--out", locked / "seg.nii.gz")
        if writable:
            assert code == 0, err
            assert sitk.ReadImage(str(locked / "seg.nii.gz")).GetSize() == VOLUME_SHAPE[::-1]
        else:
            assert code == 1 and "No permission to write" in err and "locked" in err
            assert not (locked / "seg.nii.gz").exists()
        assert temporaries(locked) == []
    finally:
        locked.chmod(0o700)


def test_read_only_existing_output_is_replaced_whole_or_kept(tmp_path, capsys):
    write_ct(tmp_path / "ct.nii.gz")
    out = tmp_path / "seg.nii.gz"
    out.write_bytes(b"an earlier result")
    out.chmod(0o444)

    code, _, err = segment(capsys, tmp_path / "ct.nii.gz", "--classes", "liver", "--out", out)

    if code == 0:
        assert sitk.ReadImage(str(out)).GetSize() == VOLUME_SHAPE[::-1]
    else:
        assert "seg.nii.gz" in err and out.read_bytes() == b"an earlier result"
    assert temporaries(tmp_path) == []


def test_read_only_batch_output_folder_is_refused_or_written_completely(tmp_path, capsys):
    (tmp_path / "cases").mkdir()
    write_ct(tmp_path / "cases" / "a.nrrd")
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o500)
    try:
        writable = os.access(out, os.W_OK)
        code, _, err = run_batch(capsys, "--input", tmp_path / "cases", "--output", out, "--mode", "semantic",
                                 "--classes", "liver")
        if writable:
            assert code == 0, err
            assert io.read_segmentation(out / "a.seg.nrrd")[0].shape == VOLUME_SHAPE
        else:
            assert code != 0 and str(out) in err
            assert list(out.iterdir()) == []
        assert temporaries(out) == []
    finally:
        out.chmod(0o700)


# ---------------------------------------------------------------------------- existing outputs survive failures


def _fail_writing_half(exception: BaseException):
    def write(*args, **kwargs):
        temporary = next(Path(a) for a in args if isinstance(a, (str, os.PathLike)) and ".tmp" in str(a))
        temporary.write_bytes(b"half a file")
        raise exception

    return write


@pytest.mark.parametrize("failure", ["disk_full_labelmap", "disk_full_segmentation", "interrupted_while_writing",
                                     "corrupt_input", "unknown_class", "bad_prompts", "corrupt_weights"])
def test_an_existing_output_stays_intact_when_a_later_run_fails(tmp_path, capsys, monkeypatch, failure):
    source = tmp_path / "ct.nii.gz"
    write_ct(source)
    out = tmp_path / ("seg.seg.nrrd" if failure == "disk_full_segmentation" else "seg.nii.gz")
    assert segment(capsys, source, "--classes", "liver", "--out", out)[0] == 0
    before = out.read_bytes()
    arguments = [source, "--classes", "liver", "--out", out]
    expected_code = 1
    if failure == "disk_full_labelmap":
        monkeypatch.setattr(io.sitk, "WriteImage", _fail_writing_half(RuntimeError("sitk::ERROR: No space left on device")))
    elif failure == "disk_full_segmentation":
        monkeypatch.setattr(io.slicerio, "write_segmentation",
                            _fail_writing_half(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    elif failure == "interrupted_while_writing":
        monkeypatch.setattr(io.sitk, "WriteImage", _fail_writing_half(KeyboardInterrupt()))
        expected_code = 130
    elif failure == "corrupt_input":
        (tmp_path / "broken.nii.gz").write_bytes(source.read_bytes()[:300])
        arguments[0] = tmp_path / "broken.nii.gz"
    elif failure == "unknown_class":
        arguments[2] = "livr"
    elif failure == "bad_prompts":
        (tmp_path / "p.json").write_text('{"points": [{"position": [999, 0, 0]}]}', encoding="utf-8")
        arguments = [source, "--prompts", tmp_path / "p.json", "--out", out]
    else:
        (tmp_path / "noise.safetensors").write_bytes(b"\0" * 64)
        arguments += ["--model", tmp_path / "noise.safetensors"]

    code, _, err = segment(capsys, *arguments)

    assert code == expected_code, err
    assert out.read_bytes() == before
    assert temporaries(tmp_path) == []
    if failure == "interrupted_while_writing":
        assert "no output was written partially" in err


def test_a_failed_segmentation_write_names_the_output(tmp_path, capsys, monkeypatch):
    write_ct(tmp_path / "ct.nii.gz")
    monkeypatch.setattr(io.slicerio, "write_segmentation", _fail_writing_half(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))

    code, _, err = segment(capsys, tmp_path / "ct.nii.gz", "--classes", "liver", "--out", tmp_path / "liver.seg.nrrd")

    assert code == 1 and "liver.seg.nrrd" in err and "No space left on device" in err


def test_a_failed_batch_write_keeps_the_earlier_output(tmp_path, capsys, monkeypatch):
    (tmp_path / "cases").mkdir()
    write_ct(tmp_path / "cases" / "a.nrrd")
    out = tmp_path / "out"
    common = ["--input", tmp_path / "cases", "--output", out, "--mode", "semantic", "--classes", "liver"]
    assert run_batch(capsys, *common)[0] == 0
    before = (out / "a.seg.nrrd").read_bytes()

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(batch.os, "replace", no_space)
    code, _, err = run_batch(capsys, *common, "--overwrite")

    assert code == 1 and "a.nrrd: FAILED" in err
    assert (out / "a.seg.nrrd").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["a.seg.nrrd"]


# ----------------------------------------------------------------------------------------------- batch outputs


@pytest.mark.parametrize("overwrite", [
    False,
    True,
])
def test_batch_never_treats_or_overwrites_an_input_as_its_output(tmp_path, capsys, overwrite):
    cases = tmp_path / "cases"
    cases.mkdir()
    write_ct(cases / "a.nrrd")
    before = (cases / "a.nrrd").read_bytes()

    code, _, err = run_batch(capsys, "--input", cases, "--output", cases, "--mode", "semantic", "--classes", "liver",
                             "--format", "nrrd", *(["--overwrite"] if overwrite else []))

    assert (cases / "a.nrrd").read_bytes() == before
    assert code == 2 and "a.nrrd" in err


def test_batch_output_that_is_a_file_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    from KPrismSlicerLib.logic import KPrismLogic

    monkeypatch.setattr(KPrismLogic, "segment", _no_model)
    (tmp_path / "cases").mkdir()
    write_ct(tmp_path / "cases" / "a.nrrd")
    (tmp_path / "segs").write_text("a file, not a folder", encoding="utf-8")

    code, _, err = run_batch(capsys, "--input", tmp_path / "cases", "--output", tmp_path / "segs", "--mode", "semantic",
                             "--classes", "liver")

    assert code == 2 and "segs" in err and "WorkStarted" not in err and "Errno" not in err
    assert (tmp_path / "segs").read_text(encoding="utf-8") == "a file, not a folder"


def test_killed_batch_leaves_only_complete_outputs_and_a_rerun_finishes_the_rest(tmp_path):
    cases = tmp_path / "cases"
    cases.mkdir()
    shapes = {"case0": (2, 32, 32), "case1": (24, 64, 64), "case2": (24, 64, 64), "case3": (24, 64, 64)}
    for name, shape in shapes.items():  # the first is quick, so the kill lands while a later one is segmented
        write_ct(cases / f"{name}.nrrd", shape=shape, spacing=(1.0, 1.0, 2.0))
    out = tmp_path / "out"
    command = [sys.executable, str(BATCH_SCRIPT), "--input", str(cases), "--output", str(out), "--mode", "semantic",
               "--classes", "liver", "--threads", "1", "--device", "cpu"]

    def outputs() -> list[Path]:
        if not out.exists():
            return []
        return sorted(p for p in out.iterdir() if p.name.endswith(".seg.nrrd") and not p.name.startswith("."))

    with open(tmp_path / "first.log", "w", encoding="utf-8") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=SUBPROCESS_ENV)
        deadline = time.monotonic() + 180
        try:
            while process.poll() is None and not outputs() and time.monotonic() < deadline:
                time.sleep(0.01)
            process.send_signal(signal.SIGKILL)
        finally:
            process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text(encoding="utf-8")[-3000:]

    finished = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in outputs()}
    assert 1 <= len(finished) < 4
    assert sorted(p.name for p in out.iterdir()) == sorted(finished)  # no partial or temporary file
    for name in finished:
        labels, _, _ = io.read_segmentation(out / name)
        assert labels.shape == shapes[name.split(".")[0]]

    rerun = subprocess.run(command, capture_output=True, encoding="utf-8", env=SUBPROCESS_ENV, timeout=300)

    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{4 - len(finished)} to segment, {len(finished)} already finished" in rerun.stdout
    assert sorted(p.name for p in out.iterdir()) == [f"{name}.seg.nrrd" for name in shapes]
    for name, shape in shapes.items():
        labels, _, segments = io.read_segmentation(out / f"{name}.seg.nrrd")
        assert labels.shape == shape and [s["name"] for s in segments] == ["liver"]
    for name, (mtime, data) in finished.items():
        assert (out / name).stat().st_mtime_ns == mtime and (out / name).read_bytes() == data


# ----------------------------------------------------------------------------------------------- prompt properties

PICTURE = np.random.default_rng(11).normal(100, 30, (30, 40)).astype(np.float32)  # rows × columns
VOLUME = np.random.default_rng(12).normal(100, 30, (8, 20, 24)).astype(np.float32)  # k × j × i (8: the smallest slice side)


def _use(session: KPrismSession, image: np.ndarray, axis: int = 0) -> None:
    """Start from no prompts on `image`, keeping the cached features when the image is already set."""
    if session.image is not None and session.image.array is image and session.axis == axis:
        session.reset()
    else:
        session.set_image(image, axis=axis)


def _inside(point, sizes) -> bool | None:
    """True / False when the point is clearly inside / outside the voxel grid; None on a rounding edge."""
    if any(not math.isfinite(c) for c in point):
        return False
    if all(-0.49 <= c <= n - 0.51 for c, n in zip(point, sizes)):
        return True
    if any(c < -0.51 or c > n - 0.49 for c, n in zip(point, sizes)):
        return False
    return None


def _coordinate(size: int, anywhere: bool = True):
    inside = st.one_of(st.integers(0, size - 1).map(float), st.floats(-0.49, size - 0.51))
    if not anywhere:
        return inside
    return st.one_of(inside, st.floats(-8, size + 8, allow_nan=False, allow_infinity=False),
                     st.integers(-3, size + 2).map(float), st.sampled_from([math.nan, math.inf, -math.inf]))


def _point(sizes):
    """A point (fastest axis first) inside the grid half of the time, else anywhere, NaN and infinity included."""
    return st.one_of(st.tuples(*[_coordinate(n, anywhere=False) for n in sizes]), st.tuples(*[_coordinate(n) for n in sizes]))


def _changed_slices(before, after, axis: int) -> set[int]:
    old = np.zeros_like(after.probability) if before is None else before[0]
    changed = np.argwhere(old != after.probability)
    return set(changed[:, axis].tolist())


def _apply_or_refuse(session, prompt, *args, inside):
    """Call `prompt(*args)`; a refused prompt must be a ValueError that leaves the result exactly as it was."""
    before = snapshot(session.result())
    try:
        result = prompt(*args)
    except ValueError as error:
        assert inside is not True, f"a prompt inside the image was refused: {error}"
        assert same_snapshot(snapshot(session.result()), before)
        return before, None
    assert inside is not False, "a prompt outside the image was accepted"
    return before, result


@PROPERTY_SETTINGS
@given(clicks=st.lists(st.tuples(_point((40, 30)), st.booleans()), min_size=1, max_size=5))
def test_any_clicks_on_a_picture_give_a_valid_result_or_change_nothing(tiny_session, clicks):
    _use(tiny_session, PICTURE)
    for (x, y), positive in clicks:
        _, result = _apply_or_refuse(tiny_session, tiny_session.add_click, [x, y], positive,
                                     inside=_inside((x, y), (40, 30)))
        if result is not None:
            assert_valid(result, PICTURE.shape)


@PROPERTY_SETTINGS
@given(axis=st.sampled_from([0, 1, 2]),
       clicks=st.lists(st.tuples(_point((24, 20, 8)), st.booleans()), min_size=1, max_size=4), travel=st.booleans())
def test_any_clicks_on_a_volume_change_their_slice_and_a_run_of_neighbours_or_nothing(tiny_session, axis, clicks, travel):
    _use(tiny_session, VOLUME, axis)
    click = functools.partial(tiny_session.add_click, propagate=travel)
    for (i, j, k), positive in clicks:
        before, result = _apply_or_refuse(tiny_session, click, [i, j, k], positive, inside=_inside((i, j, k), (24, 20, 8)))
        if result is not None:
            assert_valid(result, VOLUME.shape)
            clicked = int(np.round([k, j, i][axis]))
            changed = _changed_slices(before, result, axis)
            if not travel:
                assert changed <= {clicked}
            else:  # the change travels outwards from the clicked slice without gaps
                run = changed | {clicked}
                assert run == set(range(min(run), max(run) + 1))


@PROPERTY_SETTINGS
@given(corners=st.tuples(_point((40, 30)), _point((40, 30))))
def test_any_box_on_a_picture_gives_a_valid_result_or_changes_nothing(tiny_session, corners):
    _use(tiny_session, PICTURE)
    tiny_session.add_click([20, 15])
    (x0, y0), (x1, y1) = corners
    inside = [_inside((x0, y0), (40, 30)), _inside((x1, y1), (40, 30))]
    expected = False if False in inside else (True if inside == [True, True] else None)
    _, result = _apply_or_refuse(tiny_session, tiny_session.add_box, [x0, y0], [x1, y1], inside=expected)
    if result is not None:
        assert_valid(result, PICTURE.shape)


@PROPERTY_SETTINGS
@given(axis=st.sampled_from([0, 1, 2]),
       corners=st.tuples(_point((24, 20, 8)), _point((24, 20, 8))))
def test_any_box_on_a_volume_changes_only_the_slices_it_spans(tiny_session, axis, corners):
    _use(tiny_session, VOLUME, axis)
    first, second = corners
    inside = [_inside(first, (24, 20, 8)), _inside(second, (24, 20, 8))]
    expected = False if False in inside else (True if inside == [True, True] else None)
    before, result = _apply_or_refuse(tiny_session, functools.partial(tiny_session.add_box, propagate=False),
                                      list(first), list(second), inside=expected)
    if result is not None:
        assert_valid(result, VOLUME.shape)
        ends = sorted(int(np.round(c[::-1][axis])) for c in (first, second))
        assert _changed_slices(before, result, axis) <= set(range(ends[0], ends[1] + 1))


def _sparse_masks(shape):
    return st.one_of(st.just(np.zeros(shape, bool)), arrays(np.bool_, shape, elements=st.booleans(), fill=st.just(False)))


@PROPERTY_SETTINGS
@given(mask=_sparse_masks(PICTURE.shape), positive=st.booleans())
def test_any_scribble_on_a_picture_gives_a_valid_result_or_a_clear_error(tiny_session, mask, positive):
    _use(tiny_session, PICTURE)
    tiny_session.add_click([20, 15])
    before = snapshot(tiny_session.result())
    if not mask.any():
        with pytest.raises(ValueError, match="scribble mask is empty"):
            tiny_session.add_scribble(mask, positive)
        assert same_snapshot(snapshot(tiny_session.result()), before)
    else:
        assert_valid(tiny_session.add_scribble(mask, positive), PICTURE.shape)


@PROPERTY_SETTINGS
@given(axis=st.sampled_from([0, 1, 2]), mask=_sparse_masks(VOLUME.shape))
def test_any_scribble_on_a_volume_changes_only_the_slices_it_touches(tiny_session, axis, mask):
    _use(tiny_session, VOLUME, axis)
    before = snapshot(tiny_session.result())
    if not mask.any():
        with pytest.raises(ValueError, match="scribble mask is empty"):
            tiny_session.add_scribble(mask)
        assert same_snapshot(snapshot(tiny_session.result()), before)
        return
    result = tiny_session.add_scribble(mask, propagate=False)
    assert_valid(result, VOLUME.shape)
    touched = set(np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))[0].tolist())
    assert _changed_slices(before, result, axis) <= touched


_ACTIONS = st.lists(st.one_of(
    st.tuples(st.just("click"), _point((40, 30)), st.booleans()),
    st.tuples(st.just("box"), _point((40, 30)), _point((40, 30))),
    st.tuples(st.just("scribble"), st.integers(-5, 35), st.integers(-5, 45)),
    st.tuples(st.just("undo")),
), min_size=1, max_size=8)


@PROPERTY_SETTINGS
@given(actions=_ACTIONS)
def test_any_sequence_of_prompts_and_undos_stays_consistent(tiny_session, actions):
    """Refused prompts leave no trace: every undo returns exactly the result before the last accepted prompt."""
    _use(tiny_session, PICTURE)
    history = []  # results before each accepted prompt
    for action in actions:
        kind = action[0]
        if kind == "undo":
            current = snapshot(tiny_session.result())
            got = snapshot(tiny_session.undo())
            expected = history.pop() if history else current
            if expected is None:  # the first prompt's undo leaves an empty (all-zero) result
                assert got is None or not got[0].any()
            else:
                assert same_snapshot(got, expected)
            continue
        if kind == "click":
            _, (x, y), positive = action
            prompt, args, inside = tiny_session.add_click, ([x, y], positive), _inside((x, y), (40, 30))
        elif kind == "box":
            _, (x0, y0), (x1, y1) = action
            ends = [_inside((x0, y0), (40, 30)), _inside((x1, y1), (40, 30))]
            inside = False if False in ends else (True if ends == [True, True] else None)
            prompt, args = tiny_session.add_box, ([x0, y0], [x1, y1])
        else:
            _, row, column = action
            mask = np.zeros(PICTURE.shape, bool)
            mask[max(row, 0): max(row + 3, 0), max(column, 0): max(column + 4, 0)] = True
            prompt, args, inside = tiny_session.add_scribble, (mask,), bool(mask.any())
        before, result = _apply_or_refuse(tiny_session, prompt, *args, inside=inside)
        if result is not None:
            assert_valid(result, PICTURE.shape)
            history.append(before)
