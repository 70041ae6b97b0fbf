"""Headless KPrism batch segmentation through the Slicer module's logic.

Inside 3D Slicer:
    Slicer --no-main-window --python-script KPrismSlicer/KPrismSlicerLib/batch.py -- --input scans/ --output out/ --mode semantic --classes liver
Under plain Python with the slicer-core wheel (same code path):
    python KPrismSlicer/KPrismSlicerLib/batch.py --input scans/ --output out/ --mode semantic --classes liver

Volumes are read and results written with MRML storage nodes (vtkMRMLVolumeArchetypeStorageNode,
vtkMRMLSegmentationStorageNode), so the output is what the Slicer application would save. Every
input is first checked with kprism's reader, so the batch refuses exactly what `kprism segment`
refuses, with the same reason. Each output appears atomically and only after it was read back
completely, and it carries a fingerprint of the settings that made it: a rerun skips outputs made
with the same settings and reports those made with other ones. The exit status is 1 when any input
failed (or was kept from other settings) or on an unexpected error, 2 for a bad command line or when
kprism's dependencies are missing (it installs nothing), 130 when interrupted; inside Slicer every
outcome ends the application, so no windowless Slicer is left running.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

# Make KPrismSlicerLib importable when run as a script: it lives in KPrismSlicerLib/, both in the source
# tree and in an installed extension (qt-scripted-modules/KPrismSlicerLib/batch.py). Not at the top of the
# module folder: Slicer tries to load every top-level .py file there as a module.
_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE.parent))

if TYPE_CHECKING:
    from kprism.prompt_file import PromptFile

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
FORMATS = ("seg.nrrd", "nii.gz", "nrrd")
SETTINGS_TAG = "KPrism.Settings"  # .seg.nrrd: a tag on every segment
SETTINGS_FIELD = "kprism_settings"  # .nrrd: a key/value header field
NIFTI_MARK = "kprism:"  # .nii.gz: the header's 80-byte descrip field holds "kprism:<sha256>"
_DESCRIP_OFFSET = {348: 148, 540: 240}  # NIfTI-1 / NIfTI-2 header size → offset of descrip
FINGERPRINT_VERSION = 1  # bump when the meaning of the settings changes
INTERRUPTED = "kprism batch: interrupted; finished outputs kept, nothing partial"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # Slicer passes the separator after --python-script through
        argv = argv[1:]
    p = argparse.ArgumentParser(prog="KPrismSlicer/KPrismSlicerLib/batch.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", action="append", required=True, metavar="PATH",
                   help="a volume file or a folder of them (repeatable); .seg.nrrd files are not inputs")
    p.add_argument("--output", required=True, metavar="FOLDER", help="output folder (created if needed)")
    p.add_argument("--mode", required=True, choices=["semantic", "incontext", "interactive"])
    p.add_argument("--classes", help="comma-separated class names (semantic mode)")
    p.add_argument("--reference", nargs=2, action="append", metavar=("IMAGE", "MASK"),
                   help="in-context example: a volume and its mask (labelmap or .seg.nrrd; repeatable)")
    p.add_argument("--prompts", help="prompts.json (points, boxes, scribbles; schema in the README)")
    p.add_argument("--shard", default="0/1", metavar="I/N", help="process only inputs i, i+n, i+2n… of the sorted list (0-based)")
    p.add_argument("--model", help="model name or .safetensors file (default: the bundled kprism-tiny)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--threads", metavar="N", help="CPU threads, a positive integer (default: 2 at most)")
    p.add_argument("--modality", help="ct, mri, x-ray, … (default: unknown)")
    p.add_argument("--axis", type=int, default=0, choices=[0, 1, 2], help="slicing axis: 0 axial, 1 coronal, 2 sagittal")
    p.add_argument("--format", default="seg.nrrd", choices=FORMATS, help="output format (default seg.nrrd)")
    p.add_argument("--overwrite", action="store_true", help="redo inputs whose output exists, whatever made it")
    p.add_argument("--debug", action="store_true", help="print the traceback of unexpected errors")
    args = p.parse_args(argv)
    try:
        index, count = (int(v) for v in args.shard.split("/"))
        if not 0 <= index < count:
            raise ValueError
    except ValueError:
        p.error(f"--shard must be I/N with 0 <= I < N, e.g. 0/4; got {args.shard!r}")
    args.shard_index, args.shard_count = index, count
    if args.threads is not None:
        text, args.threads = args.threads, _positive_int(args.threads)
        if args.threads is None:
            p.error(f"--threads must be a positive integer, got {text}")
    args.class_list = [c.strip() for c in (args.classes or "").split(",") if c.strip()]
    if args.mode == "semantic" and not args.class_list:
        p.error("--mode semantic needs --classes")
    if args.mode == "incontext" and not args.reference:
        p.error("--mode incontext needs --reference IMAGE MASK")
    if args.mode == "interactive" and not args.prompts:
        p.error("--mode interactive needs --prompts")
    return args


def _positive_int(text: str) -> Optional[int]:
    try:
        value = int(text.strip())
    except ValueError:
        return None
    return value if value > 0 else None


def find_inputs(paths: Sequence[str]) -> list[Path]:
    """Volume files, folders expanded (not recursively), sorted and without duplicates."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found += [f for f in sorted(path.iterdir()) if f.is_file() and _is_volume(f)]
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"No such input file or folder: {path}")
    return sorted(dict.fromkeys(p.resolve() for p in found))


