"""Fixtures shared by the model tests: the MoE backends, each usable or skipped."""

from __future__ import annotations

import pytest

from workloads.models.backends.megablocks_experts import megablocks_available

BACKENDS = ["torch", "deepspeed", "megablocks"]


def skip_reason(backend: str) -> str | None:
    """Why ``backend`` cannot run here, or None."""
    if backend == "megablocks":
        usable, reason = megablocks_available()
        return None if usable else reason
    return None


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    reason = skip_reason(request.param)
    if reason:
        pytest.skip(reason)
    return request.param


@pytest.fixture
def device(backend: str) -> str:
    return "cuda" if backend == "megablocks" else "cpu"
