"""Prompt encoders: sparse tokens say *what* to segment, dense maps say *where*.

All coordinates are model-grid pixels (x = column, y = row) on the S×S network input.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import KPrismConfig
from .encoder import ImageFeatures, conv_bn_act
from .position import DensePositionEncoding, FourierPositions

# Order of the mode flags; the router and the dense encoder both rely on it.
MODES = ("semantic", "in_context", "clicks", "box", "scribble", "prior")
CLICK_SIGMA = 1.5  # pixels on the stride-2 grid (3 input pixels): the Gaussian radius of a click


@dataclass
class Prompts:
    """A batch of prompts; every field is optional and any combination is allowed.

    class_ids:      (B,) long, -1 where a sample has no class prompt.
    ref_features:   (B, k, D, h, w) reference embeddings from ``KPrismModel.encode``.
    ref_masks:      (B, k, 1, S, S) reference foreground in [0, 1].
    points:         (B, N, 2) float (x, y); point_labels (B, N) long: 1 positive, 0 negative, -1 padding.
    boxes:          (B, 4) float (x0, y0, x1, y1); box_valid (B,) bool.
    scribbles:      (B, 2, S, S) positive and negative scribble masks.
    prior_logits:   (B, 1, S, S) logits of a previous mask to refine.
    """

    class_ids: Optional[torch.Tensor] = None
    ref_features: Optional[torch.Tensor] = None
    ref_masks: Optional[torch.Tensor] = None
    points: Optional[torch.Tensor] = None
    point_labels: Optional[torch.Tensor] = None
    boxes: Optional[torch.Tensor] = None
    box_valid: Optional[torch.Tensor] = None
    scribbles: Optional[torch.Tensor] = None
    prior_logits: Optional[torch.Tensor] = None

    def batch_size(self) -> int:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                return value.shape[0]
        raise ValueError("No prompt given: pass a class, a reference, clicks, a box, scribbles or a prior mask.")

    def to(self, device: torch.device | str) -> "Prompts":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self) if getattr(self, f.name) is not None})

    def tile(self, times: int) -> "Prompts":
        """The whole batch repeated `times` times (to pair the same prompts with several images)."""
        if times == 1:
            return self
        return replace(self, **{f.name: getattr(self, f.name).repeat(times, *[1] * (getattr(self, f.name).dim() - 1))
                                for f in fields(self) if getattr(self, f.name) is not None})

    def mode_flags(self) -> torch.Tensor:
        """(B, len(MODES)) float: which kinds of prompt each sample carries."""
        b = self.batch_size()
        device = next(getattr(self, f.name).device for f in fields(self) if getattr(self, f.name) is not None)
        zeros = torch.zeros(b, device=device)
        flags = [
            (self.class_ids >= 0).float() if self.class_ids is not None else zeros,
            (self.ref_masks.flatten(1).amax(1) > 0).float() if self.ref_masks is not None else zeros,
            (self.point_labels >= 0).any(1).float() if self.point_labels is not None else zeros,
            self.box_valid.float() if self.box_valid is not None else zeros,
            (self.scribbles.flatten(1).amax(1) > 0).float() if self.scribbles is not None else zeros,
            torch.ones(b, device=device) if self.prior_logits is not None else zeros,
        ]
        return torch.stack(flags, dim=1)


def render_clicks(points: torch.Tensor, labels: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 2, S, S) Gaussian maps of positive and negative clicks (the nearest click wins)."""
    b = points.shape[0]
    coords = torch.arange(size, device=points.device, dtype=points.dtype) + 0.5
    dx2 = (coords.view(1, 1, 1, size) - points[..., 0].view(b, -1, 1, 1)) ** 2
    dy2 = (coords.view(1, 1, size, 1) - points[..., 1].view(b, -1, 1, 1)) ** 2
    far = torch.finfo(points.dtype).max
    maps = []
    for polarity in (1, 0):
        # Minimum squared distance first, then one exp per pixel: exp per click dominated the cost.
        mask = (labels != polarity).view(b, -1, 1, 1)
        nearest = (dx2 + dy2).masked_fill(mask, far).amin(1, keepdim=True)
        maps.append(torch.exp(-nearest / (2 * CLICK_SIGMA**2)))
    return torch.cat(maps, dim=1)


