"""Every kind of bad spec gets exit code 2 and one line naming the field, no traceback."""

from __future__ import annotations

import pytest

GOOD = """
name: tiny
workload: probe
params: {work_s: 0.0}
axes: {grid: {value: [1.0, 2.0]}}
seeds: [0]
"""

BAD_SPECS = {
    "unknown_field": (GOOD + "colour: blue\n", ["colour", "unknown field", "allowed", "axes"]),
    "unknown_nested_field": (
        GOOD.replace("seeds: [0]", "resources: {workers: 1, gpu: 2}"),
        ["resources.gpu", "allowed", "gpus_per_worker"],
    ),
    "wrong_type": (GOOD.replace("seeds: [0]", "seeds: [zero]"), ["seeds.0", "integer"]),
    "wrong_param_type": (
        GOOD.replace("{work_s: 0.0}", "{work_s: soon}"),
        ["params.work_s", "number"],
    ),
    "unknown_param": (
        GOOD.replace("{work_s: 0.0}", "{work_s: 0.0, speed: 3}"),
        ["params.speed", "unknown field", "work_s"],
    ),
    "unknown_workload": (GOOD.replace("workload: probe", "workload: nope"), ["nope", "probe"]),
    "empty_grid": (GOOD.replace("[1.0, 2.0]", "[]"), ["axes.grid.value", "empty"]),
    "zip_lengths": (
        GOOD.replace("{grid: {value: [1.0, 2.0]}}", "{zip: [{value: [1.0], work_s: [0, 0]}]}"),
        ["axes.zip[0]", "length"],
    ),
    "impossible_resources": (
        GOOD + "resources: {workers: 1, cpus_per_worker: 1, gpus_per_worker: 4}\n",
        ["resources", "GPU", "--address"],
    ),
    "negative_resources": (
        GOOD + "resources: {workers: 0}\n",
        ["resources.workers", "greater than or equal"],
    ),
    "invalid_yaml": ("name: [unclosed\nworkload: probe\n", ["invalid YAML", "line"]),
    "not_a_mapping": ("- just\n- a list\n", ["YAML mapping"]),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_spec_gets_one_line_and_exit_2(case: str, write_spec, frontier_cli) -> None:
    text, needles = BAD_SPECS[case]
    spec = write_spec(text)
    result = frontier_cli("run", str(spec), "--results", str(spec.parent / "results"))

    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_spec_file(tmp_path, frontier_cli) -> None:
    result = frontier_cli("run", str(tmp_path / "absent.yaml"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"frontier: spec: file '{tmp_path / 'absent.yaml'}' not found; check the path"
    ]


def test_unknown_builtin_name_lists_the_builtins(frontier_cli) -> None:
    result = frontier_cli("run", "no_such_study")
    assert result.returncode == 2
    assert "built-in: " in result.stderr and "smoke" in result.stderr


def test_bad_argument_is_one_line(frontier_cli) -> None:
    result = frontier_cli("run", "smoke", "--bogus")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "--bogus" in result.stderr


def test_good_spec_dry_run_prints_the_plan(write_spec, frontier_cli) -> None:
    spec = write_spec(GOOD)
    result = frontier_cli("run", str(spec), "--dry-run", "--results", str(spec.parent / "r"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("pending") == 2
    assert "2 trials" in result.stdout
