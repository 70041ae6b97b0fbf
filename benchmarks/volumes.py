"""3D quality from clicks on one slice: that slice alone, propagation, the clicks' own travel, GrowCut.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/volumes.py --datasets ../shared/datasets --out benchmarks/results

For each CT and MR structure (default: liver, spleen, both kidneys) in the shared 3D datasets: five
clicks by the K-Prism rule on the structure's largest axial slice, each placed on that slice's largest
error and answered by our model, through the one click loop (`kprism.data.interaction.click_loop`).
Then, by volumetric Dice against the whole structure:
(a) the clicks kept to their slice (`propagate=False`): that slice alone, (b) our propagation from it
along the axial axis, (b') the same followed by re-propagation along the coronal and sagittal axes,
averaged, (c) Slicer's GrowCut in 3D with the very same click positions, and (d) the 3D interaction a
user now gets: the same rule's clicks, each travelling through the volume by itself (after 1 and after
5 clicks), with the default travel rules and (d') after one click with the first-step stop rules relaxed
(`WHAT_IF_RULES`: no quality stop, growth up to 4× the previous slice's area).
Writes volumes.md/json; the text compares the means with the previous volumes.json in the folder.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

from kprism.data.interaction import Click, click_loop, dice  # noqa: E402
from kprism.data.nnunet_v2 import load_dataset  # noqa: E402
from kprism.evaluate.clickers import SliceClicker, source_slice  # noqa: E402
from kprism.evaluate.peers.growcut import GrowCutSession3D  # noqa: E402
from kprism.session import KPrismSession  # noqa: E402
from kprism.target import Target, TravelRules  # noqa: E402

DATASETS = ["Dataset006_TotalSegCT", "Dataset007_TotalSegMR"]
STRUCTURES = ["liver", "spleen", "kidney_left", "kidney_right"]
CLICKS = 5
# The two stop rules that end most one-click runs on their first step: an under-segmented clicked slice
# makes its neighbours "grow like a leak", and the quality head rates them low although they are right.
WHAT_IF_RULES = TravelRules(min_quality=0.0, max_area_ratio=4.0)
COLUMNS = [  # (json key, table heading, digits)
    ("slice_dice", "slice Dice", 3), ("single_slice", "3D: slice alone", 3), ("propagated", "3D: propagated", 3),
    ("cross_axes", "3D: + cross axes", 3), ("growcut", "3D: GrowCut", 3), ("travel_1", "3D: 1 click travels", 3),
    ("travel_5", "3D: 5 clicks travel", 3), ("travel_1_what_if", "3D: 1 click, relaxed stops", 3),
    ("propagate_s", "propagate s", 1), ("cross_axes_s", "+ cross axes s", 1), ("growcut_s", "GrowCut s", 1),
]


def one_structure(session: KPrismSession, volume: np.ndarray, truth: np.ndarray) -> dict:
    """Five clicks on the largest axial slice (array axis 0), then every way to 3D."""
    k = int(np.argmax(truth.sum(axis=(1, 2))))
    axis, index = source_slice(session.view, 0, k)
    if axis != session.axis:  # the facade's propagate slices along the session axis
        raise ValueError(f"Source array axis 0 is canonical axis {axis}; this benchmark needs axially stored volumes.")
    target = session.new_target()
    clicker = SliceClicker(target, axis, index, propagate=False)
    slice_truth = clicker.truth_of(truth)
    kept = click_loop(clicker, slice_truth, "kprism", CLICKS)
    single = target.result().mask > 0
    session.target = target  # the facade's propagate runs on this target
    start = time.perf_counter()
    propagated = session.propagate(index).mask > 0
    propagate_s = time.perf_counter() - start
    session.undo()
    start = time.perf_counter()
    fused = session.propagate(index, cross_axes=True).mask > 0
    fused_s = time.perf_counter() - start
    growcut, growcut_s = _growcut(volume, [_source_click(clicker, c) for c in kept.clicks])
    travel = _travelling(session, truth, axis, index, Target(session.encoded), CLICKS)
    what_if = _travelling(session, truth, axis, index, Target(session.encoded, rules=WHAT_IF_RULES), 1)
    return {"slice_dice": kept.dice[-1], "single_slice": dice(single, truth), "propagated": dice(propagated, truth),
            "cross_axes": dice(fused, truth), "growcut": dice(growcut, truth), "travel_1": travel[0], "travel_5": travel[-1],
            "travel_curve": travel, "travel_1_what_if": what_if[0], "clicks": len(kept.clicks), "propagate_s": propagate_s,
            "cross_axes_s": fused_s, "growcut_s": growcut_s,
            "slices_with_structure": int(truth.any(axis=(1, 2)).sum()), "slices_propagated": int(propagated.any(axis=(1, 2)).sum())}


def _source_click(clicker: SliceClicker, click: Click) -> tuple[int, int, int, bool]:
    """A click on the clicker's canonical slice → (k, j, i, positive) in the source array."""
    i, j, k = (int(round(v)) for v in clicker.source_ijk(*click.point))
    return k, j, i, click.positive


