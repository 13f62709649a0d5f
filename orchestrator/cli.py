"""`frontier`: run, inspect and aggregate studies.

Exit codes: 0 success, 1 when trials failed, 2 on bad input (one line, no traceback),
130 when interrupted (finished trials are kept; the same command resumes).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from orchestrator.errors import UserError
from orchestrator.progress import configure_logging

logger = logging.getLogger("frontier")

DEFAULT_RESULTS = "results"
SMOKE_STUDY = "smoke"
ASSUMED_GPU_FLOPS = 0.4 * 989e12
"""For --dry-run GPU-hours: an H100/H200 at 40% of its dense bf16 peak."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}; see `{self.prog} --help`\n")


def _add_results(parser: argparse.ArgumentParser, default: str = DEFAULT_RESULTS) -> None:
    parser.add_argument(
        "--results", default=default, help=f"results root, a path or URI (default: {default})"
    )


def _add_cluster(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else local)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="frontier", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    smoke = sub.add_parser("smoke", help="run the built-in smoke study and print a summary")
    _add_results(smoke, "results/smoke")
    _add_cluster(smoke)

    run = sub.add_parser("run", help="run a study spec (a YAML path or a built-in name)")
    run.add_argument("spec", help="YAML path or built-in study name (see `frontier studies`)")
    _add_results(run)
    _add_cluster(run)
    run.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    run.add_argument("--retry-failed", action="store_true", help="re-run failed trials")

    status = sub.add_parser("status", help="done / failed / pending per study")
    _add_results(status)

    aggregate = sub.add_parser("aggregate", help="fits, plots and verdicts over a results root")
    _add_results(aggregate)
    aggregate.add_argument("--out", default=None, help="output folder (default: RESULTS/report)")

    studies = sub.add_parser("studies", help="list the built-in study specs")
    _add_results(studies)
    return parser


# --- commands -----------------------------------------------------------------------------


def _plan(spec_or_name: str):
    from orchestrator.plan import expand
    from orchestrator.spec import load_spec
    from orchestrator.workload import get_workload

    spec = load_spec(spec_or_name)
    workload = get_workload(spec.workload)
    spec_path = Path(spec_or_name)
    spec_dir = spec_path.parent if spec_path.exists() else None
    return spec, expand(spec, workload), spec_dir


def cmd_run(args: argparse.Namespace) -> int:
    from orchestrator.execute import run_study

    spec, trials, spec_dir = _plan(args.spec)
    if args.dry_run:
        print_plan(spec, trials, args.results)
        return 0
    summary = run_study(
        spec,
        trials,
        args.results,
        address=args.address,
        retry_failed=args.retry_failed,
        spec_dir=spec_dir,
    )
    logger.info(
        "study %s: %d done, %d failed, %d diverged, %d skipped in %.1f s; results in %s",
        spec.name,
        summary.done,
        summary.failed,
        summary.diverged,
        summary.skipped,
        summary.wall_s,
        args.results,
    )
    return 0 if summary.ok else 1


def print_plan(spec, trials, results: str) -> None:
    from orchestrator.store import ResultsStore

    recorded = ResultsStore(results).statuses(spec.name)
    varied = sorted(
        {
            key
            for key in trials[0].params
            if len({repr(t.params.get(key)) for t in trials}) > 1 and key != "seed"
        }
    )
    notes = sorted({key for t in trials for key in t.annotations})
    header = ["trial", *notes, *varied, "seed", "workers", "cpu/w", "gpu/w", "FLOPs", "status"]
    rows = [
        [
            t.trial_id[:12],
            *(f"{t.annotations.get(k, '-'):.3g}" if k in t.annotations else "-" for k in notes),
            *(str(t.params.get(k)) for k in varied),
            str(t.seed),
            str(t.resources.workers),
            f"{t.resources.cpus_per_worker:g}",
            f"{t.resources.gpus_per_worker:g}",
            f"{t.flops:.3g}",
            recorded.get(t.trial_id, "pending"),
        ]
        for t in trials
    ]
    print(_table(header, rows))
    total_flops = sum(t.flops for t in trials)
    gpu_hours = total_flops / ASSUMED_GPU_FLOPS / 3600
    print(
        f"{len(trials)} trials, {total_flops:.3g} FLOPs in all = {gpu_hours:.3g} GPU-hours "
        "at 40% of an H100's 989 TFLOP/s bf16 peak"
    )


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=False)]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False))
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_smoke(args: argparse.Namespace) -> int:
    from orchestrator.execute import run_study

    started_s = time.perf_counter()
    spec, trials, _ = _plan(SMOKE_STUDY)
    trials = _use_local_gpu(trials)
    summary = run_study(spec, trials, args.results, address=args.address)
    print_smoke_summary(args.results, spec.name)
    print(
        f"smoke: {summary.done} trials run, {summary.skipped} already done, "
        f"{summary.failed} failed, {summary.diverged} diverged in "
        f"{time.perf_counter() - started_s:.1f} s"
    )
    return 0 if summary.ok else 1


