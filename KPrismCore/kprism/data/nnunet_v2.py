"""Segmentation datasets in the nnU-Net v2 raw layout or the Medical Segmentation Decathlon layout.

nnU-Net v2 raw: ``dataset.json`` with ``channel_names``, ``labels`` (name → value), ``numTraining``
and ``file_ending``; cases are ``imagesTr/<case>_0000<ending>`` with ``labelsTr/<case><ending>``,
and optionally ``imagesTs``/``labelsTs``. Decathlon: ``dataset.json`` lists ``training`` (and
``test``) files, ``labels`` maps value → name and ``modality`` index → name.

Only channel 0 of a multi-channel case is read: KPrism segments one image at a time. A colour
picture is one file with three channels (``channel_names`` R, G, B), not three files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import numpy as np

from ..image import ImageData
from ..io import _RASTER_SUFFIXES, read_image, read_mask

Split = Literal["train", "test"]

_NNUNET_FOLDERS = {"train": ("imagesTr", "labelsTr"), "test": ("imagesTs", "labelsTs")}
_RGB_CHANNELS = ["R", "G", "B"]
# Decathlon and nnU-Net datasets name MR sequences as modalities; KPrism only needs to know it is MRI.
_MODALITY_ALIASES = {name: "mri" for name in ("mr", "t1", "t1w", "t1gd", "t2", "t2w", "flair", "adc", "dwi", "mp-mri")}


class DatasetError(ValueError):
    """A dataset folder whose description or files are inconsistent."""


@dataclass(frozen=True)
class Case:
    case_id: str
    image_path: Path
    label_path: Path


@dataclass
class SegmentationDataset:
    """A labelled dataset: its description and its cases, loaded one at a time."""

    root: Path
    name: str  # the folder name, e.g. "Dataset001_MontgomeryCXR": unique where the json name may not be
    modality: str  # lower case: "ct", "mri", "x-ray", …; "unknown" when not declared
    dim: int  # 2 for pictures, 3 for volumes (as kprism.io reads the files)
    is_rgb: bool
    labels: dict[str, int]  # name → value, background left out
    _splits: dict[str, list[Case]] = field(repr=False)

    def cases(self, split: Split = "train") -> list[Case]:
        """The labelled cases of a split, sorted by id; ``[]`` for a split the dataset does not have."""
        if split not in _NNUNET_FOLDERS:
            raise ValueError(f"Unknown split {split!r}; use 'train' or 'test'.")
        return list(self._splits.get(split, []))

    def select(self, split: Split, case_ids: Optional[Sequence[str]] = None) -> list[Case]:
        """The split's cases, or the named cases from any split (a held-out case for a check), in the order given."""
        if case_ids is None:
            return self.cases(split)
        cases = {c.case_id: c for part in _NNUNET_FOLDERS for c in self.cases(part)}
        missing = [c for c in case_ids if c not in cases]
        if missing:
            raise ValueError(f"{self.name} has no case {', '.join(missing)}; it has {', '.join(sorted(cases)[:8])}….")
        return [cases[c] for c in dict.fromkeys(case_ids)]

    def evaluation_split(self) -> Split:
        """``"test"`` when the dataset has labelled test cases, else ``"train"`` (the only data there is)."""
        return "test" if self._splits.get("test") else "train"

    def load(self, case: Case) -> tuple[ImageData, np.ndarray]:
        """The case's image (channel 0) and its integer label map on the image grid."""
        image = read_image(case.image_path, modality=self.modality)
        # No reference image: read_mask would resample a mismatched label map instead of reporting it.
        labels = read_mask(case.label_path).array
        if labels.shape != image.spatial_shape:
            raise self._error(
                f"case {case.case_id!r}: the image has shape {image.spatial_shape} but its label map "
                f"{case.label_path.name} has shape {labels.shape}."
            )
        if image.is_rgb != self.is_rgb:
            declared, found = ("R, G, B channels", "grey") if self.is_rgb else ("grey channels", "colour")
            raise self._error(
                f"case {case.case_id!r}: dataset.json declares {declared}, but {case.image_path.name} "
                f"is a {found} image."
            )
        undeclared = sorted(set(np.unique(labels).tolist()) - set(self.labels.values()) - {0})
        if undeclared:
            raise self._error(
                f"case {case.case_id!r}: label values {undeclared} in {case.label_path.name} are not declared in "
                f"dataset.json 'labels' (declared: {sorted(self.labels.values())} and background 0)."
            )
        return image, labels

    def _error(self, message: str) -> DatasetError:
        return DatasetError(f"Dataset {self.root}: {message}")


