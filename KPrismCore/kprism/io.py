"""Reading images and masks, writing label maps and Slicer segmentations, and quick-look renders.

Every array follows :mod:`kprism.image`'s convention (slowest axis first, LPS geometry in ITK order),
which is SimpleITK's own, so geometry passes through reading and writing without conversion.
Image files go through SimpleITK, ``.seg.nrrd`` files through slicerio, pictures through matplotlib.
"""

from __future__ import annotations

import errno
import gzip
import math
import os
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence, Union

import nibabel
import nrrd
import numpy as np
import PIL.Image
import SimpleITK as sitk
import slicerio
from PIL import TiffImagePlugin

from . import atomic
from .catalog import PALETTE
from .image import Geometry, ImageData
from .orientation import CanonicalView

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PathLike = Union[str, os.PathLike]
Point = tuple[float, float, bool]  # (row, column, positive) on the shown slice

# Only these formats are 2D pictures; any other file is a volume, even with a single slice.
_RASTER_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
_TIFF_SUFFIXES = {".tif", ".tiff"}
_TIFF_BITS_PER_SAMPLE, _TIFF_SAMPLE_FORMAT, _TIFF_IEEE_FLOAT = 258, 339, 3
_LABELMAP_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".png")
_SEGMENTATION_SUFFIX = ".seg.nrrd"
_SEGMENT_KEYS = {"name", "value", "color", "tags"}
_MODALITY_TAG = "0008|0060"
_POSITION_TAG = "0020|0032"
_ORIENTATION_TAG = "0020|0037"

_DPI = 100
_MIN_RENDER_SIDE = 512  # small images are zoomed by a whole factor so the quick look stays legible
_PANEL_INCHES = 4.0
_LABEL_ALPHA = 0.4


class ImageReadError(ValueError):
    """A file that exists but cannot be read as an image: corrupt, truncated or of an unknown format."""


# ----------------------------------------------------------------------------------------------- reading


def read_image(path: PathLike, modality: str | None = None) -> ImageData:
    """Read a 2D picture, a 3D volume file or a DICOM series folder, keeping its numeric type.

    Modality comes from ``modality``, else from the DICOM Modality tag, else is ``"unknown"``.
    """
    source = _existing_path(path)
    if source.is_dir():
        return _read_dicom_folder(source, modality)
    return _read_image_file(source, modality)


def read_mask(path: PathLike, reference: ImageData | None = None) -> ImageData:
    """Read an integer label map; with ``reference``, put it on the reference grid.

    An 8-bit PNG holding only 0 and 255 is a binary mask and comes back as 0/1. A mask on another
    grid is resampled (nearest neighbour) onto the reference. A 2D mask without geometry (identity:
    unit spacing, zero origin) is taken to cover the reference's field of view, so a PNG mask of
    another size is scaled onto the reference image; one of another aspect ratio is refused.
    """
    image = read_image(path)
    labels = _integer_labels(_single_channel(image, path), path)
    if Path(path).suffix.lower() == ".png" and labels.dtype == np.uint8 and _is_0_255(labels):
        labels = (labels > 0).astype(np.uint8)
    mask = ImageData(labels, image.geometry, modality="label")
    return mask if reference is None else _onto_reference(mask, reference, path)


def read_segmentation(path: PathLike) -> tuple[np.ndarray, Geometry, list[dict[str, Any]]]:
    """Read a ``.seg.nrrd``: labels in kprism order, their geometry, and the segments.

    Segments are dicts with ``name``, ``value``, ``color`` (RGB floats in 0–1) and ``tags``.
    Files are always 3D, so labels written from a 2D image come back as one slice.
    """
    source = _existing_path(path)
    try:
        segmentation = slicerio.read_segmentation(str(source))
    except Exception as error:  # slicerio and pynrrd raise many types for a malformed file
        raise ImageReadError(f"Could not read segmentation {source}: {error}") from error
    voxels = segmentation["voxels"]
    if voxels.ndim != 3:
        raise ValueError(
            f"{source} stores overlapping segments in {voxels.shape[0]} layers, which one label map cannot "
            "hold. Export it from Slicer as a labelmap or without overlaps."
        )
    labels = np.ascontiguousarray(voxels.transpose(2, 1, 0))  # slicerio is (i, j, k); kprism is (k, j, i)
    segments = [_segment_from_slicer(segment) for segment in segmentation["segments"]]
    return labels, _geometry_from_ijk_to_lps(segmentation["ijkToLPS"]), segments


def _existing_path(path: PathLike) -> Path:
    source = Path(path).expanduser()
    if not source.exists():
        raise FileNotFoundError(errno.ENOENT, "No image file or DICOM folder at this path", str(source))
    return source


def _check_not_empty(source: Path) -> None:
    if source.is_file() and source.stat().st_size == 0:
        raise ImageReadError(f"Could not read image {source}: the file is empty (0 bytes).")


# zlib cannot compress better than about 1032:1, so no single-file image can unpack to more.
_MAX_EXPANSION = 1100
_MAX_DATA_FILES = 100_000  # a detached header naming more data files than this is refused
_MAX_HEADER_LINE = 1 << 16
_MAX_HEADER_LINES = 10_000
# How many voxel bytes one stored byte can hold, per NRRD encoding; text holds at least one character
# per value, and a value is at most 8 bytes.
_NRRD_EXPANSION = {"raw": 1, "hex": 1, "ascii": 8, "text": 8, "txt": 8, "gzip": _MAX_EXPANSION, "gz": _MAX_EXPANSION}
_NRRD_UNREADABLE_ENCODINGS = {"bzip2", "bz2"}  # ITK's NrrdIO is built without bzip2
_DATA_FILE_FIELDS = {"data file", "datafile"}
# DICOM transfer syntaxes that store pixels as they are; every other one is compressed.
_UNCOMPRESSED_DICOM = {
    "1.2.840.10008.1.2",  # implicit VR little endian, also the default without a file meta header
    "1.2.840.10008.1.2.1",  # explicit VR little endian
    "1.2.840.10008.1.2.2",  # explicit VR big endian
    "1.2.840.10008.1.2.1.98",  # encapsulated uncompressed
}
_COMPLEX_PIXELS = {sitk.sitkComplexFloat32, sitk.sitkComplexFloat64}


