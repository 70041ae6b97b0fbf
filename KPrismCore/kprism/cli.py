"""The `kprism` command line: segment, demo, models, train."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .messages import one_line, one_line_warnings


def _add_segment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("segment", help="Segment an image or volume with classes, references and/or prompts.",
                       description="Segment IMAGE and write the result to OUT (.nii.gz, .nrrd, .mha, .png or .seg.nrrd). "
                                   "Combine --classes or --reference (what) with --prompts and --init-mask (where).")
    p.add_argument("image", help="2D image (PNG/JPG/TIFF), 3D volume (NIfTI/NRRD/MHA) or a DICOM series folder")
    p.add_argument("--out", required=True, help="output label map or Slicer segmentation (.seg.nrrd)")
    p.add_argument("--classes", help="comma-separated class names (semantic); see `kprism models list`")
    p.add_argument("--reference", nargs=2, action="append", metavar=("IMAGE", "MASK"),
                   help="an in-context example: an image and a mask of the structure (repeatable)")
    p.add_argument("--reference-label", type=int, metavar="VALUE",
                   help="which label of a multi-label reference mask marks the structure (required for such masks)")
    p.add_argument("--prompts", help="prompts.json with points, boxes and scribbles (schema in the README)")
    p.add_argument("--init-mask", help="a mask to refine (on the image grid, or resampled onto it)")
    p.add_argument("--modality", help="ct, mri, x-ray, ultrasound, ... (default: the DICOM tag, else inferred from the "
                                      "intensities: Hounsfield-like values are CT, anything else is normalised by percentiles)")
    p.add_argument("--axis", type=int, default=0, help="3D slicing axis of the LPS view: 0 axial (default), 1 coronal, 2 sagittal")
    p.add_argument("--propagate", action="store_true",
                   help="3D: carry the result on the last prompted slice through the neighbouring slices")
    p.add_argument("--cross-axes", action="store_true",
                   help="with --propagate: propagate again along the other two axes and average (about 3× the time)")
    p.add_argument("--engine", default="auto", choices=["auto", "one_pass", "prompted"],
                   help="--classes: 'one_pass' = the class head, every class from one pass per slice (seconds for a whole "
                        "CT; says 'absent' for classes not in the image); 'prompted' = one decoder pass per class token; "
                        "'auto' = one_pass when the model has the head")
    p.add_argument("--name", default="segment", help="segment name for in-context / interactive results")
    p.add_argument("--overlay", help="also write a PNG quick look here")
    _add_runtime(p)


def _add_runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model name or .safetensors path (default: the bundled kprism-tiny)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--threads", type=_positive_int("--threads"), help="CPU threads (default: 2 at most)")
    p.add_argument("--debug", action="store_true", help="on an unexpected error, print the full traceback")


def _positive_int(option: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(f"{option} must be a positive whole number, got {text!r}")
        return value

    return parse


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="kprism", description="K-Prism medical image segmentation: semantic, in-context and interactive.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_segment(sub)
    demo = sub.add_parser("demo", help="Run all three modes on the bundled sample cases and write an overview PNG.")
    demo.add_argument("--out", default="kprism-demo", help="output folder (default: ./kprism-demo)")
    _add_runtime(demo)
    models = sub.add_parser("models", help="List, verify or download known models.")
    models_sub = models.add_subparsers(dest="action", required=True)
    models_sub.add_parser("list", help="known models, where each is found, and its classes")
    verify = models_sub.add_parser("verify", help="check a model file's hash and that it loads strictly")
    verify.add_argument("model", nargs="?", default=None, help="name or path (default: kprism-tiny)")
    download = models_sub.add_parser("download", help="download a model into the Hugging Face cache (needs network)")
    download.add_argument("name")
    evaluate = sub.add_parser("eval", help="Score a model on nnU-Net datasets (imagesTs/labelsTs, else imagesTr).")
    evaluate.add_argument("--dataset", action="append", required=True, help="dataset folder (repeatable)")
    evaluate.add_argument("--mode", default="all",
                          choices=["semantic", "onepass", "incontext", "interactive", "scribble", "chained", "all"],
                          help="all = every mode the model supports (onepass needs its class head); chained = semantic "
                               "or in-context first, then clicks; with --protocol cvpr25: interactive (3D box, then "
                               "clicks), chained, or all (both)")
    evaluate.add_argument("--protocol", default="kprism", choices=["kprism", "ritm", "cvpr25"],
                          help="kprism / ritm: 2D per-slice with that click rule; cvpr25: 3D box + 5 clicks per structure, "
                               "each click on the largest 3D error, in the view that shows it widest")
    evaluate.add_argument("--clicks", type=_positive_int("--clicks"),
                          help="clicks per target (default 20; 5 with --protocol cvpr25)")
    evaluate.add_argument("--references", default="1,2", help="in-context reference counts, e.g. 1,2")
    evaluate.add_argument("--max-cases", type=int, help="evaluate only the first N cases of each dataset")
    evaluate.add_argument("--case", action="append", metavar="DATASET/CASE",
                          help="evaluate only this case of that dataset, from any split (repeatable), e.g. a case "
                               "held out of a model's training: Dataset006_TotalSegCT/ts_ct_002")
    evaluate.add_argument("--max-slices", type=int, default=5, help="labelled slices per label and volume (default 5)")
    evaluate.add_argument("--json", help="write the summary (and per-item scores) here")
    evaluate.add_argument("--report", help="write report.md and click-curve plots into this folder")
    evaluate.add_argument("--compare", help="an earlier --json report of the cvpr25 protocol: report.md gives its numbers beside these")
    _add_runtime(evaluate)
    train = sub.add_parser("train", help="Train a model from a YAML or JSON config (see configs/).")
    train.add_argument("config")
    args = parser.parse_args(argv)
    commands = {"segment": _segment, "demo": _demo, "models": _models, "eval": _eval, "train": _train}
    with one_line_warnings("kprism"):
        try:
            return commands[args.command](args)
        except KeyboardInterrupt:
            print("kprism: interrupted; no output was written partially.", file=sys.stderr)
            return 130
        except (ValueError, OSError, RuntimeError) as error:  # kprism's own errors name the input and the fix
            print(f"kprism: error: {one_line(error)}", file=sys.stderr)
            _print_traceback(args)
            return 1
        except Exception as error:  # anything else: one line naming the input, the traceback only on request
            from .extras import missing_optional_line

            missing = missing_optional_line(error, args.command)
            if missing:  # training/evaluation/plot packages are extras
                print(f"kprism: error: {missing}", file=sys.stderr)
                return 1
            where = getattr(args, "image", None) or getattr(args, "config", None) or args.command
            print(f"kprism: error: {where}: unexpected {type(error).__name__}: {one_line(error)} "
                  "(run with --debug for details)", file=sys.stderr)
            _print_traceback(args)
            return 1


def _print_traceback(args: argparse.Namespace) -> None:
    if getattr(args, "debug", False):
        import traceback

        traceback.print_exc()




def _session(args: argparse.Namespace):
    from .session import KPrismSession

    return KPrismSession(args.model, device=args.device, threads=args.threads)


def _segment(args: argparse.Namespace) -> int:
    """Parse the arguments into a request, run it through the pipeline, write the result."""
    from .io import check_output_path, read_image, render_overlay, write_output
    from .pipeline import run

    check_output_path(args.out, args.image)  # fail before any work
    if args.overlay:
        check_output_path(args.overlay, args.image, suffixes=(".png",))
    request = _segmentation_request(args)
    image = read_image(args.image, modality=args.modality)
    check_output_path(args.out, args.image, ndim=image.ndim)
    session = _session(args)
    request.check_classes(session.catalog)  # unknown names fail before the image is prepared
    session.set_image(image, axis=args.axis)
    print(f"modality: {session.modality_choice}")
    outcome = run(request, session, progress=_progress_printer("segmenting") if image.ndim == 3 else None)
    provenance = {"model": str(args.model or "kprism-tiny"), "modality": session.modality_choice.modality,
                  **outcome.provenance}
    labels = outcome.labels()
    written = write_output(labels, image.geometry, args.out, segments=_segments(outcome, session.catalog, provenance),
                           source_path=args.image)
    for value, (name, quality) in enumerate(zip(outcome.names, outcome.qualities), start=1):
        print(_result_line(name, int(np.count_nonzero(labels == value)), quality, outcome.quality_kind))
    print(f"wrote {written}")
    if args.overlay:
        print(f"wrote {render_overlay(image, labels, args.overlay, title=', '.join(outcome.names))}")
    return 0


def _segmentation_request(args: argparse.Namespace):
    """The command line as a checked request (before any file is read); the prompt file is parsed here."""
    from .pipeline import CLI_NAMES, ReferenceFiles, SegmentationRequest
    from .prompt_file import load_prompt_file

    if args.reference_label is not None and not args.reference:
        raise ValueError("--reference-label picks a label of a --reference mask: give --reference IMAGE MASK too.")
    return SegmentationRequest(
        classes=args.classes.split(",") if args.classes else (),
        references=[ReferenceFiles(image, mask, args.reference_label) for image, mask in args.reference or []],
        prompts=load_prompt_file(args.prompts) if args.prompts else None,
        init_mask=args.init_mask, propagate=args.propagate, cross_axes=args.cross_axes, engine=args.engine,
        axis=args.axis, name=args.name, names=CLI_NAMES,
        provenance={key: value for key, value in (("references", [list(r) for r in args.reference or []]),
                                                  ("init_mask", args.init_mask), ("prompts", args.prompts)) if value},
    )


def _segments(outcome, catalog, provenance: dict) -> list[dict]:
    """Segment descriptions of the label map: value i+1 is the i-th name, coloured from the catalog."""
    tags = {"KPrism.Provenance": json.dumps(provenance)}
    return [{"name": name, "value": value, "tags": tags,
             "color": catalog.entry(name).color if name in catalog else (241, 214, 145)}
            for value, name in enumerate(outcome.names, start=1)]


def _result_line(name: str, voxels: int, quality: float, measure: str) -> str:
    if voxels == 0:
        return f"{name}: not found (0 voxels)"
    if quality != quality:  # NaN: the session distrusts the result and has warned why
        return f"{name}: {voxels} voxels, {measure} unknown (not trusted, see the warning)"
    return f"{name}: {voxels} voxels, {measure} {quality:.2f}"


def _progress_printer(what: str):
    from tqdm.auto import tqdm

    bar: dict = {}

    def update(done: int, total: int) -> None:
        if "bar" not in bar:
            bar["bar"] = tqdm(total=total, desc=what, unit="slice")
        bar["bar"].n = done
        bar["bar"].refresh()
        if done >= total:
            bar["bar"].close()

    return update


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), _session(args))
    return 0


def _models(args: argparse.Namespace) -> int:
    from . import weights

    if args.action == "list":
        for info in weights.load_manifest():
            try:
                where = str(weights.resolve_weights(info.name))
            except weights.WeightsError:
                where = "not available offline (kprism models download " + info.name + ")"
            print(f"{info.name}: {info.description}\n  file: {where}\n  licence: {info.licence}\n"
                  f"  input: {info.input_size} px; classes ({len(info.classes)}): {', '.join(info.classes)}")
        return 0
    if args.action == "verify":
        ok, message = weights.verify_model(args.model or weights.DEFAULT_MODEL)
        print(message)
        return 0 if ok else 1
    print(f"downloaded to {weights.download_model(args.name)}")
    return 0


def _chosen_cases(values: Optional[list[str]]) -> dict[str, list[str]]:
    """--case DATASET/CASE values → {dataset name: [case ids]}."""
    chosen: dict[str, list[str]] = {}
    for value in values or []:
        dataset, _, case = value.partition("/")
        if not dataset or not case:
            raise ValueError(f"--case takes DATASET/CASE, e.g. Dataset006_TotalSegCT/ts_ct_002; got {value!r}.")
        chosen.setdefault(dataset, []).append(case)
    return chosen


def _eval(args: argparse.Namespace) -> int:
    from .data.nnunet_v2 import load_dataset
    from .evaluate.protocols import MODES, Timings, evaluate_dataset, summarise
    from .evaluate.volumetric import CLICKS, VOLUME_MODES, evaluate_volumes, summarise_volumes

    volumetric = args.protocol == "cvpr25"
    if volumetric and args.mode not in (*VOLUME_MODES, "all"):
        raise ValueError(f"--protocol cvpr25 scores --mode {', '.join(VOLUME_MODES)} or all, not {args.mode}.")
    if args.compare and not (volumetric and args.report):
        raise ValueError("--compare puts an earlier cvpr25 report beside this one: give --protocol cvpr25 and --report too.")
    # Read before anything is written: --compare may name the very file --json replaces.
    previous = json.loads(Path(args.compare).read_text(encoding="utf-8")) if args.compare else None
    clicks = args.clicks or (CLICKS if volumetric else 20)
    session = _session(args)
    has_head = session.model.class_head is not None
    if volumetric:
        modes = VOLUME_MODES if args.mode == "all" else (args.mode,)
    else:
        modes = tuple(m for m in MODES if m != "onepass" or has_head) if args.mode == "all" else (args.mode,)
    report: dict = {"model": str(args.model or "kprism-tiny"), "protocol": args.protocol, "clicks": clicks, "datasets": {}}
    chosen = _chosen_cases(args.case)
    datasets = [load_dataset(folder) for folder in args.dataset]
    stray = sorted(set(chosen) - {d.name for d in datasets})
    if stray:
        raise ValueError(f"--case names {', '.join(stray)}, which is not among the --dataset folders.")
    for dataset in datasets:
        case_ids = chosen.get(dataset.name)
        if args.protocol == "cvpr25":
            volumes = evaluate_volumes(session, dataset, max_cases=args.max_cases, modes=modes, clicks=clicks, case_ids=case_ids,
                                       progress=lambda what: print(f"  {what}", file=sys.stderr))
            report["datasets"][dataset.name] = {"split": ", ".join(case_ids) if case_ids else dataset.evaluation_split(), "modes": summarise_volumes(volumes),
                                                "items": [vars(v) for v in volumes]}
            print(f"{dataset.name}: " + json.dumps(report["datasets"][dataset.name]["modes"]))
            continue
        timings = Timings()
        items = evaluate_dataset(session, dataset, modes, rule=args.protocol, max_clicks=clicks,
                                 references=[int(r) for r in args.references.split(",")], max_cases=args.max_cases,
                                 max_slices_per_label=args.max_slices, timings=timings, case_ids=case_ids,
                                 progress=lambda what: print(f"  {what}", file=sys.stderr))
        summary = summarise(items, timings)
        report["datasets"][dataset.name] = {"split": ", ".join(case_ids) if case_ids else dataset.evaluation_split(), "modes": summary,
                                            "items": [vars(i) for i in items]}
        print(f"{dataset.name}: " + json.dumps({m: round(v["dice_mean"], 4) for m, v in summary.items()}))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    if args.report:
        from .evaluate.report import write_report, write_volume_report

        if volumetric:
            print(f"wrote {write_volume_report(report, Path(args.report), previous)}")
        else:
            print(f"wrote {write_report(report, Path(args.report))}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from .train.trainer import Trainer, load_config

    path = Trainer(load_config(args.config)).fit()
    if path is not None:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
