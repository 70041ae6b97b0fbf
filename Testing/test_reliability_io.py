"""Reliability of kprism.io against bad inputs and failing outputs (issue 10; audit rows I07d, I08a, I08d, O07,
R01c and P18 of the 2026-12-01 reliability audit).

Every test makes its own files under tmp_path or uses the bundled samples. Reads that could allocate
what a hostile header claims run in a child interpreter under an address-space limit.
"""

from __future__ import annotations

import errno
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from kprism import io
from kprism.image import Geometry, ImageData
from test_reliability import SUBPROCESS_ENV, segment, temporaries, write_ct, write_dicom_series

SAMPLES = Path(io.__file__).parent / "samples"
CHEST_XRAY = SAMPLES / "chest_xray" / "MCUCXR_0001_0.png"
FETAL_HEAD = SAMPLES / "fetal_head"
PEAK_MEMORY_MB = 500  # issue 10: a refused input may use at most this much memory


# ------------------------------------------------------------------------ I07d: claimed sizes, detached headers

# Reads each path in one child interpreter (kprism.io only, no torch) and reports each outcome and the
# child's peak resident memory. The peak is VmHWM, the high-water mark of the child's own address space:
# getrusage's ru_maxrss survives exec on Linux, so it would report the forking test process's size. The
# address-space limit is only a safety net for this machine should the size check regress; the bound the
# issue sets is asserted on the measured peak.
_READ_PROBE = r"""
import json, re, resource, sys
from kprism.io import read_image

def status_mb(key):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024

try:
    limit = int((status_mb("VmSize") + 2048) * 2**20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
except OSError:
    pass
outcomes = {}
for path in sys.argv[1:]:
    try:
        outcomes[path] = {"error": None, "shape": list(read_image(path).array.shape)}
    except Exception as error:
        outcomes[path] = {"error": type(error).__name__, "message": str(error)}
try:
    outcomes["peak_mb"] = status_mb("VmHWM")
except OSError:  # no /proc (not Linux): no per-address-space peak to report
    outcomes["peak_mb"] = None
print(json.dumps(outcomes))
"""