@dataclass(frozen=True)
class _StoredData:
    """The files holding an image's voxels, their total size, and how many voxel bytes one of their bytes can hold."""

    files: list[Path]
    size: int
    expansion: float


def _stored_data(source: Path) -> _StoredData:
    """Where an image's voxels are: the file itself, or the data files a detached header names.

    NRRD and MetaImage headers (.nrrd/.nhdr, .mha/.mhd) are parsed here, before ITK reads them, so a
    header naming missing or countless data files is refused at once (ITK takes most of a minute over
    a list of 100 000 files).
    """
    name = source.name.lower()
    if name.endswith((".nrrd", ".nhdr")):
        files, expansion = _nrrd_data(source)
    elif name.endswith((".mha", ".mhd")):
        files, expansion = _metaimage_data(source)
    else:
        files, expansion = [source], _MAX_EXPANSION
    size = 0
    for file in files:
        if not file.is_file():
            raise ImageReadError(f"Could not read image {source}: its data file {file} does not exist.")
        size += file.stat().st_size
    return _StoredData(files, size, expansion)


def _check_claimed_size(source: Path, reader: sitk.ImageFileReader, stored: _StoredData) -> None:
    """Refuse a header that promises more voxels than its data could hold, before ITK allocates them.

    ITK allocates the whole image before reading: a damaged or hostile header claiming a huge size
    would otherwise cost that much memory before failing.
    """
    component_bytes = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID()).GetSizeOfPixelComponent()
    claimed = math.prod(reader.GetSize()) * reader.GetNumberOfComponents() * component_bytes
    if claimed > stored.expansion * stored.size:
        data = (
            f"its {stored.size} bytes" if stored.files == [source]
            else f"the {stored.size} bytes of its data {_names(stored.files)}"
        )
        raise ImageReadError(
            f"Could not read image {source}: its header claims {_by(reader.GetSize())} voxels "
            f"({claimed / 1e6:.0f} MB), more than {data} can hold (truncated or damaged)."
        )


def _names(files: Sequence[Path]) -> str:
    return f"file {files[0].name}" if len(files) == 1 else f"files {files[0].name} … {files[-1].name} ({len(files)} files)"


def _header_lines(stream: Any) -> Iterator[str]:
    """Text lines of a header, each read with a length limit so binary data never loads whole."""
    for _ in range(_MAX_HEADER_LINES + _MAX_DATA_FILES):
        line = stream.readline(_MAX_HEADER_LINE)
        if not line:
            return
        yield line.decode("latin-1").rstrip("\r\n")


def _nrrd_data(source: Path) -> tuple[list[Path], float]:
    """Fields of a NRRD header (teem's format): `encoding` and the optional `data file` (three forms)."""
    encoding, files = "raw", [source]
    with source.open("rb") as stream:
        lines = _header_lines(stream)
        if not next(lines, "").startswith("NRRD"):
            return files, _MAX_EXPANSION  # not a NRRD header: ITK will say so
        for line in lines:
            if not line:
                break  # a blank line ends the header; attached data follow
            field, separator, value = line.partition(":")
            if line.startswith("#") or not separator or value.startswith("="):
                continue  # a comment or a key:=value pair
            field, value = field.strip().lower(), value.strip()
            if field == "encoding":
                encoding = value.lower()
            elif field in _DATA_FILE_FIELDS:
                files = _data_file_names(source, value, lines)
    if encoding in _NRRD_UNREADABLE_ENCODINGS:
        raise ImageReadError(
            f"Could not read image {source}: its data are bzip2-encoded, which ITK cannot read; "
            "save it with gzip or raw encoding."
        )
    return files, _NRRD_EXPANSION.get(encoding, _MAX_EXPANSION)


def _metaimage_data(source: Path) -> tuple[list[Path], float]:
    """Fields of a MetaImage header: `CompressedData` (zlib) and `ElementDataFile`, the last field."""
    compressed, files = False, [source]
    with source.open("rb") as stream:
        lines = _header_lines(stream)
        for line in lines:
            key, _, value = line.partition("=")
            key, value = key.strip().lower(), value.strip()
            if key == "compresseddata":
                compressed = value.lower() == "true"
            elif key == "elementdatafile":
                if value.upper() != "LOCAL":  # LOCAL: the data follow the header in this file
                    files = _data_file_names(source, value, lines)
                break
    return files, _MAX_EXPANSION if compressed else 1


def _data_file_names(header: Path, value: str, rest: Iterator[str]) -> list[Path]:
    """The data files of a detached header, relative to its folder.

    Both NRRD and MetaImage name one file, or `LIST [subdim]` followed by one name per line, or a
    printf pattern with a number range: `slice%03d.raw <first> <last> <step> [subdim]`.
    """
    words = value.split()
    if words and words[0].upper() == "LIST":
        names = [line.strip() for line in rest if line.strip()]
    elif len(words) in (4, 5) and "%" in words[0] and all(re.fullmatch(r"[-+]?\d+", w) for w in words[1:]):
        names = _pattern_names(header, words[0], *(int(w) for w in words[1:4]))
    else:
        names = [value]
    _check_data_file_count(header, len(names))
    return [header.parent / name for name in names]  # an absolute name stays absolute


def _pattern_names(header: Path, pattern: str, first: int, last: int, step: int) -> list[str]:
    count = 0 if step == 0 or (last - first) * step < 0 else (last - first) // step + 1
    _check_data_file_count(header, count)
    try:
        return [pattern % number for number in range(first, last + (1 if step > 0 else -1), step)]
    except (TypeError, ValueError) as error:
        raise ImageReadError(
            f"Could not read image {header}: its data file pattern {pattern!r} is not a printf pattern for "
            f"one number ({error})."
        ) from error


def _check_data_file_count(header: Path, count: int) -> None:
    if not 0 < count <= _MAX_DATA_FILES:
        raise ImageReadError(
            f"Could not read image {header}: its header names {count} data files; KPrism reads 1 to {_MAX_DATA_FILES}."
        )


@dataclass(frozen=True)
class _DicomClaim:
    """What one DICOM file's header promises, and what the file holds."""

    name: str
    size: tuple[int, ...]  # columns, rows, frames
    claimed: int  # bytes of the stored pixel format
    stored: int  # bytes of the file
    compressed: bool


