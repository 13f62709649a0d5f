"""`frontier aggregate`: every study under a results root -> report.md, fits.parquet, plots.

Per study, per model family (dense, moe) and, for zipf_patterns, per Zipf exponent:

1. one-resource laws L = E + A X^-alpha for X in N, D, C on the lower envelope of the
   seed-averaged runs (for each X, the best loss over the other resources);
2. the joint law L(N, D) (approach 3) and its compute-optimal allocation;
3. approach 2 where trials carry ``params.flop_budget``; approach 1 from the curves;
4. MoE against dense: the effective parameter multiplier and Clark et al.'s law.

Each fit that cannot run (too few points, no minimum) or does not converge leaves one line
under "Notes" and no result. Theory predictions (SCIENCE.md section 1) go in the verdict
table next to the fitted value and its 95% interval.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.analysis import (
    Allocation,
    ChinchillaFit,
    PowerLawFit,
    allocation_from_chinchilla,
    effective_multiplier,
    effective_multiplier_joint,
    fit_chinchilla,
    fit_clark,
    fit_envelope,
    fit_isoflop_profiles,
    fit_power_law,
    plots,
)
from orchestrator.errors import UserError

logger = logging.getLogger("frontier.report")

NUM_BOOTSTRAP = 1000
"""Bootstrap replicates per fit in the report (the approach-3 fit takes ~2 s for 1000)."""


@dataclass(frozen=True)
class FitRow:
    """One fitted quantity: a row of fits.parquet."""

    study: str
    family: str
    """"dense" or "moe"."""
    group: str
    """Sub-population within the family, e.g. "alpha=1.5" for a Zipf exponent; "" if none."""
    law: str
    """The fitted law, e.g. "L(N)", "L(N,D)", "allocation (approach 2)", "MoE multiplier"."""
    name: str
    """The quantity within the law, e.g. "alpha", "a", "tokens_per_param"."""
    estimate: float
    ci_low: float
    ci_high: float
    predicted: float
    """The theory's value (SCIENCE.md); NaN where no theory gives one."""
    num_points: int
    """Runs (or profile minima) that entered the fit."""


@dataclass
class StudyReport:
    """What one study contributes to the report (mutable while it is being built)."""

    name: str
    rows: list[FitRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)


# --- reading ------------------------------------------------------------------------------


def _column(table: pa.Table, name: str, default: float = math.nan) -> np.ndarray:
    if name not in table.column_names:
        return np.full(table.num_rows, default)
    values = table.column(name).to_pylist()
    return np.array([default if v is None else float(v) for v in values], dtype=np.float64)


def _text(table: pa.Table, name: str) -> np.ndarray:
    if name not in table.column_names:
        return np.full(table.num_rows, "", dtype=object)
    return np.array(["" if v is None else str(v) for v in table.column(name).to_pylist()])


def _load(results_root: str) -> tuple[pa.Table, pa.Table]:
    from orchestrator import store

    trials = store.read_trials(results_root)
    if trials.num_rows == 0:
        raise UserError(
            f"aggregate: no finished trials under '{results_root}'; run a study there first"
            " (frontier smoke --results DIR, or frontier run SPEC --results DIR)"
        )
    return trials, store.read_curves(results_root)


# --- per-study fits -----------------------------------------------------------------------


def _predictions(workload: str, group_value: float) -> dict[tuple[str, str], float]:
    """SCIENCE.md section 1 (derived): exponents from the Zipf exponent alpha."""
    if workload != "zipf_patterns" or not np.isfinite(group_value) or group_value <= 1:
        return {}
    zipf = group_value
    a_n, a_d = zipf - 1.0, (zipf - 1.0) / zipf
    share = a_d / (a_n + a_d)
    return {
        ("L(N)", "alpha"): a_n,
        ("L(D)", "alpha"): a_d,
        ("L(N,D)", "alpha"): a_n,
        ("L(N,D)", "beta"): a_d,
        ("allocation (approach 1)", "a"): share,
        ("allocation (approach 2)", "a"): share,
        ("allocation (approach 3)", "a"): share,
        ("allocation (approach 1)", "b"): 1 - share,
        ("allocation (approach 2)", "b"): 1 - share,
        ("allocation (approach 3)", "b"): 1 - share,
    }