def read_in_child(*paths: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", _READ_PROBE, *map(str, paths)], capture_output=True,
                          encoding="utf-8", env=SUBPROCESS_ENV, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


def assert_peak_within_bound(peak_mb: float | None) -> None:
    if peak_mb is not None:
        assert peak_mb < PEAK_MEMORY_MB, f"refusing them took {peak_mb:.0f} MB"


def big_detached_headers(folder: Path) -> list[Path]:
    """The audit's case: a .nhdr and a .mhd claiming 2400³ uchar (13.8 GB) with a 64-byte raw data file."""
    (folder / "big.raw").write_bytes(bytes(64))
    (folder / "big.nhdr").write_text("NRRD0004\ntype: uchar\ndimension: 3\nsizes: 2400 2400 2400\n"
                                     "encoding: raw\ndata file: big.raw\n", encoding="ascii")
    (folder / "big.mhd").write_text("ObjectType = Image\nNDims = 3\nDimSize = 2400 2400 2400\n"
                                    "ElementType = MET_UCHAR\nElementDataFile = big.raw\n", encoding="ascii")
    return [folder / "big.nhdr", folder / "big.mhd"]


def claim_rows_and_columns(path: Path, rows: int, columns: int) -> None:
    """Rewrite a DICOM file's Rows and Columns (implicit VR little endian, as SimpleITK writes them)."""
    data = bytearray(path.read_bytes())
    for element, value in ((0x0010, rows), (0x0011, columns)):
        at = data.index(struct.pack("<HHI", 0x0028, element, 2))
        data[at + 8: at + 10] = struct.pack("<H", value)
    path.write_bytes(bytes(data))


def test_I07d_detached_headers_claiming_2400_cubed_are_refused_within_500_MB(tmp_path):
    headers = big_detached_headers(tmp_path)

    outcomes = read_in_child(*headers)

    for header in headers:
        outcome = outcomes[str(header)]
        assert outcome["error"] == "ImageReadError", outcome
        message = outcome["message"]
        assert "\n" not in message
        assert header.name in message and "2400×2400×2400" in message and "big.raw" in message and "64 bytes" in message
    assert_peak_within_bound(outcomes["peak_mb"])


def test_I07d_dicom_files_claiming_more_pixels_than_they_hold_are_refused_within_500_MB(tmp_path):
    write_dicom_series(tmp_path / "all_claim")
    for path in (tmp_path / "all_claim").iterdir():
        claim_rows_and_columns(path, 40000, 40000)  # 3.2 GB of int16 per slice
    write_dicom_series(tmp_path / "one_claims")
    claim_rows_and_columns(sorted((tmp_path / "one_claims").iterdir())[3], 40000, 40000)

    outcomes = read_in_child(tmp_path / "all_claim", tmp_path / "one_claims")

    every = outcomes[str(tmp_path / "all_claim")]
    assert every["error"] == "ImageReadError", every
    assert "claims 40000×40000×1 pixels" in every["message"] and "all_claim" in every["message"]
    one = outcomes[str(tmp_path / "one_claims")]
    assert one["error"] == "ImageReadError", one
    assert "IM0003.dcm" in one["message"] and "40000×40000×1" in one["message"]
    assert_peak_within_bound(outcomes["peak_mb"])


def _slices_as_files(folder: Path, volume: np.ndarray) -> list[str]:
    names = []
    for k, plane in enumerate(volume):
        names.append(f"slice{k + 1:02d}.raw")
        (folder / names[-1]).write_bytes(plane.astype("<i2").tobytes())
    return names


@pytest.mark.parametrize("form", ["nhdr", "nhdr_gzip", "mhd", "mhd_compressed", "nhdr_list", "nhdr_pattern",
                                  "mhd_list", "mhd_pattern"])
def test_I07d_valid_detached_headers_still_read(tmp_path, form):
    volume = np.random.default_rng(7).integers(-1000, 1000, (5, 6, 7)).astype(np.int16)
    depth, rows, columns = volume.shape
    if form in ("nhdr", "nhdr_gzip", "mhd", "mhd_compressed"):
        path = tmp_path / f"volume.{form.split('_')[0]}"
        sitk.WriteImage(sitk.GetImageFromArray(volume), str(path), "_" in form)
    else:
        names = _slices_as_files(tmp_path, volume)
        kind = form.split("_")[1]
        if form.startswith("nhdr"):
            field = "LIST 2\n" + "\n".join(names) if kind == "list" else f"slice%02d.raw 1 {depth} 1 2"
            text = (f"NRRD0004\ntype: short\ndimension: 3\nsizes: {columns} {rows} {depth}\nencoding: raw\n"
                    f"endian: little\ndata file: {field}\n")
        else:
            field = "LIST 2D\n" + "\n".join(names) if kind == "list" else f"slice%02d.raw 1 {depth} 1"
            text = (f"ObjectType = Image\nNDims = 3\nDimSize = {columns} {rows} {depth}\nElementType = MET_SHORT\n"
                    f"BinaryDataByteOrderMSB = False\nElementDataFile = {field}\n")
        path = tmp_path / f"volume.{form.split('_')[0]}"
        path.write_text(text, encoding="ascii")

    np.testing.assert_array_equal(io.read_image(path).array, volume)


@pytest.mark.parametrize(("name", "header", "message"), [
    ("bad.mhd", "ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_UCHAR\nElementDataFile = gone.raw\n",
     "its data file .*gone.raw does not exist"),
    ("bad.nhdr", "NRRD0004\ntype: uchar\ndimension: 3\nsizes: 4 4 4\nencoding: raw\ndata file: gone.raw\n",
     "its data file .*gone.raw does not exist"),
    ("bad.nhdr", "NRRD0004\ntype: uchar\ndimension: 3\nsizes: 4 4 4\nencoding: bzip2\ndata file: data.raw\n",
     "bzip2-encoded, which ITK cannot read"),
    ("bad.nhdr", "NRRD0004\ntype: uchar\ndimension: 3\nsizes: 1 1 100001\nencoding: raw\ndata file: LIST 2\n"
     + "data.raw\n" * 100_001, "names 100001 data files"),
])
def test_I07d_detached_headers_without_usable_data_files_are_named(tmp_path, name, header, message):
    (tmp_path / "data.raw").write_bytes(bytes(64))
    (tmp_path / name).write_text(header, encoding="ascii")

    with pytest.raises(io.ImageReadError, match=message) as refused:
        io.read_image(tmp_path / name)
    assert name in str(refused.value) and "\n" not in str(refused.value)


def test_I07d_gzip_detached_header_is_bounded_by_the_expansion_factor(tmp_path):
    # 512 kB claimed in 8 bytes of "gzip": far beyond zlib's ~1032:1, so refused before reading.
    (tmp_path / "data.raw.gz").write_bytes(bytes(8))
    (tmp_path / "packed.nhdr").write_text("NRRD0004\ntype: uchar\ndimension: 3\nsizes: 64 64 128\n"
                                          "encoding: gzip\ndata file: data.raw.gz\n", encoding="ascii")

    with pytest.raises(io.ImageReadError, match=r"claims 64×64×128 voxels .* 8 bytes of its data file data.raw.gz"):
        io.read_image(tmp_path / "packed.nhdr")


def test_I07d_compressed_dicom_series_with_a_blank_slice_still_reads(tmp_path):
    # A blank 1024² JPEG 2000 slice takes about 1 kB for its 2 MB of pixels, more than zlib's bound; the
    # series as a whole stays within it.
    volume = write_dicom_series(tmp_path / "plain", shape=(3, 1024, 1024))
    (tmp_path / "compressed").mkdir()
    for k, path in enumerate(sorted((tmp_path / "plain").iterdir())):
        image = sitk.ReadImage(str(path))
        if k == 0:
            blank = image * 0
            for key in image.GetMetaDataKeys():
                blank.SetMetaData(key, image.GetMetaData(key))
            image = blank
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetUseCompression(True)
        writer.SetFileName(str(tmp_path / "compressed" / path.name))
        writer.Execute(image)
    expected = sitk.GetArrayFromImage(volume)
    expected[0] = 0

    np.testing.assert_array_equal(io.read_image(tmp_path / "compressed").array, expected)


# ------------------------------------------------------------------------ I08a: complex and boolean images


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
def test_I08a_complex_nifti_is_refused_by_name(tmp_path, capsys, dtype):
    magnitude = np.random.default_rng(1).random((4, 5, 6))
    path = tmp_path / "complex.nii.gz"
    nibabel.save(nibabel.Nifti1Image((magnitude * np.exp(1j * magnitude)).astype(dtype), np.eye(4)), path)

    with pytest.raises(ValueError, match="complex.nii.gz holds complex values; KPrism reads real-valued images: "
                                         "take the magnitude first"):
        io.read_image(path)
    code, _, err = segment(capsys, path, "--classes", "liver", "--out", tmp_path / "out.nii.gz")
    assert code == 1 and "Traceback" not in err
    assert "complex.nii.gz holds complex values" in err.strip().splitlines()[-1]
    assert not (tmp_path / "out.nii.gz").exists()


def test_I08a_binary_nifti_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "mask_dt1.nii"
    nibabel.save(nibabel.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), path)
    data = bytearray(path.read_bytes())
    data[70:74] = struct.pack("<hh", 1, 1)  # datatype DT_BINARY, bitpix 1
    path.write_bytes(bytes(data))

    with pytest.raises(io.ImageReadError, match="mask_dt1.nii is not recognized as a NIFTI file"):
        io.read_image(path)


