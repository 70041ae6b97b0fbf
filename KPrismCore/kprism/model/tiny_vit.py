"""TinyViT as LiteMedSAM configures it: the pretrained medical image encoder of the `medsam` preset.

LiteMedSAM (Ma et al., MedSAM; Apache-2.0) distilled MedSAM's ViT-B into a 5.7 M-parameter TinyViT
(Wu et al., 2022) on 1.57 M medical image–mask pairs. Its variant differs from the ImageNet TinyViT:
- the patch embedding is two 1×1 convolutions at stride 1, so a 256² input keeps a 256² grid;
- stage 0 is convolutional (MBConv) at full resolution, stages 1–3 are windowed attention;
- the merge into the last stage does not downsample, so the output grid is 64×64 at 256² input;
- a SAM neck (1×1 and 3×3 convolutions with channel LayerNorms) gives a 256×64×64 embedding.

Module and parameter names follow the released checkpoint (minus its ``image_encoder.`` prefix),
so the weights load strictly: every tensor is used and none is missing. Stage outputs are kept
(`TinyViTFeatures.stages`) for decoders that want high-resolution skips.

Inputs are (B, 3, S, S) in [0, 1] — LiteMedSAM's own preprocessing: long side resized to S, zero
padded at the bottom and right, min–max scaled to [0, 1].
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .checked_dict import from_checked_dict


@dataclass(frozen=True)
class TinyViTConfig:
    """Sizes of a TinyViT encoder; the defaults are LiteMedSAM's."""

    image_size: int = 256
    in_channels: int = 3
    widths: tuple[int, ...] = (64, 128, 160, 320)  # channels per stage
    depths: tuple[int, ...] = (2, 2, 6, 2)  # blocks per stage
    heads: tuple[int, ...] = (2, 4, 5, 10)  # attention heads per stage (stage 0 is convolutional: unused)
    windows: tuple[int, ...] = (7, 7, 14, 7)  # attention window side per stage (stage 0: unused)
    merge_strides: tuple[int, ...] = (2, 2, 1)  # downsampling of the merge after stages 0, 1, 2
    mlp_ratio: float = 4.0
    conv_expansion: float = 4.0  # MBConv hidden width / input width
    local_kernel: int = 3  # depthwise convolution between attention and MLP
    embed_dim: int = 256  # neck output channels

    def __post_init__(self) -> None:
        stages = len(self.widths)
        if not (len(self.depths) == len(self.heads) == len(self.windows) == stages and len(self.merge_strides) == stages - 1):
            raise ValueError(
                f"TinyViTConfig needs one width, depth, head count and window per stage and one merge stride "
                f"between stages; got widths {self.widths}, depths {self.depths}, heads {self.heads}, "
                f"windows {self.windows}, merge_strides {self.merge_strides}."
            )
        for width, heads in zip(self.widths[1:], self.heads[1:]):
            if width % heads:
                raise ValueError(f"TinyViTConfig: stage width {width} is not divisible by its {heads} heads.")

    @property
    def grid_sizes(self) -> tuple[int, ...]:
        """Side of each stage's feature grid at `image_size` input."""
        sizes = [self.image_size]
        for stride in self.merge_strides:
            sizes.append(math.ceil(sizes[-1] / stride))  # stride-s, padding-1, 3×3 convolution
        return tuple(sizes)

    @property
    def embedding_size(self) -> int:
        return self.grid_sizes[-1]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TinyViTConfig":
        return from_checked_dict(cls, values, "TinyViT")


LITE_MEDSAM = TinyViTConfig()


class TinyViTFeatures(NamedTuple):
    embedding: torch.Tensor  # (B, embed_dim, G, G), G = 64 at 256² input
    stages: tuple[torch.Tensor, ...]  # each stage's output before its merge, (B, C_i, H_i, W_i): strides 1, 2, 4, 4


# ---------------------------------------------------------------------------------------------
# Building blocks