def _pareto(x: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Indices of the lower envelope: points no cheaper point beats (mean over equal x)."""
    order = np.lexsort((loss, x))
    keep, best = [], math.inf
    for i in order:
        if loss[i] < best and (not keep or x[i] > x[keep[-1]]):
            keep.append(i)
            best = loss[i]
    return np.array(keep, dtype=int)


class _StudyFitter:
    """Runs every applicable fit of one (study, family, group) and records rows and notes."""

    def __init__(
        self,
        report: StudyReport,
        workload: str,
        family: str,
        group: str,
        group_value: float,
        seed: int,
    ) -> None:
        self.report, self.family, self.group = report, family, group
        self.predicted = _predictions(workload, group_value)
        self.seed = seed
        self.label = " ".join(p for p in (report.name, family, group) if p)

    def attempt(self, law: str, fit: Callable[..., Any], *args: Any, **kwargs: Any) -> Any | None:
        """Run ``fit(*args, **kwargs)``; a UserError or an unconverged result becomes a note."""
        try:
            result = fit(*args, **kwargs)
        except UserError as error:
            self.note(f"{law}: {error}")
            return None
        if not getattr(result, "converged", True):
            self.note(f"{law}: the fit did not converge (iteration cap); not reported")
            return None
        return result

    def note(self, text: str) -> None:
        line = f"{self.label}: {text}"
        logger.warning(line)
        self.report.notes.append(line)

    def record(self, law: str, estimates: dict[str, float], ci: dict, num_points: int) -> None:
        for name, value in estimates.items():
            low, high = ci.get(name, (math.nan, math.nan))
            self.report.rows.append(
                FitRow(
                    study=self.report.name,
                    family=self.family,
                    group=self.group,
                    law=law,
                    name=name,
                    estimate=float(value),
                    ci_low=float(low),
                    ci_high=float(high),
                    predicted=float(self.predicted.get((law, name), math.nan)),
                    num_points=num_points,
                )
            )

    def allocation(self, allocation: Allocation | None, num_points: int) -> None:
        if allocation is not None:
            self.record(
                f"allocation ({allocation.method})",
                {
                    "a": allocation.a,
                    "b": allocation.b,
                    "tokens_per_param": allocation.tokens_per_param,
                },
                dict(allocation.ci),
                num_points,
            )


def _seed_means(n: np.ndarray, d: np.ndarray, c: np.ndarray, loss: np.ndarray) -> dict:
    """Average the loss over seeds of the same (N, D) cell."""
    cells: dict[tuple[float, float], list[int]] = {}
    for i, key in enumerate(zip(n, d, strict=True)):
        cells.setdefault(key, []).append(i)
    idx = [rows[0] for rows in cells.values()]
    return {
        "N": n[idx],
        "D": d[idx],
        "C": c[idx],
        "loss": np.array([loss[rows].mean() for rows in cells.values()]),
    }


def _fit_study(name: str, trials: pa.Table, curves: pa.Table, out_dir: Path) -> StudyReport:
    report = StudyReport(name)
    status = _text(trials, "status")
    not_done = int((status != "done").sum())
    if not_done:
        report.notes.append(f"{name}: {not_done} failed or diverged trials left out")
    trials = trials.filter(pa.array(status == "done"))
    workload = str(_text(trials, "workload")[0]) if trials.num_rows else ""

    loss = _column(trials, "metrics.loss")
    n = _column(trials, "metrics.params_active")
    n = np.where(np.isfinite(n), n, _column(trials, "metrics.params_total"))
    d = _column(trials, "metrics.tokens")
    c = _column(trials, "metrics.flops")
    c = np.where(np.isfinite(c), c, 6 * n * d)
    bad = ~np.isfinite(loss)
    if bad.any():
        report.notes.append(f"{name}: {int(bad.sum())} runs with a NaN loss excluded")
    experts = np.nan_to_num(_column(trials, "params.num_experts", 0.0))
    family = np.where(experts > 0, "moe", "dense")
    zipf = (
        _column(trials, "params.alpha") if workload == "zipf_patterns" else np.full(len(n), np.nan)
    )
    budget = _column(trials, "params.flop_budget")
    trial_ids = _text(trials, "trial_id")

    points_by_family: dict[str, dict[str, np.ndarray]] = {}
    one_resource: dict[tuple[str, str], PowerLawFit] = {}
    residuals: list[tuple[str, str, np.ndarray, np.ndarray]] = []
    allocations: list[tuple[str, Allocation]] = []
    # NaN (no Zipf exponent) is mapped to inf first: NaN never equals itself in a set.
    zipf_key = np.where(np.isfinite(zipf), zipf, np.inf)
    dense_joint: ChinchillaFit | None = None
    groups = sorted({(str(f), float(z)) for f, z in zip(family, zipf_key, strict=True)})
    if not groups:
        report.notes.append(f"{name}: no finished trials")

    for fam, z in groups:
        group = f"alpha={z:g}" if np.isfinite(z) else ""
        rows = (family == fam) & (zipf_key == z)
        rows &= ~bad
        fitter = _StudyFitter(report, workload, fam, group, z, seed=0)
        cells = _seed_means(n[rows], d[rows], c[rows], loss[rows])
        key = f"{fam} {group}".strip()
        points_by_family[key] = cells

        for resource in ("N", "D", "C"):
            env = _pareto(cells[resource], cells["loss"])
            fit = fitter.attempt(
                f"L({resource})",
                fit_power_law,
                cells[resource][env],
                cells["loss"][env],
                resource=resource,
                bootstrap=NUM_BOOTSTRAP,
            )
            if fit is not None:
                one_resource[(key, resource)] = fit
                fitter.record(
                    f"L({resource})",
                    {"E": fit.E, "A": fit.A, "alpha": fit.alpha},
                    dict(fit.ci),
                    fit.num_points,
                )
                residuals.append(
                    (
                        f"{key} L({resource})",
                        RESOURCE_LABEL_SHORT[resource],
                        cells[resource][env],
                        fit.residuals,
                    )
                )

        # Two values of a resource cannot separate its exponent from its scale and E.
        varies = len(np.unique(n[rows])) >= 3 and len(np.unique(d[rows])) >= 3
        if varies:
            joint = fitter.attempt(
                "L(N,D)",
                fit_chinchilla,
                n[rows],
                d[rows],
                loss[rows],
                bootstrap=NUM_BOOTSTRAP,
            )
            if joint is not None:
                if fam == "dense":
                    dense_joint = joint
                fitter.record("L(N,D)", joint.as_dict(), dict(joint.ci), joint.num_points)
                residuals.append(
                    (f"{key} L(N,D)", "training compute C (FLOPs)", c[rows], joint.residuals)
                )
                optimal = allocation_from_chinchilla(joint, float(np.nanmax(c[rows])))
                allocations.append((key, optimal))
                fitter.allocation(optimal, joint.num_points)

        if np.isfinite(budget[rows]).any():
            profiles = fitter.attempt(
                "allocation (approach 2)",
                fit_isoflop_profiles,
                budget[rows],
                n[rows],
                d[rows],
                loss[rows],
                bootstrap=NUM_BOOTSTRAP,
            )
            if profiles is not None:
                fitter.allocation(profiles, len(profiles.flops))
                allocations.append((key, profiles))
                report.plots.append(
                    plots.isoflop_profiles(
                        out_dir / f"{name}_{fam}_isoflop.png",
                        f"{name} {key}: isoFLOP profiles",
                        budget[rows],
                        n[rows],
                        loss[rows],
                        profiles,
                    )
                )

        envelope = _envelope_from_curves(fitter, curves, trial_ids[rows], n[rows])
        if envelope is not None:
            fitter.allocation(envelope, len(envelope.flops))
            allocations.append((key, envelope))

    _fit_moe(report, workload, family, n, d, loss, experts, bad, dense_joint)

    if points_by_family:
        report.plots.append(
            plots.loss_against_resources(
                out_dir / f"{name}_loss.png", f"{name}: final loss", points_by_family, one_resource
            )
        )
    if allocations:
        report.plots.append(
            plots.compute_optimal_frontier(
                out_dir / f"{name}_frontier.png", f"{name}: compute-optimal frontier", allocations
            )
        )
    if residuals:
        report.plots.append(
            plots.residual_panels(
                out_dir / f"{name}_residuals.png", f"{name}: residuals", residuals
            )
        )
    return report


RESOURCE_LABEL_SHORT = {"N": "parameters N", "D": "tokens D", "C": "compute C (FLOPs)"}


def _envelope_from_curves(
    fitter: _StudyFitter, curves: pa.Table, trial_ids: np.ndarray, n: np.ndarray
) -> Allocation | None:
    """Approach 1 from the curves of the given trials, when they report loss and tokens."""
    if curves.num_rows == 0 or not {"loss", "tokens"} <= set(curves.column_names):
        return None
    size = dict(zip(trial_ids, n, strict=True))
    ids = _text(curves, "trial_id")
    mine = np.isin(ids, list(size))
    if len({i for i in ids[mine]}) < 2:
        return None
    sub = curves.filter(pa.array(mine))
    ids = ids[mine]
    run_n = np.array([size[i] for i in ids])
    tokens = _column(sub, "tokens")
    if not np.isfinite(tokens).any():
        return None
    flops = _column(sub, "flops")
    flops = np.where(np.isfinite(flops), flops, 6 * run_n * tokens)
    return fitter.attempt(
        "allocation (approach 1)",
        fit_envelope,
        flops,
        run_n,
        tokens,
        _column(sub, "loss"),
        ids,
        bootstrap=200,
    )


def _fit_moe(
    report: StudyReport,
    workload: str,
    family: np.ndarray,
    n: np.ndarray,
    d: np.ndarray,
    loss: np.ndarray,
    experts: np.ndarray,
    bad: np.ndarray,
    dense_joint: ChinchillaFit | None,
) -> None:
    """Effective multiplier and Clark's law, where a study has dense and MoE runs.

    The multiplier uses the dense L(N, D) fit when there is one (each MoE run at its own D),
    else a dense L(N) at the token count most runs share.
    """
    dense, moe = (family == "dense") & ~bad, (family == "moe") & ~bad
    if not (dense.any() and moe.any()):
        return
    fitter = _StudyFitter(report, workload, "moe", "", math.nan, seed=0)
    shared_d = np.intersect1d(d[dense], d[moe])
    if dense_joint is not None:
        result = fitter.attempt(
            "MoE multiplier", effective_multiplier_joint, dense_joint, n[moe], d[moe], loss[moe]
        )
        if result is not None:
            fitter.record(
                "MoE multiplier",
                {"multiplier": result.multiplier},
                dict(result.ci),
                len(result.ratios),
            )
    elif shared_d.size:
        # Compare at the most common shared token count: a law at one D says nothing of another.
        target = shared_d[np.argmax([((d == x) & (dense | moe)).sum() for x in shared_d])]
        at_d = d == target
        result = fitter.attempt(
            "MoE multiplier",
            effective_multiplier,
            n[dense & at_d],
            loss[dense & at_d],
            n[moe & at_d],
            loss[moe & at_d],
            bootstrap=NUM_BOOTSTRAP,
        )
        if result is not None:
            fitter.record(
                "MoE multiplier",
                {"multiplier": result.multiplier},
                dict(result.ci),
                int((moe & at_d).sum()),
            )
            if result.num_below_floor:
                fitter.note(
                    f"MoE multiplier: {result.num_below_floor} MoE runs below the dense"
                    " floor E left out"
                )
    else:
        fitter.note("MoE multiplier: no token count shared by dense and MoE runs")

    # Dense runs enter Clark's law with one expert, so the expert count always varies here.
    usable = dense | moe
    clark = fitter.attempt(
        "Clark MoE law",
        fit_clark,
        n[usable],
        np.maximum(experts[usable], 1.0),
        loss[usable],
        bootstrap=NUM_BOOTSTRAP,
    )
    if clark is not None:
        fitter.record(
            "Clark MoE law",
            {k: getattr(clark, k) for k in "abcd"},
            dict(clark.ci),
            clark.num_points,
        )


# --- writing ------------------------------------------------------------------------------


def _fmt(value: float) -> str:
    if not np.isfinite(value):
        return "-"
    return f"{value:.4g}"


def _verdict_table(rows: list[FitRow]) -> list[str]:
    predicted = [r for r in rows if np.isfinite(r.predicted)]
    if not predicted:
        return [
            "No study has a theory prediction (only zipf_patterns studies do, from"
            " SCIENCE.md section 1)."
        ]
    lines = [
        "| study | family | group | law | quantity | predicted | fitted | 95% CI |"
        " CI holds prediction |",
        "|" + "---|" * 9,
    ]
    for r in predicted:
        if np.isfinite(r.ci_low):
            holds = "yes" if r.ci_low <= r.predicted <= r.ci_high else "**no**"
        else:
            holds = "no interval"
        lines.append(
            f"| {r.study} | {r.family} | {r.group} | {r.law} | {r.name} |"
            f" {_fmt(r.predicted)} | {_fmt(r.estimate)} |"
            f" [{_fmt(r.ci_low)}, {_fmt(r.ci_high)}] | {holds} |"
        )
    return lines


def _write_markdown(path: Path, root: str, studies: list[StudyReport]) -> None:
    rows = [r for s in studies for r in s.rows]
    lines = [
        f"# Scaling-law report: {root}",
        "",
        f"{len(studies)} studies, {len(rows)} fitted quantities, {NUM_BOOTSTRAP}"
        " bootstrap replicates per fit; intervals are 95% percentile intervals.",
        "",
        "## Verdicts",
        "",
        *_verdict_table(rows),
        "",
    ]
    notes = [n for s in studies for n in s.notes]
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    for study in studies:
        lines += [f"## {study.name}", ""]
        if study.rows:
            lines += [
                "| family | group | law | quantity | estimate | 95% CI | points |",
                "|" + "---|" * 7,
            ]
            lines += [
                f"| {r.family} | {r.group} | {r.law} | {r.name} | {_fmt(r.estimate)} |"
                f" [{_fmt(r.ci_low)}, {_fmt(r.ci_high)}] | {r.num_points} |"
                for r in study.rows
            ]
        else:
            lines.append("No fit could be made; see the notes above.")
        lines += ["", *[f"![{p.stem}]({p.name})" for p in study.plots], ""]
    path.write_text("\n".join(lines))


def _write_parquet(path: Path, studies: list[StudyReport]) -> None:
    rows = [r for s in studies for r in s.rows]
    names = list(FitRow.__dataclass_fields__)
    columns = {k: [getattr(r, k) for r in rows] for k in names}
    schema = pa.schema(
        [(k, pa.string()) for k in names[:5]]
        + [(k, pa.float64()) for k in names[5:9]]
        + [("num_points", pa.int64())]
    )
    pq.write_table(pa.table(columns, schema=schema), path)


def aggregate_tables(
    trials: pa.Table, curves: pa.Table, out_dir: str | Path, results_root: str = ""
) -> Path:
    """The report from in-memory tables in the results schema; returns report.md's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    studies = []
    for name in sorted(set(_text(trials, "study"))):
        logger.info("aggregate: fitting study %s", name)
        mine = pa.array(_text(trials, "study") == name)
        curve_rows = pa.array(_text(curves, "study") == name) if curves.num_rows else None
        study_curves = curves.filter(curve_rows) if curve_rows is not None else curves
        studies.append(_fit_study(name, trials.filter(mine), study_curves, out))

    _write_parquet(out / "fits.parquet", studies)
    report = out / "report.md"
    _write_markdown(report, results_root, studies)
    logger.info("aggregate: wrote %s", report)
    return report


def aggregate(results_root: str, out_dir: str) -> Path:
    """Read every study under ``results_root`` and write report.md, fits.parquet and plots.

    Raises UserError with one line for an empty or unreadable root.
    """
    trials, curves = _load(results_root)
    return aggregate_tables(trials, curves, out_dir, results_root)