def _is_volume(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(VOLUME_SUFFIXES) and not name.endswith(".seg.nrrd") and not name.startswith(".")


def stem(path: Path) -> str:
    name = path.name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


# ----------------------------------------------------------------------------------------------- settings


def settings_fingerprint(args: argparse.Namespace, prompts: Optional["PromptFile"]) -> str:
    """sha256 of everything that decides an output: files by content, the model by its file's hash."""
    from kprism.weights import file_sha256, resolve_weights

    settings = {
        "version": FINGERPRINT_VERSION,
        "mode": args.mode,
        "classes": args.class_list,
        "references": [[_file_digest(image, "reference image"), _file_digest(mask, "reference mask")]
                       for image, mask in args.reference or []],
        "prompts": _prompts_settings(prompts),
        "model": file_sha256(resolve_weights(args.model)),
        "modality": (args.modality or "").strip().lower() or None,
        "axis": args.axis,
        "format": args.format,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def _prompts_settings(prompts: Optional["PromptFile"]) -> Optional[dict]:
    """The parsed prompts (layout and key order do not matter), with scribble files by content."""
    if prompts is None:
        return None
    data = prompts.model_dump(mode="json")
    for entry, scribble in zip(data["scribbles"], prompts.scribbles):
        entry["mask"] = _file_digest(scribble.mask, "scribble mask")
    return data


def _file_digest(path: str | Path, what: str) -> str:
    from kprism.weights import file_sha256

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"The {what} {path} is not a file.")
    return file_sha256(path)


# ----------------------------------------------------------------------------------------------- plan


@dataclass
class Plan:
    todo: list[tuple[Path, Path]] = field(default_factory=list)
    finished: int = 0
    other_settings: list[tuple[Path, Path]] = field(default_factory=list)  # kept, reported
    damaged: list[tuple[Path, Path, str]] = field(default_factory=list)  # redone (also in todo)


def plan(args: argparse.Namespace, fingerprint: str) -> Plan:
    """What this shard still has to do: an existing output counts as finished only if it reads back
    completely and was made with the same settings."""
    inputs = find_inputs(args.input)
    output_dir = Path(args.output).expanduser()
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"--output {output_dir} is a file; give a folder for the segmentations.")
    existing = output_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"Cannot create the output folder {output_dir}: {existing} is a file.")
    outputs = [output_dir.resolve() / f"{stem(p)}.{args.format}" for p in inputs]
    # An output that is one of the inputs would be skipped as "finished", or replaced with --overwrite.
    clashes = sorted(str(o) for o in outputs if o in set(inputs))
    if clashes:
        raise ValueError(f"Outputs would overwrite inputs: {clashes[:3]}; choose another --output folder or --format.")
    duplicates = {o.name for o in outputs if outputs.count(o) > 1}
    if duplicates:
        raise ValueError(f"Several inputs would write the same output: {sorted(duplicates)}; rename or split them.")
    result = Plan()
    for n, (source, target) in enumerate(zip(inputs, outputs)):
        if n % args.shard_count != args.shard_index:
            continue
        if args.overwrite or not target.exists():
            result.todo.append((source, target))
            continue
        try:
            made_with, _ = read_back(target)
        except OutputUnreadable as error:
            result.damaged.append((source, target, str(error)))
            result.todo.append((source, target))
            continue
        if made_with == fingerprint:
            result.finished += 1
        else:
            result.other_settings.append((source, target))
    return result


