"""The MoE layer over every backend: dense equivalence, backend agreement, routing."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from orchestrator.errors import UserError
from workloads.models import TransformerConfig
from workloads.models.backends.megablocks_experts import megablocks_available
from workloads.models.backends.torch_experts import grouped_matmul
from workloads.models.moe import FeedForward, MoELayer


def moe_config(backend: str, **overrides: object) -> TransformerConfig:
    fields = {"d_model": 32, "num_heads": 4, "d_ff": 64, "num_experts": 4, "top_k": 2}
    fields.update(overrides)
    fields["moe_backend"] = backend
    # DeepSpeed's fixed behaviour, used for every backend so that they compare.
    fields.setdefault("normalize_top_k", fields["top_k"] > 1)
    return TransformerConfig(**fields)


def copy_dense_into_single_expert(dense: FeedForward, layer: MoELayer) -> None:
    weights = layer.experts.export_weights()
    weights["w_in"] = dense.w_in.weight.detach().t().unsqueeze(0)
    weights["w_out"] = dense.w_out.weight.detach().t().unsqueeze(0)
    if dense.w_gate is not None:
        weights["w_gate"] = dense.w_gate.weight.detach().t().unsqueeze(0)
    layer.experts.import_weights({k: v.to(layer_device(layer)) for k, v in weights.items()})


def layer_device(layer: torch.nn.Module) -> torch.device:
    return next(layer.parameters()).device


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_one_expert_top1_equals_the_dense_ffn(backend: str, device: str, activation: str) -> None:
    torch.manual_seed(0)
    config = moe_config(backend, num_experts=1, top_k=1, activation=activation)
    dense = FeedForward(config.d_model, config.d_ff, activation).to(device)
    layer = MoELayer(config).to(device)
    copy_dense_into_single_expert(dense, layer)

    x = torch.randn(3, 5, config.d_model, device=device)
    x_dense, x_moe = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_dense, y_moe = dense(x_dense), layer(x_moe)
    torch.testing.assert_close(y_moe, y_dense)

    grad = torch.randn_like(y_dense)
    y_dense.backward(grad)
    y_moe.backward(grad)
    torch.testing.assert_close(x_moe.grad, x_dense.grad)
    expert_grads = {n: p.grad for n, p in layer.experts.named_parameters() if p.ndim == 3}
    if backend == "torch":
        torch.testing.assert_close(expert_grads["w_in"][0], dense.w_in.weight.grad.t())
        torch.testing.assert_close(expert_grads["w_out"][0], dense.w_out.weight.grad.t())


@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_backends_agree_with_torch_on_the_same_weights(
    backend: str, device: str, top_k: int, activation: str
) -> None:
    if backend == "torch":
        pytest.skip("torch is the reference")
    torch.manual_seed(1)
    reference = MoELayer(moe_config("torch", top_k=top_k, activation=activation)).to(device)
    other = MoELayer(moe_config(backend, top_k=top_k, activation=activation)).to(device)
    weights = reference.experts.export_weights()
    other.experts.import_weights(weights)
    torch.testing.assert_close(other.experts.export_weights(), weights)

    x = torch.randn(64, 32, device=device)
    x_ref, x_other = x.clone().requires_grad_(), x.clone().requires_grad_()
    (y_ref, routing_ref), (y_other, routing_other) = (
        reference(x_ref, return_routing=True),
        other(x_other, return_routing=True),
    )
    torch.testing.assert_close(y_other, y_ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(routing_other.experts, routing_ref.experts)

    grad = torch.randn_like(y_ref)
    (y_ref * grad).sum().backward()
    (y_other * grad).sum().backward()
    torch.testing.assert_close(x_other.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    router_ref = reference.experts.router.weight.grad
    router_other = [
        p.grad for n, p in other.experts.named_parameters() if "wg" in n or "router" in n
    ]
    torch.testing.assert_close(router_other[0], router_ref, rtol=1e-4, atol=1e-5)


def test_routing_selects_top_k_sets_with_normalised_weights() -> None:
    torch.manual_seed(2)
    layer = MoELayer(moe_config("torch", num_experts=6, top_k=3))
    x = torch.randn(50, 32)
    _, routing = layer(x, return_routing=True)
    assert routing.experts.shape == (50, 3)
    torch.testing.assert_close(routing.weights.sum(-1), torch.ones(50))
    expected = routing.logits.topk(3, dim=-1).indices.sort(-1).values
    assert torch.equal(layer.selected_experts(x), expected)


def test_top_k_equal_to_num_experts_uses_every_expert() -> None:
    layer = MoELayer(moe_config("torch", num_experts=3, top_k=3, normalize_top_k=False))
    _, routing = layer(torch.randn(10, 32), return_routing=True)
    assert torch.equal(routing.experts.sort(-1).values, torch.arange(3).expand(10, 3))
    torch.testing.assert_close(routing.weights.sum(-1), torch.ones(10))


def test_capacity_factor_drops_routes_beyond_capacity() -> None:
    torch.manual_seed(3)
    dropless = MoELayer(moe_config("torch", top_k=1))
    capped = MoELayer(moe_config("torch", top_k=1, capacity_factor=0.25))
    capped.load_state_dict(dropless.state_dict())
    x = torch.randn(64, 32)
    y_full, y_capped = dropless(x), capped(x)
    kept = (y_capped.abs().sum(-1) > 0).sum().item()
    assert kept <= 4 * 4  # capacity ceil(0.25 * 64 / 4) = 4 per expert
    rows = y_capped.abs().sum(-1) > 0
    torch.testing.assert_close(y_capped[rows], y_full[rows])


def test_router_losses_reach_the_router() -> None:
    torch.manual_seed(4)
    layer = MoELayer(moe_config("torch", aux_loss_coef=1.0, z_loss_coef=1.0))
    layer(torch.randn(40, 32))
    assert layer.last_stats["load_balance"].item() >= 0.99  # minimum 1 when balanced
    layer.aux_loss.backward()
    assert layer.experts.router.weight.grad.abs().sum() > 0


def test_shared_experts_add_a_dense_path() -> None:
    torch.manual_seed(5)
    layer = MoELayer(moe_config("torch", num_shared_experts=2, granularity=2))
    assert layer.shared is not None and layer.shared.w_in.out_features == 2 * 32
    x = torch.randn(8, 32)
    routed, _ = layer.experts(x)
    torch.testing.assert_close(layer(x), routed + layer.shared(x))


@pytest.mark.parametrize(("width_in", "width_out"), [(6, 3), (8, 4)])
def test_grouped_matmul_matches_a_loop_including_empty_groups(
    width_in: int, width_out: int
) -> None:
    x = torch.randn(10, width_in, requires_grad=True)
    w = torch.randn(4, width_in, width_out, requires_grad=True)
    counts = torch.tensor([3, 0, 5, 2])
    y = grouped_matmul(x, w, counts)
    expected = torch.cat([x[:3] @ w[0], x[3:8] @ w[2], x[8:] @ w[3]])
    torch.testing.assert_close(y, expected)
    y.sum().backward()  # a zero-stride gradient, which grouped_mm alone rejects
    assert x.grad is not None and torch.equal(w.grad[1], torch.zeros(width_in, width_out))
    torch.testing.assert_close(x.grad[:3], w[0].detach().sum(-1).expand(3, width_in))


def test_megablocks_without_cuda_names_the_extra() -> None:
    usable, _ = megablocks_available()
    if usable:
        pytest.skip("megablocks is usable here")
    with pytest.raises(UserError, match=r"pip install -e '\.\[gpu\]'"):
        MoELayer(moe_config("megablocks"))


def test_config_rejects_bad_moe_settings() -> None:
    with pytest.raises(ValueError, match="top_k"):
        moe_config("torch", top_k=5)
    with pytest.raises(ValueError, match="granularity"):
        moe_config("torch", granularity=3)
    with pytest.raises(ValueError, match="ep_size"):
        moe_config("torch", ep_size=2)
    with pytest.raises(ValueError, match="normalize_top_k"):
        dataclasses.replace(moe_config("deepspeed"), normalize_top_k=False)