def load_dataset(root: str | Path) -> SegmentationDataset:
    """Read ``root/dataset.json`` and list the cases; images are read later, by ``load``."""
    root = Path(root).expanduser().resolve()
    description = _read_description(root)
    if "channel_names" in description:
        return _nnunet_dataset(root, description)
    if "training" in description:
        return _decathlon_dataset(root, description)
    raise DatasetError(
        f"Dataset {root}: dataset.json has neither 'channel_names' (nnU-Net v2) nor 'training' "
        "(Medical Segmentation Decathlon)."
    )


def _read_description(root: Path) -> dict[str, Any]:
    path = root / "dataset.json"
    if not path.is_file():
        raise DatasetError(f"Dataset {root}: no dataset.json in this folder.")
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"Dataset {root}: dataset.json is not valid JSON ({error}).") from error
    if not isinstance(description, dict):
        raise DatasetError(f"Dataset {root}: dataset.json must hold a JSON object.")
    return description


def _field(root: Path, description: dict[str, Any], key: str, kind: type, meaning: str) -> Any:
    if key not in description:
        raise DatasetError(f"Dataset {root}: dataset.json has no {key!r} field ({meaning}).")
    value = description[key]
    # bool is an int in Python, but "numTraining": true is a broken file.
    if not isinstance(value, kind) or isinstance(value, bool) or (isinstance(value, (dict, list)) and not value):
        raise DatasetError(f"Dataset {root}: dataset.json field {key!r} must be {meaning}; got {value!r}.")
    return value


# ----------------------------------------------------------------------------------------------- nnU-Net v2


def _nnunet_dataset(root: Path, description: dict[str, Any]) -> SegmentationDataset:
    channels = _field(root, description, "channel_names", dict, "a non-empty object: channel index → name")
    labels = _nnunet_labels(root, description)
    count = _field(root, description, "numTraining", int, "the number of training cases")
    ending = _field(root, description, "file_ending", str, 'the image file extension, e.g. ".nii.gz"')
    channel_list = [str(channels[key]) for key in sorted(channels, key=str)]
    is_rgb = [name.upper() for name in channel_list] == _RGB_CHANNELS
    declared = description.get("modality")
    if declared is not None and not isinstance(declared, str):
        raise DatasetError(f"Dataset {root}: dataset.json field 'modality' must be a string; got {declared!r}.")
    # The channel name is the modality in plain nnU-Net files ("CT", "MRI"); a colour channel is not.
    modality = declared if declared is not None else (None if is_rgb else channel_list[0])
    splits = {split: _nnunet_cases(root, *folders, ending) for split, folders in _NNUNET_FOLDERS.items()}
    if len(splits["train"]) != count:
        raise DatasetError(
            f"Dataset {root}: dataset.json field 'numTraining' is {count}, but labelsTr holds {len(splits['train'])} "
            f"label files ending in {ending!r}."
        )
    return SegmentationDataset(root, root.name, _modality(modality), _dimension(ending), is_rgb, labels, splits)


def _nnunet_labels(root: Path, description: dict[str, Any]) -> dict[str, int]:
    labels = _field(root, description, "labels", dict, "a non-empty object: label name → integer value")
    for name, value in labels.items():
        if not isinstance(value, int) or isinstance(value, bool):
            # nnU-Net's region-based training maps names to lists of values; one label map cannot say that.
            raise DatasetError(
                f"Dataset {root}: dataset.json field 'labels' must map each name to one integer; "
                f"{name!r} maps to {value!r}."
            )
    return {name: value for name, value in labels.items() if value != 0}


def _nnunet_cases(root: Path, images: str, labels_folder: str, ending: str) -> list[Case]:
    folder = root / labels_folder
    if not folder.is_dir():
        return []
    cases = []
    # Names starting with "." are metadata left by macOS ("._case.nii.gz"), not label maps.
    for label_path in sorted(p for p in folder.iterdir() if p.name.endswith(ending) and not p.name.startswith(".")):
        case_id = label_path.name[: -len(ending)]
        image_path = root / images / f"{case_id}_0000{ending}"
        if not image_path.is_file():
            raise DatasetError(
                f"Dataset {root}: case {case_id!r} has the label file {labels_folder}/{label_path.name} but no "
                f"image {images}/{image_path.name}."
            )
        cases.append(Case(case_id, image_path, label_path))
    return cases


# ----------------------------------------------------------------------------------------------- Decathlon