def test_I08a_a_boolean_array_is_refused_by_name(tmp_path, monkeypatch):
    Image.fromarray(np.eye(8, dtype=np.uint8) * 255).save(tmp_path / "flags.png")
    real = io.sitk.GetArrayFromImage
    # SimpleITK has no boolean pixels; a reader that produced them must still not pass them on.
    monkeypatch.setattr(io.sitk, "GetArrayFromImage", lambda image: real(image) > 0)

    with pytest.raises(ValueError, match="flags.png holds true/false values"):
        io.read_image(tmp_path / "flags.png")


# ------------------------------------------------------------------------ I08d: float16 TIFF


def baseline_tiff(path: Path, array: np.ndarray, sample_format: int, byte_order: str = "<") -> None:
    """A one-strip, uncompressed, greyscale baseline TIFF written by hand (no TIFF library needed)."""
    rows, columns = array.shape
    data = array.astype(array.dtype.newbyteorder(byte_order)).tobytes()
    entries = [(256, columns), (257, rows), (258, array.dtype.itemsize * 8), (259, 1), (262, 1), (273, None),
               (277, 1), (278, rows), (279, len(data)), (339, sample_format)]
    data_offset = 8 + 2 + 12 * len(entries) + 4
    out = (b"II*\0" if byte_order == "<" else b"MM\0*") + struct.pack(byte_order + "IH", 8, len(entries))
    for tag, value in entries:  # every value as a LONG, which readers accept for these tags
        out += struct.pack(byte_order + "HHII", tag, 4, 1, data_offset if value is None else value)
    path.write_bytes(out + struct.pack(byte_order + "I", 0) + data)


