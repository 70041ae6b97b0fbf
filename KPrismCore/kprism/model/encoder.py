"""Image encoder: a small convolutional pyramid with one global attention layer at stride 16.

K-Prism's UTNet encoder costs ~3 s per 512² slice on two CPU cores. Depthwise-separable residual
blocks give the same multi-scale outputs (strides 2, 4, 8, 16) in tens of milliseconds at 256²;
one self-attention layer on the 16×16 grid restores the global context that semantic and
in-context prompts need.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .config import KPrismConfig
from .position import DensePositionEncoding


class ImageFeatures(NamedTuple):
    """Encoder output: the stride-16 embedding the decoder attends to, and skips for the mask head."""

    embedding: torch.Tensor  # (B, D, S/16, S/16)
    skips: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # strides 2, 4, 8

    def expand(self, batch: int) -> "ImageFeatures":
        """Share one image's features across `batch` prompts without copying memory."""
        if self.embedding.shape[0] == batch:
            return self
        if self.embedding.shape[0] != 1:
            raise ValueError(f"Cannot pair {self.embedding.shape[0]} images with {batch} prompts.")
        return ImageFeatures(
            self.embedding.expand(batch, -1, -1, -1),
            tuple(s.expand(batch, -1, -1, -1) for s in self.skips),  # type: ignore[arg-type]
        )


def conv_bn_act(cin: int, cout: int, stride: int = 1, kernel: int = 3, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.GELU(),
    )


class SeparableBlock(nn.Module):
    """Residual depthwise 5×5 + pointwise expansion (MobileNet/ConvNeXt style)."""

    def __init__(self, channels: int, expansion: int = 2):
        super().__init__()
        self.depthwise = nn.Sequential(
            nn.Conv2d(channels, channels, 5, 1, 2, groups=channels, bias=False), nn.BatchNorm2d(channels)
        )
        self.pointwise = nn.Sequential(
            nn.Conv2d(channels, channels * expansion, 1), nn.GELU(), nn.Conv2d(channels * expansion, channels, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pointwise(self.depthwise(x))


class GlobalContext(nn.Module):
    """One pre-norm transformer layer over the stride-16 grid."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * 2), nn.GELU(), nn.Linear(dim * 2, dim))
        self.position = DensePositionEncoding(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        pos = self.position(h, w).flatten(1).transpose(0, 1).unsqueeze(0)
        q = self.norm1(tokens) + pos
        tokens = tokens + self.attention(q, q, self.norm1(tokens), need_weights=False)[0]
        tokens = tokens + self.mlp(self.norm2(tokens))
        return tokens.transpose(1, 2).reshape(b, c, h, w)


class ImageEncoder(nn.Module):
    def __init__(self, config: KPrismConfig):
        super().__init__()
        channels, blocks = config.encoder_channels, config.encoder_blocks
        stages: list[nn.Module] = []
        cin = config.in_channels
        for i, (cout, depth) in enumerate(zip(channels, blocks)):
            # The stem needs two plain convolutions to see more than 3×3 pixels before depthwise blocks.
            head = [conv_bn_act(cin, cout, stride=2)] + ([conv_bn_act(cout, cout)] if i == 0 else [])
            stages.append(nn.Sequential(*head, *[SeparableBlock(cout) for _ in range(depth)]))
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.neck = nn.Sequential(nn.Conv2d(channels[-1], config.embed_dim, 1), nn.GELU())
        self.context = GlobalContext(config.embed_dim, config.decoder_heads)

    def forward(self, images: torch.Tensor) -> ImageFeatures:
        skips = []
        x = images
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        embedding = self.context(self.neck(x))
        return ImageFeatures(embedding, (skips[0], skips[1], skips[2]))
