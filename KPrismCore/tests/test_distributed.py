"""Data-parallel training through torchrun: two CPU processes (gloo) keep identical weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from kprism.weights import read_checkpoint

from .synthetic import make_shapes_dataset


def test_torchrun_with_two_cpu_processes_trains_one_model(tmp_path):
    dataset = make_shapes_dataset(tmp_path / "Dataset900_Shapes", cases=6)
    config = tmp_path / "train.json"
    config.write_text(json.dumps({
        "datasets": [str(dataset)], "output": "model.safetensors", "run_dir": "run", "steps": 3, "batch_size": 2,
        "warmup_steps": 1, "checkpoint_every": 3, "log_every": 1, "val_every": 0, "threads": 1,
        "model_overrides": {"image_size": 64},
    }), encoding="utf-8")
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         "-m", "kprism.cli", "train", str(config)],
        capture_output=True, encoding="utf-8", env=env, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    checkpoint = read_checkpoint(tmp_path / "model.safetensors")
    assert checkpoint.training["steps"] == 3
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert state["step"] == 3
