"""Two-way transformer decoder (tokens ↔ image) whose token feed-forward blocks are MoE."""

from __future__ import annotations

import torch
from torch import nn

from .config import KPrismConfig
from .moe import MoEFeedForward, RoutingStats


class DecoderLayer(nn.Module):
    """Token self-attention → tokens read the image → MoE FFN → the image reads the tokens."""

    def __init__(self, config: KPrismConfig):
        super().__init__()
        d, h = config.embed_dim, config.decoder_heads
        self.self_attention = nn.MultiheadAttention(d, h, batch_first=True)
        self.token_to_image = nn.MultiheadAttention(d, h, batch_first=True)
        self.moe = MoEFeedForward(d, config.expert_hidden, config.num_experts, config.expert_top_k, config.dropout)
        self.image_to_token = nn.MultiheadAttention(d, h, batch_first=True)
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(4))

    def forward(self, tokens, token_pos, image, image_pos, mode) -> tuple[torch.Tensor, torch.Tensor, RoutingStats]:
        q = tokens + token_pos
        tokens = self.norms[0](tokens + self.self_attention(q, q, tokens, need_weights=False)[0])
        q = tokens + token_pos
        tokens = self.norms[1](tokens + self.token_to_image(q, image + image_pos, image, need_weights=False)[0])
        expert_tokens, routing = self.moe(tokens, mode)
        tokens = self.norms[2](tokens + expert_tokens)
        k = tokens + token_pos
        image = self.norms[3](image + self.image_to_token(image + image_pos, k, tokens, need_weights=False)[0])
        return tokens, image, routing


class MoEDecoder(nn.Module):
    def __init__(self, config: KPrismConfig):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.decoder_layers))
        d = config.embed_dim
        self.final_attention = nn.MultiheadAttention(d, config.decoder_heads, batch_first=True)
        self.final_norm = nn.LayerNorm(d)

    def forward(self, tokens: torch.Tensor, image: torch.Tensor, image_pos: torch.Tensor,
                mode: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[RoutingStats]]:
        """tokens (B, T, D); image (B, D, h, w); image_pos (D, h, w); mode (B, D).

        Returns the updated tokens, the image features (B, D, h, w) and each layer's routing statistics.
        """
        b, d, h, w = image.shape
        flat = image.flatten(2).transpose(1, 2)
        pos = image_pos.flatten(1).transpose(0, 1).unsqueeze(0)
        token_pos = tokens  # the initial prompt tokens double as their own positional code (as in SAM)
        routing = []
        for layer in self.layers:
            tokens, flat, layer_routing = layer(tokens, token_pos, flat, pos, mode)
            routing.append(layer_routing)
        q = tokens + token_pos
        tokens = self.final_norm(tokens + self.final_attention(q, flat + pos, flat, need_weights=False)[0])
        return tokens, flat.transpose(1, 2).reshape(b, d, h, w), routing
