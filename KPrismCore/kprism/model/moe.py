"""Mixture-of-Experts feed-forward block with a mode-aware router and usage statistics."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MoEFeedForward(nn.Module):
    """Tokens are routed to experts by a router that sees the token *and* the prompt mode.

    ``top_k = 0`` mixes all experts softly; ``top_k = k`` keeps the k best gates (renormalised).
    Experts run densely over the few decoder tokens (tens per sample): on a CPU that is faster
    than gathering tokens per expert, and the gates zero out unselected experts exactly.
    """

    def __init__(self, dim: int, hidden: int, num_experts: int, top_k: int, dropout: float = 0.0):
        super().__init__()
        if not 0 <= top_k <= num_experts:
            raise ValueError(f"top_k must be between 0 and num_experts ({num_experts}); got {top_k}.")
        self.num_experts, self.top_k = num_experts, top_k
        self.router = nn.Linear(dim, num_experts)
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.b1 = nn.Parameter(torch.zeros(num_experts, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.b2 = nn.Parameter(torch.zeros(num_experts, dim))
        nn.init.xavier_uniform_(self.w1.view(-1, hidden))
        nn.init.xavier_uniform_(self.w2.view(-1, dim))
        self.dropout = nn.Dropout(dropout)
        # Usage counts for inspection; not part of the weights.
        self.register_buffer("usage", torch.zeros(num_experts), persistent=False)
        self.balance_loss = torch.zeros(())

    def forward(self, tokens: torch.Tensor, mode: torch.Tensor) -> torch.Tensor:
        """tokens (B, T, D); mode (B, D) mode embedding added to the router input only."""
        probs = F.softmax(self.router(tokens + mode.unsqueeze(1)), dim=-1)  # (B, T, E)
        gates = probs
        if self.top_k:
            top, index = probs.topk(self.top_k, dim=-1)
            gates = torch.zeros_like(probs).scatter(-1, index, top / top.sum(-1, keepdim=True))
        hidden = F.gelu(torch.einsum("btd,edh->bteh", tokens, self.w1) + self.b1)
        expert_out = torch.einsum("bteh,ehd->bted", self.dropout(hidden), self.w2) + self.b2
        out = (gates.unsqueeze(-1) * expert_out).sum(2)
        self._record(probs, gates)
        return out

    def _record(self, probs: torch.Tensor, gates: torch.Tensor) -> None:
        # Switch-Transformer balance loss: E · Σ_e (share of tokens sent to e) · (mean router prob of e).
        assigned = (gates > 0).float().flatten(0, 1)
        share = assigned.mean(0) / assigned.sum(-1).mean()
        self.balance_loss = self.num_experts * (share * probs.flatten(0, 1).mean(0)).sum()
        with torch.no_grad():
            self.usage += assigned.sum(0)

    def usage_fraction(self) -> torch.Tensor:
        """Share of routed token slots each expert received since the last reset."""
        total = self.usage.sum()
        return self.usage / total if total > 0 else self.usage.clone()

    def reset_usage(self) -> None:
        self.usage.zero_()
