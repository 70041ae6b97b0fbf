"""GUI-thread time per interactive click in Slicer, measured on real MRML (slicer-core) with the model worker.

    OMP_WAIT_POLICY=PASSIVE nice -n 10 python benchmarks/slicer_gui.py [--clicks 10] [--out benchmarks/results]

A 512×512×300 synthetic CT volume node (int16, an ellipsoid organ in noisy soft tissue) and a
segmentation node; an interactive session created with ``start=False`` as the module panel does.
Each click goes the way the panel sends it: ``session.prepare`` (GUI thread: reads the point,
checks it), ``prepared.compute`` on the `ModelWorker` thread (the model), ``session.finish`` (GUI
thread: writes the changed box of the segment and the provenance). GUI time = prepare + finish,
the time Slicer cannot repaint or take input; total = from the click to its result being written.
The first click also reads the volume and encodes it (reported apart). Target: GUI p50 ≤ 50 ms.
Writes slicer_gui.md and slicer_gui.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "KPrismSlicer"))  # KPrismSlicerLib, as Slicer puts it on the path

from kprism.atomic import write_atomically  # noqa: E402
from kprism.evaluate.metrics import percentiles  # noqa: E402

SHAPE = (300, 512, 512)  # (k, j, i): 300 axial slices of 512×512
SPACING = (0.8, 0.8, 2.0)
CENTRE, RADII = (256, 240, 150), (90, 70, 24)  # (i, j, k) voxels: a liver-sized ellipsoid over 49 slices
TARGET_GUI_P50_MS = 50.0


def synthetic_ct(seed: int = 0) -> np.ndarray:
    """int16 HU: noisy soft tissue (40 ± 15) around a brighter ellipsoid organ (110 ± 10), air outside a body disc."""
    rng = np.random.default_rng(seed)
    k, j, i = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    volume = rng.normal(40, 15, SHAPE).astype(np.int16)
    organ = sum(((axis - c) / r) ** 2 for axis, c, r in zip((i, j, k), CENTRE, RADII)) <= 1
    volume[organ] = rng.normal(110, 10, int(organ.sum())).astype(np.int16)
    body = ((i - 256) / 240) ** 2 + ((j - 256) / 200) ** 2 <= 1
    volume[~np.broadcast_to(body, SHAPE)] = -1000
    return volume


def clicks(count: int) -> list[tuple[list[float], bool]]:
    """IJK clicks: the first inside the organ's middle slice, then corrections inside and just outside it."""
    rng = np.random.default_rng(1)
    out = [([CENTRE[0], CENTRE[1], CENTRE[2]], True)]
    while len(out) < count:
        positive = len(out) % 2 == 1
        scale = rng.uniform(0.2, 0.7) if positive else rng.uniform(1.05, 1.3)
        angle, dk = rng.uniform(0, 2 * np.pi), int(rng.integers(-RADII[2] // 2, RADII[2] // 2))
        out.append(([CENTRE[0] + scale * RADII[0] * np.cos(angle), CENTRE[1] + scale * RADII[1] * np.sin(angle),
                     CENTRE[2] + dk], positive))
    return out


def run(count: int) -> dict:
    import slicer

    from KPrismSlicerLib import nodes
    from KPrismSlicerLib.logic import KPrismLogic, Prompt
    from KPrismSlicerLib.worker import ModelWorker

    scene = nodes.headless_scene(new=True)
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "synthetic CT")
    volume.SetSpacing(*SPACING)
    slicer.util.updateVolumeFromArray(volume, synthetic_ct())
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    logic, worker = KPrismLogic(device="cpu", threads=torch.get_num_threads()), ModelWorker()
    session = logic.interactive(volume, segmentation, start=False)
    matrix = nodes.ijk_to_ras_matrix(volume)

    rows = []
    for n, (ijk, positive) in enumerate(clicks(count)):
        ras = (matrix @ [*ijk, 1.0])[:3]
        started = time.perf_counter()
        prepared = session.prepare(Prompt.point(ras, positive))
        prepared_at = time.perf_counter()
        job = worker.submit(prepared.label, prepared.compute, lambda delta: None)
        worker.wait()
        computed_at = time.perf_counter()
        if job.error is not None:
            raise job.error
        result = session.finish(prepared, job.result)
        finished = time.perf_counter()
        worker.deliver()
        rows.append({"click": n, "positive": positive, "prepare_ms": 1e3 * (prepared_at - started),
                     "compute_ms": 1e3 * (computed_at - prepared_at), "finish_ms": 1e3 * (finished - computed_at),
                     "gui_ms": 1e3 * ((prepared_at - started) + (finished - computed_at)),
                     "total_ms": 1e3 * (finished - started), "voxels": result.voxels,
                     "written_box_voxels": int(np.prod([s.stop - s.start for s in result.region])),
                     "slices": len(result.slices)})
    undo_started = time.perf_counter()
    prepared = session.prepare_undo()
    undo_prepared = time.perf_counter()
    delta = prepared.compute()
    undo_computed = time.perf_counter()
    session.finish(prepared, delta)
    undo_gui = (undo_prepared - undo_started) + (time.perf_counter() - undo_computed)
    later = [r for r in rows[1:]]
    return {
        "volume": {"shape_kji": list(SHAPE), "spacing": list(SPACING), "dtype": "int16"},
        "clicks": rows,
        "first_click": rows[0],
        "gui_ms": percentiles([r["gui_ms"] for r in later]),
        "prepare_ms": percentiles([r["prepare_ms"] for r in later]),
        "finish_ms": percentiles([r["finish_ms"] for r in later]),
        "total_ms": percentiles([r["total_ms"] for r in later]),
        "gui_ms_all_clicks": percentiles([r["gui_ms"] for r in rows]),
        "undo_gui_ms": 1e3 * undo_gui,
        "target_gui_p50_ms": TARGET_GUI_P50_MS,
        "meets_target": percentiles([r["gui_ms"] for r in later])["p50"] <= TARGET_GUI_P50_MS,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__},
    }