class ConvBN(nn.Sequential):
    """Convolution without bias followed by batch norm (children `c` and `bn`, as in the checkpoint)."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1):
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout))


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map (SAM's neck)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class PatchEmbed(nn.Module):
    """LiteMedSAM's stride-1 embedding: pixel-wise 1×1 convolutions to half, then full width."""

    def __init__(self, cin: int, width: int):
        super().__init__()
        self.seq = nn.Sequential(ConvBN(cin, width // 2), nn.GELU(), ConvBN(width // 2, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual: 1×1 expand, 3×3 depthwise, 1×1 project, residual, then an activation."""

    def __init__(self, width: int, expansion: float):
        super().__init__()
        hidden = int(width * expansion)
        self.conv1 = ConvBN(width, hidden)
        self.conv2 = ConvBN(hidden, hidden, 3, groups=hidden)
        self.conv3 = ConvBN(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.conv2(F.gelu(self.conv1(x))))
        return F.gelu(x + self.conv3(y))


class Merge(nn.Module):
    """Between stages: 1×1 to the next width, strided 3×3 depthwise, 1×1 (TinyViT's PatchMerging)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = ConvBN(cin, cout)
        self.conv2 = ConvBN(cout, cout, 3, stride, groups=cout)
        self.conv3 = ConvBN(cout, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(F.gelu(self.conv2(F.gelu(self.conv1(x)))))


def window_offset_index(window: int) -> torch.Tensor:
    """(w², w²) index into a per-head table of learned biases, one per |Δrow|, |Δcol| between two cells.

    TinyViT numbers the offsets in the order they first occur when pairing cell (0, 0) with every cell
    in raster order, which is exactly |Δrow| · w + |Δcol|.
    """
    rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    return (rows[:, None] - rows[None, :]).abs() * window + (cols[:, None] - cols[None, :]).abs()


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, C) → (B·nH·nW, w², C) non-overlapping windows in raster order; zero-pads bottom/right.

    Returns the windows and the padded (H, W), which `window_merge` needs to undo it.
    """
    b, h, w, c = x.shape
    pad_h, pad_w = (-h) % window, (-w) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    ph, pw = h + pad_h, w + pad_w
    x = x.reshape(b, ph // window, window, pw // window, window, c).transpose(2, 3)
    return x.reshape(-1, window * window, c), (ph, pw)


def window_merge(windows: torch.Tensor, window: int, padded: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Inverse of `window_partition`: (B·nH·nW, w², C) → (B, H, W, C) with the padding cut off."""
    (ph, pw), (h, w) = padded, size
    c = windows.shape[-1]
    x = windows.reshape(-1, ph // window, pw // window, window, window, c).transpose(2, 3)
    return x.reshape(-1, ph, pw, c)[:, :h, :w]


class WindowAttention(nn.Module):
    """Multi-head self-attention inside one window, with a learned bias per head and cell offset.

    The checkpoint packs q, k and v head by head in `qkv` ([q_h, k_h, v_h] for each head h).
    """

    def __init__(self, width: int, heads: int, window: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.attention_biases = nn.Parameter(torch.zeros(heads, window * window))
        self.register_buffer("offset_index", window_offset_index(window), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, L, C) windows of L cells
        n, length, width = x.shape
        qkv = self.qkv(self.norm(x)).reshape(n, length, self.heads, 3, width // self.heads)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each (N, heads, L, head_dim)
        bias = self.attention_biases[:, self.offset_index].to(q.dtype)  # (heads, L, L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(n, length, width))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Windowed attention (residual) → 3×3 depthwise convolution (no residual) → MLP (residual).

    Windows that overhang the grid are zero-padded and the padding takes part in attention as keys,
    as in the released model: leaving it out would change the pretrained embedding at the borders.
    """

    def __init__(self, width: int, heads: int, window: int, mlp_ratio: float, local_kernel: int):
        super().__init__()
        self.window = window
        self.attn = WindowAttention(width, heads, window)
        self.local_conv = ConvBN(width, width, local_kernel, groups=width)
        self.mlp = MLP(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        b, c, h, w = x.shape
        cells = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        windows, padded = window_partition(cells, self.window)
        cells = cells + window_merge(self.attn(windows), self.window, padded, (h, w))
        x = self.local_conv(cells.permute(0, 3, 1, 2))
        tokens = x.flatten(2).transpose(1, 2)
        tokens = tokens + self.mlp(tokens)
        return tokens.transpose(1, 2).reshape(b, c, h, w)


class Stage(nn.Module):
    """Blocks at one resolution, then (except for the last stage) the merge into the next one."""

    def __init__(self, blocks: list[nn.Module], downsample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample


class TinyViT(nn.Module):
    """(B, 3, S, S) in [0, 1] → `TinyViTFeatures` (embedding and per-stage outputs)."""

    def __init__(self, config: TinyViTConfig = LITE_MEDSAM):
        super().__init__()
        self.config = c = config
        self.patch_embed = PatchEmbed(c.in_channels, c.widths[0])
        stages = []
        for i, (width, depth) in enumerate(zip(c.widths, c.depths)):
            if i == 0:
                blocks: list[nn.Module] = [MBConv(width, c.conv_expansion) for _ in range(depth)]
            else:
                blocks = [TinyViTBlock(width, c.heads[i], c.windows[i], c.mlp_ratio, c.local_kernel) for _ in range(depth)]
            last = i == len(c.widths) - 1
            stages.append(Stage(blocks, None if last else Merge(width, c.widths[i + 1], c.merge_strides[i])))
        self.layers = nn.ModuleList(stages)
        self.neck = nn.Sequential(
            nn.Conv2d(c.widths[-1], c.embed_dim, 1, bias=False),
            ChannelLayerNorm(c.embed_dim),
            nn.Conv2d(c.embed_dim, c.embed_dim, 3, padding=1, bias=False),
            ChannelLayerNorm(c.embed_dim),
        )

    def forward(self, images: torch.Tensor) -> TinyViTFeatures:
        size = self.config.image_size
        if images.ndim != 4 or images.shape[1] != self.config.in_channels or images.shape[-2:] != (size, size):
            raise ValueError(
                f"TinyViT takes (B, {self.config.in_channels}, {size}, {size}) images; got {tuple(images.shape)}."
            )
        x = self.patch_embed(images)
        outputs = []
        for stage in self.layers:
            for block in stage.blocks:
                x = block(x)
            outputs.append(x)
            if stage.downsample is not None:
                x = stage.downsample(x)
        return TinyViTFeatures(self.neck(x), tuple(outputs))


def fold_batchnorms(model: TinyViT) -> TinyViT:
    """An eval-mode copy whose Conv+BN pairs are single convolutions with a bias: the same numbers up to
    float rounding (≤ 5e-6 on the embedding), fewer passes over memory. Not for training or for saving."""
    folded = copy.deepcopy(model).eval()
    for module in folded.modules():
        if isinstance(module, ConvBN):
            module.c = nn.utils.fusion.fuse_conv_bn_eval(module.c, module.bn)
            module.bn = nn.Identity()
    return folded


def fast_float32_encoder(model: TinyViT) -> TinyViT:
    """Folded batch norms in channels-last memory: 1.6× faster on a 2-core CPU (benchmarks/encoder_speed.md),
    float32 and within 5e-6 of `model`. Give it channels-last inputs (`x.contiguous(memory_format=torch.channels_last)`)."""
    return fold_batchnorms(model).to(memory_format=torch.channels_last)