def _use_local_gpu(trials):
    """On a machine with one GPU, single-worker smoke trials share it two at a time.

    Multi-worker smoke trials stay on CPU (gloo) unless there is a GPU per worker: NCCL
    refuses two ranks on one device.
    """
    import dataclasses

    import torch

    num_gpus = torch.cuda.device_count()
    if num_gpus == 0:
        return trials
    adjusted = []
    for trial in trials:
        workers = trial.resources.workers
        share = 0.5 if workers == 1 else (1.0 if num_gpus >= workers else 0.0)
        resources = dataclasses.replace(trial.resources, gpus_per_worker=share)
        adjusted.append(dataclasses.replace(trial, resources=resources))
    return adjusted


def print_smoke_summary(results: str, study: str) -> None:
    """Loss against N per family (mean over seeds), the smoke study's verdict at a glance."""
    from orchestrator.store import read_trials

    rows = read_trials(results, study).to_pylist()
    cells: dict[tuple[str, float, int], list[float]] = defaultdict(list)
    for row in rows:
        if row["status"] != "done":
            continue
        family = "moe" if (row.get("params.num_experts") or 0) > 0 else "dense"
        key = (family, row["metrics.params_active"], row["workers"])
        cells[key].append(row["metrics.loss"])
    table = [
        [
            family,
            f"{n_active:,.0f}",
            str(workers),
            str(len(losses)),
            f"{statistics.mean(losses):.4f}",
            f"{statistics.stdev(losses):.4f}" if len(losses) > 1 else "-",
        ]
        for (family, n_active, workers), losses in sorted(cells.items())
    ]
    print(_table(["family", "N active", "workers", "seeds", "loss", "sd"], table))


def cmd_status(args: argparse.Namespace) -> int:
    from orchestrator.store import ResultsStore

    store = ResultsStore(args.results)
    studies = store.studies()
    if not studies:
        raise UserError(f"results: no studies under '{args.results}'; run `frontier run` first")
    rows = []
    for study in studies:
        recorded = store.statuses(study)
        plan = store.read_plan(study) or {"trial_ids": list(recorded)}
        counts = defaultdict(int)
        for tid in plan["trial_ids"]:
            counts[recorded.get(tid, "pending")] += 1
        rows.append([study, *(str(counts[s]) for s in ("done", "failed", "diverged", "pending"))])
    print(_table(["study", "done", "failed", "diverged", "pending"], rows))
    return 0


def cmd_aggregate(args: argparse.Namespace) -> int:
    from orchestrator.report import aggregate

    out = args.out or f"{args.results.rstrip('/')}/report"
    path = aggregate(args.results, out)
    print(f"report: {path}")
    return 0


def cmd_studies(args: argparse.Namespace) -> int:
    from orchestrator.spec import builtin_specs, load_spec

    rows = []
    for name, path in builtin_specs().items():
        spec = load_spec(str(path))
        rows.append([name, spec.workload, spec.description])
    print(_table(["study", "workload", "description"], rows))
    return 0


COMMANDS = {
    "run": cmd_run,
    "smoke": cmd_smoke,
    "status": cmd_status,
    "aggregate": cmd_aggregate,
    "studies": cmd_studies,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        return COMMANDS[args.command](args)
    except UserError as error:
        print(f"frontier: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader (`| head`) went away; stop writing without a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
