"""Headless KPrism batch segmentation through the Slicer module's logic.

Inside 3D Slicer:
    Slicer --no-main-window --python-script KPrismSlicer/batch.py -- --input scans/ --output out/ --mode semantic --classes liver
Under plain Python with the slicer-core wheel (same code path):
    python KPrismSlicer/batch.py --input scans/ --output out/ --mode semantic --classes liver

Volumes are read and results written with MRML storage nodes (vtkMRMLVolumeArchetypeStorageNode,
vtkMRMLSegmentationStorageNode), so the output is what the Slicer application would save. Finished
outputs are skipped, each output appears atomically (written beside its final name, then renamed),
and the exit status is non-zero when any input failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Optional, Sequence

# Make KPrismSlicerLib importable when run as a script: from the source tree (KPrismSlicer/batch.py)
# or from an installed extension (qt-scripted-modules/KPrismSlicerLib/batch.py).
_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE.parent if _HERE.name == "KPrismSlicerLib" else _HERE))

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
FORMATS = ("seg.nrrd", "nii.gz", "nrrd")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # Slicer passes the separator after --python-script through
        argv = argv[1:]
    p = argparse.ArgumentParser(prog="KPrismSlicer/batch.py", description=__doc__.split("\n\n")[0])
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
    p.add_argument("--threads", type=int, help="CPU threads (default: 2 at most)")
    p.add_argument("--modality", help="ct, mri, x-ray, … (default: unknown)")
    p.add_argument("--axis", type=int, default=0, choices=[0, 1, 2], help="slicing axis: 0 axial, 1 coronal, 2 sagittal")
    p.add_argument("--format", default="seg.nrrd", choices=FORMATS, help="output format (default seg.nrrd)")
    p.add_argument("--overwrite", action="store_true", help="redo inputs whose output exists")
    args = p.parse_args(argv)
    try:
        index, count = (int(v) for v in args.shard.split("/"))
        if not 0 <= index < count:
            raise ValueError
    except ValueError:
        p.error(f"--shard must be I/N with 0 <= I < N, e.g. 0/4; got {args.shard!r}")
    args.shard_index, args.shard_count = index, count
    args.class_list = [c.strip() for c in (args.classes or "").split(",") if c.strip()]
    if args.mode == "semantic" and not args.class_list:
        p.error("--mode semantic needs --classes")
    if args.mode == "incontext" and not args.reference:
        p.error("--mode incontext needs --reference IMAGE MASK")
    if args.mode == "interactive" and not args.prompts:
        p.error("--mode interactive needs --prompts")
    return args


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


def plan(args: argparse.Namespace) -> tuple[list[tuple[Path, Path]], int]:
    """(input, output) pairs of this shard still to do, and how many were already finished."""
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
    pairs = [pair for n, pair in enumerate(zip(inputs, outputs)) if n % args.shard_count == args.shard_index]
    todo = [pair for pair in pairs if args.overwrite or not pair[1].exists()]
    return todo, len(pairs) - len(todo)


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


def read_volume(scene: Any, path: Path, name: Optional[str] = None, labelmap: bool = False):
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode", name or stem(path))
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    storage.SetSingleFile(1)
    node.SetAndObserveStorageNodeID(storage.GetID())
    if not storage.ReadData(node):
        _remove(scene, node)
        raise OSError(f"Could not read {path} as a volume.")
    return node


def read_mask_segment(scene: Any, path: Path, volume_node: Any) -> tuple[Any, str]:
    """A mask file (labelmap: every non-zero voxel; or .seg.nrrd: its first segment) → (segmentation, segment ID)."""
    from KPrismSlicerLib import nodes

    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{stem(path)} mask")
    if path.name.lower().endswith(".seg.nrrd"):
        storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
        storage.SetFileName(str(path))
        segmentation.SetAndObserveStorageNodeID(storage.GetID())
        if not storage.ReadData(segmentation) or not nodes.segment_ids(segmentation):
            raise OSError(f"Could not read a segment from {path}.")
        return segmentation, nodes.segment_ids(segmentation)[0]
    labelmap = read_volume(scene, path, labelmap=True)
    try:  # a labelmap node is a scalar volume node: its own grid
        segment_id = nodes.write_segment(segmentation, labelmap, nodes.volume_array(labelmap) > 0, name=stem(path))
    finally:
        _remove(scene, labelmap)
    return segmentation, segment_id


def write_output(scene: Any, segmentation: Any, volume: Any, target: Path) -> None:
    """Write with a storage node to a hidden sibling, then rename: readers never see half a file."""
    import slicer
    import vtk

    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = next(f".{f}" for f in FORMATS if target.name.endswith(f".{f}"))
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp{suffix}")
    created = []
    try:
        if suffix == ".seg.nrrd":
            storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
            storage.SetCropToMinimumExtent(False)  # keep the input volume's grid
            node = segmentation
        else:
            node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__kprism_labels__")
            created.append(node)
            ids = vtk.vtkStringArray()
            segmentation.GetSegmentation().GetSegmentIDs(ids)
            if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(segmentation, ids, node, volume):
                raise OSError(f"Could not convert the segmentation of {volume.GetName()} to a labelmap.")
            storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        created.append(storage)
        storage.SetFileName(str(temporary))
        storage.SetUseCompression(1)
        if not storage.WriteData(node):
            raise OSError(f"Could not write {target}.")
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
        for node in created:
            _remove(scene, node)


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


def load_prompts(path: Path) -> list[tuple]:
    """prompts.json → items resolved per volume by :func:`resolve_prompts` (order: boxes, scribbles, points)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    unknown = set(data) - {"coordinates", "points", "boxes", "scribbles"}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; allowed: coordinates, points, boxes, scribbles.")
    system = str(data.get("coordinates", "ijk")).lower()
    if system not in ("ijk", "ras", "lps"):
        raise ValueError(f"{path}: 'coordinates' must be ijk, ras or lps; got {system!r}.")
    items: list = []
    for box in data.get("boxes", []):
        items.append(("box", system, box["min"], box["max"]))
    for scribble in data.get("scribbles", []):
        items.append(("scribble", path.parent / scribble["mask"], bool(scribble.get("positive", True))))
    for point in data.get("points", []):
        items.append(("point", system, point["position"], bool(point.get("positive", True))))
    return items