def remove_stale_temporaries(output_dir: Path, targets: Sequence[Path]) -> int:
    """Hidden temporaries of this shard's outputs (".<name>.<hex>.tmp<suffix>") left by a killed run."""
    if not output_dir.is_dir():
        return 0
    names = {t.name for t in targets}
    stale = [p for p in output_dir.glob(".*.tmp*") if p.name[1:].split(".tmp")[0].rsplit(".", 1)[0] in names]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


# ----------------------------------------------------------------------------------------------- MRML I/O


_verbose = False  # --debug: let VTK and ITK print their own messages


@contextmanager
def quiet_vtk() -> Iterator[None]:
    """VTK and ITK print a storage-node failure as pages of object dumps and exception text on the
    process's stderr; the batch says it in one line (the storage node's own message), so both are
    silenced for the duration: VTK's warning display, and file descriptor 2 for ITK's std::cerr."""
    import vtk

    if _verbose:
        yield
        return
    previous = vtk.vtkObject.GetGlobalWarningDisplay()
    vtk.vtkObject.GlobalWarningDisplayOff()
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to silence
        saved = None
    try:
        if saved is not None:
            with open(os.devnull, "wb") as sink:
                os.dup2(sink.fileno(), 2)
        yield
    finally:
        if saved is not None:
            os.dup2(saved, 2)
            os.close(saved)
        vtk.vtkObject.SetGlobalWarningDisplay(previous)


def _storage_messages(storage: Any) -> str:
    """The storage node's own account of a failure, as one line."""
    messages = storage.GetUserMessages()
    text = messages.GetAllMessagesAsString() if messages is not None else ""
    lines = [line.lstrip("- ").strip() for line in text.splitlines() if line.strip()]
    return " ".join(line.removeprefix("Error: ") for line in lines)


def read_volume(scene: Any, path: Path, name: Optional[str] = None, labelmap: bool = False):
    """A volume node read by Slicer's storage node, after kprism's reader accepted the file.

    ITK zero-fills truncated NIfTI files and the storage node accepts them; kprism's reader refuses
    them, and 4D, complex or implausibly large files, with a one-line reason (the CLI's).
    """
    from kprism.io import read_image

    read_image(path)  # raises the CLI's reason; the array is dropped at once
    with quiet_vtk():  # also the labelmap display node's warning about colour tables a bare scene lacks
        node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode", name or stem(path))
        storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        storage.SetFileName(str(path))
        storage.SetSingleFile(1)
        node.SetAndObserveStorageNodeID(storage.GetID())
        read = storage.ReadData(node)
    if not read:
        reason = _storage_messages(storage)
        _remove(scene, node)
        raise OSError(f"Could not read {path} as a volume" + (f": {reason}" if reason else "."))
    return node