@pytest.mark.parametrize("byte_order", ["<", ">"])
def test_I08d_float16_tiff_is_read_as_floats(tmp_path, byte_order):
    halves = np.linspace(-1500, 1500, 128 * 128).reshape(128, 128).astype(np.float16)
    halves[0, 0], halves[1, 1], halves[2, 2] = np.inf, -np.inf, np.nan
    baseline_tiff(tmp_path / "half.tif", halves, sample_format=3, byte_order=byte_order)

    image = io.read_image(tmp_path / "half.tif")

    assert image.array.dtype == np.float32 and image.ndim == 2
    np.testing.assert_array_equal(image.array, halves.astype(np.float32))  # NaN in the same places, inf kept


@pytest.mark.parametrize(("values", "sample_format"), [
    (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 13, 1),
    (np.arange(64 * 64, dtype=np.int16).reshape(64, 64) - 2000, 2),
    (np.linspace(-1e6, 1e6, 64 * 64, dtype=np.float32).reshape(64, 64), 3),
], ids=["uint16", "int16", "float32"])
def test_I08d_other_tiff_sample_formats_keep_their_type(tmp_path, values, sample_format):
    baseline_tiff(tmp_path / "other.tif", values, sample_format)

    image = io.read_image(tmp_path / "other.tif")

    assert image.array.dtype == values.dtype
    np.testing.assert_array_equal(image.array, values)


# ------------------------------------------------------------------------ O07: full disk


PAGE = 4096


@pytest.fixture
def full_disk(tmp_path):
    """A 16 kB tmpfs holding a previous output; `fill(free_pages)` then takes all but that much space."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command to make a small file system")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(folder)],
                          capture_output=True, encoding="utf-8")
    if done.returncode != 0:
        pytest.skip(f"mounting a small tmpfs is not permitted here: {done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def fill(folder: Path, free_pages: int) -> None:
    fillers = []
    while True:
        filler = folder / f"filler{len(fillers)}"
        try:
            filler.write_bytes(bytes(PAGE))
        except OSError as error:
            assert error.errno == errno.ENOSPC
            filler.unlink(missing_ok=True)
            break
        fillers.append(filler)
    for filler in fillers[:free_pages]:
        filler.unlink()


@pytest.mark.parametrize(("suffix", "free_pages"), [(".nii.gz", 0), (".nii", 1)])
def test_O07_nifti_output_to_a_full_disk_fails_and_keeps_the_previous_file(tmp_path, capsys, full_disk, suffix,
                                                                          free_pages):
    write_ct(tmp_path / "ct.nii.gz")  # 6×32×40 labels: 8 kB as .nii, more than one free page
    out = full_disk / f"liver{suffix}"
    out.write_bytes(b"previous result")
    fill(full_disk, free_pages)

    code, _, err = segment(capsys, tmp_path / "ct.nii.gz", "--classes", "liver", "--out", out)

    assert code == 1, err
    assert err.strip().splitlines()[-1] == f"kprism: error: Could not write {out}: the file came back incomplete (disk full?)."
    assert out.read_bytes() == b"previous result"
    assert temporaries(full_disk) == []


def _short_writes(writer, keep_fraction: float):
    """A writer that reports success but leaves only part of its file, like ITK's NIfTI writer on a full disk."""
    def write(*args, **kwargs):
        writer(*args, **kwargs)
        written = next(Path(a) for a in args if isinstance(a, (str, Path)) and ".tmp" in str(a))
        whole = written.read_bytes()
        written.write_bytes(whole[: int(len(whole) * keep_fraction)])

    return write


