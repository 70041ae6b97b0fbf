"""Random Fourier position encodings (as in SAM), kept as buffers so checkpoints carry them."""

from __future__ import annotations

import math

import torch
from torch import nn


class FourierPositions(nn.Module):
    """Maps normalised (x, y) in [0, 1] to `dim` sinusoidal features with a fixed random basis."""

    def __init__(self, dim: int, scale: float = 1.0, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        # A persistent buffer: the basis is saved and loaded with the weights, never re-drawn.
        self.register_buffer("basis", scale * torch.randn(2, dim // 2, generator=generator))

    def forward(self, xy: torch.Tensor) -> torch.Tensor:
        projected = (2 * xy - 1) @ self.basis * (2 * math.pi)
        return torch.cat([projected.sin(), projected.cos()], dim=-1)


class DensePositionEncoding(nn.Module):
    """Position features for every cell of an h×w grid, shape (dim, h, w)."""

    def __init__(self, dim: int):
        super().__init__()
        self.fourier = FourierPositions(dim)

    def forward(self, h: int, w: int) -> torch.Tensor:
        ys = (torch.arange(h, device=self.fourier.basis.device) + 0.5) / h
        xs = (torch.arange(w, device=self.fourier.basis.device) + 0.5) / w
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (h, w, 2) as (x, y)
        return self.fourier(grid).permute(2, 0, 1)