def read_mask_segment(scene: Any, path: Path, volume_node: Any) -> tuple[Any, str]:
    """A mask file (labelmap: every non-zero voxel; or .seg.nrrd: its first segment) → (segmentation, segment ID)."""
    from KPrismSlicerLib import nodes

    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{stem(path)} mask")
    if path.name.lower().endswith(".seg.nrrd"):
        storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
        storage.SetFileName(str(path))
        segmentation.SetAndObserveStorageNodeID(storage.GetID())
        with quiet_vtk():
            read = storage.ReadData(segmentation)
        if not read or not nodes.segment_ids(segmentation):
            raise OSError(f"Could not read a segment from {path}.")
        return segmentation, nodes.segment_ids(segmentation)[0]
    labelmap = read_volume(scene, path, labelmap=True)
    try:  # a labelmap node is a scalar volume node: its own grid
        segment_id = nodes.write_segment(segmentation, labelmap, nodes.volume_array(labelmap) > 0, name=stem(path))
    finally:
        _remove(scene, labelmap)
    return segmentation, segment_id


class OutputUnreadable(OSError):
    """An output file that does not read back completely (truncated, damaged, not what was written)."""


def output_format(path: Path) -> str:
    return next(f for f in FORMATS if path.name.endswith(f".{f}"))


def write_output(scene: Any, segmentation: Any, volume: Any, target: Path, fingerprint: Optional[str] = None) -> None:
    """Write with a storage node to a hidden sibling, stamp the settings, read it all back, then rename.

    Storage nodes report success on a short gzip write (a full disk), so only the complete read-back
    (header, size, every compressed byte) proves the file whole; otherwise nothing replaces `target`.
    Without `fingerprint` the file is written as the storage node writes it, unstamped.
    """
    from kprism.atomic import write_atomically

    from KPrismSlicerLib import nodes

    size = tuple(volume.GetImageData().GetDimensions())

    def write(temporary: Path) -> None:
        if fingerprint and output_format(target) == "seg.nrrd":  # Slicer keeps segment tags when it loads and saves
            for segment_id in nodes.segment_ids(segmentation):
                segmentation.GetSegmentation().GetSegment(segment_id).SetTag(SETTINGS_TAG, fingerprint)
        _write_with_storage_node(scene, segmentation, volume, temporary)
        if fingerprint:
            _stamp(temporary, fingerprint)

    def verify(temporary: Path) -> None:
        try:
            made_with, read_size = read_back(temporary)
        except OutputUnreadable as error:
            raise OutputUnreadable(f"the written file {error}; is the disk full?") from None
        if read_size != size:
            raise OutputUnreadable(f"it reads back with size {read_size} instead of {size}")
        if made_with != fingerprint:
            raise OutputUnreadable("its settings fingerprint did not survive the write")

    try:
        write_atomically(target, write, verify=verify, suffix=f".{output_format(target)}")
    except (OSError, ValueError, EOFError) as error:
        raise OSError(f"Could not write {target}: {error}") from None


def _write_with_storage_node(scene: Any, segmentation: Any, volume: Any, path: Path) -> None:
    import slicer
    import vtk

    created = []
    scratch = path.parent / "TempWrite"  # the volume storage node writes there first, then moves the file
    scratch_existed = scratch.exists()
    try:
        with quiet_vtk():  # VTK's failure dumps, and the labelmap display node's colour-table warning
            if path.name.endswith(".seg.nrrd"):
                storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
                storage.SetCropToMinimumExtent(False)  # keep the input volume's grid
                node = segmentation
            else:
                node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__kprism_labels__")
                created.append(node)
                ids = vtk.vtkStringArray()
                segmentation.GetSegmentation().GetSegmentIDs(ids)
                if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(segmentation, ids, node, volume):
                    raise OSError(f"could not convert the segmentation of {volume.GetName()} to a labelmap")
                storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
            created.append(storage)
            storage.SetFileName(str(path))
            storage.SetUseCompression(1)
            written = storage.WriteData(node)
        if not written:
            raise OSError(_storage_messages(storage) or "the storage node could not write it")
    finally:
        for node in created:
            _remove(scene, node)
        _clean_scratch(scratch, path.name, scratch_existed)


