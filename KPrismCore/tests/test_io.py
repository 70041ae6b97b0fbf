"""kprism.io: every test writes its own small files under tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel
import nrrd
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image
from scipy.spatial.transform import Rotation

from kprism import io
from kprism.image import Geometry, ImageData

OBLIQUE = Geometry(
    spacing=(0.7, 1.3, 2.5),
    origin=(-120.5, 33.25, 17.0),
    direction=tuple(Rotation.from_euler("xyz", [20, -35, 50], degrees=True).as_matrix().ravel().tolist()),
)


def _volume(dtype=np.int16, shape=(6, 7, 8), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 2000, shape).astype(dtype)


def _to_sitk(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    return image


def _write_dicom_series(
    folder: Path, volume: np.ndarray, geometry: Geometry, *, modality="MR", series="1.2.826.0.1.3680043.2.1125.1",
    skip: tuple[int, ...] = (), prefix="slice",
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    image = _to_sitk(volume, geometry)
    d = geometry.direction
    orientation = "\\".join(f"{v:.8g}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(volume.shape[0]):
        if k in skip:
            continue
        slice_image = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in {
            "0008|0060": modality,
            "0020|000d": "1.2.826.0.1.3680043.2.1125.9",
            "0020|000e": series,
            "0008|0018": f"{series}.{k + 1}",
            "0020|0013": str(k + 1),
            "0020|0037": orientation,
            "0020|0032": "\\".join(f"{v:.8g}" for v in position),
        }.items():
            slice_image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{prefix}{k:03d}.dcm"))
        writer.Execute(slice_image)


# ----------------------------------------------------------------------------------------------- read_image


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd"])
@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_volume_formats_keep_data_and_oblique_geometry(tmp_path, suffix, dtype):
    volume = _volume(dtype)
    path = tmp_path / f"volume{suffix}"
    sitk.WriteImage(_to_sitk(volume, OBLIQUE), str(path))

    image = io.read_image(path)

    assert image.array.dtype == dtype and not image.is_rgb
    np.testing.assert_array_equal(image.array, volume)
    assert image.geometry.same_as(OBLIQUE, tolerance=1e-5)
    assert image.modality == "unknown"
    assert io.read_image(path, modality="CT").modality == "CT"


def test_single_slice_volume_stays_3d(tmp_path):
    path = tmp_path / "flat.nii.gz"
    nibabel.save(nibabel.Nifti1Image(np.arange(30, dtype=np.int16).reshape(5, 6), np.eye(4)), path)

    image = io.read_image(path)

    assert image.ndim == 3 and image.array.shape == (1, 6, 5)


@pytest.mark.parametrize(("scale", "dtype"), [(5, np.uint8), (1000, np.uint16)])
def test_grey_png_is_2d_with_its_bit_depth(tmp_path, scale, dtype):
    path = tmp_path / "grey.png"
    values = np.arange(48).reshape(6, 8) * scale
    Image.fromarray(values.astype(dtype)).save(path)

    image = io.read_image(path)

    assert image.ndim == 2 and not image.is_rgb and image.array.dtype == dtype
    np.testing.assert_array_equal(image.array, values)
    assert image.geometry.same_as(Geometry.identity(2))


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_rgb_and_rgba_pictures_read_as_rgb(tmp_path, suffix):
    rgba = np.random.default_rng(1).integers(0, 256, (6, 8, 4)).astype(np.uint8)
    Image.fromarray(np.ascontiguousarray(rgba[..., :3])).save(tmp_path / f"rgb{suffix}")
    Image.fromarray(rgba).save(tmp_path / f"rgba{suffix}")

    for name in ("rgb", "rgba"):
        image = io.read_image(tmp_path / f"{name}{suffix}")
        assert image.is_rgb and image.array.shape == (6, 8, 3)
        np.testing.assert_array_equal(image.array, rgba[..., :3])


def test_grey_with_alpha_drops_the_alpha(tmp_path):
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8)
    Image.fromarray(np.stack([grey, np.full_like(grey, 7)], axis=-1)).save(tmp_path / "la.png")

    image = io.read_image(tmp_path / "la.png")

    assert not image.is_rgb
    np.testing.assert_array_equal(image.array, grey)


def test_jpeg_reads_as_2d(tmp_path):
    Image.fromarray(np.full((6, 8), 128, np.uint8)).save(tmp_path / "photo.jpg")

    image = io.read_image(tmp_path / "photo.jpg")

    assert image.array.shape == (6, 8) and image.array.dtype == np.uint8


def test_dicom_series_folder(tmp_path):
    volume = _volume(shape=(5, 6, 7))
    _write_dicom_series(tmp_path / "series", volume, OBLIQUE, modality="MR")

    image = io.read_image(tmp_path / "series")

    np.testing.assert_array_equal(image.array, volume)
    assert image.geometry.same_as(OBLIQUE, tolerance=1e-4)
    assert image.modality == "MR"
    assert io.read_image(tmp_path / "series", modality="CT").modality == "CT"


def test_dicom_folder_with_several_series_reads_the_largest_and_warns(tmp_path):
    larger = _volume(shape=(5, 6, 7))
    _write_dicom_series(tmp_path / "mixed", larger, OBLIQUE, series="1.2.3.1", prefix="a")
    smaller = _volume(shape=(3, 6, 7), seed=1)
    _write_dicom_series(tmp_path / "mixed", smaller, OBLIQUE, series="1.2.3.2", prefix="b")

    with pytest.warns(UserWarning, match="2 DICOM series"):
        image = io.read_image(tmp_path / "mixed")

    np.testing.assert_array_equal(image.array, larger)


def test_dicom_series_with_missing_slice_is_refused_naming_the_gap(tmp_path):
    _write_dicom_series(tmp_path / "gappy", _volume(shape=(6, 6, 7)), OBLIQUE, skip=(3,))

    with pytest.raises(io.ImageReadError, match=r"irregular slice spacing.*slice002\.dcm and slice004\.dcm"):
        io.read_image(tmp_path / "gappy")


def test_folder_without_dicom_is_an_image_read_error(tmp_path):
    (tmp_path / "empty").mkdir()

    with pytest.raises(io.ImageReadError, match="No DICOM series"):
        io.read_image(tmp_path / "empty")


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.nii.gz"):
        io.read_image(tmp_path / "nowhere.nii.gz")


@pytest.mark.parametrize("suffix", [".nii", ".png", ".nrrd"])
def test_garbage_file_is_an_image_read_error_naming_it(tmp_path, suffix):
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes((b"\x89PNG\r\n\x1a\n" if suffix == ".png" else b"") + os.urandom(400))

    with pytest.raises(io.ImageReadError, match=f"garbage{suffix}"):
        io.read_image(path)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_truncated_file_is_an_image_read_error_naming_it(tmp_path, suffix):
    whole, cut = tmp_path / f"whole{suffix}", tmp_path / f"cut{suffix}"
    sitk.WriteImage(_to_sitk(_volume(shape=(10, 20, 30)), OBLIQUE), str(whole), True)
    data = whole.read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])

    with pytest.raises(io.ImageReadError, match=f"cut{suffix}"):
        io.read_image(cut)


def test_4d_image_is_refused_with_an_actionable_message(tmp_path):
    path = tmp_path / "dynamic.nii.gz"
    nibabel.save(nibabel.Nifti1Image(np.zeros((4, 5, 6, 3), np.int16), np.eye(4)), path)

    with pytest.raises(ValueError, match=r"dynamic\.nii\.gz is a 4D image.*Extract one"):
        io.read_image(path)


def test_1d_image_is_refused(tmp_path):
    path = tmp_path / "line.nrrd"
    nrrd.write(str(path), np.arange(10, dtype=np.int16))

    with pytest.raises(ValueError, match=r"line\.nrrd is a 1D image"):
        io.read_image(path)


# ----------------------------------------------------------------------------------------------- read_mask


def test_binary_png_mask_becomes_0_1_and_other_labels_are_kept(tmp_path):
    Image.fromarray(np.array([[0, 255], [255, 0]], np.uint8)).save(tmp_path / "binary.png")
    Image.fromarray(np.array([[0, 1], [2, 255]], np.uint8)).save(tmp_path / "labels.png")

    np.testing.assert_array_equal(io.read_mask(tmp_path / "binary.png").array, [[0, 1], [1, 0]])
    np.testing.assert_array_equal(io.read_mask(tmp_path / "labels.png").array, [[0, 1], [2, 255]])


def test_float_mask_with_whole_values_becomes_integer(tmp_path):
    path = tmp_path / "float_mask.nii.gz"
    sitk.WriteImage(_to_sitk(np.array([[[0.0, 1.0], [2.0, 0.0]]], np.float32), OBLIQUE), str(path))

    mask = io.read_mask(path)

    assert np.issubdtype(mask.array.dtype, np.integer)
    np.testing.assert_array_equal(mask.array, [[[0, 1], [2, 0]]])


def test_mask_on_a_finer_grid_is_resampled_onto_the_reference(tmp_path):
    coarse = np.random.default_rng(2).integers(0, 3, (4, 5, 6)).astype(np.uint8)
    fine = coarse.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    half = np.asarray(OBLIQUE.spacing) / 2
    # Each coarse voxel holds 2×2×2 fine ones, so the fine origin sits a quarter coarse voxel back.
    fine_origin = np.asarray(OBLIQUE.origin) - OBLIQUE.direction_matrix() @ (half / 2)
    fine_geometry = Geometry(tuple(half.tolist()), tuple(fine_origin.tolist()), OBLIQUE.direction)
    io.write_labelmap(fine, fine_geometry, tmp_path / "fine.nrrd")
    reference = ImageData(np.zeros(coarse.shape, np.int16), OBLIQUE)

    mask = io.read_mask(tmp_path / "fine.nrrd", reference=reference)

    np.testing.assert_array_equal(mask.array, coarse)
    assert mask.geometry == OBLIQUE


def test_png_mask_of_another_size_is_scaled_onto_the_image(tmp_path):
    small = np.zeros((10, 10), np.uint8)
    small[2:5, 3:8] = 255
    Image.fromarray(small).save(tmp_path / "mask.png")
    reference = ImageData(np.zeros((20, 20), np.uint8))

    mask = io.read_mask(tmp_path / "mask.png", reference=reference)

    np.testing.assert_array_equal(mask.array, (small > 0).repeat(2, 0).repeat(2, 1))


# ----------------------------------------------------------------------------------------------- writing


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".mha"])
def test_labelmap_round_trip_keeps_labels_and_geometry(tmp_path, suffix):
    labels = np.random.default_rng(3).integers(0, 4, (6, 7, 8))
    path = io.write_labelmap(labels, OBLIQUE, tmp_path / "nested" / "dirs" / f"labels{suffix}")

    mask = io.read_mask(path)

    np.testing.assert_array_equal(mask.array, labels)
    assert mask.array.dtype == np.uint8
    assert mask.geometry.same_as(OBLIQUE, tolerance=1e-5)
    assert sorted(p.name for p in path.parent.iterdir()) == [f"labels{suffix}"]  # no temporary left behind


def test_png_labelmap_is_2d_uint8(tmp_path):
    labels = np.array([[0, 1], [2, 3]])
    io.write_labelmap(labels, Geometry.identity(2), tmp_path / "labels.png")

    with Image.open(tmp_path / "labels.png") as written:
        np.testing.assert_array_equal(np.asarray(written), labels)
    with pytest.raises(ValueError, match="0–255"):
        io.write_labelmap(labels * 100, Geometry.identity(2), tmp_path / "big.png")


def test_labels_must_match_the_geometry_dimension(tmp_path):
    with pytest.raises(ValueError, match=r"2D but the geometry is 3D"):
        io.write_labelmap(np.zeros((4, 4), np.uint8), OBLIQUE, tmp_path / "labels.nii.gz")


def test_refuses_to_overwrite_the_input(tmp_path):
    source = tmp_path / "image.nii.gz"
    source.write_bytes(b"original")
    labels = np.zeros((2, 2, 2), np.uint8)

    for output in (source, tmp_path / "sub" / ".." / "image.nii.gz"):
        with pytest.raises(ValueError, match="Refusing to overwrite"):
            io.write_output(labels, OBLIQUE, output, source_path=str(source))
    assert source.read_bytes() == b"original"


def test_output_folder_under_a_file_fails_before_writing(tmp_path):
    (tmp_path / "a_file").write_text("x", encoding="utf-8")

    with pytest.raises(NotADirectoryError, match="a_file"):
        io.write_labelmap(np.zeros((2, 2, 2), np.uint8), OBLIQUE, tmp_path / "a_file" / "out" / "labels.nii.gz")


def test_read_only_folder_fails_before_writing(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("this user (root) may write in read-only folders")
        with pytest.raises(PermissionError, match="locked"):
            io.write_labelmap(np.zeros((2, 2, 2), np.uint8), OBLIQUE, folder / "labels.nii.gz")
    finally:
        folder.chmod(0o700)


def test_failed_write_leaves_the_existing_target_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "labels.nii.gz"
    target.write_bytes(b"previous result")

    with pytest.raises(ValueError):
        io.write_labelmap(np.zeros((3, 3), np.uint8), OBLIQUE, target)

    def interrupted_write(image, path, *args):
        Path(path).write_bytes(b"half a file")
        raise RuntimeError("sitk::ERROR: No space left on device")

    monkeypatch.setattr(io.sitk, "WriteImage", interrupted_write)
    with pytest.raises(OSError, match="No space left on device"):
        io.write_labelmap(np.zeros((3, 3, 3), np.uint8), OBLIQUE, target)

    assert target.read_bytes() == b"previous result"
    assert [p.name for p in tmp_path.iterdir()] == ["labels.nii.gz"]


PROVENANCE = "small v1.2 (2025-01-01T10:00)"  # a ':' inside a tag value must survive


def test_segmentation_round_trip_keeps_labels_geometry_names_colours_and_tags(tmp_path):
    labels = np.random.default_rng(4).integers(0, 4, (6, 7, 8)).astype(np.int64)
    segments = [
        {"name": "liver", "value": 1, "color": (221, 130, 101), "tags": {"kprism.model": PROVENANCE}},
        {"name": "left kidney", "value": 2, "color": (0.5, 0.25, 1.0), "tags": {"Segmentation.Status": "inprogress"}},
        {"name": "spleen", "value": 3},
    ]
    path = io.write_output(labels, OBLIQUE, tmp_path / "out.seg.nrrd", segments=segments)

    read_labels, geometry, read_segments = io.read_segmentation(path)

    np.testing.assert_array_equal(read_labels, labels)
    assert geometry.same_as(OBLIQUE, tolerance=1e-9)
    assert [s["name"] for s in read_segments] == ["liver", "left kidney", "spleen"]
    assert [s["value"] for s in read_segments] == [1, 2, 3]
    np.testing.assert_allclose(read_segments[0]["color"], np.array([221, 130, 101]) / 255)
    assert read_segments[1]["color"] == (0.5, 0.25, 1.0)
    assert len(read_segments[2]["color"]) == 3
    assert read_segments[0]["tags"] == {"kprism.model": PROVENANCE}
    assert read_segments[1]["tags"] == {"Segmentation.Status": "inprogress"}
    # The same file read as a plain volume has the same voxels and geometry.
    volume = io.read_image(path)
    np.testing.assert_array_equal(volume.array, labels)
    assert volume.geometry.same_as(OBLIQUE, tolerance=1e-9)


def test_2d_segmentation_is_written_as_one_slice(tmp_path):
    labels = np.array([[0, 1, 1], [0, 2, 0]])
    path = io.write_segmentation(labels, Geometry.identity(2), tmp_path / "flat.seg.nrrd",
                                 [{"name": "a", "value": 1}, {"name": "b", "value": 2}])

    read_labels, geometry, _ = io.read_segmentation(path)

    np.testing.assert_array_equal(read_labels, labels[np.newaxis])
    assert geometry == Geometry.identity(3)


def test_segmentation_without_segment_list_names_each_label(tmp_path):
    labels = np.array([[[0, 2], [5, 2]]])

    path = io.write_output(labels, OBLIQUE, tmp_path / "auto.seg.nrrd")

    assert [(s["name"], s["value"]) for s in io.read_segmentation(path)[2]] == [("Segment_2", 2), ("Segment_5", 5)]


def test_segment_list_is_validated(tmp_path):
    labels = np.ones((2, 2, 2), np.uint8)
    for segments, message in [
        ([{"name": "a", "value": 1, "colour": (1, 0, 0)}], "needs 'name' and 'value'"),
        ([{"name": "a", "value": 1}, {"name": "b", "value": 1}], "its own label value"),
        ([{"name": "a", "value": 1, "color": (300, 0, 0)}], "out of range"),
    ]:
        with pytest.raises(ValueError, match=message):
            io.write_segmentation(labels, OBLIQUE, tmp_path / "x.seg.nrrd", segments)
    with pytest.warns(UserWarning, match=r"\[1\] have no segment"):
        io.write_segmentation(labels, OBLIQUE, tmp_path / "x.seg.nrrd", [])


# ----------------------------------------------------------------------------------------------- rendering


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as picture:
        return np.asarray(picture.convert("RGB")).astype(int)


def test_render_overlay_of_a_2d_image(tmp_path):
    image = ImageData(np.full((40, 60), 100, np.uint16))
    labels = np.zeros((40, 60), np.uint8)
    labels[10:30, 20:40] = 1

    path = io.render_overlay(image, labels, tmp_path / "look" / "overlay.png", points=[(5, 5, True)], title="demo")

    zoom = 512 // 60
    picture = _png(path)
    assert picture.shape == (40 * zoom, 60 * zoom, 3)
    inside, outside = picture[20 * zoom, 30 * zoom], picture[35 * zoom, 55 * zoom]
    assert np.abs(inside - outside).sum() > 60
    marker = picture[int(5.5 * zoom), int(5.5 * zoom)]
    assert marker[1] > 200 and marker[0] < 100  # green + on a positive click


def test_render_overlay_of_a_volume_uses_the_pixel_aspect_ratio(tmp_path):
    geometry = Geometry((1.0, 2.0, 3.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel().tolist()))
    image = ImageData(np.random.default_rng(5).normal(size=(5, 30, 40)), geometry)
    labels = np.zeros((5, 30, 40), np.uint8)
    labels[3, 10:20, 10:30] = 2

    path = io.render_overlay(image, labels, tmp_path / "volume.png", colors={2: (255, 0, 0)})

    zoom = 512 // 40
    picture = _png(path)
    assert picture.shape == (30 * zoom * 2, 40 * zoom, 3)  # rows are 2 mm, columns 1 mm
    inside = picture[15 * zoom * 2, 20 * zoom]
    assert inside[0] > inside[1] + 40  # red tint where the slice with the labels is shown


def test_render_panels_makes_one_grid_figure(tmp_path):
    image = ImageData(np.random.default_rng(6).integers(0, 255, (32, 32, 3)).astype(np.uint8), is_rgb=True)
    panels = [{"image": image, "labels": np.eye(32, dtype=np.uint8), "title": f"panel {i}"} for i in range(3)]

    path = io.render_panels(panels, tmp_path / "overview.png", columns=2)

    assert _png(path).shape == (2 * 400, 2 * 400, 3)
