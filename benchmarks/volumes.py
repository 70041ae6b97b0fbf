"""3D quality from one annotated slice: propagation vs that slice alone vs GrowCut, same clicks.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/volumes.py --datasets ../shared/datasets --out benchmarks/results

For each CT and MR structure (default: liver, spleen, both kidneys) in the shared 3D datasets: five
clicks by the K-Prism rule on the structure's largest axial slice, answered by our model; then
(a) that slice alone, (b) our propagation from it, (b') the same followed by cross-axis re-propagation and
averaging, and (c) Slicer's GrowCut in 3D with the very same
click positions, each scored by volumetric Dice against the whole structure. Writes volumes.md/json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

from kprism.data.interaction import dice  # noqa: E402
from kprism.data.nnunet_v2 import load_dataset  # noqa: E402
from kprism.evaluate.peers.growcut import GrowCutSession3D  # noqa: E402
from kprism.evaluate.protocols import click_source_slice  # noqa: E402
from kprism.session import KPrismSession  # noqa: E402

DATASETS = ["Dataset006_TotalSegCT", "Dataset007_TotalSegMR"]
STRUCTURES = ["liver", "spleen", "kidney_left", "kidney_right"]
CLICKS = 5


def one_structure(session: KPrismSession, volume: np.ndarray, truth: np.ndarray) -> dict:
    """Five clicks on the largest axial slice (array axis 0), then the three ways to 3D."""
    k = int(np.argmax(truth.sum(axis=(1, 2))))
    session.reset()
    clicks = [(k, *c.point, c.positive) for c in click_source_slice(session, truth, k, CLICKS)]
    single = session.result().mask > 0
    prediction = single[k]
    start_slice = session.locate([clicks[0][2], clicks[0][1], k])[0]
    start = time.perf_counter()
    propagated = session.propagate(start_slice).mask > 0
    propagate_s = time.perf_counter() - start
    session.undo()
    start = time.perf_counter()
    fused = session.propagate(start_slice, cross_axes=True).mask > 0
    fused_s = time.perf_counter() - start
    growcut = GrowCutSession3D(volume)
    start = time.perf_counter()
    for kk, row, col, positive in clicks:
        grown = growcut.add_click(kk, row, col, positive)
    growcut_s = time.perf_counter() - start
    return {"slice_dice": dice(prediction, truth[k]), "single_slice": dice(single, truth), "propagated": dice(propagated, truth),
            "cross_axes": dice(fused, truth), "growcut": dice(grown, truth), "clicks": len(clicks), "propagate_s": propagate_s,
            "cross_axes_s": fused_s, "growcut_s": growcut_s,
            "slices_with_structure": int(truth.any(axis=(1, 2)).sum()), "slices_propagated": int(propagated.any(axis=(1, 2)).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", required=True, type=Path)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), type=Path)
    parser.add_argument("--model")
    args = parser.parse_args()
    session = KPrismSession(args.model, device="cpu")
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
    (args.out / "volumes.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    lines = ["# From one clicked slice to 3D", "",
             f"{CLICKS} K-Prism-rule clicks on each structure's largest axial slice, then volumetric Dice of: that slice alone, "
             "our propagation from it (along the axial axis; then also re-propagated along the coronal and sagittal axes and averaged: "
             "`cross_axes`), and Slicer's GrowCut in 3D with the same click positions. Reproduce: "
             "`.venv/bin/python benchmarks/volumes.py --datasets ../shared/datasets`.", "",
             "| dataset | case | structure | slices | slice Dice | 3D: slice alone | 3D: propagated | 3D: + cross axes | 3D: GrowCut | propagate s | + cross axes s | GrowCut s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['dataset'].split('_', 1)[1]} | {r['case']} | {r['structure']} | {r['slices_with_structure']} | {r['slice_dice']:.3f} | "
                     f"{r['single_slice']:.3f} | {r['propagated']:.3f} | {r['cross_axes']:.3f} | {r['growcut']:.3f} | {r['propagate_s']:.1f} | "
                     f"{r['cross_axes_s']:.1f} | {r['growcut_s']:.1f} |")
    if rows:
        lines.append(f"| mean | | | | {np.mean([r['slice_dice'] for r in rows]):.3f} | {np.mean([r['single_slice'] for r in rows]):.3f} | "
                     f"{np.mean([r['propagated'] for r in rows]):.3f} | {np.mean([r['cross_axes'] for r in rows]):.3f} | "
                     f"{np.mean([r['growcut'] for r in rows]):.3f} | | | |")
    (args.out / "volumes.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
