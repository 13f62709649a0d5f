"""MoE backends behind one config field, ``TransformerConfig.moe_backend``."""

from __future__ import annotations

from workloads.models.config import TransformerConfig
from workloads.models.moe import ExpertBackend


def build_backend(config: TransformerConfig) -> ExpertBackend:
    """The routed experts of one MoE layer; backends import their package lazily."""
    if config.moe_backend == "torch":
        from workloads.models.backends.torch_experts import TorchExperts

        return TorchExperts(config)
    if config.moe_backend == "deepspeed":
        from workloads.models.backends.deepspeed_experts import DeepSpeedExperts

        return DeepSpeedExperts(config)
    if config.moe_backend == "megablocks":
        from workloads.models.backends.megablocks_experts import MegablocksExperts

        return MegablocksExperts(config)
    raise ValueError(f"unknown moe_backend {config.moe_backend!r}")
