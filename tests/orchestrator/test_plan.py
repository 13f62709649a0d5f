"""Planning: grid expansion, content-addressed ids, isoFLOP sizing."""

from __future__ import annotations

import pytest

from orchestrator.errors import UserError
from orchestrator.plan import expand, trial_id
from orchestrator.spec import parse_spec
from orchestrator.workload import get_workload


def plan(raw: dict, workload: str = "probe"):
    spec = parse_spec({"name": "t", "workload": workload, **raw}, "test")
    return expand(spec, get_workload(workload))


def test_grid_times_zip_times_seeds_plus_include() -> None:
    trials = plan(
        {
            "axes": {
                "grid": {"value": [1.0, 2.0, 3.0]},
                "zip": [{"work_s": [0.0, 0.5], "num_steps": [2, 3]}],
            },
            "include": [{"value": 9.0, "num_workers": 2}],
            "seeds": [0, 1],
        }
    )
    assert len(trials) == (3 * 2 + 1) * 2
    zipped = {(t.params["work_s"], t.params["num_steps"]) for t in trials}
    assert zipped == {(0.0, 2), (0.5, 3), (0.1, 4)}
    assert [t.resources.workers for t in trials if t.params["value"] == 9.0] == [2, 2]


def test_trial_id_is_content_addressed() -> None:
    first = plan({"axes": {"grid": {"value": [1.0, 2.0]}}, "seeds": [0, 1]})
    again = plan({"axes": {"grid": {"value": [1.0, 2.0]}}, "seeds": [0, 1]})
    assert [t.trial_id for t in first] == [t.trial_id for t in again]
    assert len({t.trial_id for t in first}) == 4

    # Growing the grid keeps the old ids: the old cells are the same trials.
    grown = plan({"axes": {"grid": {"value": [1.0, 2.0, 3.0]}}, "seeds": [0, 1]})
    assert {t.trial_id for t in first} < {t.trial_id for t in grown}

    # Defaults are part of the params, so spelling one out changes nothing.
    explicit = plan(
        {"params": {"work_s": 0.1}, "axes": {"grid": {"value": [1.0, 2.0]}}, "seeds": [0, 1]}
    )
    assert {t.trial_id for t in explicit} == {t.trial_id for t in first}


def test_trial_id_depends_on_every_part() -> None:
    base = trial_id("w", "1", {"a": 1}, 0)
    assert base != trial_id("w", "2", {"a": 1}, 0)
    assert base != trial_id("v", "1", {"a": 1}, 0)
    assert base != trial_id("w", "1", {"a": 2}, 0)
    assert base != trial_id("w", "1", {"a": 1}, 1)
    assert base == trial_id("w", "1", {"a": 1}, 0)


def test_duplicate_cells_are_planned_once() -> None:
    trials = plan({"axes": {"grid": {"value": [1.0, 1.0]}}, "include": [{"value": 1.0}]})
    assert len(trials) == 1


def test_repeats_is_seeds_range() -> None:
    assert sorted(t.seed for t in plan({"repeats": 3})) == [0, 1, 2]


def test_isoflop_sizes_tokens_to_the_budget() -> None:
    trials = plan(
        {
            "params": {"num_patterns": 256, "batch_size": 32},
            "isoflop": {
                "budgets": [1e9, 4e9],
                "size_param": "width",
                "sizes": [8, 32],
                "tokens_param": "steps",
            },
        },
        workload="zipf_patterns",
    )
    assert len(trials) == 4
    for trial in trials:
        budget = trial.annotations["flop_budget"]
        # Steps are whole numbers, so the cost is within one step of the budget.
        assert trial.flops == pytest.approx(budget, rel=0.01)
    small, large = (
        sorted(t.params["steps"] for t in trials if t.params["width"] == w) for w in (8, 32)
    )
    assert small[0] > large[0]  # the smaller model trains longer on the same budget


def test_isoflop_unknown_tokens_param() -> None:
    with pytest.raises(UserError, match=r"isoflop\.tokens_param"):
        plan(
            {
                "isoflop": {
                    "budgets": [1e9],
                    "size_param": "value",
                    "sizes": [1],
                    "tokens_param": "nope",
                }
            }
        )


def test_version_mismatch_is_an_error() -> None:
    with pytest.raises(UserError, match="version"):
        plan({"version": "99"})
