"""A decoder-only transformer: pre-norm blocks, rotary positions, causal SDPA attention."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from workloads.models.config import TransformerConfig
from workloads.models.moe import FeedForward, MoELayer


def rotary_tables(config: TransformerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape ``(context_length, head_dim)`` for rotate-half rotary."""
    half = config.head_dim // 2
    inverse_freq = config.rope_base ** (-torch.arange(half, dtype=torch.float32) / half)
    angles = torch.outer(torch.arange(config.context_length, dtype=torch.float32), inverse_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs ``(x_i, x_{i + half})`` of ``(batch, heads, time, head_dim)``."""
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class Attention(nn.Module):
    """Multi-head causal self-attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.out = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, time, width = x.shape
        qkv = self.qkv(x).view(batch, time, 3, self.num_heads, width // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(batch, time, width))


class Block(nn.Module):
    """``x + attn(norm(x))``, then ``x + ffn(norm(x))``; the FFN is dense or MoE."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.d_model)
        self.attn = Attention(config)
        self.ffn_norm = nn.RMSNorm(config.d_model)
        self.ffn: nn.Module = (
            MoELayer(config)
            if config.is_moe
            else FeedForward(config.d_model, config.d_ff, config.activation)
        )

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    """Token ids ``(batch, time)`` in, next-token logits ``(batch, time, vocab)`` out.

    After each forward, :attr:`aux_loss` is the sum of the MoE layers' router losses
    (zero for a dense model); training adds it to the language-model loss.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.final_norm = nn.RMSNorm(config.d_model)
        self.head = (
            None
            if config.tie_embeddings
            else nn.Linear(config.d_model, config.vocab_size, bias=False)
        )
        cos, sin = rotary_tables(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.aux_loss: torch.Tensor = torch.zeros(())
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        std = self.config.init_std
        output_std = std / math.sqrt(2 * self.config.num_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear | nn.Embedding) and ".experts." not in f".{name}.":
                is_output = name.endswith((".out", ".w_out"))
                module.weight.normal_(0.0, output_std if is_output else std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        time = tokens.shape[1]
        assert time <= self.config.context_length, "sequence longer than context_length"
        cos, sin = self.rope_cos[:time], self.rope_sin[:time]

        x = self.embedding(tokens)
        for block in self.blocks:
            x = block(x, cos, sin)
        x = self.final_norm(x)
        weight = self.embedding.weight if self.head is None else self.head.weight
        logits = F.linear(x, weight)

        moe_layers = [b.ffn for b in self.blocks if isinstance(b.ffn, MoELayer)]
        self.aux_loss = sum((m.aux_loss for m in moe_layers), torch.zeros((), device=x.device))
        return logits

    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoELayer)]


def build_model(config: TransformerConfig) -> Transformer:
    """The transformer ``config`` describes, initialised (on CPU, float32)."""
    return Transformer(config)
