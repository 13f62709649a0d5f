"""The one configuration object of the transformer and its feed-forward blocks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Activation = Literal["gelu", "swiglu"]
MoEBackend = Literal["torch", "megablocks", "deepspeed"]
MOE_BACKENDS: tuple[str, ...] = ("torch", "megablocks", "deepspeed")


@dataclass(frozen=True, kw_only=True)
class TransformerConfig:
    """A decoder-only, pre-norm transformer with a dense or mixture-of-experts FFN.

    Every field has a working default: ``TransformerConfig()`` is a tiny dense model.
    """

    vocab_size: int = 256
    """Tokens in the vocabulary (256 is byte-level)."""
    context_length: int = 128
    """Longest sequence the rotary tables are built for; training sequences use all of it."""
    d_model: int = 128
    """Width of the residual stream."""
    num_layers: int = 2
    """Transformer blocks."""
    num_heads: int = 4
    """Attention heads; ``d_model`` must divide by it."""
    d_ff: int = 512
    """Hidden width of the dense FFN; an expert's width is ``d_ff // granularity``."""
    activation: Activation = "gelu"
    """``gelu`` (two matrices) or ``swiglu`` (three matrices) in every FFN and expert."""
    tie_embeddings: bool = True
    """Share the input embedding with the output projection."""
    rope_base: float = 10_000.0
    """Base of the rotary position frequencies."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation; output projections are scaled
    down by ``sqrt(2 * num_layers)``."""

    num_experts: int = 0
    """Routed experts per FFN; 0 means a dense FFN."""
    top_k: int = 2
    """Experts each token is routed to, from 1 to ``num_experts``."""
    granularity: int = 1
    """Fine-grained experts: expert width is ``d_ff // granularity``. To keep active
    parameters fixed, multiply ``num_experts`` and ``top_k`` by the same factor."""
    num_shared_experts: int = 0
    """Experts of the same width that every token passes through (weight 1)."""
    normalize_top_k: bool = True
    """Rescale the selected router probabilities of a token to sum to one."""
    capacity_factor: float = 0.0
    """Tokens an expert takes per batch, as a multiple of ``tokens * top_k / num_experts``;
    routes beyond it are dropped. 0 means dropless."""
    aux_loss_coef: float = 0.01
    """Weight of the load-balancing loss ``E * sum_i f_i P_i`` (Switch Transformer)."""
    z_loss_coef: float = 0.001
    """Weight of the router z-loss ``mean(logsumexp(logits)^2)`` (ST-MoE)."""
    moe_backend: MoEBackend = "torch"
    """Implementation of the routed experts: ``torch``, ``megablocks`` or ``deepspeed``."""
    ep_size: int = 1
    """Expert-parallel ranks (``deepspeed`` backend only); ``num_experts`` divides by it."""

    def __post_init__(self) -> None:
        positive = ("vocab_size", "context_length", "d_model", "num_layers", "num_heads", "d_ff")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.d_model % self.num_heads or (self.d_model // self.num_heads) % 2:
            raise ValueError(
                f"d_model ({self.d_model}) must divide into num_heads ({self.num_heads}) "
                "heads of even width (rotary positions rotate pairs)"
            )
        if self.activation not in ("gelu", "swiglu"):
            raise ValueError(f"activation must be gelu or swiglu, got {self.activation!r}")
        if self.num_experts < 0:
            raise ValueError(f"num_experts must be >= 0 (0 is dense), got {self.num_experts}")
        if self.num_experts > 0:
            self._check_moe()

    def _check_moe(self) -> None:
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"top_k must be between 1 and num_experts ({self.num_experts}), got {self.top_k}"
            )
        if self.granularity < 1 or self.d_ff % self.granularity:
            raise ValueError(
                f"granularity ({self.granularity}) must be >= 1 and divide d_ff ({self.d_ff})"
            )
        if self.moe_backend not in MOE_BACKENDS:
            raise ValueError(
                f"moe_backend must be one of {', '.join(MOE_BACKENDS)}, got {self.moe_backend!r}"
            )
        if self.capacity_factor < 0:
            raise ValueError(f"capacity_factor must be >= 0, got {self.capacity_factor}")
        if self.ep_size < 1 or self.num_experts % self.ep_size:
            raise ValueError(
                f"ep_size ({self.ep_size}) must be >= 1 and divide num_experts "
                f"({self.num_experts})"
            )
        if self.ep_size > 1 and self.moe_backend != "deepspeed":
            raise ValueError("ep_size > 1 needs moe_backend 'deepspeed'")
        if self.moe_backend == "deepspeed" and self.normalize_top_k != (self.top_k > 1):
            # DeepSpeed's gates renormalise for k >= 2 and never for k = 1; no switch exists.
            raise ValueError(
                "moe_backend 'deepspeed' fixes normalize_top_k to (top_k > 1); "
                f"set normalize_top_k={self.top_k > 1}"
            )
        if self.moe_backend == "megablocks" and self.capacity_factor > 0:
            raise ValueError("moe_backend 'megablocks' is dropless; set capacity_factor to 0")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def d_expert(self) -> int:
        """Hidden width of one routed or shared expert."""
        return self.d_ff // self.granularity

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads
