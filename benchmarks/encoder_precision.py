"""Does running `kprism-medsam`'s encoder in bfloat16 change our Dice? And how much faster is it?

    OMP_WAIT_POLICY=PASSIVE python benchmarks/encoder_precision.py --datasets ../shared/datasets --out benchmarks/results

The same 2D protocol (`kprism.evaluate.protocols.evaluate_dataset`: semantic, and 5 clicks by the K-Prism rule) on
the 2D test sets, the held-out CT volume `ts_ct_002` and five ACDC test volumes, once with the float32 encoder
(folded batch norms, channels-last: what ships) and once under bfloat16 autocast, each reading and filling its
own embedding cache (the recipe is part of the key). Encoding time is measured apart, without any cache.
The rule of issue 13: ship the faster variant only if Dice stays within 0.005. Writes encoder_precision.md/json.
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

from kprism.data.nnunet_v2 import load_dataset  # noqa: E402
from kprism.evaluate.protocols import evaluate_dataset, summarise  # noqa: E402
from kprism.session import KPrismSession  # noqa: E402
from kprism.weights import load_model  # noqa: E402

SETS = [("Dataset001_MontgomeryCXR", None), ("Dataset002_DRIVE", None), ("Dataset003_PH2", None),
        ("Dataset004_ISBI2012EM", None), ("Dataset005_KvasirMini", None), ("Dataset020_HC18FetalHead", None),
        ("Dataset021_MoNuSegNuclei", None), ("Dataset006_TotalSegCT", ["ts_ct_002"]), ("Dataset022_ACDCCardiacMRI", None)]
RECIPES = ("fp32", "bf16")


def encode_ms(model, recipe: str, repeats: int) -> float:
    encoder = model.encoder
    encoder.recipe, cache = recipe, encoder.disk_cache
    encoder.disk_cache = None
    images = torch.randn(1, model.config.in_channels, model.config.image_size, model.config.image_size)
    encoder.embed(images)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        encoder.embed(images)
        times.append((time.perf_counter() - start) * 1000)
    encoder.disk_cache = cache
    return float(np.median(times))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="kprism-medsam")
    parser.add_argument("--datasets", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "datasets")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results: dict = {"model": args.model, "recipes": {}}
    for recipe in RECIPES:
        model, catalog, _ = load_model(args.model, embedding_cache=False)
        model.encoder.use_disk_cache(recipe=recipe)
        session = KPrismSession(model, catalog=catalog, threads=args.threads)
        entry = {"encode_ms": encode_ms(model, recipe, args.repeats), "datasets": {}}
        for name, cases in SETS:
            items = evaluate_dataset(session, load_dataset(args.datasets / name), ("semantic", "interactive"), max_clicks=5,
                                     max_slices_per_label=3, case_ids=cases, max_cases=5 if cases is None else None)
            summary = summarise(items)
            entry["datasets"][name] = {"targets": len(items), "semantic": summary["semantic"]["dice_mean"],
                                       "click_1": summary["interactive"]["dice_at_clicks"]["1"],
                                       "click_5": summary["interactive"]["dice_at_clicks"]["5"]}
            print(recipe, name, entry["datasets"][name], flush=True)
        results["recipes"][recipe] = entry
    base, fast = (results["recipes"][r] for r in RECIPES)
    changes = [fast["datasets"][n][k] - base["datasets"][n][k] for n in base["datasets"] for k in ("semantic", "click_1", "click_5")]
    results["mean_change"], results["worst_change"] = float(np.mean(changes)), float(min(changes))
    lines = ["# `kprism-medsam` encoder: float32 vs bfloat16 autocast, Dice of our decoder", "",
             f"Made by `benchmarks/encoder_precision.py` ({args.threads} threads). Encode: median of {args.repeats} runs "
             f"per 256² slice, no cache: float32 {base['encode_ms']:.0f} ms, bfloat16 {fast['encode_ms']:.0f} ms "
             f"({base['encode_ms'] / fast['encode_ms']:.2f}×). Dice change over all cells: mean {results['mean_change']:+.4f}, "
             f"worst {results['worst_change']:+.4f} (ship bfloat16 only if within 0.005).", "",
             "| dataset | targets | semantic fp32 → bf16 | 1 click | 5 clicks |", "|---|---|---|---|---|"]
    for name in base["datasets"]:
        b, f = base["datasets"][name], fast["datasets"][name]
        lines.append(f"| {name} | {b['targets']} | " + " | ".join(f"{b[k]:.3f} → {f[k]:.3f}" for k in ("semantic", "click_1", "click_5")) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "encoder_precision.json").write_text(json.dumps(results, indent=1))
    (args.out / "encoder_precision.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
