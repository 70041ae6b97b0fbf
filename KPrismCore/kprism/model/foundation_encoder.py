"""The `medsam` image encoder: LiteMedSAM's frozen TinyViT plus small trainable adapters.

It returns the same `ImageFeatures` as our own encoder (a stride-16 embedding for the decoder,
skips at strides 2, 4 and 8), so every other part of K-Prism — prompt encoders, reference fusion,
MoE decoder, mask, quality and class heads — and every caller (sessions, caches) is unchanged.

- The TinyViT embedding (256 channels on a stride-4 grid: 64×64 at 256²) holds the anatomy. It
  becomes the stride-4 skip (projected, so small structures keep their detail) and, pooled, the
  stride-8 skip and the stride-16 grid the decoder attends to (cheap enough per click on a CPU).
- A trainable stem on KPrism's own input gives the stride-2 and stride-4 detail the ViT's 4×
  downsampled embedding lacks (thin vessels, edges), and sees all three CT windows.

The TinyViT never trains (`requires_grad` off, always in eval mode so its batch-norm statistics
stay the released ones), which lets training read its embeddings from an on-disk cache instead of
running it (`from_embedding`); `forward` and `from_embedding` give the same numbers for the same
embedding. At inference the same cache (`use_disk_cache`) makes a slice seen before — a reopened
case, a rerun, a slice trained on — cost a file read instead of seconds of encoding.
"""

from __future__ import annotations

import json
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .config import KPrismConfig
from .encoder import GlobalContext, ImageFeatures, SeparableBlock, conv_bn_act
from .foundation_input import foundation_input
from .tiny_vit import TinyViT, TinyViTConfig, fast_float32_encoder


class FoundationEncoder(nn.Module):
    def __init__(self, config: KPrismConfig):
        super().__init__()
        vit_config = TinyViTConfig.from_dict(json.loads(config.foundation))
        if vit_config.image_size != config.image_size:
            raise ValueError(f"The foundation encoder takes {vit_config.image_size}² slices but the model {config.image_size}²; "
                             "set the same image_size in both configs.")
        c2, c4, c8, _ = config.encoder_channels
        d = config.embed_dim
        self.vit = TinyViT(vit_config).requires_grad_(False).eval()
        stem_blocks, detail_blocks = config.encoder_blocks[0], config.encoder_blocks[1]
        self.stem = nn.Sequential(conv_bn_act(config.in_channels, c2, stride=2), conv_bn_act(c2, c2),
                                  *[SeparableBlock(c2) for _ in range(stem_blocks)])  # stride 2
        self.detail = nn.Sequential(conv_bn_act(c2, c4, stride=2), *[SeparableBlock(c4) for _ in range(detail_blocks)])  # stride 4
        self.project4 = nn.Sequential(nn.Conv2d(vit_config.embed_dim, c4, 1), nn.GELU())
        self.fuse4 = conv_bn_act(2 * c4, c4, kernel=1)
        self.down8 = conv_bn_act(c4, c8, stride=2)
        self.project16 = nn.Conv2d(vit_config.embed_dim, d, 1)
        self.down16 = nn.Conv2d(c8, d, 3, 2, 1)
        self.context = GlobalContext(d, config.decoder_heads)
        self.disk_cache = None  # an EmbeddingCache once use_disk_cache is called; not part of the weights
        self.recipe = "fp32"  # or "bf16": the encoder under bfloat16 autocast (CPU; benchmarks/encoder_precision.md)
        self._fast: list[TinyViT] = []  # the folded channels-last copy inference runs (a list: not a submodule)
        self.register_load_state_dict_post_hook(lambda module, keys: module._fast.clear())  # new weights: rebuild it

    def use_disk_cache(self, root=None, recipe: str = "fp32"):
        """Read and store TinyViT embeddings in the on-disk cache (keyed by the exact encoder input); returns it.

        `root` defaults to $KPRISM_EMBEDDING_CACHE or the kprism user cache. Entries hold float16 (the numbers
        training saw); a 256² slice takes 2 MB, so a 300-slice CT about 0.6 GB.
        """
        from ..embedding_cache import EmbeddingCache
        from ..encoder_weights import encoder_id

        self.disk_cache = EmbeddingCache(self.vit, encoder_id(self.vit), root=root, recipe=recipe)
        self.recipe = recipe
        return self.disk_cache

    def train(self, mode: bool = True) -> "FoundationEncoder":
        super().train(mode)
        self.vit.eval()  # frozen: its batch norms keep the released statistics
        return self

    def requires_grad_(self, requires_grad: bool = True) -> "FoundationEncoder":
        super().requires_grad_(requires_grad)
        self.vit.requires_grad_(False)  # whatever a trainer unfreezes, the pretrained weights stay as released
        return self

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen TinyViT embedding (B, 256, G, G) of KPrism-normalised slices (what the cache stores)."""
        with torch.no_grad():
            inputs = foundation_input(images)
            if self.disk_cache is None:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.recipe == "bf16"):
                    embedding = self._fast_vit()(inputs.contiguous(memory_format=torch.channels_last)).embedding
                return embedding.float()
            try:
                entries = self.disk_cache.get_many(list(inputs))
            except OSError as error:  # a full disk or an unwritable cache folder must not stop a segmentation
                warnings.warn(f"The embedding cache {self.disk_cache.root} cannot be written ({error}); encoding without "
                              "it from now on. Set KPRISM_EMBEDDING_CACHE to a writable folder, or to 'off'.",
                              RuntimeWarning, stacklevel=2)
                self.disk_cache = None
                return self.embed(images)
            return torch.stack([entry.embedding for entry in entries]).to(device=images.device, dtype=torch.float32)

    def _fast_vit(self) -> TinyViT:
        """Batch norms folded, channels-last (`fast_float32_encoder`): 1.6× faster, within 5e-6; built on first use."""
        device = next(self.vit.parameters()).device
        if not self._fast or next(self._fast[0].parameters()).device != device:  # first use, or the model moved
            self._fast[:] = [fast_float32_encoder(self.vit)]
        return self._fast[0]

    def forward(self, images: torch.Tensor) -> ImageFeatures:
        return self.from_embedding(images, self.embed(images))

    def from_embedding(self, images: torch.Tensor, embedding: torch.Tensor) -> ImageFeatures:
        """Features from KPrism-normalised slices and their (cached) TinyViT embedding."""
        f2 = self.stem(images)
        detail = self.detail(f2)
        embedding = embedding.to(detail.dtype)
        if embedding.shape[-2:] != detail.shape[-2:]:  # another input size than the ViT's native stride 4
            embedding = F.interpolate(embedding, size=detail.shape[-2:], mode="bilinear", align_corners=False)
        f4 = self.fuse4(torch.cat([self.project4(embedding), detail], dim=1))
        f8 = self.down8(f4)
        pooled = F.adaptive_avg_pool2d(embedding, f8.shape[-2] // 2)
        embedding16 = self.context(self.project16(pooled) + self.down16(f8))
        return ImageFeatures(embedding16, (f2, f4, f8))