def _growcut(volume: np.ndarray, clicks: list[tuple[int, int, int, bool]]) -> tuple[np.ndarray, float]:
    growcut = GrowCutSession3D(volume)
    start = time.perf_counter()
    for k, j, i, positive in clicks:
        grown = growcut.add_click(k, j, i, positive)
    return grown, time.perf_counter() - start


def _travelling(session: KPrismSession, truth: np.ndarray, axis: int, index: int, target: Target, clicks: int) -> list[float]:
    """The same rule's clicks on the same slice, each travelling through the volume: 3D Dice after each click."""
    clicker = SliceClicker(target, axis, index, propagate=None)
    in_3d: list[float] = []

    def answer(click: Click) -> np.ndarray:
        prediction = clicker(click)
        in_3d.append(dice(target.result().mask > 0, truth))
        return prediction

    click_loop(answer, clicker.truth_of(truth), "kprism", clicks)
    return in_3d + in_3d[-1:] * (clicks - len(in_3d))  # a slice made exact early: later clicks change nothing


def markdown(rows: list[dict], before: list[dict]) -> str:
    lines = ["# From clicks on one slice to 3D", "",
             f"{CLICKS} K-Prism-rule clicks on each structure's largest axial slice (each on that slice's largest error, "
             "through the one click loop), then volumetric Dice of: the clicks kept to their slice (`slice alone`), our "
             "propagation from that slice along the axial axis (`propagated`; then also re-propagated along the coronal "
             "and sagittal axes and averaged: `+ cross axes`), Slicer's GrowCut in 3D with the same click positions, and "
             "the 3D interaction itself: the same rule's clicks, each travelling through the volume from its slice "
             "(`1 click travels`, `5 clicks travel`; default travel rules), and one click with relaxed stop rules "
             f"(`relaxed stops`: `TravelRules(min_quality={WHAT_IF_RULES.min_quality}, max_area_ratio={WHAT_IF_RULES.max_area_ratio})`, "
             "a what-if for the travel rules). Reproduce: "
             "`.venv/bin/python benchmarks/volumes.py --datasets ../shared/datasets`.", ""]
    lines += _comparison(rows, before) + [""]
    lines += ["| dataset | case | structure | slices | " + " | ".join(h for _, h, _ in COLUMNS) + " |",
              "|---|---|---|---:|" + "---:|" * len(COLUMNS)]
    for r in rows:
        lines.append(f"| {r['dataset'].split('_', 1)[1]} | {r['case']} | {r['structure']} | {r['slices_with_structure']} | "
                     + " | ".join(f"{r[key]:.{digits}f}" for key, _, digits in COLUMNS) + " |")
    if rows:
        lines.append("| mean | | | | " + " | ".join(f"{np.mean([r[key] for r in rows]):.3f}" if digits == 3 else ""
                                                   for key, _, digits in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def _comparison(rows: list[dict], before: list[dict]) -> list[str]:
    """Means of this run beside the previous one (the volumes.json this run replaces), and the one-click liver."""
    text = []
    shared = [(key, heading) for key, heading, digits in COLUMNS if digits == 3 and before and all(key in r for r in before)]
    if shared:
        changes = ", ".join(f"{heading} {np.mean([r[key] for r in before]):.3f} → {np.mean([r[key] for r in rows]):.3f}"
                            for key, heading in shared)
        text.append(f"Means, previous run → this run ({len(before)} → {len(rows)} structures): {changes}.")
    livers = [r for r in rows if r["structure"] == "liver"]
    if livers:
        text.append("The liver from one click in 3D, default rules (relaxed stops): "
                    + "; ".join(f"{r['dataset'].split('_', 1)[1]} {r['case']} {r['travel_1']:.3f} ({r['travel_1_what_if']:.3f})"
                                for r in livers) + ".")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", required=True, type=Path)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), type=Path)
    parser.add_argument("--model")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    session = KPrismSession(args.model, device="cpu", threads=args.threads)
    previous = args.out / "volumes.json"
    before = json.loads(previous.read_text(encoding="utf-8")) if previous.exists() else []
    rows = []
    for name in DATASETS:
        dataset = load_dataset(args.datasets / name)
        for case in dataset.cases("train"):
            image, labels = dataset.load(case)
            session.set_image(image)
            for structure in STRUCTURES:
                value = dataset.labels.get(structure)
                if value is None or not (labels == value).any():
                    continue
                row = {"dataset": name, "case": case.case_id, "structure": structure,
                       **one_structure(session, image.array.astype(np.float32), labels == value)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    previous.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    text = markdown(rows, before)
    (args.out / "volumes.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
