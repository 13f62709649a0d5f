"""Tests of the Zipf-pattern workload: sampling, params, accounting, learning, failure."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydantic
import pytest
import torch
from scipy import stats

from orchestrator.workload import Context, TrialDiverged, get_workload
from workloads import zipf_patterns as zp

# A task small enough to learn in a fraction of a second on one CPU thread.
TINY: dict[str, Any] = {
    "alpha": 1.5,
    "num_patterns": 64,
    "input_dim": 16,
    "num_classes": 8,
    "width": 64,
    "num_samples": 2048,
    "steps": 200,
    "batch_size": 64,
    "lr": 1e-2,
    "eval_every": 50,
}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread; more only contend with other tests."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_ctx(tmp_path: Path) -> Context:
    return Context(
        trial_id="test",
        checkpoint_dir=tmp_path / "checkpoints",
        artifact_dir=tmp_path / "artifacts",
        device=torch.device("cpu"),
    )


def tiny(**overrides: Any) -> zp.ZipfPatternsParams:
    return zp.ZipfPatternsParams(**{**TINY, **overrides})


def test_registered_as_entry_point() -> None:
    assert isinstance(get_workload("zipf_patterns"), zp.ZipfPatterns)


@pytest.mark.parametrize("alpha", [1.3, 2.0])
def test_zipf_sampling_matches_power_law(alpha: float) -> None:
    num_patterns, num_draws = 30, 200_000
    probs = zp.zipf_probs(alpha, num_patterns)
    draws = zp.sample_zipf(probs, num_draws, torch.Generator().manual_seed(1))
    counts = torch.bincount(draws, minlength=num_patterns).double()

    # Goodness of fit against k^-alpha itself, not against the sampler's own table.
    ranks = torch.arange(1, num_patterns + 1, dtype=torch.float64)
    expected = ranks.pow(-alpha) / ranks.pow(-alpha).sum() * num_draws
    assert stats.chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3

    # The test has power: a slightly wrong exponent is rejected.
    wrong = ranks.pow(-alpha - 0.1) / ranks.pow(-alpha - 0.1).sum() * num_draws
    assert stats.chisquare(counts.numpy(), wrong.numpy()).pvalue < 1e-6


def test_zipf_probs_normalized_and_ordered() -> None:
    probs = zp.zipf_probs(1.5, 100)
    assert math.isclose(float(probs.sum()), 1.0, rel_tol=1e-12)
    assert math.isclose(float(probs[0] / probs[3]), 4.0**1.5, rel_tol=1e-12)


@pytest.mark.parametrize(
    "bad",
    [
        {"alpha": 1.0},
        {"alpha": 0.5},
        {"num_patterns": 1},
        {"num_classes": 1},
        {"num_experts": 4, "top_k": 5},
        {"learned_threshold": 0.125},  # chance accuracy with 8 classes
        {"learned_threshold": 1.5},
        {"steps": 0},
        {"lr": 0.0},
        {"weight_decay": -0.1},
        {"depth": 0},
        {"num_workers": 0},
        {"hidden": 3},
    ],
)
def test_params_validation_rejects(bad: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError):
        tiny(**bad)


def test_params_are_frozen_and_documented() -> None:
    params = tiny()
    with pytest.raises(pydantic.ValidationError):
        params.steps = 3  # type: ignore[misc]
    undocumented = [
        name for name, field in zp.ZipfPatternsParams.model_fields.items() if not field.description
    ]
    assert undocumented == []


@pytest.mark.parametrize("moe", [{}, {"num_experts": 4, "top_k": 2}])
def test_flops_and_tokens_linear_in_steps(moe: dict[str, Any]) -> None:
    workload = zp.ZipfPatterns()
    short, long = tiny(steps=100, **moe), tiny(steps=300, **moe)
    assert workload.tokens(long) == 3 * workload.tokens(short)
    assert workload.flops(long) == pytest.approx(3 * workload.flops(short))
    assert workload.tokens(short) == 100 * TINY["batch_size"]

    # Every worker adds its own batch, so the account counts all of them.
    two_workers = tiny(steps=100, num_workers=2, **moe)
    assert workload.tokens(two_workers) == 2 * workload.tokens(short)

    _, active = zp.count_params(short)
    assert workload.flops(short) == 6 * active * workload.tokens(short)


def test_moe_active_params_below_total() -> None:
    total, active = zp.count_params(tiny(num_experts=8, top_k=2))
    dense_total, dense_active = zp.count_params(tiny())
    assert active < total
    assert dense_active == dense_total
    assert active < 3 * dense_total < total


@pytest.mark.parametrize(
    "shape",
    [
        {},
        {"depth": 3, "width": 17},
        {"num_experts": 4, "top_k": 1},
        {"num_experts": 5, "top_k": 3, "depth": 2},
    ],
)
def test_param_counts_match_built_model(shape: dict[str, Any]) -> None:
    params = tiny(**shape)
    model = zp.build_model(params)
    total, active = zp.count_params(params)
    assert total == sum(p.numel() for p in model.parameters())

    if params.is_moe:
        assert isinstance(model, zp.MoEMLP)
        one_expert = sum(p.numel() for p in model.experts[0].parameters())
        assert active == model.router.weight.numel() + params.top_k * one_expert
    else:
        assert active == total


def test_moe_forward_uses_top_k_experts_and_balances() -> None:
    params = tiny(num_experts=4, top_k=2)
    torch.manual_seed(0)
    model = zp.build_model(params)
    logits, aux_loss = model(torch.randn(256, params.input_dim))
    assert logits.shape == (256, params.num_classes)
    # The Switch-style balance loss is >= 1 and equals 1 only under a uniform load.
    assert float(aux_loss.detach()) >= 1.0 - 1e-6

    # Every expert gets a gradient tensor, even one that no example was routed to.
    with torch.no_grad():
        model.router.weight.zero_()
        model.router.weight[0] = 10.0
        model.router.weight[1] = 10.0
    logits, aux_loss = model(torch.ones(8, params.input_dim))
    (logits.sum() + aux_loss).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert float(model.experts[3][0].weight.grad.abs().sum()) == 0.0
    assert float(model.experts[0][0].weight.grad.abs().sum()) > 0.0


def test_effective_frontier_recovers_a_sharp_frontier() -> None:
    correct = torch.zeros(1000, dtype=torch.float64)
    correct[:100] = 1.0
    assert zp.effective_frontier(correct, 0.5) == 100
    assert zp.effective_frontier(correct, 0.9) == 100

    # An isolated miss inside, and chance hits in the tail, do not move it.
    correct[2] = 0.0
    correct[300::8] = 1.0
    assert zp.effective_frontier(correct, 0.5) == 100

    assert zp.effective_frontier(torch.zeros(50, dtype=torch.float64), 0.5) == 0
    assert zp.effective_frontier(torch.ones(50, dtype=torch.float64), 0.5) == 50


def test_frontier_metrics_tail_mass_and_bins() -> None:
    probs = zp.zipf_probs(2.0, 16)
    correct = torch.tensor([1.0] * 4 + [0.0] * 12, dtype=torch.float64)
    ce = 1.0 - correct
    metrics = zp.frontier_metrics(ce, correct, probs, 0.5)
    assert metrics["frontier_k"] == 4
    assert metrics["tail_mass"] == pytest.approx(float(probs[4:].sum()))
    assert metrics["loss"] == pytest.approx(metrics["tail_mass"])
    assert metrics["accuracy"] == pytest.approx(1.0 - metrics["tail_mass"])
    bins = {k: v for k, v in metrics.items() if k.startswith("acc_bin_")}
    assert bins == {
        "acc_bin_1_1": 1.0,
        "acc_bin_2_2": 1.0,
        "acc_bin_3_4": 1.0,
        "acc_bin_5_8": 0.0,
        "acc_bin_9_16": 0.0,
    }


def initial_loss(params: zp.ZipfPatternsParams) -> float:
    """Exact Zipf-weighted loss of the untrained model that ``run`` starts from."""
    torch.manual_seed(params.seed)
    task = zp.build_task(params, torch.device("cpu"))
    ce, correct = zp.per_pattern_eval(zp.build_model(params), task, torch.float32)
    return zp.frontier_metrics(ce, correct, task.probs, params.learned_threshold)["loss"]


@pytest.mark.parametrize("moe", [{}, {"num_experts": 4, "top_k": 2}], ids=["dense", "moe"])
def test_short_run_learns(tmp_path: Path, moe: dict[str, Any]) -> None:
    params = tiny(**moe)
    ctx = make_ctx(tmp_path)
    metrics = zp.ZipfPatterns().run(params, ctx)

    assert metrics["loss"] < 0.3 * initial_loss(params)
    assert metrics["train_loss"] < metrics["loss"]
    for top_bin in ("acc_bin_1_1", "acc_bin_2_2", "acc_bin_3_4", "acc_bin_5_8"):
        assert metrics[top_bin] == 1.0
    assert metrics["accuracy"] > 0.8
    assert 8 <= metrics["frontier_k"] <= params.num_patterns
    assert metrics["tail_mass"] == pytest.approx(
        float(zp.zipf_probs(params.alpha, params.num_patterns)[int(metrics["frontier_k"]) :].sum())
    )
    assert metrics["tokens"] == zp.ZipfPatterns().tokens(params)
    assert metrics["flops"] == zp.ZipfPatterns().flops(params)
    assert all(isinstance(v, float) for v in metrics.values())

    # One report per eval interval, with cumulative accounting and the exact eval loss.
    assert [c["step"] for c in ctx.curves] == [50.0, 100.0, 150.0, 200.0]
    assert ctx.curves[-1]["tokens"] == metrics["tokens"]
    assert ctx.curves[-1]["eval_loss"] == pytest.approx(metrics["loss"])
    assert ctx.curves[0]["loss"] > ctx.curves[-1]["loss"]


def test_same_seed_same_result(tmp_path: Path) -> None:
    params = tiny(steps=60, eval_every=30)
    first = zp.ZipfPatterns().run(params, make_ctx(tmp_path))
    again = zp.ZipfPatterns().run(params, make_ctx(tmp_path))
    other = zp.ZipfPatterns().run(tiny(steps=60, eval_every=30, seed=1), make_ctx(tmp_path))
    assert first == again
    assert first["loss"] != other["loss"]


def test_task_does_not_depend_on_model_or_budget() -> None:
    a = zp.build_task(tiny(), torch.device("cpu"))
    b = zp.build_task(tiny(width=8, steps=7, num_samples=9), torch.device("cpu"))
    c = zp.build_task(tiny(seed=3), torch.device("cpu"))
    assert torch.equal(a.keys, b.keys) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.keys, c.keys)


def test_huge_learning_rate_diverges(tmp_path: Path) -> None:
    with pytest.raises(TrialDiverged):
        zp.ZipfPatterns().run(tiny(lr=1e30, steps=20, eval_every=10), make_ctx(tmp_path))


def test_injected_nan_diverges(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_build_task = zp.build_task

    def poisoned(params: zp.ZipfPatternsParams, device: torch.device) -> zp.PatternTask:
        task = real_build_task(params, device)
        task.keys[0] = float("nan")  # rank 1 is in nearly every minibatch
        return task

    monkeypatch.setattr(zp, "build_task", poisoned)
    with pytest.raises(TrialDiverged):
        zp.ZipfPatterns().run(tiny(steps=20, eval_every=10), make_ctx(tmp_path))


def _distributed_worker(rank: int, port: int, config: dict[str, Any], out_dir: str) -> None:
    """One of two gloo ranks running the workload through DeepSpeed on the CPU."""
    import os

    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_RANK=str(rank),
        DS_ACCELERATOR="cpu",
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    train_losses: list[float] = []
    ctx = Context(
        trial_id="test",
        checkpoint_dir=Path(out_dir),
        artifact_dir=Path(out_dir),
        device=torch.device("cpu"),
        rank=rank,
        world_size=2,
        deepspeed_config=config,
        on_report=lambda step, metrics: train_losses.append(float(metrics["loss"])),
    )
    params = tiny(steps=40, eval_every=20, num_workers=2, num_experts=4, top_k=2)
    metrics = zp.ZipfPatterns().run(params, ctx)
    torch.save({**metrics, "train_losses": train_losses}, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_deepspeed_on_cpu(tmp_path: Path) -> None:
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config_path = Path(__file__).parents[2] / "clusters" / "deepspeed" / "zero1_cpu.json"
    config = json.loads(config_path.read_text())
    mp.spawn(_distributed_worker, args=(port, config, str(tmp_path)), nprocs=2)

    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    # Ranks draw different minibatches but hold one synchronized model.
    assert rank0["loss"] == pytest.approx(rank1["loss"])
    assert rank0["train_losses"] != rank1["train_losses"]
    assert rank0["tokens"] == 2 * 40 * TINY["batch_size"]
    assert rank0["loss"] < math.log(TINY["num_classes"])