def _decathlon_dataset(root: Path, description: dict[str, Any]) -> SegmentationDataset:
    training = _field(root, description, "training", list, 'a non-empty list of {"image": …, "label": …}')
    labels = _decathlon_labels(root, description)
    modalities = description.get("modality", {})
    if not isinstance(modalities, dict):
        raise DatasetError(
            f"Dataset {root}: dataset.json field 'modality' must map channel index → name; got {modalities!r}."
        )
    if description.get("tensorImageSize") == "4D":
        raise DatasetError(
            f"Dataset {root}: the images are 4D (several channels in one file), which KPrism does not read. "
            "Convert the dataset with nnUNetv2_convert_MSD_dataset, which splits the channels into files."
        )
    train = _decathlon_cases(root, training, "training")
    # Decathlon test entries are bare image paths without labels; only labelled entries can be evaluated.
    test_entries = [entry for entry in description.get("test", []) if isinstance(entry, dict)]
    test = _decathlon_cases(root, test_entries, "test")
    modality = modalities.get("0", modalities.get(0))
    return SegmentationDataset(
        root, root.name, _modality(modality), _dimension(_file_ending(train[0].image_path)), False, labels,
        {"train": train, "test": test},
    )


def _decathlon_labels(root: Path, description: dict[str, Any]) -> dict[str, int]:
    meaning = 'a non-empty object: label value → name, e.g. {"0": "background"}'
    labels = _field(root, description, "labels", dict, meaning)
    try:
        return {str(name): int(value) for value, name in labels.items() if int(value) != 0}
    except ValueError as error:
        raise DatasetError(
            f"Dataset {root}: dataset.json field 'labels' must map integer values to names; got {labels!r}."
        ) from error


def _decathlon_cases(root: Path, entries: list[Any], key: str) -> list[Case]:
    cases = []
    for entry in entries:
        if not (isinstance(entry, dict) and all(isinstance(entry.get(k), str) for k in ("image", "label"))):
            raise DatasetError(
                f"Dataset {root}: each entry of dataset.json field {key!r} needs 'image' and 'label' paths; "
                f"got {entry!r}."
            )
        image_path, label_path = root / entry["image"], root / entry["label"]
        case_id = image_path.name[: -len(_file_ending(image_path))]
        if not label_path.is_file():
            raise DatasetError(f"Dataset {root}: case {case_id!r}: the label file {entry['label']} does not exist.")
        if not image_path.is_file():
            raise DatasetError(
                f"Dataset {root}: case {case_id!r} has the label file {entry['label']} but no image {entry['image']}."
            )
        cases.append(Case(case_id, image_path, label_path))
    return sorted(cases, key=lambda case: case.case_id)


def _file_ending(path: Path) -> str:
    return ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix


# ----------------------------------------------------------------------------------------------- shared


def _modality(name: Any) -> str:
    if not isinstance(name, str) or not name.strip():
        return "unknown"
    key = name.strip().lower()
    return _MODALITY_ALIASES.get(key, key)


def _dimension(ending: str) -> int:
    # kprism.io reads raster pictures as 2D and every other format as a volume, even with one slice.
    return 2 if ending.lower() in _RASTER_SUFFIXES else 3


# ----------------------------------------------------------------------------------------------- slices


def slice_index(labels: np.ndarray, axis: int, values: list[int]) -> dict[int, np.ndarray]:
    """For each label value, the sorted indices of the slices along ``axis`` that contain it.

    Training samples foreground slices of a class from these and negatives from the rest.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"slice_index needs a 3D label volume; got shape {labels.shape}.")
    slices = np.moveaxis(labels, axis, 0).reshape(labels.shape[axis], -1)
    present = [set(np.unique(s).tolist()) for s in slices]  # one pass over the volume for all values
    return {value: np.array([i for i, found in enumerate(present) if value in found], np.int64) for value in values}


def take_slice(array: np.ndarray, axis: int, index: int) -> np.ndarray:
    """The 2D slice ``index`` along array ``axis`` of a ``(k, j, i)`` volume (a view, not a copy).

    In array order, axis 0 fixes k and gives a ``(j, i)`` slice, axis 1 fixes j and gives
    ``(k, i)``, axis 2 fixes i and gives ``(k, j)``. For an axial acquisition with an axis-aligned
    direction (a diagonal of ±1, as in most CT and body MRI) these are the axial, coronal and
    sagittal planes; for oblique acquisitions (e.g. cardiac short-axis stacks) axis 0 is the
    acquired plane, whatever its anatomical orientation.
    """
    array = np.asarray(array)
    if array.ndim != 3 or axis not in (0, 1, 2):
        raise ValueError(f"take_slice needs a 3D volume and axis 0, 1 or 2; got shape {array.shape} and axis {axis}.")
    if not 0 <= index < array.shape[axis]:
        raise IndexError(f"Slice {index} is outside axis {axis} of a volume of shape {array.shape}.")
    return array[(slice(None),) * axis + (index,)]
