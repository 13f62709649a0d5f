"""Shared fixtures: a way to run the real `frontier` command, and tiny spec files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_frontier(*args: str, timeout_s: float = 600, env: dict | None = None, cwd: Path = REPO):
    """Run `frontier ARGS` as a user would, in a fresh process (from folder ``cwd``)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=full_env,
        cwd=cwd,
    )


@pytest.fixture
def frontier_cli():
    """`frontier_cli("run", ...)` runs the real CLI in a fresh process."""
    return run_frontier


@pytest.fixture
def repo_root() -> Path:
    return REPO


@pytest.fixture
def write_spec(tmp_path: Path):
    def write(text: str, name: str = "spec.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write