def resolve_prompts(scene: Any, items: list, volume: Any) -> list:
    """prompts.json items → logic Prompts on this volume (IJK and LPS converted to RAS)."""
    import numpy as np

    from KPrismSlicerLib import nodes
    from KPrismSlicerLib.logic import Prompt

    def ras(system: str, values: Sequence[float]) -> list[float]:
        values = np.asarray(values, dtype=float)
        if values.shape != (3,):
            raise ValueError(f"Prompt positions on a volume need 3 coordinates; got {values.tolist()}.")
        if system == "ijk":
            return nodes.volume_ras(volume, values).tolist()
        return (values * [-1, -1, 1]).tolist() if system == "lps" else values.tolist()

    prompts = []
    for item in items:
        if item[0] == "box":
            prompts.append(Prompt.box_ras(ras(item[1], item[2]), ras(item[1], item[3])))
        elif item[0] == "scribble":
            segmentation, segment_id = read_mask_segment(scene, item[1], volume)
            prompts.append(Prompt.scribble(segmentation, segment_id, item[2]))
        else:
            prompts.append(Prompt.point(ras(item[1], item[2]), item[3]))
    return prompts


# ----------------------------------------------------------------------------------------------- main


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        todo, finished = plan(args)
    except (OSError, ValueError) as error:
        print(f"kprism batch: error: {error}", file=sys.stderr)
        return 2
    removed = remove_stale_temporaries(Path(args.output), [target for _, target in todo])
    if removed:
        print(f"kprism batch: removed {removed} partial file(s) left by an interrupted run", flush=True)
    print(f"kprism batch: {len(todo)} to segment, {finished} already finished (shard {args.shard})", flush=True)
    if not todo:
        return 0

    from KPrismSlicerLib import nodes
    from KPrismSlicerLib.logic import KPrismLogic, KPrismUnavailable

    scene = nodes.headless_scene()
    logic = KPrismLogic(args.model, args.device, args.threads)
    failures = 0
    try:
        references = []
        for image, mask in args.reference or []:
            ref_volume = read_volume(scene, Path(image))
            references.append((ref_volume, *read_mask_segment(scene, Path(mask), ref_volume)))
        prompt_items = load_prompts(Path(args.prompts)) if args.prompts else []
    except (OSError, ValueError, KeyError) as error:
        print(f"kprism batch: error: {error}", file=sys.stderr)
        return 2
    for source, target in todo:
        started, existing = time.time(), _node_ids(scene)
        try:
            volume = read_volume(scene, source)
            segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{stem(source)} KPrism")
            segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
            prompts = resolve_prompts(scene, prompt_items, volume)
            written = logic.segment(volume, segmentation, args.mode, classes=args.class_list, references=references,
                                    prompts=prompts, modality=args.modality, axis=args.axis)
            write_output(scene, segmentation, volume, target)
            print(f"{source.name}: {', '.join(written)} → {target} ({time.time() - started:.1f} s)", flush=True)
        except KPrismUnavailable as error:
            print(f"kprism batch: error: {error}", file=sys.stderr)
            return 2
        except Exception as error:  # one bad input must not stop the batch
            failures += 1
            print(f"{source.name}: FAILED: {error}", file=sys.stderr, flush=True)
        finally:  # free this input's nodes (volume, segmentation, scribbles)
            for node_id in _node_ids(scene) - existing:
                node = scene.GetNodeByID(node_id)
                if node is not None:
                    scene.RemoveNode(node)
    print(f"kprism batch: {len(todo) - failures} written, {failures} failed", flush=True)
    return 1 if failures else 0


def _exit(code: int) -> None:
    from KPrismSlicerLib.nodes import app_running

    if app_running():
        import slicer

        slicer.util.exit(code)
    else:
        sys.exit(code)


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _exit(main())
