"""Mixture-of-Experts feed-forward block with a mode-aware router; routing statistics are returned."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn


class RoutingStats(NamedTuple):
    """What one MoE call did with its tokens, returned next to its output instead of stored."""

    balance_loss: torch.Tensor  # scalar load-balancing loss; differentiable in the router
    usage: torch.Tensor  # (E,) token slots routed to each expert in this call (no gradient)


class MoEFeedForward(nn.Module):
    """Tokens are routed to experts by a router that sees the token *and* the prompt mode.

    ``top_k = 0`` mixes all experts softly; ``top_k = k`` keeps the k best gates (renormalised).
    Experts run densely over the few decoder tokens (tens per sample): on a CPU that is faster
    than gathering tokens per expert, and the gates zero out unselected experts exactly.
    The module holds only its weights: the balance loss and expert usage of a call come back
    with its output, so running it (inference included) changes nothing in the module.
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

    def forward(self, tokens: torch.Tensor, mode: torch.Tensor) -> tuple[torch.Tensor, RoutingStats]:
        """tokens (B, T, D); mode (B, D) mode embedding added to the router input only.

        Returns the output tokens (B, T, D) and the routing statistics of this call.
        """
        probs = F.softmax(self.router(tokens + mode.unsqueeze(1)), dim=-1)  # (B, T, E)
        gates = probs
        if self.top_k:
            top, index = probs.topk(self.top_k, dim=-1)
            gates = torch.zeros_like(probs).scatter(-1, index, top / top.sum(-1, keepdim=True))
        hidden = F.gelu(torch.einsum("btd,edh->bteh", tokens, self.w1) + self.b1)
        expert_out = torch.einsum("bteh,ehd->bted", self.dropout(hidden), self.w2) + self.b2
        out = (gates.unsqueeze(-1) * expert_out).sum(2)
        return out, self._routing_stats(probs, gates)

    def _routing_stats(self, probs: torch.Tensor, gates: torch.Tensor) -> RoutingStats:
        # Switch-Transformer balance loss: E · Σ_e (share of tokens sent to e) · (mean router prob of e).
        assigned = (gates > 0).float().flatten(0, 1)  # a comparison: carries no gradient
        share = assigned.mean(0) / assigned.sum(-1).mean()
        balance_loss = self.num_experts * (share * probs.flatten(0, 1).mean(0)).sum()
        return RoutingStats(balance_loss, assigned.sum(0))


class ExpertUsage:
    """Running count of the token slots each expert received, per decoder layer.

    The caller owns the counter and adds the predictions it wants counted (one validation run,
    one benchmark); the model keeps no statistics of its own.

        usage = ExpertUsage()
        usage.add(model.decode(features, prompts).expert_usage)
        usage.fractions()  # [[share of expert 0, 1, …] per layer]
    """

    def __init__(self) -> None:
        self.counts: Optional[torch.Tensor] = None  # (layers, experts) once something was added

    def add(self, usage: torch.Tensor) -> None:
        """Adds a (layers, experts) count, e.g. `Prediction.expert_usage`."""
        usage = usage.detach().to("cpu", torch.float64)
        if self.counts is not None and usage.shape != self.counts.shape:
            raise ValueError(f"Expert usage of shape {tuple(usage.shape)} cannot be added to counts of shape "
                             f"{tuple(self.counts.shape)} (another model?).")
        self.counts = usage.clone() if self.counts is None else self.counts + usage

    def fractions(self) -> list[list[float]]:
        """Per decoder layer, the share of routed token slots each expert received (empty before any add)."""
        if self.counts is None:
            return []
        totals = self.counts.sum(-1, keepdim=True)
        return torch.where(totals > 0, self.counts / totals.clamp(min=1), self.counts).tolist()

    def reset(self) -> None:
        self.counts = None
