"""Planning: a study spec becomes a list of content-addressed trials.

A trial id is a hash of the canonical JSON of (workload name, workload version, the full
validated params, seed). The same cell in two studies, or in a grid that grew, is the
same trial, so re-running a study redoes nothing that is done.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pydantic

from orchestrator.errors import UserError
from orchestrator.spec import StudySpec, describe_validation_error
from orchestrator.workload import Resources, Workload

TRIAL_ID_CHARS = 16


@dataclass(frozen=True)
class Trial:
    """One point of a study: what to run, with what, and what it costs."""

    study: str
    workload: str
    workload_version: str
    params: dict[str, Any]
    """Full validated params (defaults included), as JSON-safe values."""
    seed: int
    trial_id: str
    resources: Resources
    flops: float
    tokens: float
    annotations: dict[str, Any] = field(default_factory=dict)
    """Planning facts that do not define the trial (the isoFLOP budget it was sized for)."""


def trial_id(workload: str, version: str, params: Mapping[str, Any], seed: int) -> str:
    canonical = json.dumps(
        {"workload": workload, "version": version, "params": params, "seed": seed},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:TRIAL_ID_CHARS]


def _grid_cells(spec: StudySpec) -> Iterator[dict[str, Any]]:
    grid_axes = list(spec.axes.grid.items())
    grid = itertools.product(*(values for _, values in grid_axes))
    zipped = [
        [dict(zip(group, values, strict=True)) for values in zip(*group.values(), strict=True)]
        for group in spec.axes.zip
    ]
    for grid_values in grid:
        cell = dict(zip((axis for axis, _ in grid_axes), grid_values, strict=True))
        for zip_cells in itertools.product(*zipped):
            merged = dict(cell)
            for part in zip_cells:
                merged.update(part)
            yield merged


def _cells(spec: StudySpec) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(params, annotations) for every cell before seeds: grid x zip x isoFLOP, then include."""
    for cell in _grid_cells(spec):
        base = {**spec.params, **cell}
        if spec.isoflop is None:
            yield base, {}
            continue
        for budget in spec.isoflop.budgets:
            for size in spec.isoflop.sizes:
                sized = {**base, spec.isoflop.size_param: size}
                yield sized, {"flop_budget": float(budget)}
    for extra in spec.include:
        yield {**spec.params, **extra}, {}


def _validate(workload: Workload, raw: dict[str, Any]) -> Any:
    try:
        return workload.parse_params(raw)
    except pydantic.ValidationError as error:
        message = describe_validation_error(error, "params.", workload.params_model)
        raise UserError(f"{message} (workload {workload.name})") from None


def _size_for_budget(
    workload: Workload, raw: dict[str, Any], tokens_param: str, budget_flops: float
) -> dict[str, Any]:
    """Set the token param so the trial costs the budget; FLOPs are linear in tokens."""
    if tokens_param not in workload.params_model.model_fields:
        allowed = ", ".join(sorted(workload.params_model.model_fields))
        raise UserError(
            f"isoflop.tokens_param: unknown param '{tokens_param}'; allowed: {allowed}"
        )
    unit = workload.flops(_validate(workload, {**raw, tokens_param: 1}))
    if unit <= 0:
        raise UserError(f"isoflop: workload {workload.name} reports no FLOPs per token")
    return {**raw, tokens_param: max(1, round(budget_flops / unit))}


def expand(spec: StudySpec, workload: Workload, default: Resources | None = None) -> list[Trial]:
    """Every trial of the study in a stable order, duplicates removed."""
    if spec.version is not None and spec.version != workload.version:
        raise UserError(
            f"version: spec asks for {workload.name} version {spec.version}, "
            f"installed is {workload.version}; update the spec or the package"
        )
    fields = workload.params_model.model_fields
    if spec.isoflop is not None and spec.isoflop.size_param not in fields:
        raise UserError(
            f"isoflop.size_param: unknown param '{spec.isoflop.size_param}'; "
            f"allowed: {', '.join(sorted(fields))}"
        )
    default = default or Resources(**spec.resources.model_dump())
    has_seed_param = "seed" in workload.params_model.model_fields
    check = getattr(workload, "check", None)

    trials: dict[str, Trial] = {}
    for raw, notes in _cells(spec):
        if spec.isoflop is not None and "flop_budget" in notes:
            budget = notes["flop_budget"]
            raw = _size_for_budget(workload, raw, spec.isoflop.tokens_param, budget)
        for index, seed in enumerate(spec.seed_list):
            seeded = {**raw, "seed": seed} if has_seed_param else raw
            params = _validate(workload, seeded)
            if index == 0 and check is not None:
                check(params)  # inputs such as a corpus do not depend on the seed
            values = params.model_dump(mode="json")
            tid = trial_id(workload.name, workload.version, values, seed)
            trials.setdefault(
                tid,
                Trial(
                    study=spec.name,
                    workload=workload.name,
                    workload_version=workload.version,
                    params=values,
                    seed=seed,
                    trial_id=tid,
                    resources=workload.resources(params, default),
                    flops=float(workload.flops(params)),
                    tokens=float(workload.tokens(params)),
                    annotations=notes,
                ),
            )
    if not trials:
        raise UserError("axes: the study has no cells; give grid values, zip groups or include")
    return list(trials.values())
