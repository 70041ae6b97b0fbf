"""Our model and its peers on the same 2D test cases with the same prompts, in one run.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/peers.py --datasets ../shared/datasets --out benchmarks/results \
        [--clicks 20] [--unet-steps 700 | --unet-seconds 600] [--unet-only] [--max-cases N] [--model FILE]

Per dataset (the 2D sets with an imagesTs split) and per label:
- interactive: our session and Slicer's GrowCut, each clicked by the K-Prism rule on its own errors;
- box: LiteMedSAM with the tight ground-truth box (our model's 5-click Dice is the comparison);
- in-context: our model and SimpleITK registration label transfer from the same reference case;
- semantic: our model and a MONAI UNet specialist trained on the dataset's training split for
  `--unet-steps` (or `--unet-seconds`; 0 = skip, PEERS.md then gives the reference numbers).
Writes peers.json, peers.md and peers_dice_vs_clicks.png.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kprism.data.interaction import box_from_mask, click_loop, dice  # noqa: E402
from kprism.data.nnunet_v2 import load_dataset  # noqa: E402
from kprism.evaluate.clickers import timed  # noqa: E402
from kprism.evaluate.metrics import noc, percentiles  # noqa: E402
from kprism.evaluate.protocols import ReferencePicker, Timings, evaluate_dataset, summarise  # noqa: E402
from kprism.session import KPrismSession  # noqa: E402

TWO_D = ["Dataset001_MontgomeryCXR", "Dataset002_DRIVE", "Dataset003_PH2", "Dataset004_ISBI2012EM",
         "Dataset005_KvasirMini", "Dataset020_HC18FetalHead", "Dataset021_MoNuSegNuclei"]


def growcut_curves(dataset, cases, clicks: int, timings: list[float]) -> list[list[float]]:
    """GrowCut clicked by the K-Prism rule on its own errors, through the same loop as our model."""
    from kprism.evaluate.peers.growcut import GrowCutSession

    curves = []
    for case in cases:
        image, labels = dataset.load(case)
        for value in dataset.labels.values():
            truth = labels == value
            if not truth.any():
                continue
            growcut = GrowCutSession(image.array)
            answer = timed(lambda click: growcut.add_click(*click.point, click.positive), timings)
            curves.append(click_loop(answer, truth, "kprism", clicks).dice)
    return curves


def litemedsam_dice(dataset, cases, model, timings: list[float]) -> list[float]:
    scores = []
    for case in cases:
        image, labels = dataset.load(case)
        for value in dataset.labels.values():
            truth = labels == value
            if truth.any():
                (r0, c0), (r1, c1) = box_from_mask(truth)
                start = time.perf_counter()
                scores.append(dice(model.segment_box(image.array, (r0, c0, r1, c1)), truth))
                timings.append((time.perf_counter() - start) * 1000)
    return scores


def registration_dice(dataset, cases, picker: ReferencePicker, timings: list[float]) -> list[float]:
    from kprism.evaluate.peers.registration import transfer_label

    scores = []
    for case in cases:
        image, labels = dataset.load(case)
        for value in dataset.labels.values():
            truth = labels == value
            refs = picker.references(case.case_id, value, 1) if truth.any() else []
            if refs:
                start = time.perf_counter()
                scores.append(dice(transfer_label(refs[0].image.array, refs[0].mask, image.array), truth))
                timings.append((time.perf_counter() - start) * 1000)
    return scores


def unet_dice(dataset, cases, seconds: float, steps: int | None, cache: Path) -> list[float]:
    """Trains (or reads back) the dataset's UNet specialist under a time or step budget; Dice per target."""
    from kprism.evaluate.peers.unet_specialist import load_specialist, predict_specialist, save_specialist, train_specialist

    path = cache / (f"unet_{dataset.name}_{steps}steps.safetensors" if steps else f"unet_{dataset.name}_{int(seconds)}s.safetensors")
    if path.exists():
        model = load_specialist(path)
    else:
        pairs = [dataset.load(c) for c in dataset.cases("train")]
        value = next(iter(dataset.labels.values()))
        model = train_specialist([p[0].array for p in pairs], [p[1] == value for p in pairs],
                                 seconds=float("inf") if steps else seconds, max_steps=steps,
                                 modality=dataset.modality, is_rgb=dataset.is_rgb)
        save_specialist(model, path)
    scores = []
    for case in cases:
        image, labels = dataset.load(case)
        for value in dataset.labels.values():
            if (labels == value).any():
                scores.append(dice(predict_specialist(model, image.array, dataset.modality, dataset.is_rgb), labels == value))
    return scores


