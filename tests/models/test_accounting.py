"""count_params against the built module and a hand count; flops_per_token against
torch's FLOP counter."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from workloads.models import TransformerConfig, build_model, count_params, flops_per_token

CONFIGS = {
    "dense-gelu-tied": TransformerConfig(d_model=64, num_layers=2, num_heads=4, d_ff=256),
    "dense-swiglu-untied": TransformerConfig(
        d_model=64, num_layers=3, num_heads=2, d_ff=160, activation="swiglu", tie_embeddings=False
    ),
    "moe-top2-shared-fine": TransformerConfig(
        d_model=64,
        num_layers=2,
        num_heads=4,
        d_ff=256,
        num_experts=8,
        top_k=2,
        granularity=2,
        num_shared_experts=1,
        activation="swiglu",
    ),
}


def test_count_params_total_matches_the_module(backend: str) -> None:
    for name, config in CONFIGS.items():
        if backend != "torch" and not config.is_moe:
            continue
        config = TransformerConfig(**{**config.__dict__, "moe_backend": backend})
        model = build_model(config)
        built = sum(p.numel() for p in model.parameters())
        assert count_params(config)["total"] == built, name


def test_active_params_of_a_top2_model_by_hand() -> None:
    config = TransformerConfig(
        vocab_size=100,
        d_model=32,
        num_layers=3,
        num_heads=4,
        d_ff=64,
        num_experts=4,
        top_k=2,
        tie_embeddings=False,
    )
    per_layer = 4 * 32 * 32 + 2 * 32 + 32 * 4 + 2 * (2 * 32 * 64)  # attn, norms, router, 2 experts
    hand = 2 * 100 * 32 + 32 + 3 * per_layer
    counts = count_params(config)
    assert counts["active"] == hand
    assert counts["total"] == hand + 3 * 2 * (2 * 32 * 64)
    assert counts["non_embedding"] == counts["total"] - 2 * 100 * 32


def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    # (M, K) @ (G, K, N) or (K, M) @ (M, N) jagged over M: 2 M K N either way.
    return 2 * a_shape[0] * a_shape[1] * b_shape[-1]


def _cpu_sdpa_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q, k, v)


def _cpu_sdpa_backward_flops(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, q, k, v)


# torch's counter knows CUDA attention kernels and plain matmuls; these three CPU ops it
# does not count at all, so their standard formulas are registered here.
CPU_FORMULAS = {
    torch.ops.aten._grouped_mm: _grouped_mm_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_flops_per_token_within_10_percent_of_the_counter(name: str) -> None:
    config = CONFIGS[name]
    model = build_model(config)
    tokens = torch.randint(0, config.vocab_size, (2, config.context_length))

    counter = FlopCounterMode(display=False, custom_mapping=CPU_FORMULAS)
    with counter:
        logits = model(tokens)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())
        (loss + model.aux_loss).backward()

    measured = counter.get_total_flops() / tokens.numel()
    assert measured == pytest.approx(flops_per_token(config), rel=0.10)
