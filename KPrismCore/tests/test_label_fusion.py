"""Box-limited label fusion gives the label map of resizing every class in full."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kprism.label_fusion import interpolation_matrix, winning_labels


def brute_force(logits: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    grid = F.interpolate(torch.from_numpy(logits)[:, None], size=shape, mode="bilinear", align_corners=False)[:, 0]
    best, winner = grid.max(0)
    return np.where(best.numpy() >= 0, winner.numpy() + 1, 0)


def test_interpolation_matrix_is_torchs_bilinear_resize():
    signal = torch.randn(7, 5)
    expected = F.interpolate(signal[None, None], size=(19, 13), mode="bilinear", align_corners=False)[0, 0]
    assert torch.allclose(interpolation_matrix(7, 19) @ signal @ interpolation_matrix(5, 13).T, expected, atol=1e-5)


@pytest.mark.parametrize("shape", [(512, 512), (333, 517), (64, 64), (40, 200)])
def test_box_limited_fusion_equals_resizing_every_class(shape):
    rng = np.random.default_rng(sum(shape))
    logits = np.full((12, 32, 32), -4.0, np.float32) + rng.normal(0, 0.3, (12, 32, 32)).astype(np.float32)
    for k in range(0, 12, 2):  # blobs of different classes, some overlapping, one on the border
        r, c = rng.integers(0, 28, 2)
        logits[k, r : r + 6, c : c + 7] = rng.normal(2, 1.5, (len(range(r, min(r + 6, 32))), len(range(c, min(c + 7, 32)))))
    logits[3, 0:4, 28:32] = 3.0
    expected = brute_force(logits, shape)
    result = winning_labels(logits, shape)
    assert (expected > 0).any() and len(np.unique(expected)) > 4
    assert (result == expected).mean() > 0.9999


def test_nothing_positive_gives_background():
    assert not winning_labels(np.full((3, 8, 8), -1.0, np.float32), (20, 20)).any()
