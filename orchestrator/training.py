"""One training-step interface over a plain PyTorch loop and a DeepSpeed engine.

Workloads call :func:`prepare_training` and then only ``trainer.model(...)`` and
``trainer.step(loss)``: a single-worker trial runs the plain loop, a multi-worker trial
(``ctx.deepspeed_config`` set) runs DeepSpeed with the ZeRO stage and precision of the
JSON named by the study spec.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch

from orchestrator.workload import Context


class Trainer:
    """Plain PyTorch: backward, optional clipping, optimizer step, zero grads."""

    def __init__(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float | None
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.grad_clip = grad_clip

    @property
    def module(self) -> torch.nn.Module:
        """The underlying ``nn.Module`` (for evaluation and parameter counts)."""
        return self.model

    def step(self, loss: torch.Tensor) -> None:
        loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class DeepSpeedTrainer(Trainer):
    """A DeepSpeed engine behind the same two calls."""

    def __init__(self, engine: Any) -> None:
        super().__init__(engine, engine.optimizer, None)
        self.engine = engine

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def step(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()


def deepspeed_config_for(
    base: dict[str, Any], *, micro_batch_size: int, world_size: int, grad_clip: float | None
) -> dict[str, Any]:
    """Fill the batch fields DeepSpeed requires; the JSON keeps ZeRO and precision."""
    config = copy.deepcopy(base)
    config["train_micro_batch_size_per_gpu"] = micro_batch_size
    config["gradient_accumulation_steps"] = 1
    config["train_batch_size"] = micro_batch_size * world_size
    if grad_clip:
        config["gradient_clipping"] = grad_clip
    # The workload builds its own optimizer; a JSON optimizer block would replace it.
    config.pop("optimizer", None)
    config.setdefault("steps_per_print", 10**9)
    return config


def prepare_training(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ctx: Context,
    *,
    micro_batch_size: int,
    grad_clip: float | None = None,
) -> Trainer:
    """Wrap ``model`` and ``optimizer`` for this trial: plain loop or DeepSpeed engine."""
    model = model.to(ctx.device)
    if ctx.deepspeed_config is None:
        return Trainer(model, optimizer, grad_clip)

    if ctx.device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    config = deepspeed_config_for(
        ctx.deepspeed_config,
        micro_batch_size=micro_batch_size,
        world_size=ctx.world_size,
        grad_clip=grad_clip,
    )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return DeepSpeedTrainer(engine)
