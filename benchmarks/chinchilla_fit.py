"""Time the approach-3 fit against scipy's L-BFGS-B called once per start.

Data: the 240 Chinchilla runs of Besiroglu et al. (the 5 highest losses dropped), D = C/6N.
Both sides use the full Hoffmann grid of 4500 starts and the same Huber objective with
its analytic gradient. The naive loop is timed on a random subset of starts and scaled to
the full grid, to keep this script to a couple of minutes; the printout says so.

    python benchmarks/chinchilla_fit.py [--baseline-starts 200] [--replicates 4000]

BLAS runs on one thread for both sides: the per-start loop does many tiny BLAS calls, and
a multi-threaded OpenBLAS on a busy machine made each of them up to 15x slower, which would
flatter the batched solver.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import time
from pathlib import Path

import numpy as np
import scipy.optimize

from orchestrator.analysis import _lse_solver as solver
from orchestrator.analysis import chinchilla as ch
from orchestrator.analysis import fit_chinchilla

DATA = Path(__file__).resolve().parents[1] / "../shared/data/chinchilla_svg_extracted.csv"
DELTA = 1e-3


def load_runs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return ch.load_chinchilla_runs(DATA)


def objective_only(params: np.ndarray, log_x: np.ndarray, log_loss: np.ndarray) -> float:
    return solver.objective_and_gradient(params, log_x, log_loss, DELTA)[0]


def naive_loop(
    starts: np.ndarray, log_x: np.ndarray, log_loss: np.ndarray, *, analytic: bool
) -> float:
    """scipy L-BFGS-B once per start; returns the best objective found.

    Without ``analytic`` scipy differences the objective numerically, as the published
    replication did.
    """
    best = np.inf
    for start in starts:
        if analytic:
            fun, args = solver.objective_and_gradient, (log_x, log_loss, DELTA)
        else:
            fun, args = objective_only, (log_x, log_loss)
        result = scipy.optimize.minimize(fun, start, args=args, jac=analytic, method="L-BFGS-B")
        best = min(best, float(result.fun))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-starts", type=int, default=200)
    parser.add_argument("--replicates", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    n, d, loss = load_runs()
    log_x, log_loss = np.log(np.stack([n, d], axis=1)), np.log(loss)
    starts = ch.chinchilla_starts()
    print(f"data: {len(loss)} runs; grid: {len(starts)} starts")

    subset = np.random.default_rng(0).choice(len(starts), args.baseline_starts, replace=False)
    baseline_s = {}
    for analytic, label in ((False, "numerical"), (True, "analytic")):
        began = time.perf_counter()
        naive_best = naive_loop(starts[subset], log_x, log_loss, analytic=analytic)
        subset_s = time.perf_counter() - began
        baseline_s[label] = subset_s * len(starts) / args.baseline_starts
        print(
            f"baseline  scipy L-BFGS-B per start, {label} gradient: {subset_s:.1f} s for"
            f" {args.baseline_starts} random starts -> {baseline_s[label]:.0f} s extrapolated"
            f" to {len(starts)} (best loss on the subset {naive_best:.10f})"
        )

    fit_times_s = []
    for _ in range(args.repeats):
        began = time.perf_counter()
        fit = fit_chinchilla(n, d, loss, huber_delta=DELTA)
        fit_times_s.append(time.perf_counter() - began)
    fit_s = min(fit_times_s)
    print(
        f"frontier  batched multi-start:    {fit_s:.2f} s for all {len(starts)} starts (best of"
        f" {args.repeats}); loss {fit.huber_loss:.10f}; E {fit.E:.4f} A {fit.A:.1f}"
        f" B {fit.B:.1f} alpha {fit.alpha:.4f} beta {fit.beta:.4f}"
    )
    print(
        f"speed-up: {baseline_s['numerical'] / fit_s:.0f}x against the numerical-gradient loop"
        f" (target >= 50x), {baseline_s['analytic'] / fit_s:.0f}x against the analytic one"
    )

    began = time.perf_counter()
    boot = fit_chinchilla(n, d, loss, huber_delta=DELTA, bootstrap=args.replicates, seed=0)
    total_s = time.perf_counter() - began
    boot_s = total_s - fit_s
    widths = {name: high - low for name, (low, high) in boot.ci.items()}
    print(
        f"bootstrap: {args.replicates} refits in {boot_s:.1f} s (fit + bootstrap {total_s:.1f} s;"
        f" target < 60 s); {boot.num_bootstrap_failed} unconverged; 95% widths"
        f" E {widths['E']:.3f} alpha {widths['alpha']:.3f} beta {widths['beta']:.3f}"
    )
    stds = boot.bootstrap_samples.std(axis=0)
    print(
        f"bootstrap std errors: E {stds[0]:.3f} alpha {stds[3]:.3f} beta {stds[4]:.3f}"
        " (Besiroglu et al.: 0.03, 0.02, 0.02)"
    )


if __name__ == "__main__":
    main()
