"""End to end through a real local Ray: tasks, a 2-worker DeepSpeed trial, failures, resume."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
from pathlib import Path

from orchestrator.store import read_curves, read_trials

MIXED_STUDY = """
name: mixed
workload: {workload}
params: {params}
axes: {{grid: {grid}}}
include: {include}
seeds: [0]
resources: {{workers: 1, cpus_per_worker: 1}}
deepspeed: zero1_cpu
"""


def test_study_with_failures_divergence_and_deepspeed_pair(tmp_path: Path, frontier_cli) -> None:
    probe = tmp_path / "probe.yaml"
    probe.write_text(
        MIXED_STUDY.format(
            workload="probe",
            params="{work_s: 0.2, num_steps: 4}",
            grid="{value: [1.0, 2.0]}",
            include="[{fail_at_step: 2}, {diverge_at_step: 3}]",
        )
    )
    pair = tmp_path / "pair.yaml"
    pair.write_text(
        MIXED_STUDY.format(
            workload="zipf_patterns",
            params="{num_patterns: 128, width: 8, num_experts: 2, top_k: 1, steps: 40, "
            "batch_size: 32, eval_every: 20, num_workers: 2}",
            grid="{alpha: [1.5]}",
            include="[]",
        ).replace("name: mixed", "name: pair")
    )
    results = tmp_path / "results"

    first = frontier_cli("run", str(probe), "--results", str(results))
    assert first.returncode == 1, first.stderr  # one trial failed
    assert "[4/4]" in first.stderr and "failed" in first.stderr

    table = read_trials(results, "mixed")
    by_status = {}
    for row in table.to_pylist():
        by_status.setdefault(row["status"], []).append(row)
    assert len(by_status["done"]) == 2
    assert "probe failure requested at step 2" in by_status["failed"][0]["error"]
    diverged = by_status["diverged"][0]
    assert diverged["diverged_step"] == 3
    assert sorted(r["metrics.loss"] for r in by_status["done"]) == [1.0, 2.0]
    assert all(r["provenance.git_rev"] and r["provenance.started_at"] for r in table.to_pylist())
    curves = read_curves(results, "mixed")
    done_ids = {r["trial_id"] for r in by_status["done"]}
    assert {tid for tid in curves["trial_id"].to_pylist() if tid in done_ids} == done_ids

    # The 2-worker trial: Ray Train TorchTrainer with DeepSpeed on gloo, given the results
    # root as a relative path, as `make smoke` does.
    second = frontier_cli("run", str(pair), "--results", "results", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    (pair_row,) = read_trials(results, "pair").to_pylist()
    assert pair_row["status"] == "done", pair_row["error"]
    assert pair_row["workers"] == 2
    assert math.isfinite(pair_row["metrics.loss"])
    # Both ranks' examples are counted: tokens = steps * batch * world size.
    assert pair_row["metrics.tokens"] == 40 * 32 * 2

    # A rerun runs nothing; --retry-failed runs only the failed and diverged ones.
    again = frontier_cli("run", str(probe), "--results", str(results))
    assert again.returncode == 0, again.stderr
    assert "0 to run" in again.stderr
    retried = frontier_cli("run", str(probe), "--results", str(results), "--retry-failed")
    assert "2 to run" in retried.stderr
    assert read_trials(results, "mixed").num_rows == 4

    status = frontier_cli("status", "--results", str(results))
    assert status.returncode == 0
    lines = {line.split()[0]: line.split()[1:] for line in status.stdout.splitlines()[2:]}
    assert lines["mixed"] == ["2", "1", "1", "0"]
    assert lines["pair"] == ["1", "0", "0", "0"]


def _start_and_stop(
    command: list[str], cwd: Path, trials_dir: Path, min_files: int, signum: int
) -> subprocess.CompletedProcess:
    """Start `frontier run`, wait until min_files trials are recorded, then send signum."""
    process = subprocess.Popen(
        command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(trials_dir.glob("*.parquet"))) < min_files:
        time.sleep(0.1)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=60)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def test_interrupted_and_killed_runs_resume_without_loss_or_duplicates(
    tmp_path: Path, frontier_cli, repo_root: Path
) -> None:
    spec = tmp_path / "slow.yaml"
    spec.write_text(
        "name: slow\nworkload: probe\nparams: {work_s: 1.5, num_steps: 3}\n"
        "axes: {grid: {value: [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]}}\nseeds: [0]\n"
    )
    results = tmp_path / "results"
    trials_dir = results / "slow" / "trials"
    command = [
        sys.executable,
        "-m",
        "orchestrator.cli",
        "run",
        str(spec),
        "--results",
        str(results),
    ]

    # Ctrl-C: a clean stop with exit 130 that says how to resume.
    stopped = _start_and_stop(command, repo_root, trials_dir, 2, signal.SIGINT)
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    assert "interrupted" in stopped.stderr and "run the same command" in stopped.stderr
    after_interrupt = len(list(trials_dir.glob("*.parquet")))

    # SIGKILL: no chance to clean up, and still nothing half-written or lost.
    killed = _start_and_stop(command, repo_root, trials_dir, after_interrupt + 2, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    survivors = {p.name: p.stat().st_mtime_ns for p in trials_dir.glob("*.parquet")}
    assert after_interrupt + 2 <= len(survivors) < 8, "the kill should land mid-study"
    assert not [p for p in trials_dir.iterdir() if not p.name.endswith(".parquet")]

    resumed = frontier_cli("run", str(spec), "--results", str(results))
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(survivors)} already recorded" in resumed.stderr

    table = read_trials(results, "slow")
    ids = table["trial_id"].to_pylist()
    assert len(ids) == 8 and len(set(ids)) == 8
    assert set(table["status"].to_pylist()) == {"done"}
    # Trials finished before the stops were neither lost nor run again.
    for name, mtime_ns in survivors.items():
        assert (trials_dir / name).stat().st_mtime_ns == mtime_ns


LM_PAIR = """
name: lm_pair
workload: lm
params: {d_model: 32, num_layers: 1, num_heads: 2, d_ff: 64, context_length: 32,
         vocab_size: 64, batch_size: 8, num_tokens: 8192, eval_every: 16, eval_tokens: 1024,
         num_experts: 4, top_k: 2, moe_backend: deepspeed, ep_size: 2, num_workers: 2}
seeds: [0]
deepspeed: zero1_cpu
"""


def test_two_worker_moe_lm_with_expert_parallelism_through_the_orchestrator(
    tmp_path: Path, frontier_cli
) -> None:
    spec = tmp_path / "lm_pair.yaml"
    spec.write_text(LM_PAIR)
    result = frontier_cli("run", str(spec), "--results", str(tmp_path / "r"))
    assert result.returncode == 0, result.stderr[-3000:]

    (row,) = read_trials(tmp_path / "r", "lm_pair").to_pylist()
    assert row["status"] == "done", row["error"]
    assert row["workers"] == 2 and row["params.ep_size"] == 2
    assert math.isfinite(row["metrics.loss"])
    # 4 experts, 2 selected: far fewer active than total parameters.
    assert row["metrics.params_active"] < row["metrics.params_total"]
    assert row["metrics.tokens"] >= 8192