@pytest.mark.parametrize("keep_fraction", [0.0, 0.5])
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ".png"])
def test_O07_a_short_labelmap_write_is_refused_and_keeps_the_previous_file(tmp_path, monkeypatch, suffix,
                                                                           keep_fraction):
    labels = np.random.default_rng(5).integers(0, 3, (40, 50) if suffix == ".png" else (6, 40, 50))
    geometry = Geometry.identity(labels.ndim)
    target = tmp_path / f"labels{suffix}"
    target.write_bytes(b"previous result")
    monkeypatch.setattr(io.sitk, "WriteImage", _short_writes(io.sitk.WriteImage, keep_fraction))

    with pytest.raises(OSError, match=rf"Could not write .*labels{suffix}: the file came back incomplete \(disk full\?\)"):
        io.write_labelmap(labels, geometry, target)

    assert target.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_O07_a_short_segmentation_write_is_refused_and_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "labels.seg.nrrd"
    target.write_bytes(b"previous result")
    monkeypatch.setattr(io.slicerio, "write_segmentation", _short_writes(io.slicerio.write_segmentation, 0.6))
    labels = np.random.default_rng(6).integers(0, 3, (6, 40, 50))

    with pytest.raises(OSError, match="labels.seg.nrrd: the file came back incomplete"):
        io.write_segmentation(labels, Geometry.identity(3), target, [{"name": "a", "value": 1}, {"name": "b", "value": 2}])

    assert target.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_O07_a_short_overlay_write_is_refused_and_keeps_the_previous_file(tmp_path, monkeypatch):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    target = tmp_path / "overlay.png"
    target.write_bytes(b"previous result")
    short = _short_writes(FigureCanvasAgg.print_figure, 0.5)
    monkeypatch.setattr(FigureCanvasAgg, "print_figure", lambda canvas, path, **kwargs: short(canvas, path, **kwargs))
    image = ImageData(np.random.default_rng(8).random((64, 64)).astype(np.float32))

    with pytest.raises(OSError, match="overlay.png: the file came back incomplete"):
        io.render_overlay(image, (image.array > 0.5).astype(np.uint8), target)

    assert target.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_O07_complete_writes_still_replace_the_previous_file(tmp_path, suffix):
    labels = np.random.default_rng(9).integers(0, 4, (6, 7, 8))
    target = tmp_path / f"labels{suffix}"
    target.write_bytes(b"previous result")

    io.write_labelmap(labels, Geometry.identity(3), target)

    np.testing.assert_array_equal(io.read_mask(target).array, labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


# ------------------------------------------------------------------------ R01c: masks of another aspect ratio


def _fetal_mask(rows: slice | None = None, scale: float = 1.0) -> np.ndarray:
    with Image.open(FETAL_HEAD / "hc18_023_fetal_head.png") as picture:
        if scale != 1.0:
            picture = picture.resize((round(picture.width * scale), round(picture.height * scale)), Image.NEAREST)
        mask = np.asarray(picture)
    return mask if rows is None else mask[rows]


def test_R01c_mask_of_another_aspect_ratio_is_refused_naming_both_sizes(tmp_path, capsys):
    Image.fromarray(_fetal_mask(rows=slice(0, 300))).save(tmp_path / "mask_cropped.png")
    out = tmp_path / "R_cropped.png"

    code, _, err = segment(capsys, FETAL_HEAD / "hc18_013.png", "--reference", FETAL_HEAD / "hc18_023.png",
                           tmp_path / "mask_cropped.png", "--out", out)

    assert code == 1
    message = err.strip().splitlines()[-1]
    assert "mask_cropped.png" in message and "300×800" in message and "540×800" in message
    assert "aspect ratio" in message
    assert not out.exists()


@pytest.mark.parametrize("shape", [(300, 800), (540, 400), (270, 420), (100, 100)])
def test_R01c_read_mask_refuses_another_aspect_ratio(tmp_path, shape):
    Image.fromarray(np.zeros(shape, np.uint8)).save(tmp_path / "mask.png")

    with pytest.raises(ValueError, match=rf"{shape[0]}×{shape[1]} pixels but the image is 540×800"):
        io.read_mask(tmp_path / "mask.png", reference=ImageData(np.zeros((540, 800), np.uint8)))


@pytest.mark.parametrize("scale", [0.5, 2.0, 0.25, 1 / 3])
def test_R01c_uniformly_scaled_masks_are_still_scaled_onto_the_picture(tmp_path, scale):
    full = _fetal_mask() > 0
    Image.fromarray(_fetal_mask(scale=scale)).save(tmp_path / "scaled.png")

    mask = io.read_mask(tmp_path / "scaled.png", reference=ImageData(np.zeros((540, 800), np.uint8)))

    assert mask.array.shape == (540, 800)
    # Scaling loses at most the detail of the coarser grid: nearly every pixel agrees with the full mask.
    assert np.mean((mask.array > 0) == full) > 0.99


def test_R01c_rounded_half_size_mask_is_accepted(tmp_path):
    small = np.zeros((271, 400), np.uint8)  # 541 / 2 rounded up, for a 540-row picture: still the same aspect
    small[100:150, 100:300] = 1
    Image.fromarray(small).save(tmp_path / "small.png")

    mask = io.read_mask(tmp_path / "small.png", reference=ImageData(np.zeros((540, 800), np.uint8)))

    assert mask.array.shape == (540, 800) and mask.array[250, 400] == 1 and mask.array[50, 400] == 0


# ------------------------------------------------------------------------ P18: header text in .seg.nrrd


def test_P18_prompt_file_name_with_bar_and_colon_is_kept_in_the_provenance(tmp_path, capsys):
    prompts = tmp_path / "dir" / "evil|name:x.json"
    prompts.parent.mkdir()
    prompts.write_text(json.dumps({"points": [{"position": [256, 256], "positive": True}]}), encoding="utf-8")
    out = tmp_path / "x.seg.nrrd"

    code, _, err = segment(capsys, CHEST_XRAY, "--prompts", prompts, "--out", out)

    assert code == 0, err
    _, _, segments = io.read_segmentation(out)
    provenance = json.loads(segments[0]["tags"]["KPrism.Provenance"])
    assert provenance["prompts"] == str(prompts)


def test_P18_tags_with_header_characters_round_trip_and_names_stay_one_line(tmp_path):
    # The header is ASCII with one line per field and tags as "key:value|key:value|".
    tags = {"KPrism.Provenance": 'a|b\nc\r:d 50% %7C rein é 腎', "odd:key|x": "v", "Segmentation.Status": "inprogress"}
    segments = [{"name": "left\nkidney", "value": 1, "tags": tags}, {"name": "rein é 50%", "value": 2}]
    labels = np.random.default_rng(10).integers(0, 3, (3, 4, 5))

    path = io.write_segmentation(labels, Geometry.identity(3), tmp_path / "tags.seg.nrrd", segments)

    read_labels, _, read_segments = io.read_segmentation(path)
    np.testing.assert_array_equal(read_labels, labels)
    assert read_segments[0]["name"] == "left kidney"
    assert read_segments[0]["tags"] == tags
    assert read_segments[1]["name"] == "rein é 50%"