def _clean_scratch(scratch: Path, name: str, existed: bool) -> None:
    """A failed volume write leaves its partial file in the storage node's TempWrite folder."""
    (scratch / name).unlink(missing_ok=True)
    if not existed:
        try:
            scratch.rmdir()  # only when empty: a parallel shard may be writing there
        except OSError:
            pass


# ----------------------------------------------------------------------------------------------- fingerprints


def _stamp(path: Path, fingerprint: str) -> None:
    """Put the settings fingerprint inside a written labelmap (a .seg.nrrd has it as segment tags)."""
    kind = output_format(path)
    if kind == "nrrd":
        _stamp_nrrd(path, SETTINGS_FIELD, fingerprint)
    elif kind == "nii.gz":
        _stamp_nifti(path, fingerprint)


def _stamp_nrrd(path: Path, key: str, value: str) -> None:
    """Add a `key:=value` line to an attached NRRD header (the data follows the header's blank line)."""
    data = path.read_bytes()
    end = data.find(b"\n\n")
    if not data.startswith(b"NRRD") or end < 0:
        raise OutputUnreadable(f"{path.name} is not an NRRD file with an attached header")
    path.write_bytes(data[:end] + f"\n{key}:={value}".encode("ascii") + data[end:])


def _stamp_nifti(path: Path, fingerprint: str) -> None:
    """Write "kprism:<sha256>" into the NIfTI header's descrip field (80 bytes; NIfTI-1 at 148, NIfTI-2 at 240)."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    header_size = {int.from_bytes(raw[:4], "little"), int.from_bytes(raw[:4], "big")}  # either byte order
    offset = next((_DESCRIP_OFFSET[n] for n in header_size if n in _DESCRIP_OFFSET), None)
    if offset is None:
        raise OutputUnreadable(f"{path.name} has no NIfTI header")
    raw[offset: offset + 80] = (NIFTI_MARK + fingerprint).encode("ascii").ljust(80, b"\0")[:80]
    path.write_bytes(gzip.compress(bytes(raw), compresslevel=6, mtime=0))


def read_back(path: Path) -> tuple[Optional[str], tuple[int, ...]]:
    """(settings fingerprint or None, voxel size i, j, k) of an output, reading every byte of it."""
    try:
        kind = output_format(path)
        if kind == "seg.nrrd":
            import slicerio

            segmentation = slicerio.read_segmentation(str(path))
            shape = segmentation["voxels"].shape[-3:]
            stamps = {s.get("tags", {}).get(SETTINGS_TAG) for s in segmentation["segments"]}
            made_with = stamps.pop() if len(stamps) == 1 else None
        elif kind == "nrrd":
            import nrrd

            voxels, header = nrrd.read(str(path))
            shape, made_with = voxels.shape, header.get(SETTINGS_FIELD)
        else:
            import nibabel
            import numpy as np

            image = nibabel.load(str(path))
            shape = np.asanyarray(image.dataobj).shape  # decompresses everything: a short gzip fails here
            descrip = image.header["descrip"].tobytes().rstrip(b"\0").decode("ascii", "replace")
            made_with = descrip[len(NIFTI_MARK):] if descrip.startswith(NIFTI_MARK) else None
    except Exception as error:  # every reader raises its own types for a damaged file
        raise OutputUnreadable(f"does not read back completely ({type(error).__name__}: {error})".splitlines()[0]) from None
    return made_with, tuple(int(n) for n in shape) + (1,) * (3 - len(shape))


def _node_ids(scene: Any) -> set[str]:
    return {scene.GetNthNode(n).GetID() for n in range(scene.GetNumberOfNodes())}


def _remove(scene: Any, node: Any) -> None:
    if node is None or node.GetScene() is None:
        return
    for n in range(node.GetNumberOfDisplayNodes() if hasattr(node, "GetNumberOfDisplayNodes") else 0):
        display = node.GetNthDisplayNode(n)
        if display is not None:
            scene.RemoveNode(display)
    storage = node.GetStorageNode() if hasattr(node, "GetStorageNode") else None
    if storage is not None:
        scene.RemoveNode(storage)
    scene.RemoveNode(node)


# ----------------------------------------------------------------------------------------------- prompts


def load_prompts(path: Path) -> "PromptFile":
    """prompts.json through kprism's one parser (the CLI's): a PromptFileError names the file and JSON path."""
    from kprism.prompt_file import load_prompt_file

    return load_prompt_file(path)


def resolve_prompts(scene: Any, prompts: Optional["PromptFile"], volume: Any) -> list:
    """prompts.json → logic Prompts on this volume (IJK and LPS converted to RAS), order: boxes, scribbles, points."""
    import numpy as np

    from KPrismSlicerLib import nodes
    from KPrismSlicerLib.prompts import Prompt

    if prompts is None:
        return []
    system = prompts.coordinates

    def ras(values: Sequence[float], where: str) -> list[float]:
        values = np.asarray(values, dtype=float)
        if values.shape != (3,):
            raise ValueError(f"Prompt file {prompts.source}: {where}: a volume needs 3 coordinates, got {values.tolist()}.")
        if system == "ijk":
            return nodes.volume_ras(volume, values).tolist()
        return (values * [-1, -1, 1]).tolist() if system == "lps" else values.tolist()

    resolved = []
    for n, box in enumerate(prompts.boxes):
        resolved.append(Prompt.box_ras(ras(box.min, f"boxes[{n}].min"), ras(box.max, f"boxes[{n}].max")))
    for n, scribble in enumerate(prompts.scribbles):
        try:
            segmentation, segment_id = read_mask_segment(scene, scribble.mask, volume)
        except (OSError, ValueError) as error:
            raise ValueError(f"Prompt file {prompts.source}: scribbles[{n}] ({scribble.mask.name}): {error}") from None
        resolved.append(Prompt.scribble(segmentation, segment_id, scribble.positive))
    for n, point in enumerate(prompts.points):
        resolved.append(Prompt.point(ras(point.position, f"points[{n}].position"), point.positive))
    return resolved


# ----------------------------------------------------------------------------------------------- main


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    unavailable = dependencies_problem()
    if unavailable:
        print(f"kprism batch: error: {unavailable}", file=sys.stderr, flush=True)
        return 2
    try:
        with _one_line_warnings():
            return run(args)
    except KeyboardInterrupt:  # outputs appear only whole (atomic writes), so what exists is finished
        print(INTERRUPTED, file=sys.stderr, flush=True)
        return 130
    except Exception as error:  # a bug or an unforeseen environment: one line, the details on request
        if args.debug:
            traceback.print_exc()
        reason = f"{type(error).__name__}: {error}".splitlines()[0]
        print(f"kprism batch: unexpected error: {reason}; run with --debug for details", file=sys.stderr, flush=True)
        return 1


def _one_line_warnings():
    """kprism's one-line warnings; plain Python warnings when kprism is not installed yet (run() then says so)."""
    try:
        from kprism.messages import one_line_warnings
    except ImportError:
        import contextlib

        return contextlib.nullcontext()
    return one_line_warnings("kprism batch")


