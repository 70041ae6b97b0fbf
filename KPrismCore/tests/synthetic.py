"""Generated datasets for tests: bright disks and squares on noise, in the nnU-Net v2 raw layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def make_shapes_dataset(root: Path, cases: int = 12, size: int = 64, seed: int = 0) -> Path:
    """2D grey PNG dataset with label 1 'disk' and label 2 'square' in every image."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    yy, xx = np.mgrid[:size, :size]
    for n in range(cases):
        labels = np.zeros((size, size), np.uint8)
        cy, cx, r = rng.integers(size // 4, size - size // 4, 2).tolist() + [int(rng.integers(6, 12))]
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
        sy, sx = rng.integers(2, size - 14, 2)
        square = np.zeros_like(labels, bool)
        square[sy : sy + 12, sx : sx + 12] = True
        labels[square & (labels == 0)] = 2
        image = 40 + 30 * rng.standard_normal((size, size)) + 120 * (labels == 1) + 70 * (labels == 2)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / "imagesTr" / f"case{n:02d}_0000.png")
        Image.fromarray(labels).save(root / "labelsTr" / f"case{n:02d}.png")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "synthetic"}, "labels": {"background": 0, "disk": 1, "square": 2},
        "numTraining": cases, "file_ending": ".png", "modality": "synthetic", "tensor_image_size": "2D",
    }), encoding="utf-8")
    return root
