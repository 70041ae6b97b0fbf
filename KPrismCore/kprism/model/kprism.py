"""KPrismModel: encoder → prompt encoders (sparse tokens + dense maps) → MoE decoder → heads."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .class_head import ClassHead
from .config import KPrismConfig
from .decoder import MoEDecoder
from .encoder import ImageEncoder, ImageFeatures
from .foundation_encoder import FoundationEncoder
from .heads import MaskHead, QualityHead
from .position import DensePositionEncoding
from .prompts import MODES, DensePromptEncoder, Prompts, ReferenceFusion, SparsePromptEncoder


class Prediction(NamedTuple):
    """Everything one decode produced; the model keeps nothing of it."""

    logits: torch.Tensor  # (B, 1, S/2, S/2): upsample with `upsample_logits` to the grid you need
    quality: torch.Tensor  # (B,) predicted Dice of the mask
    aux_logits: list[torch.Tensor]  # deep-supervision logits at strides 8 and 4; empty unless asked for
    balance_loss: torch.Tensor  # MoE load-balancing loss (scalar), the mean over decoder layers
    expert_usage: torch.Tensor  # (decoder layers, experts) token slots routed to each expert; see `ExpertUsage`


class KPrismModel(nn.Module):
    def __init__(self, config: KPrismConfig):
        super().__init__()
        self.config = config
        d = config.embed_dim
        # `medsam`: a pretrained, frozen TinyViT with trainable adapters; otherwise our own small encoder.
        self.encoder = FoundationEncoder(config) if config.foundation else ImageEncoder(config)
        self.sparse = SparsePromptEncoder(config)
        self.dense = DensePromptEncoder(config)
        self.reference_fusion = ReferenceFusion(config)
        self.image_position = DensePositionEncoding(d)
        self.mode_embedding = nn.Linear(len(MODES), d)
        self.output_tokens = nn.Embedding(2, d)  # mask token, quality token
        self.decoder = MoEDecoder(config)
        self.mask_head = MaskHead(config)
        self.quality_head = QualityHead(config)
        self.class_head = ClassHead(config) if config.class_head else None

    def encode(self, images: torch.Tensor) -> ImageFeatures:
        """(B, C, S, S) normalised images → cached features. Run once per slice."""
        return self.encoder(images)

    def decode(self, features: ImageFeatures, prompts: Prompts, deep_supervision: bool = False) -> Prediction:
        """Answers one batch of prompts on already-encoded images (cheap: run per click).

        `deep_supervision` adds the stride-8 and stride-4 logits training needs (`aux_logits`);
        inference leaves it off and skips their cost.
        """
        batch = prompts.batch_size()
        features = features.expand(batch)
        mode_flags = prompts.mode_flags()
        if not bool((mode_flags[:, :] > 0).any(1).all()):
            raise ValueError("Every sample needs at least one prompt (class, reference, click, box, scribble or prior).")
        mode = self.mode_embedding(mode_flags)

        d2, d4, d8, d16 = self.dense(prompts, batch)
        image = features.embedding + d16
        if prompts.ref_features is not None:
            image = self.reference_fusion(image, prompts.ref_features, prompts.ref_masks)

        sparse = self.sparse(prompts, features, batch)
        tokens = torch.cat([self.output_tokens.weight.expand(batch, -1, -1), sparse], dim=1)
        h, w = image.shape[-2:]
        tokens, image, routing = self.decoder(tokens, image, self.image_position(h, w), mode)

        logits, aux = self.mask_head(image, features.skips, (d2, d4, d8), tokens[:, 0], deep_supervision)
        quality = self.quality_head(tokens[:, 1])
        balance = torch.stack([layer.balance_loss for layer in routing]).mean()
        usage = torch.stack([layer.usage for layer in routing])
        return Prediction(logits, quality, aux, balance, usage)

    def segment_all(self, features: ImageFeatures) -> torch.Tensor:
        """Every class at once from encoded slices: (B, num_classes, S/2, S/2) logits (needs the class head)."""
        if self.class_head is None:
            raise ValueError("This model has no one-pass class head (config class_head=False); decode classes with prompts.")
        return self.class_head(features)

    def forward(self, images: torch.Tensor, prompts: Prompts, deep_supervision: bool = False) -> Prediction:
        return self.decode(self.encode(images), prompts, deep_supervision)


def upsample_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of mask logits to any (rows, columns) grid."""
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def build_model(config: Optional[KPrismConfig] = None) -> KPrismModel:
    return KPrismModel(config or KPrismConfig())