def run(args: argparse.Namespace) -> int:
    global _verbose
    _verbose = args.debug
    try:
        prompts = load_prompts(Path(args.prompts)) if args.prompts else None
        fingerprint = settings_fingerprint(args, prompts)
        work = plan(args, fingerprint)
    except (OSError, ValueError, RuntimeError, ImportError) as error:
        print(f"kprism batch: error: {error}", file=sys.stderr)
        return 2
    _report_plan(args, work)
    if not work.todo:
        return 1 if work.other_settings else 0

    from KPrismSlicerLib import nodes
    from KPrismSlicerLib.logic import KPrismLogic, KPrismUnavailable

    scene = nodes.headless_scene()
    logic = KPrismLogic(args.model, args.device, args.threads)
    try:
        references = []
        for image, mask in args.reference or []:
            ref_volume = read_volume(scene, Path(image))
            references.append((ref_volume, *read_mask_segment(scene, Path(mask), ref_volume)))
    except (OSError, ValueError) as error:
        print(f"kprism batch: error: {error}", file=sys.stderr)
        return 2
    failures = 0
    for source, target in work.todo:
        started, existing = time.time(), _node_ids(scene)
        try:
            volume = read_volume(scene, source)
            segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{stem(source)} KPrism")
            segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
            written = logic.segment(volume, segmentation, args.mode, classes=args.class_list, references=references,
                                    prompts=resolve_prompts(scene, prompts, volume), modality=args.modality, axis=args.axis)
            write_output(scene, segmentation, volume, target, fingerprint)
            print(f"{source.name}: {', '.join(written)} → {target} ({time.time() - started:.1f} s)", flush=True)
        except KPrismUnavailable as error:
            print(f"kprism batch: error: {error}", file=sys.stderr)
            return 2
        except Exception as error:  # one bad input must not stop the batch
            failures += 1
            if args.debug:
                traceback.print_exc()
            print(f"{source.name}: FAILED: {error}".splitlines()[0], file=sys.stderr, flush=True)
        finally:  # free this input's nodes (volume, segmentation, scribbles)
            for node_id in _node_ids(scene) - existing:
                node = scene.GetNodeByID(node_id)
                if node is not None:
                    scene.RemoveNode(node)
    kept = f", {len(work.other_settings)} kept from other settings" if work.other_settings else ""
    print(f"kprism batch: {len(work.todo) - failures} written, {failures} failed{kept}", flush=True)
    return 1 if failures or work.other_settings else 0


