"""The ``torch`` backend: tokens sorted by expert, one grouped matrix multiply per layer.

Dropless by default: every route is computed. Tokens are gathered in expert order, the
experts run as a grouped GEMM over the contiguous groups (``torch.nn.functional.
grouped_mm`` where the device and dtype allow it, else a loop over experts), and the
weighted results are scattered back with ``index_add_``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from workloads.models.config import TransformerConfig
from workloads.models.moe import ExpertBackend, Routing, route


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: grouped_mm's backward
    rejects the zero-stride gradients that ``.sum()`` and ``expand`` produce."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether torch's grouped GEMM runs here: float32 on CPU, bfloat16 on CUDA compute
    capability >= 8.0, and every row a multiple of 16 bytes (the kernels' alignment)."""
    if not hasattr(F, "grouped_mm") or x.dtype != w.dtype:
        return False
    row_sizes = (x.shape[-1], *w.shape[1:])
    if any(size * x.element_size() % 16 for size in row_sizes):
        return False
    if x.device.type == "cpu":
        return x.dtype == torch.float32
    if x.device.type == "cuda":
        capable = torch.cuda.get_device_capability(x.device) >= (8, 0)
        return x.dtype == torch.bfloat16 and capable
    return False


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` in consecutive groups of ``counts[e]`` times ``w[e]`` (``E, K, N``)."""
    if grouped_mm_supported(x, w):
        offsets = counts.cumsum(0).to(torch.int32)
        return _ContiguousGrad.apply(F.grouped_mm(x, w, offs=offsets))

    # Fallback: one matmul per expert. It needs the counts on the host (one sync).
    chunks = x.split(counts.tolist())
    return torch.cat([chunk @ w[e] for e, chunk in enumerate(chunks)])


class TorchExperts(ExpertBackend):
    """Experts stacked as ``(E, d_model, d_expert)`` tensors; runs on CPU and GPU."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config)
        num, d, d_e = config.num_experts, config.d_model, config.d_expert
        self.router = nn.Linear(d, num, bias=False)
        self.w_in = nn.Parameter(torch.empty(num, d, d_e))
        swiglu = config.activation == "swiglu"
        self.w_gate = nn.Parameter(torch.empty(num, d, d_e)) if swiglu else None
        self.w_out = nn.Parameter(torch.empty(num, d_e, d))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.init_std
        for weight in (self.router.weight, self.w_in, self.w_gate):
            if weight is not None:
                weight.normal_(0.0, std)
        self.w_out.normal_(0.0, std / math.sqrt(2 * self.config.num_layers))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        config = self.config
        logits = F.linear(x.float(), self.router.weight.float())
        weights, experts = route(logits, config.top_k, config.normalize_top_k)

        # Sort the (token, choice) routes by expert; a stable sort keeps token order.
        flat_experts = experts.flatten()
        order = flat_experts.argsort(stable=True)
        counts = torch.bincount(flat_experts, minlength=config.num_experts)
        if config.capacity_factor > 0:
            order, counts = self._drop_over_capacity(order, flat_experts, counts, x.shape[0])

        token_index = order // config.top_k
        hidden = self._experts(x[token_index], counts)
        hidden = hidden * weights.flatten()[order].unsqueeze(-1).to(hidden.dtype)
        y = torch.zeros_like(x).index_add_(0, token_index, hidden.to(x.dtype))
        return y, Routing(logits=logits, experts=experts, weights=weights)

    def _experts(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # Autocast does not reach grouped_mm; cast by hand so the bf16 kernel is used.
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        w_in = self.w_in.to(x.dtype)
        hidden = grouped_matmul(x, w_in, counts)
        if self.w_gate is None:
            hidden = F.gelu(hidden)
        else:
            hidden = F.silu(grouped_matmul(x, self.w_gate.to(x.dtype), counts)) * hidden
        return grouped_matmul(hidden, self.w_out.to(x.dtype), counts)

    def _drop_over_capacity(
        self,
        order: torch.Tensor,
        flat_experts: torch.Tensor,
        counts: torch.Tensor,
        num_tokens: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep each expert's first ``capacity`` routes in token order; drop the rest."""
        config = self.config
        capacity = math.ceil(
            config.capacity_factor * num_tokens * config.top_k / config.num_experts
        )
        starts = counts.cumsum(0) - counts
        sorted_experts = flat_experts[order]
        position = torch.arange(order.numel(), device=order.device) - starts[sorted_experts]
        keep = position < capacity
        return order[keep], counts.clamp(max=capacity)

    def export_weights(self) -> dict[str, torch.Tensor]:
        weights = {
            "router": self.router.weight,
            "w_in": self.w_in,
            "w_out": self.w_out,
        }
        if self.w_gate is not None:
            weights["w_gate"] = self.w_gate
        return {name: w.detach().clone() for name, w in weights.items()}

    @torch.no_grad()
    def import_weights(self, weights: dict[str, torch.Tensor]) -> None:
        self.router.weight.copy_(weights["router"])
        self.w_in.copy_(weights["w_in"])
        self.w_out.copy_(weights["w_out"])
        if self.w_gate is not None:
            self.w_gate.copy_(weights["w_gate"])
