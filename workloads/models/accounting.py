"""Parameter and FLOP accounts of a :class:`TransformerConfig`, without building it.

These are the N and C of a scaling-law fit, so they are written out term by term.
"""

from __future__ import annotations

from workloads.models.config import TransformerConfig


def _ffn_matrices(config: TransformerConfig) -> int:
    """Weight matrices in one FFN or expert: 2 for GELU, 3 for SwiGLU."""
    return 3 if config.activation == "swiglu" else 2


def _ffn_params(config: TransformerConfig) -> tuple[int, int]:
    """(total, active per token) parameters of one block's FFN, router included."""
    matrices = _ffn_matrices(config)
    if not config.is_moe:
        dense = matrices * config.d_model * config.d_ff
        return dense, dense

    per_expert = matrices * config.d_model * config.d_expert
    router = config.d_model * config.num_experts
    shared = config.num_shared_experts * per_expert
    total = router + shared + config.num_experts * per_expert
    active = router + shared + config.top_k * per_expert
    return total, active


def count_params(config: TransformerConfig) -> dict[str, int]:
    """Parameters of the model ``build_model(config)`` builds (with ``ep_size`` 1).

    Returns ``total``; ``active``, the parameters one token passes through (the
    ``top_k`` routed experts, the shared experts and the router, not the other
    experts); ``non_embedding``, the total without the embedding and, when untied,
    the output projection (Kaplan et al.'s N); and ``active_non_embedding``.
    """
    d, vocab = config.d_model, config.vocab_size
    embedding = vocab * d + (0 if config.tie_embeddings else vocab * d)
    attention = 4 * d * d
    norms = 2 * d
    ffn_total, ffn_active = _ffn_params(config)

    total = embedding + d + config.num_layers * (attention + norms + ffn_total)
    active = total - config.num_layers * (ffn_total - ffn_active)
    return {
        "total": total,
        "active": active,
        "non_embedding": total - embedding,
        "active_non_embedding": active - embedding,
    }


def matmul_params_per_token(config: TransformerConfig) -> int:
    """Weights one token multiplies through: active ones minus norms and the lookup
    table, plus the output projection (a matmul even when it is tied)."""
    d = config.d_model
    norms = d + 2 * d * config.num_layers
    head = config.vocab_size * d
    return count_params(config)["active_non_embedding"] - norms + head


def flops_per_token(config: TransformerConfig) -> float:
    """Training FLOPs of one token, forward and backward: ``6 N + 12 L d T``.

    ``N`` is :func:`matmul_params_per_token` (2 FLOPs per weight forward, 4 backward);
    ``12 L d T`` is attention's two ``T x T`` products per layer at full context ``T``
    (``4 d T`` forward per token, twice that backward), counted over the whole square
    as PaLM (Chowdhery et al., 2022) does, although the causal mask skips half of it.
    Norms, softmax, activations and the router's top-k are left out (a few percent at
    small widths). With a capacity factor, dropped routes are still counted.
    """
    attention = 12 * config.num_layers * config.d_model * config.context_length
    return float(6 * matmul_params_per_token(config) + attention)
