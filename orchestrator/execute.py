"""Execution on Ray: submit pending trials, record each as it finishes, resume after crashes.

Single-worker trials run as Ray tasks that ask for the trial's CPUs and GPUs. Multi-worker
trials run through Ray Train's TorchTrainer (gloo on CPU, NCCL on GPU) with DeepSpeed
initialised inside each worker; the trainer is launched from a zero-CPU Ray task so that
several multi-worker trials can queue beside the single-worker ones. Ray does the
queueing, placement and retries of lost workers; this module only submits, waits on
completions and writes results. Results are written by the driver alone, one atomic file
per trial, so a killed run loses only the trials that were still in flight.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from orchestrator.errors import UserError
from orchestrator.plan import Trial
from orchestrator.progress import StudyProgress, configure_logging
from orchestrator.spec import StudySpec, resolve_deepspeed_config
from orchestrator.store import ResultsStore, trial_row
from orchestrator.workload import Context, TrialDiverged, get_workload

logger = logging.getLogger("frontier")

PROVENANCE_PACKAGES = ("frontier", "torch", "ray", "deepspeed", "pyarrow", "optuna", "numpy")
TASK_MAX_RETRIES = 2
"""Ray re-runs a trial whose worker process died (node lost, OOM kill); not one that raised."""


@dataclass(frozen=True)
class RunSummary:
    planned: int
    skipped: int
    done: int
    failed: int
    diverged: int
    wall_s: float

    @property
    def ok(self) -> bool:
        return self.failed == 0


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def provenance(spec: StudySpec) -> dict[str, Any]:
    """Where and with what a study ran; stored beside every trial row."""
    repo = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = (
            subprocess.run(
                ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.strip()
            != ""
        )
    except (OSError, subprocess.SubprocessError):
        rev, dirty = "unknown", False
    packages = {}
    for name in PROVENANCE_PACKAGES:
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            continue
    return {
        "provenance.git_rev": rev,
        "provenance.git_dirty": dirty,
        "provenance.packages": json.dumps(packages, sort_keys=True),
        "provenance.spec_hash": spec.spec_hash(),
    }


# --- inside Ray workers ------------------------------------------------------------------


def _scratch_dirs(payload: dict[str, Any]) -> tuple[Path, Path]:
    # NOTE: for URI results roots the checkpoint and artifact folders stay on the worker's
    # local disk; uploading artifacts to the object store is not implemented yet.
    base = Path(payload["scratch_root"]) / payload["study"]
    tid = payload["trial_id"]
    return base / "checkpoints" / tid, base / "artifacts" / tid


def run_trial_here(
    payload: dict[str, Any], *, rank: int, world_size: int, device: Any, raise_errors: bool
) -> dict[str, Any]:
    """Run one trial in this process and return its outcome (a JSON-safe dict)."""
    import torch

    configure_logging()
    torch.set_num_threads(max(1, int(payload["cpus_per_worker"])))
    workload = get_workload(payload["workload"])
    params = workload.parse_params(payload["params"])
    checkpoint_dir, artifact_dir = _scratch_dirs(payload)
    ctx = Context(
        trial_id=payload["trial_id"],
        checkpoint_dir=checkpoint_dir,
        artifact_dir=artifact_dir,
        device=device,
        rank=rank,
        world_size=world_size,
        deepspeed_config=payload["deepspeed"] if world_size > 1 else None,
        logger=logging.getLogger(f"frontier.trial.{payload['trial_id'][:8]}"),
    )
    if ctx.is_main:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        artifact_dir.mkdir(parents=True, exist_ok=True)

    started_s, started_at = time.perf_counter(), _now()
    status, metrics, error, diverged_step = "done", {}, None, None
    try:
        metrics = {k: float(v) for k, v in workload.run(params, ctx).items()}
    except TrialDiverged as diverged:
        status, error, diverged_step = "diverged", str(diverged), diverged.step
    except Exception:
        if raise_errors:
            raise
        status, error = "failed", traceback.format_exc(limit=20)
    return _outcome(
        status,
        metrics=metrics,
        curves=ctx.curves,
        error=error,
        diverged_step=diverged_step,
        wall_s=time.perf_counter() - started_s,
        started_at=started_at,
    )


def _outcome(
    status: str,
    *,
    metrics: dict[str, float],
    curves: list[dict[str, float]],
    error: str | None,
    diverged_step: int | None,
    wall_s: float,
    started_at: str,
) -> dict[str, Any]:
    """A trial's outcome as it travels back to the driver (JSON-safe)."""
    return {
        "status": status,
        "metrics": metrics,
        "curves": curves,
        "error": error,
        "diverged_step": diverged_step,
        "wall_s": wall_s,
        "started_at": started_at,
        "ended_at": _now(),
        "host": socket.gethostname(),
    }