def markdown(report: dict) -> str:
    first, g, t = report["first_click"], report["gui_ms"], report["total_ms"]
    lines = [
        "# GUI-thread time per click in Slicer (slicer-core, model on the worker thread)",
        "",
        f"Volume {report['volume']['shape_kji'][2]}×{report['volume']['shape_kji'][1]}×{report['volume']['shape_kji'][0]} "
        f"int16 (synthetic CT), {report['machine']['cores']} cores, torch {report['machine']['torch']} on "
        f"{report['machine']['torch_threads']} thread(s). Produced by `benchmarks/slicer_gui.py`.",
        "",
        "GUI time = `session.prepare` + `session.finish` (Slicer cannot repaint meanwhile); total = click → segment written.",
        "",
        "| clicks 2–N | p50 | p95 |",
        "|---|---|---|",
        f"| GUI thread (target ≤ {report['target_gui_p50_ms']:.0f} ms p50) | {g['p50']:.1f} ms | {g['p95']:.1f} ms |",
        f"| of which prepare | {report['prepare_ms']['p50']:.1f} ms | {report['prepare_ms']['p95']:.1f} ms |",
        f"| of which finish (write the changed box) | {report['finish_ms']['p50']:.1f} ms | {report['finish_ms']['p95']:.1f} ms |",
        f"| total click (worker compute included) | {t['p50']:.0f} ms | {t['p95']:.0f} ms |",
        "",
        f"First click (reads the volume and the segment, encodes on the worker, travels through the organ): GUI "
        f"{first['gui_ms']:.0f} ms (prepare {first['prepare_ms']:.0f} ms, finish {first['finish_ms']:.0f} ms), total "
        f"{first['total_ms'] / 1e3:.1f} s, {first['slices']} slices written. Undo: GUI {report['undo_gui_ms']:.1f} ms.",
        "",
        f"Target met: {'yes' if report['meets_target'] else 'NO'}.",
        "",
        "| click | positive | prepare ms | compute ms | finish ms | GUI ms | total ms | slices | box written (voxels) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["clicks"]:
        lines.append(f"| {r['click']} | {r['positive']} | {r['prepare_ms']:.1f} | {r['compute_ms']:.0f} | {r['finish_ms']:.1f} | "
                     f"{r['gui_ms']:.1f} | {r['total_ms']:.0f} | {r['slices']} | {r['written_box_voxels']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clicks", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = run(args.clicks)
    args.out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2) + "\n"
    write_atomically(args.out / "slicer_gui.json", lambda temporary: temporary.write_text(text, encoding="utf-8"))
    page = markdown(report)
    write_atomically(args.out / "slicer_gui.md", lambda temporary: temporary.write_text(page, encoding="utf-8"))
    print(page)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