def render_boxes(boxes: torch.Tensor, valid: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 1, S, S) filled box maps."""
    coords = torch.arange(size, device=boxes.device, dtype=boxes.dtype) + 0.5
    inside_x = (coords.view(1, 1, -1) >= boxes[:, 0:1, None]) & (coords.view(1, 1, -1) <= boxes[:, 2:3, None])
    inside_y = (coords.view(1, -1, 1) >= boxes[:, 1:2, None]) & (coords.view(1, -1, 1) <= boxes[:, 3:4, None])
    return ((inside_x & inside_y) & valid.view(-1, 1, 1)).float().unsqueeze(1)


class SparsePromptEncoder(nn.Module):
    """Builds the token sequence: class token, reference summaries, clicks and box corners."""

    def __init__(self, config: KPrismConfig):
        super().__init__()
        d = config.embed_dim
        self.image_size = config.image_size
        self.class_tokens = nn.Embedding(config.num_classes, d)
        self.no_class = nn.Parameter(torch.zeros(d))
        self.reference_projection = nn.Linear(d, d)
        self.reference_kind = nn.Embedding(2, d)  # foreground / background summary
        self.no_reference = nn.Parameter(torch.zeros(2, d))
        self.positions = FourierPositions(d)
        self.click_feature = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
        self.click_polarity = nn.Embedding(2, d)  # index 0 negative, 1 positive
        self.no_point = nn.Parameter(torch.zeros(d))
        self.box_corner = nn.Embedding(2, d)
        self.no_box = nn.Parameter(torch.zeros(2, d))

    def forward(self, prompts: Prompts, features: ImageFeatures, batch: int) -> torch.Tensor:
        tokens = [self._class_tokens(prompts.class_ids, batch)]
        tokens.append(self._reference_tokens(prompts, batch))
        if prompts.points is not None and prompts.points.shape[1] > 0:
            tokens.append(self._click_tokens(prompts.points, prompts.point_labels, features.embedding))
        tokens.append(self._box_tokens(prompts.boxes, prompts.box_valid, batch))
        return torch.cat(tokens, dim=1)

    def _class_tokens(self, class_ids: Optional[torch.Tensor], batch: int) -> torch.Tensor:
        if class_ids is None:
            return self.no_class.expand(batch, 1, -1)
        present = (class_ids >= 0).unsqueeze(-1)
        embedded = self.class_tokens(class_ids.clamp(min=0))
        return torch.where(present, embedded, self.no_class).unsqueeze(1)

    def _reference_tokens(self, prompts: Prompts, batch: int) -> torch.Tensor:
        """Foreground and background summaries, averaged over the k references."""
        if prompts.ref_features is None:
            return self.no_reference.expand(batch, -1, -1)
        feats = prompts.ref_features  # (B, k, D, h, w)
        masks = F.adaptive_avg_pool2d(prompts.ref_masks.flatten(0, 1), feats.shape[-2:]).view(
            feats.shape[0], feats.shape[1], 1, *feats.shape[-2:])
        summaries = []
        for weight in (masks, 1 - masks):
            pooled = (feats * weight).sum((1, 3, 4)) / weight.sum((1, 3, 4)).clamp(min=1e-6)
            summaries.append(pooled)
        stacked = self.reference_projection(torch.stack(summaries, dim=1))  # (B, 2, D)
        return stacked + self.reference_kind.weight

    def _click_tokens(self, points: torch.Tensor, labels: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        normalised = points / self.image_size
        grid = (2 * normalised - 1).unsqueeze(2)  # (B, N, 1, 2) for grid_sample
        sampled = F.grid_sample(embedding, grid, align_corners=False).squeeze(-1).transpose(1, 2)
        tokens = self.positions(normalised) + self.click_feature(sampled)
        tokens = tokens + self.click_polarity(labels.clamp(min=0, max=1))
        return torch.where((labels < 0).unsqueeze(-1), self.no_point, tokens)

    def _box_tokens(self, boxes: Optional[torch.Tensor], valid: Optional[torch.Tensor], batch: int) -> torch.Tensor:
        if boxes is None:
            return self.no_box.expand(batch, -1, -1)
        corners = boxes.view(-1, 2, 2) / self.image_size
        tokens = self.positions(corners) + self.box_corner.weight
        return torch.where(valid.view(-1, 1, 1), tokens, self.no_box)


class ReferenceFusion(nn.Module):
    """Brings the reference into the query's *image features*, not only its tokens.

    Query pixels attend to reference pixels whose keys carry a foreground/background embedding
    (KSAM: tokens alone reach 0.30 Dice, fused features 0.89). A correspondence map — each query
    pixel's best cosine match among reference foreground pixels versus background pixels — is
    added as a dense cue.
    """

    def __init__(self, config: KPrismConfig):
        super().__init__()
        d = config.embed_dim
        self.mask_embedding = nn.Embedding(2, d)  # background, foreground
        self.position = DensePositionEncoding(d)
        self.norm = nn.LayerNorm(d)
        self.attention = nn.MultiheadAttention(d, config.decoder_heads, batch_first=True)
        self.correspondence = nn.Conv2d(2, d, 1)

    def forward(self, embedding: torch.Tensor, ref_features: torch.Tensor, ref_masks: torch.Tensor) -> torch.Tensor:
        b, d, h, w = embedding.shape
        k = ref_features.shape[1]
        weights = F.adaptive_avg_pool2d(ref_masks.flatten(0, 1), (h, w)).view(b, k * h * w, 1)
        ref_tokens = ref_features.permute(0, 1, 3, 4, 2).reshape(b, k * h * w, d)
        pos = self.position(h, w).flatten(1).transpose(0, 1)
        keys = self.norm(ref_tokens) + pos.repeat(k, 1) + weights * self.mask_embedding.weight[1] + (
            1 - weights) * self.mask_embedding.weight[0]
        query = embedding.flatten(2).transpose(1, 2)
        fused = self.attention(self.norm(query) + pos, keys, keys, need_weights=False)[0]
        corr = self._correspondence(query, ref_tokens, weights.squeeze(-1))
        dense = self.correspondence(corr.transpose(1, 2).reshape(b, 2, h, w))
        return embedding + fused.transpose(1, 2).reshape(b, d, h, w) + dense

    @staticmethod
    def _correspondence(query: torch.Tensor, ref: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """(B, hw, 2): best cosine similarity to reference foreground and to background pixels."""
        sim = F.normalize(query, dim=-1) @ F.normalize(ref, dim=-1).transpose(1, 2)  # (B, hw, k·hw)
        # A pixel counts as foreground if it holds at least half of the reference's peak coverage,
        # so small structures that cover under half a feature cell are still found.
        peak = weights.amax(1, keepdim=True).clamp(min=1e-6)
        is_fg = (weights >= 0.5 * peak) & (weights > 0)
        is_bg = weights < 0.5
        fg = sim.masked_fill(~is_fg.unsqueeze(1), -1.0).amax(-1)
        bg = sim.masked_fill(~is_bg.unsqueeze(1), -1.0).amax(-1)
        return torch.stack([fg, bg], dim=-1)


def conv_act(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """A 3×3 convolution (with bias) and GELU: no statistics that depend on the batch."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GELU())


