"""Results store: rows, atomic writes, schema growth, resume selection."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

from orchestrator.execute import select_pending
from orchestrator.plan import Trial
from orchestrator.store import ResultsStore, read_curves, read_trials, trial_row
from orchestrator.workload import Resources


def row(tid: str, status: str = "done", **metrics: float) -> dict:
    return trial_row(
        study="s",
        trial_id=tid,
        workload="probe",
        status=status,
        wall_s=1.5,
        workers=1,
        seed=0,
        params={"width": 8, "tags": ["a", "b"]},
        metrics=metrics or {"loss": 0.5},
        extra={"provenance.host": "h"},
    )


def test_rows_and_curves_round_trip(tmp_path) -> None:
    store = ResultsStore(tmp_path)
    store.write_trial(row("a", loss=0.5), [{"step": 1.0, "loss": 1.0}, {"step": 2.0, "loss": 0.7}])
    store.write_trial(row("b", "failed"), [])

    table = read_trials(tmp_path)
    assert table.num_rows == 2
    for column in (
        "study",
        "trial_id",
        "workload",
        "status",
        "wall_s",
        "workers",
        "seed",
        "params.width",
        "metrics.loss",
        "provenance.host",
    ):
        assert column in table.column_names
    assert table["params.tags"].to_pylist() == ['["a", "b"]'] * 2
    assert store.statuses("s") == {"a": "done", "b": "failed"}

    curves = read_curves(tmp_path, "s")
    assert curves["loss"].to_pylist() == [1.0, 0.7]
    assert set(curves["trial_id"].to_pylist()) == {"a"}


def test_columns_grow_across_trials(tmp_path) -> None:
    store = ResultsStore(tmp_path)
    store.write_trial(row("a", loss=0.5), [])
    store.write_trial(row("b", loss=0.4, accuracy=0.9), [])
    table = read_trials(tmp_path, "s")
    assert table["metrics.accuracy"].to_pylist().count(None) == 1


def test_rewriting_a_trial_replaces_it(tmp_path) -> None:
    store = ResultsStore(tmp_path)
    store.write_trial(row("a", "failed"), [])
    store.write_trial(row("a", "done"), [])
    assert read_trials(tmp_path)["status"].to_pylist() == ["done"]


def test_crash_mid_write_leaves_no_trusted_file(tmp_path, monkeypatch) -> None:
    store = ResultsStore(tmp_path)
    store.write_trial(row("a"), [])

    def crash(*args, **kwargs):
        raise OSError("disk vanished")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        store.write_trial(row("b"), [])
    monkeypatch.undo()

    # The half-done write is a hidden temporary file the reader never trusts.
    assert read_trials(tmp_path)["trial_id"].to_pylist() == ["a"]
    leftovers = [p.name for p in (tmp_path / "s" / "trials").iterdir()]
    assert "b.parquet" not in leftovers


def test_empty_root_reads_as_empty_table(tmp_path) -> None:
    table = read_trials(tmp_path / "nothing")
    assert isinstance(table, pa.Table) and table.num_rows == 0
    assert "trial_id" in table.column_names


def test_plan_file_round_trip(tmp_path) -> None:
    store = ResultsStore(tmp_path)
    assert store.read_plan("s") is None
    store.write_plan("s", {"trial_ids": ["a", "b"]})
    assert store.read_plan("s") == {"trial_ids": ["a", "b"]}
    assert store.studies() == ["s"]


def _trial(tid: str) -> Trial:
    return Trial("s", "probe", "1", {}, 0, tid, Resources(), 1.0, 1.0)


def test_select_pending_skips_done_and_retries_failed_only_when_asked() -> None:
    trials = [_trial(t) for t in ("done1", "failed1", "diverged1", "new1")]
    recorded = {"done1": "done", "failed1": "failed", "diverged1": "diverged"}

    pending, skipped = select_pending(trials, recorded, retry_failed=False)
    assert [t.trial_id for t in pending] == ["new1"]
    assert len(skipped) == 3

    pending, _ = select_pending(trials, recorded, retry_failed=True)
    assert [t.trial_id for t in pending] == ["failed1", "diverged1", "new1"]


def test_uri_roots_go_through_pyarrow_filesystems(tmp_path) -> None:
    uri = f"file://{tmp_path}/root"
    store = ResultsStore(uri)
    store.write_trial(row("a"), [{"step": 1.0, "loss": 0.5}])
    store.write_plan("s", {"trial_ids": ["a"]})
    assert read_trials(uri)["trial_id"].to_pylist() == ["a"]
    assert read_curves(uri)["loss"].to_pylist() == [0.5]
    assert (tmp_path / "root" / "s" / "trials" / "a.parquet").is_file()


def test_unknown_uri_scheme_is_a_user_error() -> None:
    from orchestrator.errors import UserError

    with pytest.raises(UserError, match="results: cannot open"):
        ResultsStore("nosuch://bucket/root")