def _check_dicom_claims(files: Sequence[str], folder: Path) -> None:
    """The claimed-size check for a DICOM series, before the series reader allocates the volume.

    Uncompressed files must each hold their pixels. Compressed pixels have no firm bound (a blank
    JPEG 2000 frame takes about 1 kB at any size), so they are checked over the whole series, where
    the expansion factor of zlib still bounds any real series. All files must have one size, as ITK
    requires: it would otherwise allocate a damaged file's claim before noticing.
    """
    claims = [claim for claim in map(_dicom_claim, files) if claim is not None]
    for claim in claims:
        if claim.size != claims[0].size:
            raise ImageReadError(
                f"Could not read the DICOM series in {folder}: {claim.name} is {_by(claim.size)} pixels but "
                f"{claims[0].name} is {_by(claims[0].size)}; the files of one series must have one size."
            )
        if not claim.compressed and claim.claimed > claim.stored:
            raise ImageReadError(
                f"Could not read the DICOM series in {folder}: {claim.name} claims {_by(claim.size)} pixels "
                f"({claim.claimed / 1e6:.0f} MB), more than its {claim.stored} bytes can hold (truncated or damaged)."
            )
    compressed = [claim for claim in claims if claim.compressed]
    claimed, stored = sum(c.claimed for c in compressed), sum(c.stored for c in compressed)
    if claimed > _MAX_EXPANSION * stored:
        raise ImageReadError(
            f"Could not read the DICOM series in {folder}: its {len(compressed)} compressed files claim "
            f"{claimed / 1e6:.0f} MB of pixels, more than their {stored} bytes can hold (truncated or damaged)."
        )


def _by(size: Sequence[int]) -> str:
    return "×".join(map(str, size))


def _dicom_claim(name: str) -> _DicomClaim | None:
    reader = sitk.ImageFileReader()
    reader.SetFileName(name)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None  # the series reader reports an unreadable file itself, before allocating it
    path = Path(name)
    return _DicomClaim(
        path.name,
        tuple(reader.GetSize()),
        _dicom_pixel_bytes(reader),
        path.stat().st_size,
        _dicom_transfer_syntax(path) not in _UNCOMPRESSED_DICOM,
    )


def _dicom_pixel_bytes(reader: sitk.ImageFileReader) -> int:
    bits = reader.GetMetaData("0028|0100").strip() if reader.HasMetaDataKey("0028|0100") else ""
    if bits.isdigit():
        bits_allocated = int(bits)
    else:
        bits_allocated = 8 * sitk.Image([1] * reader.GetDimension(), reader.GetPixelID()).GetSizeOfPixelComponent()
    return math.prod(reader.GetSize()) * reader.GetNumberOfComponents() * bits_allocated // 8


def _dicom_transfer_syntax(path: Path) -> str | None:
    """Transfer syntax UID from the file meta header (group 0002, always explicit VR little endian).

    A file without the "DICM" preamble has no meta header and is implicit VR little endian.
    """
    with path.open("rb") as stream:
        head = stream.read(1 << 14)
    if head[128:132] != b"DICM":
        return "1.2.840.10008.1.2"
    at = 132
    while at + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, at)
        if group != 0x0002:
            break
        if head[at + 4 : at + 6] in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            length, value_at = struct.unpack_from("<I", head, at + 8)[0], at + 12
        else:
            length, value_at = struct.unpack_from("<H", head, at + 6)[0], at + 8
        if element == 0x0010:
            return head[value_at : value_at + length].rstrip(b"\0 ").decode("ascii", "replace")
        at = value_at + length
    return None


def _check_real_valued(source: Path, reader: sitk.ImageFileReader) -> None:
    if reader.GetPixelID() in _COMPLEX_PIXELS:
        raise ValueError(_complex_message(source))


def _complex_message(source: Path) -> str:
    return f"{source} holds complex values; KPrism reads real-valued images: take the magnitude first (numpy.abs) and save that."


def _read_image_file(source: Path, modality: str | None) -> ImageData:
    _check_not_empty(source)
    stored = _stored_data(source)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(source))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        grey = _grey_of_grey_alpha(source) if source.suffix.lower() in _RASTER_SUFFIXES else None
        if grey is not None:
            return ImageData(grey, modality=modality or "unknown")
        raise ImageReadError(f"Could not read image {source}: {_sitk_reason(error)}") from error
    _check_dimension(source, reader.GetDimension(), reader.GetSize())
    _check_real_valued(source, reader)
    _check_claimed_size(source, reader, stored)
    if source.name.lower().endswith((".nii", ".nii.gz")):
        _check_nifti_complete(source)
        _check_nifti_finite(source)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise ImageReadError(
            f"Could not read image {source} (corrupt or truncated?): {_sitk_reason(error)}"
        ) from error
    if modality is None and reader.HasMetaDataKey(_MODALITY_TAG):
        modality = reader.GetMetaData(_MODALITY_TAG)
    if source.suffix.lower() in _TIFF_SUFFIXES and _holds_half_floats(source):
        image = _half_floats_of(image)
    return _to_image_data(image, source, modality, raster=source.suffix.lower() in _RASTER_SUFFIXES)


def _holds_half_floats(source: Path) -> bool:
    """Whether a TIFF stores 16-bit IEEE floats (SampleFormat 3), which ITK reads as their uint16 bit patterns.

    Pillow cannot open such a TIFF as a picture, but reads its first image file directory.
    """
    try:
        with source.open("rb") as stream:
            head = stream.read(8)
            if head[2:3] == b"\x2b" or head[3:4] == b"\x2b":  # BigTIFF has a 16-byte header
                head += stream.read(8)
            directory = TiffImagePlugin.ImageFileDirectory_v2(head)
            stream.seek(directory.next)
            directory.load(stream)
    except (OSError, SyntaxError, ValueError, struct.error):
        return False  # ITK has read it already; without a readable directory, keep ITK's reading
    bits, formats = directory.get(_TIFF_BITS_PER_SAMPLE, (1,)), directory.get(_TIFF_SAMPLE_FORMAT, (1,))
    return set(_as_tuple(bits)) == {16} and set(_as_tuple(formats)) == {_TIFF_IEEE_FLOAT}


