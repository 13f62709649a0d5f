"""Study specs: YAML files validated into frozen, typed objects.

A spec names one workload, its fixed params, the axes to sweep (a cartesian grid, zipped
axes, explicit extra cells, isoFLOP budgets), the seeds and the resources of one trial.
Every validation problem becomes one :class:`UserError` line that names the field and
the allowed values; nothing here raises anything else for bad input.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import resources as importlib_resources
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pydantic
import yaml

from orchestrator.errors import UserError

STUDIES_GROUP = "frontier.studies"


class _Frozen(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


class ResourcesSpec(_Frozen):
    """Resources of one trial; a workload's ``num_workers`` param overrides ``workers``."""

    workers: int = pydantic.Field(1, ge=1, description="Training processes per trial.")
    cpus_per_worker: float = pydantic.Field(1.0, ge=0, description="Ray CPUs per worker.")
    gpus_per_worker: float = pydantic.Field(0.0, ge=0, description="Ray GPUs per worker.")


class AxesSpec(_Frozen):
    grid: dict[str, list[Any]] = pydantic.Field(
        default_factory=dict, description="Cartesian axes: every combination is a cell."
    )
    zip: list[dict[str, list[Any]]] = pydantic.Field(
        default_factory=list,
        description="Groups of equal-length axes walked together; groups cross the grid.",
    )


class IsoFlopSpec(_Frozen):
    """For each budget C and model size, the token param is set so the trial costs C."""

    budgets: list[float] = pydantic.Field(min_length=1, description="Training FLOP budgets.")
    size_param: str = pydantic.Field(description="The param that sets model size N.")
    sizes: list[Any] = pydantic.Field(min_length=1, description="Values of size_param.")
    tokens_param: str = pydantic.Field(description="The param derived as C / FLOPs per token.")


class StudySpec(_Frozen):
    name: str = pydantic.Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    workload: str
    version: str | None = pydantic.Field(
        None, description="Expected workload version; a mismatch is an error, not a silent mix."
    )
    params: dict[str, Any] = pydantic.Field(default_factory=dict)
    axes: AxesSpec = pydantic.Field(default_factory=AxesSpec)
    include: list[dict[str, Any]] = pydantic.Field(
        default_factory=list, description="Extra cells: fixed params updated by each dict."
    )
    seeds: list[int] | None = None
    repeats: int | None = pydantic.Field(None, ge=1, description="Shorthand for seeds 0..n-1.")
    resources: ResourcesSpec = pydantic.Field(default_factory=ResourcesSpec)
    deepspeed: str = pydantic.Field(
        "zero1_cpu", description="DeepSpeed JSON for multi-worker trials: a name or a path."
    )
    isoflop: IsoFlopSpec | None = None

    @pydantic.model_validator(mode="after")
    def _check_axes(self) -> StudySpec:
        if self.seeds is not None and self.repeats is not None:
            raise ValueError("give either seeds or repeats, not both")
        if self.seeds is not None and not self.seeds:
            raise ValueError("seeds: empty list; give at least one seed")
        for axis, values in self.axes.grid.items():
            if not values:
                raise ValueError(f"axes.grid.{axis}: empty list; give at least one value")
        for i, group in enumerate(self.axes.zip):
            lengths = {axis: len(values) for axis, values in group.items()}
            if not group or 0 in lengths.values():
                raise ValueError(f"axes.zip[{i}]: empty group; give axes with values")
            if len(set(lengths.values())) > 1:
                raise ValueError(f"axes.zip[{i}]: zipped axes differ in length: {lengths}")
        return self

    @property
    def seed_list(self) -> list[int]:
        if self.seeds is not None:
            return list(self.seeds)
        return list(range(self.repeats or 1))

    def spec_hash(self) -> str:
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def describe_validation_error(
    error: pydantic.ValidationError,
    prefix: str = "",
    model: type[pydantic.BaseModel] = StudySpec,
) -> str:
    """The first problem of a pydantic error as ``field: what is wrong; allowed: ...``."""
    first = error.errors()[0]
    location = ".".join(str(part) for part in first["loc"])
    field = f"{prefix}{location}" if location else (prefix.rstrip(".") or "spec")
    if first["type"] == "extra_forbidden":
        allowed = _allowed_fields(model, first["loc"][:-1])
        hint = f"; allowed: {', '.join(allowed)}" if allowed else ""
        return f"{field}: unknown field{hint}"
    message = first["msg"].removeprefix("Value error, ")
    given = first.get("input")
    shown = "" if isinstance(given, dict | list) or given is None else f" (got {given!r})"
    return f"{field}: {message}{shown}"


