"""Fill the `medsam` embedding cache with every training slice, resumably, yielding the CPU to others.

    nice -n 19 python KPrismCore/scripts/fill_embedding_cache.py DATASET_DIR... [--log FILE]

Entries already in the cache are skipped (only their key is computed), so rerunning after an
interruption, or after the cache was partly deleted, encodes just what is missing. Progress (done
/ total, encodes per second, time left) goes to --log and stdout. Runs torch on --threads (default 1)
with OMP_WAIT_POLICY=PASSIVE, so under `nice -n 19` it only uses CPU nobody else wants.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from kprism.data.slices import training_cases  # noqa: E402
from kprism.medsam_preprocess import CT_WINDOWS  # noqa: E402
from kprism.preprocess import CT_NAMES  # noqa: E402
from kprism.embedding_cache import EmbeddingCache  # noqa: E402
from kprism.train.encoder_slices import LAYOUTS, encoder_training_slices  # noqa: E402
from kprism.user_cache import user_cache_dir  # noqa: E402

DEFAULT_ENCODER = user_cache_dir("encoders", "litemedsam-tinyvit-fp16.safetensors")


def count_slices(roots: list[Path], split: str, axis: int, windows: int) -> int:
    """How many encoder inputs `encoder_training_slices` will yield: the same walk, without preprocessing."""
    total = 0
    for case in training_cases(roots, split, axis):
        total += (windows if case.image.modality.lower() in CT_NAMES else 1) * len(case.indices)
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("datasets", nargs="+", type=Path, help="nnU-Net dataset folders, in training-config order")
    parser.add_argument("--encoder", type=Path, default=DEFAULT_ENCODER, help="converted encoder file (convert_litemedsam.py)")
    parser.add_argument("--cache", type=Path, help="cache root (default: $KPRISM_EMBEDDING_CACHE or the kprism user cache)")
    parser.add_argument("--split", default="train", choices=("train", "test"))
    parser.add_argument("--axis", type=int, default=0)
    parser.add_argument("--ct-windows", nargs="+", default=list(CT_WINDOWS), choices=list(CT_WINDOWS),
                        help="letterbox input only: CT slices are encoded once per window")
    parser.add_argument("--input", default="letterbox", choices=LAYOUTS,
                        help="letterbox: LiteMedSAM's own preparation; stretched: the input the medsam model derives itself")
    parser.add_argument("--stages", nargs="*", type=int, default=[], help="also keep these stage outputs (large)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--log", type=Path, help="append progress lines to this file")
    parser.add_argument("--every", type=int, default=20, help="log every N slices")
    parser.add_argument("--per-dataset", type=int, help="encode at most this many inputs per dataset (the first ones of the walk): "
                        "a quick, even start over many datasets; training uses whatever is cached")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    log_file = args.log.open("a", buffering=1) if args.log else None

    def log(message: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        print(line, flush=True)
        if log_file:
            log_file.write(line + "\n")

    cache = EmbeddingCache.from_encoder_file(args.encoder, root=args.cache, stages=args.stages)
    total = count_slices(args.datasets, args.split, args.axis, len(args.ct_windows) if args.input == "letterbox" else 1)
    log(f"filling {cache.folder} from {len(args.datasets)} datasets ({args.split}, {args.input} input): {total} encoder inputs, "
        f"{args.threads} thread(s)")
    start, done, encode_seconds = time.perf_counter(), 0, 0.0
    current = ""
    taken = 0
    for item in encoder_training_slices(args.datasets, args.split, args.axis, args.ct_windows, layout=args.input):
        if item.dataset != current:
            current, taken = item.dataset, 0
            log(f"{current}: starting at {done}/{total}")
        taken += 1
        if args.per_dataset is not None and taken > args.per_dataset:
            done += 1
            continue
        before = cache.encoded
        tick = time.perf_counter()
        cache.get(item.image, item.info())
        if cache.encoded > before:
            encode_seconds += time.perf_counter() - tick
        done += 1
        if done % args.every == 0 or done == total:
            rate = encode_seconds / max(cache.encoded, 1)
            left = (total - done) * rate
            log(f"{done}/{total} done, {cache.encoded} encoded this run ({rate:.2f} s each), "
                f"{done - cache.encoded} already cached; ~{left / 60:.0f} min left at this rate")
    log(f"finished: {done} inputs, {cache.encoded} encoded in {(time.perf_counter() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