def cached_peers(dataset, cases, litemedsam, args, cache: Path) -> dict:
    """GrowCut, LiteMedSAM and registration results on these cases; computed once, then read back.

    Their latency is measured when they are computed; `benchmarks/latency.py` times all methods
    together on an idle machine for the ratios.
    """
    path = cache / f"peers_{dataset.name}_{args.clicks}clicks_{len(cases)}cases.json"
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    growcut_ms, medsam_ms, registration_ms = [], [], []
    gc_curves = growcut_curves(dataset, cases, args.clicks, growcut_ms)
    peers = {
        "growcut": {"curve": np.mean(gc_curves, axis=0).tolist(), "noc90": mean([noc(c, 0.9, args.clicks) for c in gc_curves]),
                    "click_ms": percentiles(growcut_ms)},
        "litemedsam_box": {"dice": mean(litemedsam_dice(dataset, cases, litemedsam, medsam_ms)), "call_ms": percentiles(medsam_ms)},
        "registration": {"dice": mean(registration_dice(dataset, cases, ReferencePicker(dataset, dataset.cases("train")), registration_ms)),
                         "call_ms": percentiles(registration_ms)},
    }
    path.write_text(json.dumps(peers, indent=1), encoding="utf-8")
    print(json.dumps({k: {a: b for a, b in v.items() if a != "curve"} for k, v in peers.items()}), flush=True)
    return peers