def _device_for(payload: dict[str, Any]) -> Any:
    import torch

    if payload["gpus_per_worker"] > 0 and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: every rank runs the workload; rank 0's outcome is kept."""
    import ray.train
    import ray.train.torch

    payload, board = config["payload"], config["board"]
    context = ray.train.get_context()
    device = ray.train.torch.get_device() if payload["gpus_per_worker"] > 0 else None
    outcome = run_trial_here(
        payload,
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        device=device if device is not None else _device_for(payload),
        raise_errors=True,
    )
    if context.get_world_rank() == 0:
        # Ray Train V2 keeps reported metrics only beside checkpoints; the board holds it.
        ray.get(board.post_outcome.remote(payload["trial_id"], outcome))


def _failed_outcome(error: BaseException | str, wall_s: float, started_at: str) -> dict[str, Any]:
    text = error if isinstance(error, str) else "".join(traceback.format_exception(error))
    status = "diverged" if "TrialDiverged" in text else "failed"
    return _outcome(
        status,
        metrics={},
        curves=[],
        error=text[-8000:],
        diverged_step=None,
        wall_s=wall_s,
        started_at=started_at,
    )


def _single_worker_trial(payload: dict[str, Any], board: Any) -> dict[str, Any]:
    board.started.remote(payload["trial_id"])
    return run_trial_here(
        payload, rank=0, world_size=1, device=_device_for(payload), raise_errors=False
    )


def _multi_worker_trial(payload: dict[str, Any], board: Any) -> dict[str, Any]:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    board.started.remote(payload["trial_id"])
    use_gpu = payload["gpus_per_worker"] > 0
    per_worker = {"CPU": payload["cpus_per_worker"]}
    if use_gpu:
        per_worker["GPU"] = payload["gpus_per_worker"]
    trainer = TorchTrainer(
        _train_loop_per_worker,
        train_loop_config={"payload": payload, "board": board},
        scaling_config=ScalingConfig(
            num_workers=payload["workers"], use_gpu=use_gpu, resources_per_worker=per_worker
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=f"{payload['study']}-{payload['trial_id']}",
            storage_path=payload["ray_storage"],
            failure_config=FailureConfig(max_failures=0),
        ),
    )
    started_s, started_at = time.perf_counter(), _now()
    try:
        trainer.fit()
    except Exception as error:
        return _failed_outcome(error, time.perf_counter() - started_s, started_at)
    outcome = ray.get(board.take_outcome.remote(payload["trial_id"]))
    if outcome is None:
        return _failed_outcome("rank 0 finished without an outcome", 0.0, started_at)
    return outcome


# --- in the driver -----------------------------------------------------------------------