def _allowed_fields(model: type[pydantic.BaseModel], parent: tuple[Any, ...]) -> list[str]:
    """Field names of the model that holds the unknown key (nested spec sections too)."""
    if model is StudySpec and parent:
        nested = {"resources": ResourcesSpec, "axes": AxesSpec, "isoflop": IsoFlopSpec}
        found = nested.get(str(parent[0])) if len(parent) == 1 else None
        return sorted(found.model_fields) if found else []
    return sorted(model.model_fields) if not parent else []


def parse_spec(raw: Any, source: str) -> StudySpec:
    if not isinstance(raw, dict):
        raise UserError(f"{source}: a study spec is a YAML mapping (name, workload, params, ...)")
    try:
        return StudySpec(**raw)
    except pydantic.ValidationError as error:
        raise UserError(f"{source}: {describe_validation_error(error)}") from None


def builtin_specs() -> dict[str, Path]:
    """Name -> path of every built-in study spec shipped by installed packages."""
    found: dict[str, Path] = {}
    for entry in entry_points(group=STUDIES_GROUP):
        folder = importlib_resources.files(entry.value)
        for item in folder.iterdir():
            if item.name.endswith((".yaml", ".yml")):
                found[item.name.rsplit(".", 1)[0]] = Path(str(item))
    return dict(sorted(found.items()))


def load_spec(spec_or_name: str) -> StudySpec:
    """Load a spec from a YAML path or a built-in name; bad input raises one UserError."""
    path = Path(spec_or_name)
    if not path.exists():
        builtins = builtin_specs()
        if spec_or_name in builtins:
            path = builtins[spec_or_name]
        elif spec_or_name.endswith((".yaml", ".yml")) or "/" in spec_or_name:
            raise UserError(f"spec: file '{spec_or_name}' not found; check the path")
        else:
            names = ", ".join(builtins) or "none"
            raise UserError(
                f"spec: '{spec_or_name}' is neither a file nor a built-in study; built-in: {names}"
            )
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UserError(f"{path}: invalid YAML{where}: {problem}") from None
    except OSError as error:
        raise UserError(f"{path}: cannot read the spec: {error.strerror}") from None
    return parse_spec(raw, str(path))


def resolve_deepspeed_config(name_or_path: str, spec_dir: Path | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON named by a spec: a path, or a name in clusters/deepspeed/."""
    candidates = [Path(name_or_path)]
    if spec_dir is not None:
        candidates.append(spec_dir / name_or_path)
    stem = name_or_path.removesuffix(".json")
    for root in _deepspeed_dirs():
        candidates.append(root / f"{stem}.json")
    for candidate in candidates:
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text())
            except json.JSONDecodeError as error:
                message = f"{candidate}: invalid JSON: {error.msg} at line {error.lineno}"
                raise UserError(message) from None
    known = sorted(p.stem for root in _deepspeed_dirs() for p in root.glob("*.json"))
    raise UserError(
        f"deepspeed: no config '{name_or_path}'; give a JSON path or one of: {', '.join(known)}"
    )


def _deepspeed_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("FRONTIER_DEEPSPEED_DIR"):
        dirs.append(Path(os.environ["FRONTIER_DEEPSPEED_DIR"]))
    dirs.append(Path(__file__).resolve().parents[1] / "clusters" / "deepspeed")
    return [d for d in dirs if d.is_dir()]
