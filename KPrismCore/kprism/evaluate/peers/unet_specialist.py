"""UNet specialist peer: a MONAI UNet trained on one dataset's training split with a time budget.

Protocol (PEERS.md): ``UNet(spatial_dims=2, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2),
num_res_units=2)`` on 256² inputs, Dice + cross-entropy, Adam at 1e-3, light augmentation, 10 CPU
minutes; predictions are resized back to the original image before scoring. Inputs go through
K-Prism's own preprocessing (`normalize_slice` + `resize_image`), so both models see the same pixels.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from monai.transforms import Compose, RandAffined, RandScaleIntensityd, RandShiftIntensityd
from monai.utils import convert_to_tensor
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ...preprocess import normalize_slice, resize_image, resize_mask

INPUT_SIZE = 256
LEARNING_RATE = 1e-3
_PROGRESS_EVERY = 50  # steps
_KIND = "monai-unet-specialist"


class UNetSpecialist(nn.Module):
    """The PEERS.md UNet and the square input size it was trained at (needed again to predict)."""

    def __init__(self, size: int = INPUT_SIZE):
        super().__init__()
        self.size = size
        self.net = UNet(
            spatial_dims=2, in_channels=3, out_channels=1,
            channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # logits, (B, 1, S, S)


def _model_input(image: np.ndarray, modality: str, is_rgb: bool, size: int) -> torch.Tensor:
    return resize_image(normalize_slice(image, modality, is_rgb), size)


def _augmentation(seed: int, size: int) -> Compose:
    """Small rotations, scalings and shifts (image and mask together) and mild intensity changes."""
    both = ("image", "mask")
    augment = Compose([
        RandAffined(both, prob=0.5, rotate_range=0.2, scale_range=0.1, translate_range=0.05 * size, padding_mode="zeros"),
        RandScaleIntensityd("image", factors=0.1, prob=0.5),
        RandShiftIntensityd("image", offsets=0.1, prob=0.5),
    ])
    augment.set_random_state(seed=seed)
    return augment


def train_specialist(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    seconds: float = 600.0,
    batch_size: int = 8,
    seed: int = 0,
    progress: Optional[Callable[[str], None]] = None,
    *,
    max_steps: Optional[int] = None,
    modality: str = "",
    is_rgb: bool = False,
    size: int = INPUT_SIZE,
) -> UNetSpecialist:
    """Trains until `seconds` of wall time have passed or `max_steps` steps are done (at least one
    step); returns the model in eval mode. A step budget makes a run reproducible on a busy machine.

    `images` are 2D slices (grey ``(H, W)`` or RGB ``(H, W, 3)``) of one `modality`; `masks` their
    binary targets. Batches are drawn with replacement, so any number of images works.
    """
    if len(images) != len(masks) or not images:
        raise ValueError(f"Need as many masks as images, and at least one; got {len(images)} and {len(masks)}.")
    inputs = torch.stack([_model_input(image, modality, is_rgb, size) for image in images])
    # Area-weighted coverage keeps thin structures (vessels) as soft targets instead of erasing them.
    targets = torch.stack([resize_mask(mask, size) for mask in masks])[:, None]
    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's generator
        torch.manual_seed(seed)
        model = UNetSpecialist(size)
    augment = _augmentation(seed, size)
    rng = np.random.default_rng(seed)
    loss_function = DiceCELoss(sigmoid=True)
    optimiser = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    model.train()
    start, step = time.monotonic(), 0
    while step == 0 or (time.monotonic() - start < seconds and (max_steps is None or step < max_steps)):
        samples = [augment({"image": inputs[n], "mask": targets[n]}) for n in rng.integers(len(inputs), size=batch_size)]
        # Plain tensors: MONAI's MetaTensor would drag its metadata through every layer.
        batch = convert_to_tensor(torch.stack([s["image"] for s in samples]), track_meta=False)
        target = convert_to_tensor(torch.stack([s["mask"] for s in samples]), track_meta=False).clamp(0, 1)
        loss = loss_function(model(batch), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        step += 1
        if progress and step % _PROGRESS_EVERY == 0:
            progress(f"step {step}, {time.monotonic() - start:.0f} s, loss {loss.item():.3f}")
    if progress:
        progress(f"trained {step} steps in {time.monotonic() - start:.0f} s")
    return model.eval()


@torch.no_grad()
def predict_specialist(model: UNetSpecialist, image: np.ndarray, modality: str, is_rgb: bool) -> np.ndarray:
    """Binary mask at the image's own ``(H, W)``: logits are resized back before thresholding."""
    logits = model(_model_input(image, modality, is_rgb, model.size)[None])
    logits = F.interpolate(logits, size=np.shape(image)[:2], mode="bilinear", align_corners=False)
    return (logits[0, 0] > 0).numpy()


def save_specialist(model: UNetSpecialist, path: str | Path, metadata: Optional[dict[str, str]] = None) -> None:
    """Weights to a .safetensors file; the input size (and any extra string metadata) in its header."""
    header = {**(metadata or {}), "kind": _KIND, "size": str(model.size)}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=header)


def load_specialist(path: str | Path) -> UNetSpecialist:
    """A specialist saved by `save_specialist`, in eval mode."""
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata() or {}
    if header.get("kind") != _KIND:
        raise ValueError(f"{path} is not a saved UNet specialist (header kind {header.get('kind')!r}).")
    model = UNetSpecialist(int(header["size"]))
    model.load_state_dict(load_file(str(path)))
    return model.eval()
