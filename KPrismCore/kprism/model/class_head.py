"""One-pass class head: every class's mask logits from one slice's features at once.

The prompted path decodes one class per pass (the decoder conditions the image features on the
class token), which costs one mask-head pass per class and slice: 66 CT organs × 300 slices is
~20 000 passes. This head shares a single upsampling path across classes and ends in one 1×1
convolution with a channel per class, so a whole-volume label map costs one pass per slice.
It reads the same encoder features as the promptable decoder and is trained on them frozen
(stage 2 of the default model), so adding it changes no prompted result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import KPrismConfig
from .encoder import ImageFeatures
from .heads import fuse_block


class ClassHead(nn.Module):
    def __init__(self, config: KPrismConfig):
        super().__init__()
        c2, c4, c8, _ = config.encoder_channels
        self.up8 = fuse_block(config.embed_dim + c8, c8)
        self.up4 = fuse_block(c8 + c4, c4)
        self.up2 = fuse_block(c4 + c2, c2 * 2, spatial=False)  # a depthwise 3×3 at stride 2 would double the cost
        self.classify = nn.Conv2d(c2 * 2, config.num_classes, 1)

    def pixel_features(self, features: ImageFeatures) -> torch.Tensor:
        """The shared upsampling path: (B, C, S/2, S/2) features every class reads."""
        f2, f4, f8 = features.skips
        x = features.embedding
        for up, skip in ((self.up8, f8), (self.up4, f4), (self.up2, f2)):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = up(torch.cat([x, skip], dim=1))
        return x

    def forward(self, features: ImageFeatures) -> torch.Tensor:
        """→ (B, num_classes, S/2, S/2) logits, class i = token i of the catalog."""
        return self.classify(self.pixel_features(features))

    def logits_for(self, pixels: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Logits of chosen classes only, (B, K) indices → (B, K, S/2, S/2); the same numbers as
        `forward` for those channels. Training scores a few classes per sample, not all 80."""
        weight = self.classify.weight[:, :, 0, 0][classes]  # (B, K, C)
        return torch.einsum("bchw,bkc->bkhw", pixels, weight) + self.classify.bias[classes][..., None, None]
