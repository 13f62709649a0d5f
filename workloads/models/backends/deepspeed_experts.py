"""The ``deepspeed`` backend: DeepSpeed's MoE layer, experts sharded over ``ep_size`` ranks.

Each rank holds ``num_experts / ep_size`` experts; tokens travel to them by all-to-all
in DeepSpeed's expert-parallel group. Expert parameters carry DeepSpeed's
``allreduce=False`` and ``group_name`` marks, so the optimizer must get its parameter
groups from :func:`moe_param_groups` (DeepSpeed's split) before the engine is built.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from workloads.models.config import TransformerConfig
from workloads.models.moe import ExpertBackend, FeedForward, Routing, route

logger = logging.getLogger("frontier.models")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ensure_distributed() -> None:
    """DeepSpeed's MoE needs ``deepspeed.comm``; a single process gets a 1-rank group."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        logger.info("moe_backend deepspeed: starting a 1-rank %s process group", backend)
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
        )
    import deepspeed

    deepspeed.init_distributed(dist_backend=dist.get_backend())


def _moe_class() -> type:
    from deepspeed.moe.layer import MoE

    class _MoE(MoE):
        """DeepSpeed's MoE whose process groups may be set up before the engine asks."""

        def set_deepspeed_parallelism(
            self, use_data_before_expert_parallel_: bool = False
        ) -> None:
            if self.deepspeed_moe.ep_group is None:
                super().set_deepspeed_parallelism(use_data_before_expert_parallel_)

    return _MoE


class DeepSpeedExperts(ExpertBackend):
    """``deepspeed.moe.layer.MoE`` with dropless (or capacity) top-k gating, no noise."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config)
        ensure_distributed()
        if dist.get_world_size() % config.ep_size:
            raise ValueError(
                f"ep_size ({config.ep_size}) must divide the worker count "
                f"({dist.get_world_size()})"
            )
        expert = FeedForward(config.d_model, config.d_expert, config.activation)
        dropless = config.capacity_factor == 0
        self.moe = _moe_class()(
            hidden_size=config.d_model,
            expert=expert,
            num_experts=config.num_experts,
            ep_size=config.ep_size,
            k=config.top_k,
            capacity_factor=config.capacity_factor or 1.0,
            eval_capacity_factor=config.capacity_factor or 1.0,
            min_capacity=0,
            drop_tokens=not dropless,
            use_rts=False,
            top2_2nd_expert_sampling=False,
        )
        self.num_local_experts = config.num_experts // config.ep_size
        rank_in_group = dist.get_rank() % config.ep_size
        self.first_expert = rank_in_group * self.num_local_experts
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        std = self.config.init_std
        self.router_weight.normal_(0.0, std)
        for expert in self.local_experts:
            for name, param in expert.named_parameters():
                scale = 2 * self.config.num_layers if name.startswith("w_out") else 1
                param.normal_(0.0, std / scale**0.5)

    @property
    def router_weight(self) -> torch.Tensor:
        return self.moe.deepspeed_moe.gate.wg.weight

    @property
    def local_experts(self) -> list[FeedForward]:
        return list(self.moe.deepspeed_moe.experts.deepspeed_experts)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        self.moe.set_deepspeed_parallelism()
        y, _, _ = self.moe(x)

        # DeepSpeed keeps its gate's choice inside; the same softmax top-k is recomputed
        # here (d_model x E FLOPs per token) so losses and analysis match other backends.
        logits = F.linear(x.float(), self.router_weight.float())
        weights, experts = route(logits, self.config.top_k, self.config.normalize_top_k)
        return y, Routing(logits=logits, experts=experts, weights=weights)

    def export_weights(self) -> dict[str, torch.Tensor]:
        experts = self.local_experts
        weights: dict[str, Any] = {
            "router": self.router_weight.detach().clone(),
            "w_in": torch.stack([e.w_in.weight.detach().t() for e in experts]),
            "w_out": torch.stack([e.w_out.weight.detach().t() for e in experts]),
        }
        if self.config.activation == "swiglu":
            weights["w_gate"] = torch.stack([e.w_gate.weight.detach().t() for e in experts])
        return weights

    @torch.no_grad()
    def import_weights(self, weights: dict[str, torch.Tensor]) -> None:
        self.router_weight.copy_(weights["router"])
        for local, expert in enumerate(self.local_experts):
            index = self.first_expert + local
            expert.w_in.weight.copy_(weights["w_in"][index].t())
            expert.w_out.weight.copy_(weights["w_out"][index].t())
            if expert.w_gate is not None:
                expert.w_gate.weight.copy_(weights["w_gate"][index].t())


def moe_param_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Split optimizer groups so expert parameters sit in DeepSpeed's MoE groups.

    Each input group needs a unique ``name``. Models without DeepSpeed experts pass
    through unchanged.
    """
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    return split_params_into_different_moe_groups_for_optimizer(groups)
