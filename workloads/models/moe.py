"""The feed-forward blocks: a dense FFN and a mixture-of-experts layer over backends.

The MoE layer owns what every backend shares: the router's losses (load balancing and
z-loss), the shared experts and the routing record handed out for analysis. A backend
owns the router weight and the routed experts, and only has to return the router
logits and the top-k choice with the combined expert output.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from workloads.models.config import TransformerConfig

logger = logging.getLogger("frontier.models")


class FeedForward(nn.Module):
    """``w_out(act(x w_in))`` for GELU, ``w_out(silu(x w_gate) * x w_in)`` for SwiGLU."""

    def __init__(self, d_model: int, d_hidden: int, activation: str) -> None:
        super().__init__()
        self.activation = activation
        self.w_in = nn.Linear(d_model, d_hidden, bias=False)
        self.w_gate = nn.Linear(d_model, d_hidden, bias=False) if activation == "swiglu" else None
        self.w_out = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w_gate is None:
            return self.w_out(F.gelu(self.w_in(x)))
        return self.w_out(F.silu(self.w_gate(x)) * self.w_in(x))


@dataclass
class Routing:
    """One forward pass's routing decisions, tokens flattened to ``(num_tokens, ...)``."""

    logits: torch.Tensor
    """Router logits, float32, ``(num_tokens, num_experts)``."""
    experts: torch.Tensor
    """Selected experts per token, ``(num_tokens, top_k)``, best first."""
    weights: torch.Tensor
    """Combine weights of the selected experts (normalised when the config says so)."""


def route(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k: (weights, experts), both ``(num_tokens, top_k)``."""
    probs = logits.softmax(dim=-1)
    weights, experts = probs.topk(top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def load_balancing_loss(routing: Routing, num_experts: int) -> torch.Tensor:
    """Switch Transformer's ``E * sum_i f_i P_i``: f_i the share of routes sent to expert
    i (all k choices), P_i its mean router probability. Equals 1 when balanced."""
    probs = routing.logits.softmax(dim=-1)
    counts = torch.bincount(routing.experts.flatten(), minlength=num_experts)
    share = counts.to(probs.dtype) / routing.experts.numel()
    return num_experts * (share * probs.mean(dim=0)).sum()


def z_loss(routing: Routing) -> torch.Tensor:
    """ST-MoE's router z-loss, ``mean(logsumexp(logits)^2)``: keeps logits small."""
    return routing.logits.logsumexp(dim=-1).square().mean()


class ExpertBackend(nn.Module):
    """Router weight plus routed experts. Subclasses live in ``workloads.models.backends``.

    Weights move between backends in one layout (see :meth:`export_weights`), which is
    how the tests compare backends on the same weights.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        """``x`` is ``(num_tokens, d_model)``; returns the combined expert output."""
        raise NotImplementedError

    def export_weights(self) -> dict[str, torch.Tensor]:
        """``router (E, d)``, ``w_in (E, d, d_e)``, ``w_gate`` (SwiGLU only) and
        ``w_out (E, d_e, d)``, copies over all experts (local ones only when sharded)."""
        raise NotImplementedError

    @torch.no_grad()
    def import_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Load the layout of :meth:`export_weights`, given over all experts."""
        raise NotImplementedError


class MoELayer(nn.Module):
    """Routed experts from the configured backend, optional shared experts, router losses.

    After each forward, :attr:`aux_loss` holds the weighted sum of this layer's
    load-balancing and z-losses (the model sums it over layers, as DeepSpeed's
    ``l_aux`` is summed) and :attr:`last_stats` the unweighted values, detached.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        from workloads.models.backends import build_backend

        self.config = config
        self.experts = build_backend(config)
        width = config.num_shared_experts * config.d_expert
        self.shared = FeedForward(config.d_model, width, config.activation) if width else None
        self.aux_loss: torch.Tensor = torch.zeros(())
        self.last_stats: dict[str, torch.Tensor] = {}

    def forward(
        self, x: torch.Tensor, *, return_routing: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, Routing]:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        y, routing = self.experts(flat)
        if self.shared is not None:
            y = y + self.shared(flat)

        balance = load_balancing_loss(routing, self.config.num_experts)
        zloss = z_loss(routing)
        self.aux_loss = self.config.aux_loss_coef * balance + self.config.z_loss_coef * zloss
        self.last_stats = {"load_balance": balance.detach(), "z_loss": zloss.detach()}

        y = y.reshape(shape)
        return (y, routing) if return_routing else y

    @torch.no_grad()
    def selected_experts(self, x: torch.Tensor) -> torch.Tensor:
        """Each token's selected expert set, ``(num_tokens, top_k)`` sorted ascending:
        the cell of the routing fan the token falls in."""
        _, routing = self.forward(x, return_routing=True)
        return routing.experts.sort(dim=-1).values