def _as_tuple(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _half_floats_of(image: sitk.Image) -> sitk.Image:
    """Reinterpret uint16 bit patterns as float16, widened to float32 (which ITK and torch handle)."""
    halves = sitk.GetArrayViewFromImage(image).view(np.float16)
    floats = sitk.GetImageFromArray(halves.astype(np.float32), isVector=image.GetNumberOfComponentsPerPixel() > 1)
    floats.CopyInformation(image)
    return floats


def _grey_of_grey_alpha(source: Path) -> np.ndarray | None:
    """SimpleITK cannot read grey-with-alpha pictures; Pillow can, and the alpha is dropped anyway."""
    try:
        with PIL.Image.open(source) as picture:
            return np.asarray(picture.getchannel(0)) if picture.mode == "LA" else None
    except OSError:  # not a picture Pillow knows either
        return None


def _read_dicom_folder(folder: Path, modality: str | None) -> ImageData:
    files = _largest_dicom_series(folder)
    _check_dicom_claims(files, folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()  # per-slice tags, for the spacing check and the modality
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise ImageReadError(f"Could not read the DICOM series in {folder}: {_sitk_reason(error)}") from error
    _check_slice_spacing(reader, files, folder)
    if modality is None and reader.HasMetaDataKey(0, _MODALITY_TAG):
        modality = reader.GetMetaData(0, _MODALITY_TAG)
    return _to_image_data(image, folder, modality, raster=False)


def _largest_dicom_series(folder: Path) -> Sequence[str]:
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise ImageReadError(
            f"No DICOM series found in folder {folder}. Pass the folder that directly holds the DICOM files, "
            "or an image file."
        )
    files = {sid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series_ids}
    chosen = max(files, key=lambda sid: len(files[sid]))
    if len(files) > 1:
        warnings.warn(
            f"{folder} holds {len(files)} DICOM series; reading the largest, {chosen} ({len(files[chosen])} "
            "files). Put each series in its own folder to read another one.",
            stacklevel=4,
        )
    return files[chosen]


def _check_slice_spacing(reader: sitk.ImageSeriesReader, files: Sequence[str], folder: Path) -> None:
    """SimpleITK assembles a series with a missing slice without complaint, which distorts the volume."""
    count = len(files)
    if count < 3 or not reader.HasMetaDataKey(0, _ORIENTATION_TAG):
        return
    if not all(reader.HasMetaDataKey(i, _POSITION_TAG) for i in range(count)):
        return
    orientation = [float(v) for v in reader.GetMetaData(0, _ORIENTATION_TAG).split("\\")]
    normal = np.cross(orientation[:3], orientation[3:])
    positions = np.array(
        [[float(v) for v in reader.GetMetaData(i, _POSITION_TAG).split("\\")] for i in range(count)]
    )
    gaps = np.diff(positions @ normal)
    typical = float(np.median(gaps))
    worst = int(np.argmax(np.abs(gaps - typical)))
    if abs(gaps[worst] - typical) > max(0.01 * abs(typical), 1e-3):
        raise ImageReadError(
            f"The DICOM series in {folder} has irregular slice spacing: {Path(files[worst]).name} and "
            f"{Path(files[worst + 1]).name} are {abs(gaps[worst]):.4g} mm apart, the other slices "
            f"{abs(typical):.4g} mm (a missing or duplicated slice?). Complete the series before segmenting."
        )


def _check_dimension(source: Path, dimension: int, size: Sequence[int]) -> None:
    if dimension not in (2, 3):
        raise ValueError(
            f"{source} is a {dimension}D image (size {tuple(size)}), but KPrism segments 2D images and 3D "
            "volumes. Extract one 3D volume (a time point or channel) or 2D slice first, e.g. with SimpleITK "
            "image[:, :, :, 0]."
        )


def _check_nifti_complete(source: Path) -> None:
    """ITK silently zero-fills a truncated NIfTI, so compare the bytes present with what the header needs."""
    try:
        header = nibabel.load(source).header
        voxel_bytes = math.prod(header.get_data_shape()) * header.get_data_dtype().itemsize
        needed = int(header.get_data_offset()) + voxel_bytes
        present = _uncompressed_size(source)
    except (
        OSError, EOFError, nibabel.filebasedimages.ImageFileError, nibabel.spatialimages.HeaderDataError
    ) as error:
        raise ImageReadError(f"Could not read image {source} (corrupt or truncated?): {error}") from error
    if present < needed:
        raise ImageReadError(
            f"Could not read image {source}: the file is truncated ({present} of {needed} bytes present)."
        )


def _check_nifti_finite(source: Path) -> None:
    """ITK's NIfTI reader turns NaN and infinite voxels into 0 without a word, so count them first (float files only)."""
    image = nibabel.load(source)
    if not np.issubdtype(image.header.get_data_dtype(), np.floating):
        return
    data, bad = image.dataobj, 0
    shape = image.shape
    for index in range(shape[-1] if len(shape) > 2 else 1):  # a slice at a time: memory stays bounded
        block = np.asanyarray(data[..., index] if len(shape) > 2 else data)
        bad += int(block.size - np.count_nonzero(np.isfinite(block)))
    if bad:
        raise ImageReadError(
            f"{source} has {bad} of {math.prod(shape)} voxels that are NaN or infinite; replace them (e.g. with the "
            "background value) before segmenting."
        )


def _uncompressed_size(source: Path) -> int:
    if not source.name.lower().endswith(".gz"):
        return source.stat().st_size
    size = 0
    with gzip.open(source, "rb") as stream:  # reading to the end also verifies the gzip checksum
        while chunk := stream.read(1 << 22):
            size += len(chunk)
    return size


def _to_image_data(image: sitk.Image, source: Path, modality: str | None, raster: bool) -> ImageData:
    if image.GetDimension() == 2 and not raster:
        image = sitk.JoinSeries(image)  # a volume format with one slice stays a (1-slice) volume
    array = sitk.GetArrayFromImage(image)
    if np.iscomplexobj(array):
        raise ValueError(_complex_message(source))
    if array.dtype == bool:
        raise ValueError(f"{source} holds true/false values; KPrism reads numeric images: save it as 0/1 integers (uint8).")
    components = image.GetNumberOfComponentsPerPixel()
    is_rgb = components in (3, 4)  # RGB or RGBA; grey with alpha has 2
    if components > 1:
        if image.GetDimension() != 2 or components > 4:
            raise ValueError(
                f"{source} has {components} values per pixel; KPrism reads grey or RGB(A) pictures and "
                "single-channel volumes. Extract one channel first."
            )
        array = np.ascontiguousarray(array[..., :3] if is_rgb else array[..., 0])  # drops alpha
    return ImageData(array, _geometry_of(image), modality=(modality or "").strip() or "unknown", is_rgb=is_rgb)


def _sitk_reason(error: RuntimeError) -> str:
    """The useful part of a SimpleITK exception: its first and last message lines, without source locations."""
    lines = [
        re.sub(r"^(sitk::ERROR: |ITK ERROR: \w+\(0x[0-9a-f]+\): )", "", line.strip())
        for line in str(error).splitlines()
        if line.strip() and not line.startswith("Exception thrown in SimpleITK")
    ]
    # ITK's MetaImage reader appends errno's text even when the file exists but cannot be parsed.
    lines = [line for line in lines if not line.endswith("Reason: No such file or directory")] or lines
    if not lines:
        return str(error)
    return lines[0] if len(lines) == 1 else f"{lines[0]} … {lines[-1]}"


# ----------------------------------------------------------------------------------------------- masks


def _single_channel(image: ImageData, path: PathLike) -> np.ndarray:
    if not image.is_rgb:
        return image.array
    red, green, blue = np.moveaxis(image.array, -1, 0)
    if np.array_equal(red, green) and np.array_equal(red, blue):
        return red
    raise ValueError(f"{path} is a colour image, not a label map; save the mask as a single-channel image.")


def _integer_labels(array: np.ndarray, what: Any) -> np.ndarray:
    if array.dtype == bool:
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        return array
    if np.all(np.isfinite(array)) and np.array_equal(array, np.round(array)):
        return array.astype(_label_dtype(array, what))
    raise ValueError(
        f"Non-integer values in {what}, so it is not a label map (a probability map?). Threshold it first."
    )


def _label_dtype(array: np.ndarray, what: Any) -> type:
    """The smallest integer type that holds every label: Slicer and viewers handle these best."""
    low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
    for dtype in (np.uint8, np.uint16, np.int32):
        if np.iinfo(dtype).min <= low and high <= np.iinfo(dtype).max:
            return dtype
    raise ValueError(f"Labels of {what} range from {low} to {high}, beyond what a label map can store (int32).")


def _is_0_255(labels: np.ndarray) -> bool:
    values = np.unique(labels)
    return 255 in values and set(values.tolist()) <= {0, 255}


def _onto_reference(mask: ImageData, reference: ImageData, path: PathLike) -> ImageData:
    if mask.ndim != reference.ndim:
        raise ValueError(
            f"The mask {path} is {mask.ndim}D but the image is {reference.ndim}D; a mask must have the "
            "image's dimensions."
        )
    geometry = mask.geometry
    if mask.ndim == 2 and geometry.same_as(Geometry.identity(2)):
        _check_uniform_scale(mask.spatial_shape, reference.spatial_shape, path)
        geometry = _covering_field_of_view(mask.spatial_shape, reference)
    if mask.spatial_shape == reference.spatial_shape and geometry.same_as(reference.geometry):
        return ImageData(mask.array, reference.geometry, modality=mask.modality)
    resampled = sitk.Resample(
        _to_sitk(mask.array, geometry),
        [int(n) for n in reference.spatial_shape[::-1]],
        sitk.Transform(),
        sitk.sitkNearestNeighbor,
        reference.geometry.origin,
        reference.geometry.spacing,
        reference.geometry.direction,
        0,
    )
    return ImageData(sitk.GetArrayFromImage(resampled), reference.geometry, modality=mask.modality)


def _check_uniform_scale(mask_shape: tuple[int, ...], image_shape: tuple[int, ...], path: PathLike) -> None:
    """A mask without geometry may be the picture at another scale, but not of another aspect ratio.

    Scaled sizes are rounded, so a scale passes if one factor maps each side of the smaller grid to
    the larger within one pixel of the smaller grid.
    """
    smaller, larger = sorted((mask_shape, image_shape), key=math.prod)
    lowest = max(big / (small + 1) for small, big in zip(smaller, larger))
    highest = min(big / (small - 1) if small > 1 else math.inf for small, big in zip(smaller, larger))
    if lowest > highest:
        raise ValueError(
            f"The mask {path} is {_by(mask_shape)} pixels but the image is "
            f"{_by(image_shape)} (rows×columns), another aspect ratio; a mask without geometry "
            "must be the image's size or a uniform scale of it. Resize or pad it to match the image."
        )


def _covering_field_of_view(mask_shape: tuple[int, ...], reference: ImageData) -> Geometry:
    """Geometry that stretches a mask's pixel grid over the reference's, edge to edge."""
    target = reference.geometry
    ratio = np.array(reference.spatial_shape[::-1], float) / np.array(mask_shape[::-1], float)
    spacing = np.asarray(target.spacing) * ratio
    # Pixel centres sit half a pixel in from the edges, so the origin moves by half the spacing change.
    origin = np.asarray(target.origin) + target.direction_matrix() @ ((spacing - np.asarray(target.spacing)) / 2)
    return Geometry(tuple(spacing.tolist()), tuple(origin.tolist()), target.direction)


# ----------------------------------------------------------------------------------------------- writing


def write_output(
    labels: np.ndarray,
    geometry: Geometry,
    path: PathLike,
    *,
    segments: list[dict[str, Any]] | None = None,
    source_path: PathLike | None = None,
) -> Path:
    """Write labels as a Slicer segmentation (``.seg.nrrd``) or a plain label map (any other extension).

    Without ``segments``, a segmentation gets one segment per label value, named ``Segment_<value>``.
    """
    if str(path).lower().endswith(_SEGMENTATION_SUFFIX):
        if segments is None:
            values = np.unique(np.asarray(labels)).tolist()
            segments = [{"name": f"Segment_{value}", "value": value} for value in values if value != 0]
        return write_segmentation(labels, geometry, path, segments, source_path=source_path)
    return write_labelmap(labels, geometry, path, source_path=source_path)


def write_labelmap(
    labels: np.ndarray, geometry: Geometry, path: PathLike, *, source_path: PathLike | None = None
) -> Path:
    """Write a label map (.nii, .nii.gz, .nrrd, .mha, or .png for 2D) with the exact geometry.

    The file appears complete or not at all; an existing file at ``path`` is replaced only on success.
    PNG stores no geometry and only values 0–255.
    """
    suffix = _suffix(path, _LABELMAP_SUFFIXES)
    labels = _checked_labels(labels, geometry)
    if suffix == ".png" and labels.ndim == 3:
        raise ValueError(f"Cannot write a 3D result to {path}: PNG holds one 2D slice; use .nii.gz, .nrrd or .seg.nrrd.")
    if suffix == ".png":
        labels = _png_labels(labels, geometry)
    target = check_output_path(path, source_path)
    image = _to_sitk(labels, geometry)
    _write_whole(
        target,
        suffix,
        lambda temporary: sitk.WriteImage(image, temporary, True),
        verify=lambda temporary: _labelmap_reads_back(temporary, labels),
    )
    return target


def write_segmentation(
    labels: np.ndarray,
    geometry: Geometry,
    path: PathLike,
    segments: list[dict[str, Any]],
    *,
    source_path: PathLike | None = None,
) -> Path:
    """Write a 3D Slicer segmentation (``.seg.nrrd``).

    ``segments`` items: ``name``, ``value`` (the label value), ``color`` (RGB as 0–255 ints or 0–1 floats;
    optional) and ``tags`` (str → str, e.g. provenance; optional). 2D labels are written as one slice,
    because Slicer segmentations are 3D.
    """
    _suffix(path, (_SEGMENTATION_SUFFIX,))
    labels = _checked_labels(labels, geometry)
    if labels.ndim == 2:
        labels, geometry = labels[np.newaxis], _as_one_slice(geometry)
    slicer_segments = _slicer_segments(segments, labels)
    target = check_output_path(path, source_path)
    segmentation = {
        "voxels": labels.transpose(2, 1, 0),  # slicerio is (i, j, k)
        "ijkToLPS": _ijk_to_lps(geometry),
        "containedRepresentationNames": ["Binary labelmap"],
        "segments": slicer_segments,
    }
    _write_whole(
        target,
        _SEGMENTATION_SUFFIX,
        lambda temporary: slicerio.write_segmentation(temporary, segmentation),
        verify=lambda temporary: np.array_equal(nrrd.read(temporary)[0], segmentation["voxels"]),
    )
    return target


def _suffix(path: PathLike, allowed: Sequence[str]) -> str:
    name = Path(path).name.lower()
    for suffix in allowed:
        if name.endswith(suffix):
            return suffix
    raise ValueError(f"Cannot write {path}: use one of the extensions {', '.join(allowed)}.")


def _checked_labels(labels: np.ndarray, geometry: Geometry) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != geometry.ndim:
        raise ValueError(
            f"Labels of shape {array.shape} are {array.ndim}D but the geometry is {geometry.ndim}D; "
            "pass the labels of the image whose geometry this is."
        )
    array = _integer_labels(array, "the labels")
    return array.astype(_label_dtype(array, "the labels"), copy=False)


def _png_labels(labels: np.ndarray, geometry: Geometry) -> np.ndarray:
    if labels.dtype != np.uint8:
        raise ValueError("PNG label maps hold values 0–255 only; write .nii.gz or .nrrd for larger labels.")
    if not geometry.same_as(Geometry.identity(2)):
        warnings.warn(
            "PNG stores no spacing, origin or direction; write .nii.gz or .nrrd to keep the geometry.",
            stacklevel=3,
        )
    return labels


def check_output_path(
    path: PathLike, source_path: PathLike | None, *, suffixes: Sequence[str] | None = None, ndim: int | None = None
) -> Path:
    """Check the output can be written, before any work, and create its folder.

    `suffixes` (default: every label map format and .seg.nrrd) are the extensions allowed; with
    `ndim` = 3 a PNG is refused, since it would keep one slice of the volume.
    """
    if Path(path).expanduser().is_dir():
        raise IsADirectoryError(errno.EISDIR, "The output path is a folder; give a file name", str(path))
    suffix = _suffix(path, suffixes or (*_LABELMAP_SUFFIXES, _SEGMENTATION_SUFFIX))
    if ndim == 3 and suffix == ".png":
        raise ValueError(f"Cannot write a 3D result to {path}: PNG holds one 2D slice; use .nii.gz, .nrrd or .seg.nrrd.")
    target = Path(path).expanduser().resolve()
    if source_path is not None and target == Path(source_path).expanduser().resolve():
        raise ValueError(f"Refusing to overwrite the input {source_path}; choose another output path.")
    if target.is_dir():
        raise IsADirectoryError(errno.EISDIR, "The output path is a folder; give a file name", str(target))
    existing = target.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(
            errno.ENOTDIR, f"Cannot create the output folder {target.parent}: this is a file", str(existing)
        )
    # os.access, because a failed write halfway through would be a worse error to report.
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(
            errno.EACCES, "No permission to write in this folder; choose another output", str(existing)
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


class _IncompleteFile(Exception):
    """A written file that does not read back as what was written."""


def _write_whole(
    target: Path, suffix: str, write: Callable[[str], None], *, verify: Callable[[str], bool]
) -> None:
    """Write through `kprism.atomic`: a failed write or a file that does not read back leaves the target as it was.

    `verify(temporary)` reads the written file back and says whether it is complete. Some writers
    report success on a short write (ITK's NIfTI writer on a full disk), so this read-back, not the
    writer, decides.
    """
    try:
        atomic.write_atomically(
            target, lambda temporary: write(str(temporary)), verify=_read_back(verify), suffix=suffix
        )
    except _IncompleteFile as error:
        raise OSError(f"Could not write {target}: the file came back incomplete (disk full?).") from error
    except RuntimeError as error:  # SimpleITK reports write failures (disk full, …) as RuntimeError
        raise OSError(f"Could not write {target}: {_sitk_reason(error)}") from error
    except OSError as error:  # slicerio and the file system raise these directly
        raise OSError(error.errno, f"Could not write {target}: {error.strerror or error}") from error


def _read_back(verify: Callable[[str], bool]) -> Callable[[Path], None]:
    def check(temporary: Path) -> None:
        try:
            complete = verify(str(temporary))
        except Exception as error:  # any reader's failure on the fresh file means it is not whole
            raise _IncompleteFile(str(error)) from error
        if not complete:
            raise _IncompleteFile(str(temporary))

    return check


def _labelmap_reads_back(path: str, labels: np.ndarray) -> bool:
    """Read the whole file (decompressing it all) and compare every label."""
    if path.lower().endswith((".nii", ".nii.gz")):
        _check_nifti_complete(Path(path))  # ITK would zero-fill a truncated NIfTI
    image = sitk.ReadImage(path)  # kept alive while its array view is compared
    written = sitk.GetArrayViewFromImage(image)
    return written.shape == labels.shape and np.array_equal(written, labels)


def _picture_reads_back(path: str) -> bool:
    with PIL.Image.open(path) as picture:
        picture.load()  # decodes every row: raises on a truncated file
    return True


# ----------------------------------------------------------------------------------------------- geometry


def _geometry_of(image: sitk.Image) -> Geometry:
    return Geometry(tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(image.GetDirection()))


def _to_sitk(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    return image


def _as_one_slice(geometry: Geometry) -> Geometry:
    direction = np.eye(3)
    direction[:2, :2] = geometry.direction_matrix()
    return Geometry((*geometry.spacing, 1.0), (*geometry.origin, 0.0), tuple(direction.ravel().tolist()))


def _ijk_to_lps(geometry: Geometry) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = geometry.direction_matrix() * np.asarray(geometry.spacing)  # scales the columns
    matrix[:3, 3] = geometry.origin
    return matrix


def _geometry_from_ijk_to_lps(matrix: np.ndarray) -> Geometry:
    matrix = np.asarray(matrix, dtype=float)
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)  # each column is one index step
    direction = matrix[:3, :3] / spacing
    return Geometry(tuple(spacing.tolist()), tuple(matrix[:3, 3].tolist()), tuple(direction.ravel().tolist()))


# ----------------------------------------------------------------------------------------------- segments


def _slicer_segments(segments: list[dict[str, Any]], labels: np.ndarray) -> list[dict[str, Any]]:
    converted = [_segment_to_slicer(segment) for segment in segments]
    values = [segment["labelValue"] for segment in converted]
    if len(set(values)) != len(values):
        raise ValueError(f"Each segment needs its own label value; got {values}.")
    unlisted = sorted(set(np.unique(labels).tolist()) - set(values) - {0})
    if unlisted:
        warnings.warn(f"Label values {unlisted} have no segment, so Slicer will not show them.", stacklevel=3)
    return converted


def _segment_to_slicer(segment: dict[str, Any]) -> dict[str, Any]:
    unknown = set(segment) - _SEGMENT_KEYS
    if unknown or "name" not in segment or "value" not in segment:
        raise ValueError(
            f"A segment needs 'name' and 'value' and may have 'color' and 'tags'; got keys {sorted(segment)}."
        )
    value = int(segment["value"])
    if value <= 0:
        raise ValueError(f"Segment {segment['name']!r} has label value {value}; 0 is the background.")
    # The NRRD header stores tags as "key:value|key:value|" on one line, in ASCII, so text that would
    # break it is escaped (and unescaped on reading) rather than refused after a whole run.
    tags = {
        _escape_header_text(str(key), _TAG_KEY_RESERVED): _escape_header_text(str(text), _TAG_VALUE_RESERVED)
        for key, text in segment.get("tags", {}).items()
    }
    name = re.sub(r"\r\n|[\r\n]", " ", str(segment["name"]))  # a name is one header line
    return {
        "id": f"Segment_{value}",
        "name": _escape_header_text(name, reserved=""),
        "labelValue": value,
        "layer": 0,
        "color": list(_unit_rgb(segment.get("color", _default_color(value)))),
        "tags": tags,
    }


def _segment_from_slicer(segment: dict[str, Any]) -> dict[str, Any]:
    value = int(segment.get("labelValue", 1))
    tags = {_unescape_header_text(key): _unescape_header_text(text) for key, text in segment.get("tags", {}).items()}
    name = segment.get("name", segment.get("id", f"Segment_{value}"))
    # slicerio lifts these two tags into their own fields; put them back so tags round-trip.
    if "status" in segment:
        tags["Segmentation.Status"] = segment["status"]
    if "terminology" in segment:
        tags["TerminologyEntry"] = slicerio.segmentation.terminology_entry_to_string(segment["terminology"])
    return {
        "name": _unescape_header_text(name, _NON_ASCII_ESCAPES),
        "value": value,
        "color": tuple(float(c) for c in segment.get("color", _unit_rgb(_default_color(value)))),
        "tags": tags,
    }


# Characters a tag key or value cannot hold as they are; "%" too, so that decoding is unambiguous.
# Control and non-ASCII characters are always escaped (the header is ASCII, one line per field).
_TAG_VALUE_RESERVED = "%|"
_TAG_KEY_RESERVED = "%|:"
_ALL_ESCAPES = re.compile(r"(?:%[0-9A-F]{2})+")
_NON_ASCII_ESCAPES = re.compile(r"(?:%[89A-F][0-9A-F])+")  # names keep "%" as is: only these are decoded


def _escape_header_text(text: str, reserved: str) -> str:
    """Percent-encode (UTF-8 bytes, upper-case hex) reserved, control and non-ASCII characters."""
    return "".join(
        "".join(f"%{byte:02X}" for byte in character.encode("utf-8"))
        if character in reserved or not " " <= character <= "~" else character
        for character in text
    )


def _unescape_header_text(text: str, escapes: re.Pattern = _ALL_ESCAPES) -> str:
    def decode(match: re.Match) -> str:
        try:
            return bytes.fromhex(match.group(0).replace("%", "")).decode("utf-8")
        except UnicodeDecodeError:  # not something this module encoded: keep it as written
            return match.group(0)

    return escapes.sub(decode, str(text))


def _default_color(value: int) -> tuple[int, int, int]:
    # The catalog's palette, so label value i + 1 gets class i's colour.
    return PALETTE[(value - 1) % len(PALETTE)]


def _unit_rgb(color: Sequence[float]) -> tuple[float, float, float]:
    """RGB in 0–1 from 0–255 integers or 0–1 floats."""
    values = np.asarray(color)
    if values.shape != (3,) or not np.issubdtype(values.dtype, np.number):
        raise ValueError(f"A colour is three numbers (RGB); got {color!r}.")
    scale = 255.0 if np.issubdtype(values.dtype, np.integer) else 1.0
    unit = values.astype(float) / scale
    if unit.min() < 0 or unit.max() > 1:
        raise ValueError(f"Colour {color!r} is out of range: use integers 0–255 or floats 0–1.")
    return tuple(unit.tolist())


# ----------------------------------------------------------------------------------------------- rendering


def render_overlay(
    image: ImageData,
    labels: np.ndarray | None,
    path: PathLike,
    *,
    slice_index: int | None = None,
    axis: int = 0,
    colors: dict[int, tuple] | None = None,
    points: list[Point] | None = None,
    title: str | None = None,
) -> Path:
    """Save a PNG quick look of a 2D image, or of one slice of a volume, with the labels on top.

    A volume is shown in its canonical LPS view (`kprism.orientation`): ``axis`` 0 axial, 1 coronal,
    2 sagittal; ``slice_index`` (along that axis of the view) defaults to the slice with the most
    foreground. The picture is the slice zoomed by a whole factor until its longer side
    is at least 512 pixels, with rows stretched by the pixel aspect ratio; ``points`` are (row, column,
    positive) on the slice, drawn as green + or red −.
    """
    from matplotlib.figure import Figure

    pixels, label_slice, aspect = _view(image, labels, slice_index, axis)
    rows, columns = label_slice.shape
    zoom = max(1, _MIN_RENDER_SIDE // max(rows, columns))
    size = (columns * zoom / _DPI, round(rows * zoom * aspect) / _DPI)
    figure = Figure(figsize=size, dpi=_DPI)
    axes = figure.add_axes((0, 0, 1, 1))
    _draw(axes, pixels, label_slice, aspect, colors, points)
    if title:
        axes.text(0.01, 0.99, title, transform=axes.transAxes, va="top", ha="left", color="white", fontsize=10,
                  bbox={"facecolor": "black", "alpha": 0.6, "edgecolor": "none"})
    return _save_figure(figure, path)


def render_panels(panels: list[dict[str, Any]], path: PathLike, columns: int = 3) -> Path:
    """Save one PNG with a grid of quick looks.

    Each panel has ``image`` and optionally ``labels``, ``title``, ``points``, ``colors``, ``slice_index``
    and ``axis``, as in :func:`render_overlay`.
    """
    from matplotlib.figure import Figure

    if not panels:
        raise ValueError("render_panels needs at least one panel.")
    columns = max(1, min(columns, len(panels)))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(columns * _PANEL_INCHES, rows * _PANEL_INCHES), dpi=_DPI, layout="constrained")
    for index, panel in enumerate(panels):
        unknown = set(panel) - {"image", "labels", "title", "points", "colors", "slice_index", "axis"}
        if unknown:
            raise ValueError(f"Panel {index} has unknown keys {sorted(unknown)}.")
        axes = figure.add_subplot(rows, columns, index + 1)
        pixels, label_slice, aspect = _view(
            panel["image"], panel.get("labels"), panel.get("slice_index"), panel.get("axis", 0)
        )
        _draw(axes, pixels, label_slice, aspect, panel.get("colors"), panel.get("points"))
        if panel.get("title"):
            axes.set_title(panel["title"], fontsize=9)
    return _save_figure(figure, path)


def _view(
    image: ImageData, labels: np.ndarray | None, slice_index: int | None, axis: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """The shown pixels and labels, and the pixel aspect ratio (row spacing / column spacing)."""
    labels = np.zeros(image.spatial_shape, np.uint8) if labels is None else np.asarray(labels)
    if labels.shape != image.spatial_shape:
        raise ValueError(f"Labels of shape {labels.shape} do not match the image {image.spatial_shape}.")
    spacing = image.geometry.spacing[::-1]  # array-axis order
    if image.ndim == 2:
        return image.array, labels, spacing[0] / spacing[1]
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2 for a volume; got {axis}.")
    # Volumes are shown in the canonical LPS view, as a radiologist expects (patient right on the
    # screen's left) and exactly as the model slices them.
    view = CanonicalView.of(image.geometry, image.spatial_shape)
    array, labels = view.to_canonical(image.array), view.to_canonical(labels)
    spacing = tuple(spacing[p] for p in view.permutation)
    if slice_index is None:
        foreground = np.count_nonzero(labels, axis=tuple(a for a in range(3) if a != axis))
        slice_index = int(np.argmax(foreground)) if foreground.any() else labels.shape[axis] // 2
    rows, columns = (a for a in range(3) if a != axis)
    aspect = spacing[rows] / spacing[columns]
    return np.take(array, slice_index, axis), np.take(labels, slice_index, axis), aspect


def _draw(
    axes: "Axes",
    pixels: np.ndarray,
    labels: np.ndarray,
    aspect: float,
    colors: dict[int, tuple] | None,
    points: list[Point] | None,
) -> None:
    axes.imshow(_window(pixels), cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect=aspect)
    axes.set_autoscale_on(False)  # markers and contours must not move the view
    overlay = np.zeros(labels.shape + (4,))
    for value in np.unique(labels[labels != 0]).tolist():
        rgb = _unit_rgb((colors or {}).get(value, _default_color(value)))
        inside = labels == value
        overlay[inside] = (*rgb, _LABEL_ALPHA)
        if not inside.all():
            axes.contour(inside, levels=[0.5], colors=[rgb], linewidths=1.5)
    axes.imshow(overlay, interpolation="nearest", aspect=aspect)
    for row, column, positive in points or []:
        axes.plot(column, row, marker="+" if positive else "_", color="lime" if positive else "red",
                  markersize=14, markeredgewidth=3)
    axes.set_axis_off()


def _window(pixels: np.ndarray) -> np.ndarray:
    """Scale to 0–1 between the 1st and 99th percentiles, so a few extreme values do not wash out the view."""
    values = pixels.astype(float)
    low, high = np.nanpercentile(values, (1, 99))
    return np.nan_to_num(np.clip((values - low) / max(high - low, 1e-12), 0, 1))


def _save_figure(figure: "Figure", path: PathLike) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    _write_whole(
        target,
        ".png",
        lambda temporary: FigureCanvasAgg(figure).print_figure(temporary, dpi=_DPI),
        verify=_picture_reads_back,
    )
    return target