def mean(values) -> float | None:
    return float(np.mean(values)) if len(values) else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", required=True, type=Path, help="folder holding the DatasetNNN_* folders")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), type=Path)
    parser.add_argument("--clicks", type=int, default=20)
    parser.add_argument("--unet-seconds", type=float, default=0)
    parser.add_argument("--unet-steps", type=int, default=0,
                        help="step budget instead of seconds (reproducible on a busy machine; PEERS.md's 10 minutes "
                             "on one thread ≈ 700 steps at batch 8)")
    parser.add_argument("--unet-only", action="store_true", help="only train, cache and score the UNet specialists")
    parser.add_argument("--max-cases", type=int)
    parser.add_argument("--model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peers-only", action="store_true",
                        help="only run and cache the peers (their results do not depend on our model)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from kprism.evaluate.peers.litemedsam import LiteMedSAM

    session = KPrismSession(args.model, device="cpu", threads=args.threads)
    litemedsam = LiteMedSAM()  # loads in 0.3 s; only encodes when a dataset's peers are not cached
    cache = args.out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    results: dict = {"clicks": args.clicks, "unet_seconds": args.unet_seconds, "unet_steps": args.unet_steps, "datasets": {}}
    for name in TWO_D:
        dataset = load_dataset(args.datasets / name)
        cases = dataset.cases("test")[: args.max_cases or None]
        print(f"{name}: {len(cases)} cases", flush=True)
        if args.unet_only:
            print(json.dumps({"unet": mean(unet_dice(dataset, cases, args.unet_seconds, args.unet_steps or None, cache))}), flush=True)
            continue
        peers = cached_peers(dataset, cases, litemedsam, args, cache)
        if args.peers_only:
            continue
        ours_timings = Timings()
        modes = ("semantic", "onepass", "incontext", "interactive") if session.model.class_head is not None else ("semantic", "incontext", "interactive")
        items = evaluate_dataset(session, dataset, modes, references=(1,),
                                 max_clicks=args.clicks, max_cases=args.max_cases, timings=ours_timings)
        ours = summarise(items, ours_timings, cap=args.clicks)
        ours_curves = [i.scores["interactive"]["curve"] for i in items]
        entry = {
            "ours": {"semantic": ours.get("semantic", {}).get("dice_mean"), "onepass": ours.get("onepass", {}).get("dice_mean"),
                     "incontext_1": ours["incontext_1"]["dice_mean"],
                     "curve": np.mean(ours_curves, axis=0).tolist(), "noc90": mean([noc(c, 0.9, args.clicks) for c in ours_curves]),
                     "click_ms": ours["interactive"]["latency_ms"], "targets": len(items)},
            **peers,
        }
        if args.unet_seconds > 0 or args.unet_steps > 0:
            entry["unet"] = {"dice": mean(unet_dice(dataset, cases, args.unet_seconds, args.unet_steps or None, cache)),
                             "seconds": args.unet_seconds or None, "steps": args.unet_steps or None}
        results["datasets"][name] = entry
        print(json.dumps({k: (v if not isinstance(v, dict) else {a: b for a, b in v.items() if a != "curve"}) for k, v in entry.items()}), flush=True)
    if args.peers_only or args.unet_only:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peers.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    (args.out / "peers.md").write_text(markdown(results), encoding="utf-8")
    plot(results, args.out / "peers_dice_vs_clicks.png")
    print((args.out / "peers.md").read_text(encoding="utf-8"))


def _at(curve: list[float], clicks: int) -> float | None:
    """Dice after `clicks` clicks, if the curve went that far."""
    return curve[clicks - 1] if len(curve) >= clicks else None


def _f(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(results: dict) -> str:
    n = results["clicks"]
    lines = [
        "# KPrism and its peers on the same test cases",
        "",
        f"2D test splits, every label on its own, Dice at the original resolution. Clicks by the K-Prism rule on each "
        f"method's own errors, up to {n}; NoC@90 counts {n} when never reached. LiteMedSAM gets the tight ground-truth box; "
        "registration and our in-context mode get the same reference case. Reproduce with the command in `benchmarks/README.md`.",
        "",
        "| dataset | ours 1 / 5 / 20 clicks | GrowCut 1 / 5 / 20 clicks | NoC@90 ours / GrowCut | ours 5 clicks vs LiteMedSAM box | "
        "in-context: ours vs registration | semantic: ours (prompted / one-pass) vs UNet |",
        "|---|---|---|---|---|---|---|",
    ]
    wins = []
    for name, d in results["datasets"].items():
        ours, gc = d["ours"], d["growcut"]
        unet = d.get("unet", {}).get("dice")
        lines.append(
            f"| {name.split('_', 1)[1]} | {_f(_at(ours['curve'], 1))} / {_f(_at(ours['curve'], 5))} / {_f(_at(ours['curve'], n))} | "
            f"{_f(_at(gc['curve'], 1))} / {_f(_at(gc['curve'], 5))} / {_f(_at(gc['curve'], n))} | {_f(ours['noc90'], 1)} / {_f(gc['noc90'], 1)} | "
            f"{_f(_at(ours['curve'], 5))} vs {_f(d['litemedsam_box']['dice'])} | {_f(ours['incontext_1'])} vs {_f(d['registration']['dice'])} | "
            f"{_f(ours['semantic'])} / {_f(ours.get('onepass'))} vs {_f(unet)} |")
        comparisons = [("GrowCut (5 clicks)", _at(gc["curve"], 5), _at(ours["curve"], 5)),
                       ("LiteMedSAM (box vs our 5 clicks)", d["litemedsam_box"]["dice"], _at(ours["curve"], 5)),
                       ("registration (in-context)", d["registration"]["dice"], ours["incontext_1"]),
                       ("UNet specialist (semantic, vs the better of our prompted and one-pass)", unet, max(v for v in (ours["semantic"], ours.get("onepass")) if v is not None))]
        for peer, theirs, mine in comparisons:
            if theirs is not None and mine is not None and theirs > mine:
                wins.append(f"- {name.split('_', 1)[1]}: {peer} wins by {theirs - mine:.3f} Dice ({theirs:.3f} vs {mine:.3f}).")
    lines += ["", "## Where a peer wins", ""] + (wins or ["- Nowhere on these cases."])
    lines += ["", "## Per-click latency (same run, same machine)", "", "| dataset | ours p50 / p95 ms | GrowCut p50 / p95 ms | LiteMedSAM per box (encoder + decoder) p50 ms |", "|---|---|---|---|"]
    for name, d in results["datasets"].items():
        o, g, m = d["ours"]["click_ms"], d["growcut"]["click_ms"], d["litemedsam_box"]["call_ms"]
        lines.append(f"| {name.split('_', 1)[1]} | {_f(o['click_p50'], 1)} / {_f(o['click_p95'], 1)} | {_f(g['p50'], 1)} / {_f(g['p95'], 1)} | {_f(m['p50'], 0)} |")
    budget = (f"{results['unet_steps']} steps at batch 8" if results.get("unet_steps") else f"{results.get('unet_seconds')} s")
    if any("unet" in d for d in results["datasets"].values()):
        lines += ["", f"UNet specialists: MONAI UNet per dataset, trained in this run on its training split for {budget} "
                  "(PEERS.md: ~700 steps = 10 minutes on one thread); they know one dataset each, ours all of them."]
    else:
        lines += ["", "The UNet specialists were not retrained in this run (`--unet-steps 0`); PEERS.md measured them at "
                  "lungs 0.975, skin lesions 0.874, fetal head 0.939, nuclei 0.773, DRIVE vessels 0.674 (10 CPU-minutes each)."]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5), dpi=110, layout="constrained")
    axes = figure.add_subplot()
    for k, (name, d) in enumerate(results["datasets"].items()):
        color = f"C{k % 10}"
        for key, style in (("ours", "-"), ("growcut", "--")):
            curve = d[key]["curve"]
            axes.plot(range(1, len(curve) + 1), curve, style, color=color, label=f"{name.split('_', 1)[1]} ({'ours' if key == 'ours' else 'GrowCut'})")
    axes.set(xlabel="clicks", ylabel="mean Dice", ylim=(0, 1), title="solid: KPrism, dashed: GrowCut")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=6, ncol=2)
    FigureCanvasAgg(figure).print_figure(str(path))


if __name__ == "__main__":
    main()