def _report_plan(args: argparse.Namespace, work: Plan) -> None:
    removed = remove_stale_temporaries(Path(args.output), [target for _, target in work.todo])
    if removed:
        print(f"kprism batch: removed {removed} partial file(s) left by an interrupted run", flush=True)
    for source, target, reason in work.damaged:
        print(f"{source.name}: the existing {target.name} {reason}; redoing it", flush=True)
    for source, target in work.other_settings:
        print(f"{source.name}: {target.name} was made with other settings; --overwrite to redo", file=sys.stderr, flush=True)
    kept = f", {len(work.other_settings)} made with other settings" if work.other_settings else ""
    print(f"kprism batch: {len(work.todo)} to segment, {work.finished} already finished{kept} (shard {args.shard})", flush=True)


def dependencies_problem() -> Optional[str]:
    """One line when kprism or what it needs is missing from this Python, else None. The batch installs nothing."""
    from KPrismSlicerLib import bundled, install

    problem = bundled.python_problem()
    if problem:
        return problem
    if not bundled.kprism_found():
        return bundled.MISSING_PACKAGE
    absent = install.missing()
    if absent:
        return (f"KPrism's Python packages are not installed: {', '.join(absent)}. The batch installs nothing: open "
                "the KPrism module in Slicer once and press 'Install dependencies' (plain Python: pip install ./KPrismCore).")
    return None


def script_entry(argv: Optional[Sequence[str]] = None) -> None:
    """Run as a script and always end the process with a status.

    `Slicer --python-script` does not exit when the script ends, so anything that escaped here would leave
    a windowless Slicer running: every outcome, an unforeseen exception included, ends in _exit.
    """
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse: --help (0) or a bad command line (2, message already printed)
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr, flush=True)
        code = 130
    except BaseException as error:  # noqa: BLE001 - the last line of defence
        print(f"kprism batch: unexpected error: {type(error).__name__}: {error}".splitlines()[0], file=sys.stderr, flush=True)
        code = 1
    _exit(code)


def _exit(code: int) -> None:
    try:
        import slicer

        inside_slicer = getattr(slicer, "app", None) is not None
    except ImportError:
        inside_slicer = False
    if inside_slicer:
        slicer.util.exit(code)
    else:
        sys.exit(code)


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    script_entry()
