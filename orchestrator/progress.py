"""Progress of a running study: a live bar and one log line per finished trial."""

from __future__ import annotations

import logging
import math
import sys
from typing import Any

from tqdm import tqdm

logger = logging.getLogger("frontier")


def configure_logging(verbose: bool = False) -> None:
    """One handler on the package logger, in the driver and in every Ray worker."""
    root = logging.getLogger("frontier")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False


class StudyProgress:
    """Done / running / failed counts with an ETA, and the best key metric so far."""

    def __init__(self, study: str, num_trials: int, key_metric: str) -> None:
        self.study = study
        self.num_trials = num_trials
        self.key_metric = key_metric
        self.num_finished = 0
        self.num_failed = 0
        self.num_running = 0
        self.best: tuple[float, str] | None = None
        # disable=None: a bar on a terminal, nothing on a pipe or CI log (the lines remain).
        self.bar = tqdm(total=num_trials, desc=study, unit="trial", disable=None, leave=True)
        self._refresh()

    def _refresh(self) -> None:
        self.bar.set_postfix_str(f"running={self.num_running} failed={self.num_failed}")

    def set_running(self, num_running: int) -> None:
        if num_running != self.num_running:
            self.num_running = num_running
            self._refresh()

    def finished(self, trial: Any, outcome: dict[str, Any]) -> None:
        self.num_finished += 1
        status = outcome["status"]
        if status != "done":
            self.num_failed += 1
        value = outcome["metrics"].get(self.key_metric, math.nan)
        improves = self.best is None or value < self.best[0]
        if status == "done" and math.isfinite(value) and improves:
            self.best = (value, trial.trial_id)
        self.bar.update(1)
        self._refresh()

        prefix = f"[{self.num_finished}/{self.num_trials}] trial {trial.trial_id[:8]}"
        best = f"best {self.best[0]:.4g} ({self.best[1][:8]})" if self.best else "no best yet"
        if status == "done":
            message = f"{prefix} done in {outcome['wall_s']:.1f} s: {self.key_metric} {value:.4g}"
        else:
            last_line = (outcome.get("error") or "").strip().splitlines()[-1:] or [""]
            message = f"{prefix} {status} after {outcome['wall_s']:.1f} s: {last_line[0][:160]}"
        self._write(f"{message}; {best}", warn=status != "done")

    def _write(self, line: str, warn: bool) -> None:
        if self.bar.disable:
            (logger.warning if warn else logger.info)(line)
        else:
            self.bar.write(line)

    def close(self) -> None:
        self.bar.close()