class DensePromptEncoder(nn.Module):
    """Encodes click, scribble, box and prior-mask maps at strides 2, 4, 8 and 16.

    Maps are rendered directly at stride 2: at full resolution they cost as much as the rest of
    a click's decoding, and a 3-pixel click blob survives the halving.
    """

    IN_CHANNELS = 6  # positive clicks, negative clicks, positive scribble, negative scribble, box, prior

    def __init__(self, config: KPrismConfig):
        super().__init__()
        c2, c4, c8, _ = config.encoder_channels
        self.image_size = config.image_size
        if config.prompt_norm not in ("batch", "none"):
            raise ValueError(f"prompt_norm must be 'batch' or 'none', not {config.prompt_norm!r}.")
        block = conv_bn_act if config.prompt_norm == "batch" else conv_act
        self.down2 = block(self.IN_CHANNELS, c2)
        self.down4 = block(c2, c4, stride=2)
        self.down8 = block(c4, c8, stride=2)
        self.down16 = nn.Sequential(nn.Conv2d(c8, config.embed_dim, 3, 2, 1))

    def maps(self, prompts: Prompts, batch: int) -> torch.Tensor:
        """(B, 6, S/2, S/2) prompt maps on the stride-2 grid."""
        half = self.image_size // 2
        device = self.down16[0].weight.device
        out = torch.zeros(batch, self.IN_CHANNELS, half, half, device=device)
        if prompts.points is not None and prompts.points.shape[1] > 0:
            out[:, 0:2] = render_clicks(prompts.points / 2, prompts.point_labels, half)
        if prompts.scribbles is not None:
            # Max-pooling keeps one-pixel scribble strokes that averaging would dilute.
            out[:, 2:4] = F.max_pool2d(prompts.scribbles, 2)
        if prompts.boxes is not None:
            out[:, 4:5] = render_boxes(prompts.boxes / 2, prompts.box_valid, half)
        if prompts.prior_logits is not None:
            # tanh keeps "no prior" (0) distinct from a confident background prior (-1).
            out[:, 5:6] = torch.tanh(F.avg_pool2d(prompts.prior_logits, 2) / 2)
        return out

    def forward(self, prompts: Prompts, batch: int) -> tuple[torch.Tensor, ...]:
        x2 = self.down2(self.maps(prompts, batch))
        x4 = self.down4(x2)
        x8 = self.down8(x4)
        return x2, x4, x8, self.down16(x8)
