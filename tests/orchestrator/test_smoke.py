"""`frontier smoke` end to end: both families, a 2-worker trial, and a rerun that runs nothing.

Marked slow (several minutes on 2 cores); the default run covers the same paths at small
size in test_execute_ray.py.
"""

from __future__ import annotations

import time

import pytest

from orchestrator.store import read_trials


@pytest.mark.slow
def test_smoke_then_rerun(tmp_path, frontier_cli) -> None:
    results = tmp_path / "smoke"
    started = time.perf_counter()
    first = frontier_cli("smoke", "--results", str(results), timeout_s=1200)
    first_s = time.perf_counter() - started
    assert first.returncode == 0, first.stderr[-3000:]
    assert "family" in first.stdout and "moe" in first.stdout and "dense" in first.stdout

    rows = read_trials(results).to_pylist()
    done = [r for r in rows if r["status"] == "done"]
    assert len(done) == len(rows) == 18
    assert {(r["params.num_experts"] > 0) for r in done} == {False, True}
    assert any(r["workers"] == 2 for r in done)

    started = time.perf_counter()
    again = frontier_cli("smoke", "--results", str(results))
    again_s = time.perf_counter() - started
    assert again.returncode == 0
    assert "0 trials run, 18 already done" in again.stdout
    assert again_s < 0.25 * first_s
