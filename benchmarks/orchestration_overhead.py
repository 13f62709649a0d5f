"""Orchestration overhead: frontier against bare Ray tasks doing the same work.

Both run on one local Ray in this process: 16 trials (by default) that each hold one CPU
for a fixed 2 s. The bare baseline is a plain ``@ray.remote`` function; the frontier run
is a real study of the ``probe`` workload through ``run_study`` (planning, Ray tasks,
progress, atomic Parquet rows and curves, provenance). Prints both wall times and the
ratio; the target is under 1.15.

    python benchmarks/orchestration_overhead.py [--trials 16] [--work-s 2] [--busy]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time

import ray

from orchestrator.execute import init_ray, run_study
from orchestrator.plan import expand
from orchestrator.spec import parse_spec
from orchestrator.workload import get_workload


def _work(seconds: float, busy: bool) -> float:
    if busy:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            pass
    else:
        time.sleep(seconds)
    return seconds


def bare_ray_s(num_trials: int, work_s: float, busy: bool) -> float:
    task = ray.remote(num_cpus=1)(_work)
    started = time.perf_counter()
    ray.get([task.remote(work_s, busy) for _ in range(num_trials)])
    return time.perf_counter() - started


def frontier_s(num_trials: int, work_s: float, busy: bool, results: str, name: str) -> float:
    spec = parse_spec(
        {
            "name": name,
            "workload": "probe",
            "params": {"work_s": work_s, "busy": busy, "num_steps": 1},
            "axes": {"grid": {"value": [float(v) for v in range(num_trials)]}},
        },
        "benchmark",
    )
    trials = expand(spec, get_workload("probe"))
    started = time.perf_counter()
    summary = run_study(spec, trials, results)
    assert summary.done == num_trials, summary
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--work-s", type=float, default=2.0)
    parser.add_argument("--busy", action="store_true", help="spin the CPU instead of sleeping")
    args = parser.parse_args()
    logging.getLogger("frontier").setLevel(logging.WARNING)

    init_ray(None)
    with tempfile.TemporaryDirectory() as results:
        # Warm both paths once so neither pays for starting Ray's worker processes.
        bare_ray_s(2, 0.1, args.busy)
        frontier_s(2, 0.1, args.busy, results, "warmup")

        bare = bare_ray_s(args.trials, args.work_s, args.busy)
        ours = frontier_s(args.trials, args.work_s, args.busy, results, "overhead")
    ideal = args.trials * args.work_s / ray.cluster_resources()["CPU"]
    print(
        f"{args.trials} trials x {args.work_s:g} s on {ray.cluster_resources()['CPU']:g} CPUs "
        f"(ideal {ideal:.2f} s)"
    )
    print(f"bare Ray tasks:  {bare:.2f} s")
    print(f"frontier run:    {ours:.2f} s")
    print(f"ratio frontier / bare: {ours / bare:.3f} (target < 1.15)")


if __name__ == "__main__":
    main()
