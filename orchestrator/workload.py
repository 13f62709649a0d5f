"""The small interface between the engine and the science.

A workload is a registered training or probing routine. The orchestrator knows it only
through this module: a typed params model, a resources rule, a FLOP account and a
``run(params, ctx)`` that reports through a :class:`Context`. Workloads are found through
the ``frontier.workloads`` entry-point group, so the engine never imports one by name.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

import pydantic

from orchestrator.errors import UserError

logger = logging.getLogger("frontier")

WORKLOAD_GROUP = "frontier.workloads"


class Params(pydantic.BaseModel):
    """Base of every workload's params model: frozen, and unknown fields are errors."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Resources:
    """What one trial asks Ray for."""

    workers: int = 1
    """Training processes; more than one runs through Ray Train and DeepSpeed."""
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise UserError(f"resources.workers must be at least 1, got {self.workers}")
        if self.cpus_per_worker < 0 or self.gpus_per_worker < 0:
            raise UserError("resources.cpus_per_worker and gpus_per_worker must be >= 0")
        if self.cpus_per_worker == 0 and self.gpus_per_worker == 0:
            raise UserError("resources: a worker needs cpus_per_worker > 0 or gpus_per_worker > 0")


class TrialDiverged(Exception):
    """Raised by :meth:`Context.report` when a loss is NaN or infinite."""

    def __init__(self, step: int, name: str, value: float) -> None:
        super().__init__(f"{name} became {value} at step {step}")
        self.step = step


@dataclass
class Context:
    """What a running trial may use. One per process; only rank 0's reports are kept."""

    trial_id: str
    checkpoint_dir: Path
    artifact_dir: Path
    device: Any
    """A ``torch.device``; typed loosely so this module does not import torch."""
    rank: int = 0
    world_size: int = 1
    deepspeed_config: dict[str, Any] | None = None
    """The parsed DeepSpeed JSON for multi-worker trials, None for single-worker ones."""
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("frontier.trial"))
    curves: list[dict[str, float]] = field(default_factory=list)
    on_report: Callable[[int, Mapping[str, float]], None] | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def report(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record metrics at a step; a non-finite ``loss``-like value ends the trial."""
        for name, value in metrics.items():
            if "loss" in name and not math.isfinite(float(value)):
                raise TrialDiverged(step, name, float(value))
        if self.is_main:
            self.curves.append({"step": float(step), **{k: float(v) for k, v in metrics.items()}})
        if self.on_report is not None:
            self.on_report(step, metrics)


class Workload:
    """Base class of registered workloads. Subclasses set the class attributes below."""

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    """Bump when a change alters results: it is part of every trial id."""
    params_model: ClassVar[type[Params]]
    key_metric: ClassVar[str] = "loss"
    """The final metric the progress log ranks trials by (lower is better)."""

    def parse_params(self, raw: Mapping[str, Any]) -> Params:
        return self.params_model(**raw)

    def resources(self, params: Params, default: Resources) -> Resources:
        """Resources of one trial. By default a ``num_workers`` param sets the worker count."""
        workers = getattr(params, "num_workers", default.workers)
        return Resources(workers, default.cpus_per_worker, default.gpus_per_worker)

    def flops(self, params: Params) -> float:
        """Training FLOPs of one trial (forward and backward). Linear in the token count."""
        raise NotImplementedError

    def tokens(self, params: Params) -> float:
        """Training tokens (or examples) the trial processes."""
        raise NotImplementedError

    def run(self, params: Params, ctx: Context) -> dict[str, float]:
        """Train or probe; return the final metrics (rank 0's are recorded)."""
        raise NotImplementedError


def available_workloads() -> dict[str, Callable[[], Workload]]:
    """Name -> factory for every registered workload."""
    return {ep.name: ep.load for ep in entry_points(group=WORKLOAD_GROUP)}


def get_workload(name: str) -> Workload:
    found = available_workloads()
    if name not in found:
        allowed = ", ".join(sorted(found)) or "none (is the package installed?)"
        raise UserError(f"workload: unknown workload '{name}'; registered: {allowed}")
    return found[name]()()