def init_ray(address: str | None) -> None:
    """Join ``address`` (or RAY_ADDRESS), else start a local Ray bound to loopback."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    quiet = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address:
        logger.info("joining the Ray cluster at %s", address)
        ray.init(address=address, **quiet)
        return
    # The dashboard serves Ray's state API, which Ray Train uses to clean up after its
    # controllers; it listens on loopback only, like the rest of the local Ray.
    context = ray.init(
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",
        **quiet,
    )
    logger.info("started a local Ray on 127.0.0.1; dashboard: http://%s", context.dashboard_url)


def local_node() -> dict[str, float]:
    """The resources a local Ray started here would have."""
    import torch

    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def live_nodes() -> list[dict[str, float]]:
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def check_capacity(trials: Sequence[Trial], nodes: Sequence[dict[str, float]]) -> None:
    """Refuse trials no node of the cluster could ever place, before submitting any."""
    total = {key: sum(n.get(key, 0.0) for n in nodes) for key in ("CPU", "GPU")}
    for trial in trials:
        need = trial.resources
        fits_one = any(
            n.get("CPU", 0.0) >= need.cpus_per_worker and n.get("GPU", 0.0) >= need.gpus_per_worker
            for n in nodes
        )
        fits_all = (
            total["CPU"] >= need.workers * need.cpus_per_worker
            and total["GPU"] >= need.workers * need.gpus_per_worker
        )
        if not (fits_one and fits_all):
            raise UserError(
                f"resources: trial {trial.trial_id} needs {need.workers} worker(s) x "
                f"{need.cpus_per_worker:g} CPU, {need.gpus_per_worker:g} GPU; the cluster has "
                f"{total['CPU']:g} CPU, {total['GPU']:g} GPU in all; lower resources.* or "
                "num_workers in the spec, or join a larger cluster with --address"
            )


def _payload(
    trial: Trial, deepspeed: dict[str, Any], store: ResultsStore, scratch: str
) -> dict[str, Any]:
    return {
        "study": trial.study,
        "trial_id": trial.trial_id,
        "workload": trial.workload,
        "params": trial.params,
        "workers": trial.resources.workers,
        "cpus_per_worker": trial.resources.cpus_per_worker,
        "gpus_per_worker": trial.resources.gpus_per_worker,
        "deepspeed": deepspeed,
        "scratch_root": scratch,
        # Ray Train wants an absolute path or a URI; a relative --results is neither.
        "ray_storage": f"{_absolute_root(store).rstrip('/')}/_ray_train",
    }


def _absolute_root(store: ResultsStore) -> str:
    return store.root if "://" in store.root else store.base


def _scratch_root(store: ResultsStore) -> str:
    if "://" in store.root:
        return tempfile.gettempdir() + "/frontier"
    return store.base


@functools.cache
def _remote(function: Any) -> Any:
    """One Ray remote function per trial kind: Ray exports each to the workers only once."""
    import ray

    return ray.remote(function)


def _submit(trial: Trial, payload: dict[str, Any], board: Any) -> Any:
    need = trial.resources
    if need.workers == 1:
        task = _remote(_single_worker_trial).options(
            num_cpus=need.cpus_per_worker,
            num_gpus=need.gpus_per_worker,
            max_retries=TASK_MAX_RETRIES,
            name=f"trial-{trial.trial_id}",
        )
    else:
        task = _remote(_multi_worker_trial).options(
            num_cpus=0, max_retries=TASK_MAX_RETRIES, name=f"trial-{trial.trial_id}"
        )
    return task.remote(payload, board)


class _TrialBoard:
    """A zero-CPU actor the trials tell when they start, so the driver can count running.

    Rank 0 of a multi-worker trial also leaves its outcome here for the launching task.
    """

    def __init__(self) -> None:
        self.started_ids: set[str] = set()
        self.outcomes: dict[str, dict[str, Any]] = {}

    def post_outcome(self, trial_id: str, outcome: dict[str, Any]) -> None:
        self.outcomes[trial_id] = outcome

    def take_outcome(self, trial_id: str) -> dict[str, Any] | None:
        return self.outcomes.pop(trial_id, None)

    def started(self, trial_id: str) -> None:
        self.started_ids.add(trial_id)

    def started_list(self) -> list[str]:
        return sorted(self.started_ids)


def select_pending(
    trials: Sequence[Trial], recorded: dict[str, str], retry_failed: bool
) -> tuple[list[Trial], list[tuple[Trial, str]]]:
    """Split trials into those to run and those skipped, with the reason for each skip."""
    pending, skipped = [], []
    for trial in trials:
        status = recorded.get(trial.trial_id)
        if status is None:
            pending.append(trial)
        elif status == "done":
            skipped.append((trial, "done"))
        elif retry_failed:
            pending.append(trial)
        else:
            skipped.append((trial, f"{status} (pass --retry-failed to run it again)"))
    return pending, skipped


def run_study(
    spec: StudySpec,
    trials: Sequence[Trial],
    results: str,
    *,
    address: str | None = None,
    retry_failed: bool = False,
    spec_dir: Path | None = None,
) -> RunSummary:
    """Run every trial of the study not yet done; return the counts."""
    import ray

    started_s = time.perf_counter()
    store = ResultsStore(results)
    recorded = store.statuses(spec.name)
    pending, skipped = select_pending(trials, recorded, retry_failed)
    needs_deepspeed = any(t.resources.workers > 1 for t in pending)
    deepspeed = resolve_deepspeed_config(spec.deepspeed, spec_dir) if needs_deepspeed else {}
    local = not (address or os.environ.get("RAY_ADDRESS"))
    if local:
        check_capacity(pending, [local_node()])

    store.write_plan(
        spec.name,
        {
            "study": spec.name,
            "workload": spec.workload,
            "spec_hash": spec.spec_hash(),
            "trial_ids": [t.trial_id for t in trials],
        },
    )
    for trial, reason in skipped:
        logger.debug("skip trial %s: %s", trial.trial_id, reason)
    logger.info(
        "study %s: %d trials planned, %d already recorded, %d to run",
        spec.name,
        len(trials),
        len(skipped),
        len(pending),
    )
    if not pending:
        return RunSummary(len(trials), len(skipped), 0, 0, 0, time.perf_counter() - started_s)

    init_ray(address)
    if not local:
        check_capacity(pending, live_nodes())

    board = ray.remote(num_cpus=0)(_TrialBoard).remote()
    shared = provenance(spec)
    scratch = _scratch_root(store)
    workload = get_workload(spec.workload)
    progress = StudyProgress(spec.name, len(pending), workload.key_metric)
    refs = {_submit(t, _payload(t, deepspeed, store, scratch), board): t for t in pending}
    counts = {"done": 0, "failed": 0, "diverged": 0}

    previous_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        waiting = list(refs)
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1, timeout=2.0)
            if not ready:
                progress.set_running(_running(board, refs, waiting))
                continue
            trial = refs[ready[0]]
            outcome = _collect(ready[0])
            _record(store, trial, outcome, shared)
            counts[outcome["status"]] += 1
            progress.finished(trial, outcome)
            progress.set_running(_running(board, refs, waiting))
    except KeyboardInterrupt:
        for ref in refs:
            ray.cancel(ref, force=True)
        progress.close()
        logger.warning(
            "interrupted: %d finished trials are saved; run the same command to finish "
            "the other %d",
            sum(counts.values()),
            len(pending) - sum(counts.values()),
        )
        raise
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    progress.close()
    return RunSummary(
        len(trials),
        len(skipped),
        counts["done"],
        counts["failed"],
        counts["diverged"],
        time.perf_counter() - started_s,
    )


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _running(board: Any, refs: dict[Any, Trial], waiting: list[Any]) -> int:
    import ray

    started = set(ray.get(board.started_list.remote()))
    return sum(1 for ref in waiting if refs[ref].trial_id in started)


def _collect(ref: Any) -> dict[str, Any]:
    """The trial's outcome; a task Ray gave up on (worker lost past retries) is failed."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayError as error:
        return _failed_outcome(str(error), 0.0, _now())


def _record(store: ResultsStore, trial: Trial, outcome: dict[str, Any], shared: dict) -> None:
    extra = {
        **shared,
        "workload_version": trial.workload_version,
        "error": outcome.get("error"),
        "diverged_step": outcome.get("diverged_step"),
        "flops_planned": trial.flops,
        "tokens_planned": trial.tokens,
        "provenance.host": outcome.get("host"),
        "provenance.started_at": outcome.get("started_at"),
        "provenance.ended_at": outcome.get("ended_at"),
        **{f"params.{k}": v for k, v in trial.annotations.items()},
        "resources": json.dumps(asdict(trial.resources)),
    }
    row = trial_row(
        study=trial.study,
        trial_id=trial.trial_id,
        workload=trial.workload,
        status=outcome["status"],
        wall_s=outcome["wall_s"],
        workers=trial.resources.workers,
        seed=trial.seed,
        params=trial.params,
        metrics=outcome["metrics"],
        extra=extra,
    )
    store.write_trial(row, outcome.get("curves") or [])
