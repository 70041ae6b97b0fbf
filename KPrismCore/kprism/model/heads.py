"""Mask head (prompt-conditioned upsampling + hypernetwork dot product) and quality head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import KPrismConfig
from .encoder import conv_bn_act


def fuse_block(cin: int, cout: int, spatial: bool = True) -> nn.Sequential:
    """1×1 mixing, then a depthwise 3×3 where affordable: a full 3×3 would triple a click's cost,
    and at stride 2 even the depthwise one costs more than the rest of the stage (measured)."""
    layers = [conv_bn_act(cin, cout, kernel=1)] + ([conv_bn_act(cout, cout, groups=cout)] if spatial else [])
    return nn.Sequential(*layers)


def mlp(din: int, dout: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(din, hidden), nn.GELU(), nn.Linear(hidden, dout))


class MaskHead(nn.Module):
    """Upsamples the decoded stride-16 features with encoder skips and dense prompt maps.

    The mask token is turned into per-scale kernels; mask logits are their dot product with the
    pixel features. Stride 2 is the final mask (thin vessels and membranes need the fine scale);
    strides 8 and 4 give deep-supervision outputs, computed only when training asks for them.
    Callers upsample the mask once, straight to the grid they need, instead of paying for an
    intermediate full-size map on every click.
    """

    def __init__(self, config: KPrismConfig):
        super().__init__()
        c2, c4, c8, _ = config.encoder_channels
        d = config.embed_dim
        self.up8 = fuse_block(d + c8, c8)
        self.up4 = fuse_block(c8 + c4, c4)
        self.up2 = fuse_block(c4 + c2, c2, spatial=False)
        self.kernels = nn.ModuleList(mlp(d, c, d) for c in (c8, c4, c2))

    def forward(self, image: torch.Tensor, skips, dense, mask_token: torch.Tensor,
                deep_supervision: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Returns the stride-2 logits (B, 1, h, w) and the stride-8 and stride-4 logits when
        `deep_supervision` is set (an empty list otherwise: inference never looks at them)."""
        f2, f4, f8 = skips
        d2, d4, d8 = dense
        stages = ((self.up8, f8, d8, self.kernels[0]), (self.up4, f4, d4, self.kernels[1]), (self.up2, f2, d2, self.kernels[2]))
        scale_logits = []  # the final stride-2 logits last
        x = image
        for up, skip, prompt_map, kernel in stages:
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = up(torch.cat([x, skip + prompt_map], dim=1))
            if deep_supervision or kernel is self.kernels[-1]:
                scale_logits.append(torch.einsum("bc,bchw->bhw", kernel(mask_token), x).unsqueeze(1))
        return scale_logits[-1], scale_logits[:-1]


class QualityHead(nn.Module):
    """Predicts the Dice of the model's own mask from the quality token."""

    def __init__(self, config: KPrismConfig):
        super().__init__()
        self.mlp = mlp(config.embed_dim, 1, config.embed_dim)

    def forward(self, quality_token: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.mlp(quality_token)).squeeze(-1)
