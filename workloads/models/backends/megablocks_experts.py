"""The ``megablocks`` backend: megablocks' dropless MoE (dMoE), GPU only.

Installed by the ``gpu`` extra (``pip install -e '.[gpu]'``). Its router and expert
weights are used as they are; this module only maps them to the shared layout and
recomputes the softmax top-k for the router losses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from orchestrator.errors import UserError
from workloads.models.config import TransformerConfig
from workloads.models.moe import ExpertBackend, Routing, route

INSTALL_HINT = "install the gpu extra: pip install -e '.[gpu]'"


def megablocks_available() -> tuple[bool, str]:
    """(usable, reason when not): needs a CUDA device and the megablocks package."""
    if not torch.cuda.is_available():
        return False, f"moe_backend megablocks needs a CUDA device and megablocks ({INSTALL_HINT})"
    try:
        import megablocks.layers.dmoe  # noqa: F401
    except ImportError as error:
        return False, f"moe_backend megablocks: cannot import megablocks ({error}); {INSTALL_HINT}"
    return True, ""


class MegablocksExperts(ExpertBackend):
    """``megablocks.layers.dmoe.dMoE`` without bias, with this project's activation."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config)
        usable, reason = megablocks_available()
        if not usable:
            raise UserError(reason)
        from megablocks.layers.arguments import Arguments
        from megablocks.layers.dmoe import dMoE

        swiglu = config.activation == "swiglu"
        args = Arguments(
            hidden_size=config.d_model,
            ffn_hidden_size=config.d_expert,
            num_layers=config.num_layers,
            bias=False,
            return_bias=False,
            activation_fn=F.silu if swiglu else F.gelu,
            moe_num_experts=config.num_experts,
            moe_top_k=config.top_k,
            moe_normalize_expert_weights=1.0 if config.normalize_top_k else None,
            # The router losses are computed by MoELayer for every backend alike.
            moe_loss_weight=0.0,
            mlp_type="glu" if swiglu else "mlp",
            fp16=False,
            bf16=False,
            device=torch.device("cuda", torch.cuda.current_device()),
            init_method=lambda w: torch.nn.init.normal_(w, 0.0, config.init_std),
            output_layer_init_method=lambda w: torch.nn.init.normal_(
                w, 0.0, config.init_std / (2 * config.num_layers) ** 0.5
            ),
        )
        self.dmoe = dMoE(args)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        y = self.dmoe(x.unsqueeze(1))
        if isinstance(y, tuple):
            y = y[0]
        logits = F.linear(x.float(), self.dmoe.router.layer.weight.float())
        weights, experts = route(logits, self.config.top_k, self.config.normalize_top_k)
        return y.reshape_as(x), Routing(logits=logits, experts=experts, weights=weights)

    def _expert_view(self, name: str) -> torch.Tensor:
        """megablocks stores each matrix as ``(E * d_e, d)``; view it as ``(E, d_e, d)``."""
        weight = getattr(self.dmoe.experts.mlp, name)
        return weight.view(self.config.num_experts, self.config.d_expert, self.config.d_model)

    def export_weights(self) -> dict[str, torch.Tensor]:
        # megablocks' w1 is the activated matrix and v1 the linear one (GLU), w2 the output.
        swiglu = self.config.activation == "swiglu"
        weights = {
            "router": self.dmoe.router.layer.weight.detach().clone(),
            "w_in": self._expert_view("v1" if swiglu else "w1").transpose(1, 2).clone(),
            "w_out": self._expert_view("w2").clone(),
        }
        if swiglu:
            weights["w_gate"] = self._expert_view("w1").transpose(1, 2).clone()
        return {name: w.detach() for name, w in weights.items()}

    @torch.no_grad()
    def import_weights(self, weights: dict[str, torch.Tensor]) -> None:
        swiglu = self.config.activation == "swiglu"
        self.dmoe.router.layer.weight.copy_(weights["router"])
        self._expert_view("v1" if swiglu else "w1").copy_(weights["w_in"].transpose(1, 2))
        self._expert_view("w2").copy_(weights["w_out"])
        if swiglu:
            self._expert_view("w1").copy_(weights["w_gate"].transpose(1, 2))
