"""Training throughput of a config on this machine: steps per hour, measured alone.

    python benchmarks/train_speed.py KPrismCore/configs/kprism-tiny.yaml --steps 150

Builds the config's slice bank, then times `--steps` training steps after `--warmup` untimed ones in a
throw-away run folder (no checkpoints, no validation), and appends a row to
benchmarks/results/train_speed.md and .json. Everything else on the machine should be idle.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from kprism.train.trainer import Trainer, load_config  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def measure(config_path: Path, steps: int, warmup: int) -> dict:
    config = load_config(config_path)
    with tempfile.TemporaryDirectory() as run_dir:
        config = dataclasses.replace(config, run_dir=run_dir, output=str(Path(run_dir) / "w.safetensors"),
                                     val_every=0, checkpoint_every=10**9, init_from=None)
        started = time.time()
        trainer = Trainer(config, show_progress=False)
        bank_s = time.time() - started
        for _ in range(warmup):
            trainer.train_step(trainer.sampler.sample(config.batch_size))
        started = time.time()
        for _ in range(steps):
            trainer.train_step(trainer.sampler.sample(config.batch_size))
        per_step = (time.time() - started) / steps
    return {
        "config": config_path.name, "batch_size": config.batch_size,
        "max_correction_rounds": config.task.max_correction_rounds, "soft_targets": config.soft_targets,
        "threads": config.threads, "torch": torch.__version__, "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "slices": len(trainer.bank.records), "bank_build_s": round(bank_s, 1), "timed_steps": steps,
        "s_per_step": round(per_step, 4), "steps_per_hour": round(3600 / per_step),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args(argv)
    row = measure(args.config, args.steps, args.warmup)
    RESULTS.mkdir(exist_ok=True)
    json_path = RESULTS / "train_speed.json"
    rows = json.loads(json_path.read_text(encoding="utf-8")) if json_path.exists() else []
    rows = [r for r in rows if r["config"] != row["config"]] + [row]
    json_path.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    lines = ["# Training throughput (this machine, nothing else running)", "",
             "Reproduce: `python benchmarks/train_speed.py CONFIG --steps 150`.", "",
             "| config | batch | correction rounds ≤ | soft targets | threads | s/step | steps/hour | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['batch_size']} | {r['max_correction_rounds']} | {r['soft_targets']} | {r['threads']} | "
              f"{r['s_per_step']} | {r['steps_per_hour']} | {r['peak_rss_mb']} |" for r in rows]
    (RESULTS / "train_speed.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
