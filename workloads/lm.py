"""Workload ``lm``: train the transformer of ``workloads.models`` on a token source.

A trial trains on ``num_tokens`` tokens (D) a model of ``params_active`` parameters (N)
for ``flops_per_token * num_tokens`` FLOPs (C), reporting train and validation loss,
tokens/s and MFU along the way. Its key metric ``loss`` is the final validation loss.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from orchestrator.errors import UserError
from orchestrator.training import Trainer, prepare_training
from orchestrator.workload import Context, Params, Workload
from workloads.data import lm_tokens
from workloads.models import TransformerConfig, build_model, count_params, flops_per_token

logger = logging.getLogger("frontier.lm")

PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}
"""Dense bf16 peak per device, by a substring of the CUDA device name."""
VALIDATION_SEED = 1_000_003
"""Validation windows are the same for every trial of a corpus, whatever its seed."""

_MODEL_FIELDS = (
    "vocab_size", "context_length", "d_model", "num_layers", "num_heads", "d_ff",
    "activation", "tie_embeddings", "num_experts", "top_k", "granularity",
    "num_shared_experts", "normalize_top_k", "capacity_factor", "aux_loss_coef",
    "z_loss_coef", "moe_backend", "ep_size",
)  # fmt: skip


class LanguageModelParams(Params):
    """Model, optimisation and data of one ``lm`` trial."""

    # Model: the fields of TransformerConfig (documented there).
    vocab_size: int = Field(256, ge=2, description="Vocabulary; 256 for bytes.")
    context_length: int = Field(128, ge=2, description="Tokens per training sequence.")
    d_model: int = Field(128, ge=2, description="Residual width.")
    num_layers: int = Field(2, ge=1, description="Transformer blocks.")
    num_heads: int = Field(4, ge=1, description="Attention heads.")
    d_ff: int = Field(512, ge=1, description="Dense FFN width; experts get d_ff / granularity.")
    activation: Literal["gelu", "swiglu"] = "gelu"
    tie_embeddings: bool = True
    num_experts: int = Field(0, ge=0, description="0 for a dense FFN.")
    top_k: int = Field(2, ge=1, description="Experts per token.")
    granularity: int = Field(1, ge=1, description="Expert width is d_ff / granularity.")
    num_shared_experts: int = Field(0, ge=0, description="Always-on experts.")
    normalize_top_k: bool = True
    capacity_factor: float = Field(0.0, ge=0.0, description="0 is dropless.")
    aux_loss_coef: float = Field(0.01, ge=0.0, description="Load-balancing loss weight.")
    z_loss_coef: float = Field(0.001, ge=0.0, description="Router z-loss weight.")
    moe_backend: Literal["torch", "megablocks", "deepspeed"] = "torch"
    ep_size: int = Field(1, ge=1, description="Expert-parallel ranks (deepspeed backend).")

    # Optimisation.
    num_tokens: int = Field(1_000_000, ge=1, description="Training tokens D, all workers.")
    batch_size: int = Field(16, ge=1, description="Sequences per step, all workers.")
    lr: float = Field(3e-3, gt=0.0, description="Peak AdamW learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Final lr / peak lr.")
    warmup_steps: int = Field(20, ge=0, description="Linear warm-up, then cosine decay.")
    weight_decay: float = Field(0.1, ge=0.0, description="On matrices only.")
    grad_clip: float | None = Field(1.0, description="Global norm clip; None for none.")
    seed: int = 0
    num_workers: int = Field(1, ge=1, description="Data-parallel workers (DeepSpeed if > 1).")

    # Data.
    data: Literal["synthetic", "tokens", "parquet"] = "synthetic"
    data_path: str | None = Field(None, description="uint16 token file or Parquet path.")
    zipf_exponent: float = Field(1.2, gt=0.0, description="Synthetic language's Zipf law.")
    language_seed: int = Field(0, description="Fixes the synthetic language itself.")
    tokenizer: str = Field("bytes", description="'bytes' or a tokenizers JSON path.")
    text_column: str = Field("text", description="Parquet column holding the text.")

    # Evaluation and logging.
    eval_every: int = Field(100, ge=1, description="Steps between validation losses.")
    eval_tokens: int = Field(16_384, ge=1, description="Validation tokens per evaluation.")
    log_every: int = Field(10, ge=1, description="Steps between curve points.")

    @model_validator(mode="after")
    def _check_model(self) -> LanguageModelParams:
        self.transformer_config()  # its ValueError becomes a validation error
        if self.batch_size % self.num_workers:
            raise ValueError(
                f"batch_size ({self.batch_size}) must divide by num_workers ({self.num_workers})"
            )
        return self

    def transformer_config(self) -> TransformerConfig:
        return TransformerConfig(**{name: getattr(self, name) for name in _MODEL_FIELDS})


class TokenBatches:
    """Train and validation batches of one trial, on the trial's device."""

    def __init__(self, params: LanguageModelParams, rank: int, device: torch.device) -> None:
        self.params = params
        self.device = device
        self.length = params.context_length + 1
        self.train_gen = torch.Generator().manual_seed(params.seed * 1000 + rank)
        self.entropy_nats: float | None = None
        if params.data == "synthetic":
            self.language = lm_tokens.ZipfLanguage(
                params.vocab_size, params.zipf_exponent, params.language_seed
            )
            self.entropy_nats = self.language.entropy_nats
        elif params.data == "tokens":
            self.array = lm_tokens.token_file(str(params.data_path))
        else:
            self.array = lm_tokens.parquet_tokens(
                str(params.data_path), params.text_column, params.tokenizer
            )

    def _sample(self, batch_size: int, gen: torch.Generator, split: str) -> torch.Tensor:
        if self.params.data == "synthetic":
            return self.language.batch(batch_size, self.length, gen)
        return self.array.batch(batch_size, self.length, gen, split=split)

    def train(self, batch_size: int) -> torch.Tensor:
        return self._sample(batch_size, self.train_gen, "train").to(self.device, non_blocking=True)

    def validation(self, batch_size: int) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(VALIDATION_SEED)
        num_batches = math.ceil(
            self.params.eval_tokens / (batch_size * self.params.context_length)
        )
        return [self._sample(batch_size, gen, "val").to(self.device) for _ in range(num_batches)]


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of one device, or None where none is assumed (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def optimizer_groups(model: torch.nn.Module, params: LanguageModelParams) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices, none on norms; DeepSpeed's MoE split."""
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    groups: list[dict[str, Any]] = [
        {"name": "decay", "params": matrices, "weight_decay": params.weight_decay},
        {"name": "no_decay", "params": vectors, "weight_decay": 0.0},
    ]
    if params.moe_backend == "deepspeed" and params.num_experts > 0:
        from workloads.models.backends.deepspeed_experts import moe_param_groups

        groups = moe_param_groups(groups)
    return groups


def lr_at(step: int, num_steps: int, params: LanguageModelParams) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``min_lr_ratio * lr``."""
    if step <= params.warmup_steps:
        return params.lr * step / max(1, params.warmup_steps)
    progress = (step - params.warmup_steps) / max(1, num_steps - params.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return params.lr * (params.min_lr_ratio + (1 - params.min_lr_ratio) * cosine)


def lm_loss(trainer: Trainer, batch: torch.Tensor) -> torch.Tensor:
    logits = trainer.model(batch[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())


@torch.no_grad()
def validation_loss(trainer: Trainer, batches: list[torch.Tensor], autocast: bool) -> float:
    trainer.module.eval()
    with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
        losses = [lm_loss(trainer, batch) for batch in batches]
    trainer.module.train()
    return float(torch.stack(losses).mean())


class LanguageModel(Workload):
    """Next-token prediction with a dense or MoE transformer."""

    name = "lm"
    version = "1"
    params_model = LanguageModelParams
    key_metric = "loss"

    def flops(self, params: LanguageModelParams) -> float:  # type: ignore[override]
        return flops_per_token(params.transformer_config()) * params.num_tokens

    def tokens(self, params: LanguageModelParams) -> float:  # type: ignore[override]
        return float(params.num_tokens)

    def check(self, params: LanguageModelParams) -> None:
        """Cheap checks of the corpus before any trial starts (UserError on failure)."""
        if params.data == "synthetic":
            return
        if not params.data_path:
            raise UserError(f"data_path: required when data is '{params.data}'")
        if params.data == "tokens":
            lm_tokens.check_token_file(params.data_path, params.vocab_size, params.context_length)
        else:
            lm_tokens.check_parquet(
                params.data_path, params.text_column, params.tokenizer, params.vocab_size
            )

    def run(  # type: ignore[override]
        self, params: LanguageModelParams, ctx: Context
    ) -> dict[str, float]:
        self.check(params)
        config = params.transformer_config()
        torch.manual_seed(params.seed)
        model = build_model(config)
        optimizer = torch.optim.AdamW(
            optimizer_groups(model, params), lr=params.lr, betas=(0.9, 0.95)
        )
        micro_batch = params.batch_size // ctx.world_size
        trainer = prepare_training(
            model, optimizer, ctx, micro_batch_size=micro_batch, grad_clip=params.grad_clip
        )
        batches = TokenBatches(params, ctx.rank, ctx.device)
        return _train(trainer, batches, params, ctx, micro_batch)


def _train(
    trainer: Trainer,
    batches: TokenBatches,
    params: LanguageModelParams,
    ctx: Context,
    micro_batch: int,
) -> dict[str, float]:
    """The training loop: step, log every ``log_every``, evaluate every ``eval_every``."""
    config = params.transformer_config()
    counts = count_params(config)
    flops_token = flops_per_token(config)
    tokens_per_step = params.batch_size * params.context_length
    num_steps = max(1, round(params.num_tokens / tokens_per_step))
    autocast = ctx.device.type == "cuda" and ctx.deepspeed_config is None
    peak = peak_flops(ctx.device)
    if peak is None:
        ctx.logger.info("mfu reported as 0.0: no peak FLOP/s is assumed for %s", ctx.device)
    val_batches = batches.validation(micro_batch)

    train_s = 0.0
    interval_s, interval_steps = 0.0, 0
    loss_sum = torch.zeros((), device=ctx.device)
    train_loss = val_loss = math.nan
    tokens_per_s = 0.0
    for step in range(1, num_steps + 1):
        started = time.perf_counter()
        for group in trainer.optimizer.param_groups:
            group["lr"] = lr_at(step, num_steps, params)
        with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            loss = lm_loss(trainer, batches.train(micro_batch))
        trainer.step(loss + trainer.module.aux_loss)
        loss_sum += loss.detach()
        interval_steps += 1

        last = step == num_steps
        if step % params.log_every and step % params.eval_every and not last:
            interval_s += time.perf_counter() - started
            continue
        train_loss = float(loss_sum) / interval_steps  # syncs the device: time it too
        interval_s += time.perf_counter() - started
        train_s += interval_s
        tokens_per_s = tokens_per_step * interval_steps / interval_s
        metrics = {
            "loss": train_loss,
            "tokens": float(step * tokens_per_step),
            "flops": step * tokens_per_step * flops_token,
            "tokens_per_s": tokens_per_s,
            "mfu": _mfu(tokens_per_s * flops_token, peak, ctx.world_size),
            "lr": lr_at(step, num_steps, params),
        }
        if step % params.eval_every == 0 or last:
            val_loss = validation_loss(trainer, val_batches, autocast)
            metrics["val_loss"] = val_loss
        ctx.report(step, metrics)
        loss_sum.zero_()
        interval_s, interval_steps = 0.0, 0

    tokens = float(num_steps * tokens_per_step)
    mean_tokens_per_s = tokens / train_s
    final = {
        "loss": val_loss,
        "train_loss": train_loss,
        "params_total": float(counts["total"]),
        "params_active": float(counts["active"]),
        "params_non_embedding": float(counts["non_embedding"]),
        "tokens": tokens,
        "flops": tokens * flops_token,
        "tokens_per_s": mean_tokens_per_s,
        "mfu": _mfu(mean_tokens_per_s * flops_token, peak, ctx.world_size),
    }
    if batches.entropy_nats is not None:
        final["loss_floor"] = batches.entropy_nats
    ctx.logger.info(
        "lm done: val_loss %.4f train_loss %.4f | %.0f tokens/s | mfu %.3f",
        val_loss, train_loss, mean_tokens_per_s, final["mfu"],
    )  # fmt: skip
    return final


def _mfu(flops_per_s: float, peak: float | None, world_size: int) -> float:
    return 0.0 if peak is None else flops_per_s / (peak * world_size)
