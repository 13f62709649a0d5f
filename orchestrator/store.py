"""Results store: Parquet files under a results root, local path or URI (s3://, gs://).

Layout of one study::

    <root>/<study>/plan.json               planned trial ids (for `frontier status`)
    <root>/<study>/trials/<trial_id>.parquet   one row: status, params.*, metrics.*, ...
    <root>/<study>/curves/<trial_id>.parquet   metrics per reported step

One file per trial keeps every write small and atomic: a local write goes to a hidden
temporary name and is renamed into place, and an object-store PUT is atomic by itself, so
a crash never leaves a file a reader would trust half-written. A trial written twice
(a rerun after a crash) replaces its own file: no trial is recorded twice.

NOTE: there are no leases yet. Two `frontier run` processes started on the same study at
the same time would both run its pending trials (each trial still ends up as one row,
the later write winning); a lease per study or per trial is what is missing.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from orchestrator.errors import UserError

STATUSES = ("done", "failed", "diverged")
BASE_COLUMNS = {
    "study": pa.string(),
    "trial_id": pa.string(),
    "workload": pa.string(),
    "status": pa.string(),
    "wall_s": pa.float64(),
    "workers": pa.int64(),
    "seed": pa.int64(),
}


def _filesystem(root: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    text = str(root)
    if "://" in text:
        try:
            return pafs.FileSystem.from_uri(text)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as error:
            raise UserError(f"results: cannot open '{text}': {error}") from None
    return pafs.LocalFileSystem(), str(Path(text).expanduser().resolve())


def _is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def _write_bytes_atomic(fs: pafs.FileSystem, path: str, payload: bytes) -> None:
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if not _is_local(fs):
        with fs.open_output_stream(path) as stream:
            stream.write(payload)
        return
    temporary = f"{parent}/.{path.rsplit('/', 1)[1]}.{uuid.uuid4().hex}.tmp"
    with open(temporary, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _write_table_atomic(fs: pafs.FileSystem, path: str, table: pa.Table) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    _write_bytes_atomic(fs, path, sink.getvalue().to_pybytes())


def _cell(value: Any) -> Any:
    """A Parquet-friendly scalar: containers become JSON text."""
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, sort_keys=True)
    return value


def trial_row(
    *,
    study: str,
    trial_id: str,
    workload: str,
    status: str,
    wall_s: float,
    workers: int,
    seed: int,
    params: Mapping[str, Any],
    metrics: Mapping[str, float],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The flat row of one finished trial, with the column names DESIGN.md fixes."""
    assert status in STATUSES, status
    row: dict[str, Any] = {
        "study": study,
        "trial_id": trial_id,
        "workload": workload,
        "status": status,
        "wall_s": float(wall_s),
        "workers": int(workers),
        "seed": int(seed),
    }
    row.update({f"params.{k}": _cell(v) for k, v in params.items()})
    row.update({f"metrics.{k}": float(v) for k, v in metrics.items()})
    row.update({k: _cell(v) for k, v in (extra or {}).items()})
    return row


class ResultsStore:
    """Reads and writes one results root."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = str(root)
        self.fs, self.base = _filesystem(root)

    def _path(self, *parts: str) -> str:
        return "/".join([self.base.rstrip("/"), *parts])

    def write_trial(self, row: Mapping[str, Any], curves: Sequence[Mapping[str, float]]) -> None:
        """Write a finished trial: curves first, so a trial row always has its curves."""
        study, tid = row["study"], row["trial_id"]
        if curves:
            table = pa.Table.from_pylist(
                [{"study": study, "trial_id": tid, **point} for point in curves]
            )
            _write_table_atomic(self.fs, self._path(study, "curves", f"{tid}.parquet"), table)
        table = pa.Table.from_pylist([dict(row)])
        _write_table_atomic(self.fs, self._path(study, "trials", f"{tid}.parquet"), table)

    def write_plan(self, study: str, plan: Mapping[str, Any]) -> None:
        payload = json.dumps(plan, indent=1, sort_keys=True).encode()
        _write_bytes_atomic(self.fs, self._path(study, "plan.json"), payload)

    def read_plan(self, study: str) -> dict[str, Any] | None:
        path = self._path(study, "plan.json")
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as stream:
            return json.loads(stream.read())

    def studies(self) -> list[str]:
        info = self.fs.get_file_info(self.base)
        if info.type != pafs.FileType.Directory:
            return []
        entries = self.fs.get_file_info(pafs.FileSelector(self.base))
        folders = [
            e.base_name
            for e in entries
            if e.type == pafs.FileType.Directory and not e.base_name.startswith(("_", "."))
        ]
        # A study folder has a plan or trials; a report written into the root has neither.
        return sorted(
            name
            for name in folders
            if any(
                self.fs.get_file_info(self._path(name, marker)).type != pafs.FileType.NotFound
                for marker in ("plan.json", "trials")
            )
        )

    def _read_folder(
        self, study: str | None, folder: str, columns: list[str] | None = None
    ) -> pa.Table | None:
        tables = []
        for name in [study] if study else self.studies():
            path = self._path(name, folder)
            if self.fs.get_file_info(path).type != pafs.FileType.Directory:
                continue
            files = self.fs.get_file_info(pafs.FileSelector(path))
            for info in sorted(files, key=lambda i: i.path):
                if info.base_name.endswith(".parquet") and not info.base_name.startswith("."):
                    table = pq.read_table(info.path, columns=columns, filesystem=self.fs)
                    tables.append(table)
        if not tables:
            return None
        return pa.concat_tables(tables, promote_options="permissive")

    def read_trials(self, study: str | None = None) -> pa.Table:
        table = self._read_folder(study, "trials")
        return table if table is not None else pa.schema(BASE_COLUMNS).empty_table()

    def read_curves(self, study: str | None = None) -> pa.Table:
        table = self._read_folder(study, "curves")
        empty = pa.schema({"study": pa.string(), "trial_id": pa.string(), "step": pa.float64()})
        return table if table is not None else empty.empty_table()

    def statuses(self, study: str) -> dict[str, str]:
        """trial_id -> recorded status for one study."""
        # Only the two columns: this runs before every study, over every recorded trial.
        table = self._read_folder(study, "trials", columns=["trial_id", "status"])
        if table is None:
            return {}
        return dict(zip(table["trial_id"].to_pylist(), table["status"].to_pylist(), strict=True))


def read_trials(root: str | os.PathLike[str], study: str | None = None) -> pa.Table:
    """One row per finished trial under ``root`` (all studies, or one)."""
    return ResultsStore(root).read_trials(study)


def read_curves(root: str | os.PathLike[str], study: str | None = None) -> pa.Table:
    """Metrics per reported step, keyed by ``study`` and ``trial_id``."""
    return ResultsStore(root).read_curves(study)
