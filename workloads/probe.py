"""`probe`: a workload that trains nothing, for checking the orchestrator itself.

It holds a worker for a fixed time (sleeping or spinning a CPU), reports a short curve,
and can be told to fail or diverge at a step. The orchestration-overhead benchmark and
the failure, divergence and resume tests run it: it is what a trial costs the engine
when the science costs nothing.
"""

from __future__ import annotations

import time

from pydantic import Field

from orchestrator.workload import Context, Params, Workload


class ProbeParams(Params):
    work_s: float = Field(0.1, ge=0.0, description="Seconds of work the trial takes.")
    busy: bool = Field(False, description="Spin the CPU instead of sleeping.")
    num_steps: int = Field(4, ge=1, description="Reports spread over the work.")
    fail_at_step: int = Field(-1, description="Raise RuntimeError at this step; -1 never.")
    diverge_at_step: int = Field(-1, description="Report a NaN loss at this step; -1 never.")
    value: float = Field(1.0, description="The final loss; lets a grid vary the key metric.")
    seed: int = Field(0, ge=0, description="Only part of the trial id.")
    num_workers: int = Field(1, ge=1, description="Workers; the work runs on each.")


class Probe(Workload):
    name = "probe"
    version = "1"
    params_model = ProbeParams

    def flops(self, params: ProbeParams) -> float:
        return float(params.num_steps)

    def tokens(self, params: ProbeParams) -> float:
        return float(params.num_steps)

    def run(self, params: ProbeParams, ctx: Context) -> dict[str, float]:
        step_s = params.work_s / params.num_steps
        for step in range(1, params.num_steps + 1):
            _work(step_s, params.busy)
            if step == params.fail_at_step:
                raise RuntimeError(f"probe failure requested at step {step}")
            loss = float("nan") if step == params.diverge_at_step else params.value + 1 / step
            ctx.report(step, {"loss": loss, "tokens": float(step), "flops": float(step)})
        return {"loss": params.value, "rank": float(ctx.rank), "world_size": ctx.world_size}


def _work(seconds: float, busy: bool) -> None:
    if not busy:
        time.sleep(seconds)
        return
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        pass
