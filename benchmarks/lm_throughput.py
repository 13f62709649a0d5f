"""Throughput of the ``lm`` training step, measured against baselines in this script.

1. tokens/s of ``LanguageModel.run`` (the orchestrator's Context and Trainer) against a
   plain PyTorch loop on the same model and the same token source (target >= 0.95);
2. step time of an 8-expert top-2 ``torch``-backend MoE against the dense model with
   the same active parameters (target <= 1.5);
3. on a GPU, MFU of dense and MoE (``torch`` and, where installed, ``megablocks``).

Usage: ``python benchmarks/lm_throughput.py [--steps 20] [--repeats 2]``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from orchestrator.workload import Context
from workloads.data.lm_tokens import ZipfLanguage
from workloads.lm import LanguageModel, peak_flops
from workloads.models import TransformerConfig, build_model, count_params, flops_per_token
from workloads.models.backends.megablocks_experts import megablocks_available

logger = logging.getLogger("frontier.benchmarks")

CPU_MODEL = {
    "d_model": 256, "num_layers": 4, "num_heads": 4, "d_ff": 1024, "vocab_size": 256,
    "context_length": 128,
}  # fmt: skip
GPU_MODEL = {
    "d_model": 1024, "num_layers": 8, "num_heads": 16, "d_ff": 4096, "vocab_size": 8192,
    "context_length": 1024, "activation": "swiglu",
}  # fmt: skip


def plain_loop_tokens_per_s(
    model_fields: dict, batch_size: int, num_steps: int, device: torch.device
) -> float:
    """The baseline: AdamW on the same model and token source, nothing else."""
    config = TransformerConfig(**model_fields)
    torch.manual_seed(0)
    model = build_model(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    language = ZipfLanguage(config.vocab_size, 1.2)
    gen = torch.Generator().manual_seed(0)
    length = config.context_length + 1
    autocast = device.type == "cuda"

    started = time.perf_counter()
    for _ in range(num_steps):
        batch = language.batch(batch_size, length, gen).to(device, non_blocking=True)
        with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            logits = model(batch[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        (loss + model.aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    float(loss.detach())  # wait for the device
    return num_steps * batch_size * config.context_length / (time.perf_counter() - started)


def workload_run(
    model_fields: dict, batch_size: int, num_steps: int, device: torch.device
) -> dict[str, float]:
    """``LanguageModel.run`` with a Context as the orchestrator gives one worker."""
    tokens = num_steps * batch_size * model_fields["context_length"]
    raw = {
        **model_fields, "batch_size": batch_size, "num_tokens": tokens,
        "eval_every": 10**9, "log_every": 10, "eval_tokens": 1, "lr": 1e-3,
    }  # fmt: skip
    workload = LanguageModel()
    folder = Path(tempfile.mkdtemp(prefix="lm-bench-"))
    ctx = Context("benchmark", folder, folder, device)
    return workload.run(workload.parse_params(raw), ctx)


def compare_with_plain_loop(num_steps: int, repeats: int, batch_size: int) -> None:
    device = torch.device("cpu")
    params = count_params(TransformerConfig(**CPU_MODEL))["total"]
    plain, ours = [], []
    for _ in range(repeats):  # interleaved, so drifting machine load hits both alike
        plain.append(plain_loop_tokens_per_s(CPU_MODEL, batch_size, num_steps, device))
        ours.append(workload_run(CPU_MODEL, batch_size, num_steps, device)["tokens_per_s"])
    ratio = statistics.median(ours) / statistics.median(plain)
    print(
        f"[1] lm step, {params / 1e6:.2f}M params, batch {batch_size}x"
        f"{CPU_MODEL['context_length']}, {num_steps} steps x {repeats}, CPU"
    )
    for label, runs in (("plain PyTorch loop ", plain), ("lm via orchestrator", ours)):
        each = ", ".join(f"{value:.0f}" for value in runs)
        print(f"    {label}: {statistics.median(runs):9.0f} tokens/s  (runs: {each})")
    print(f"    ratio orchestrator / plain = {ratio:.3f}  (target >= 0.95)")


def step_time_s(
    config: TransformerConfig, batch_size: int, num_steps: int, device: torch.device
) -> float:
    torch.manual_seed(0)
    model = build_model(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(config.vocab_size, (batch_size, config.context_length + 1))
    tokens = tokens.to(device)
    times = []
    for _ in range(num_steps + 1):
        started = time.perf_counter()
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        (loss + model.aux_loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss.detach())
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])  # the first step warms caches up


def compare_moe_with_dense(num_steps: int, batch_size: int) -> None:
    moe = TransformerConfig(**{**CPU_MODEL, "d_ff": 512, "num_experts": 8, "top_k": 2})
    dense = TransformerConfig(**{**CPU_MODEL, "d_ff": 1024})  # 2 experts of 512 per token
    active_moe, active_dense = count_params(moe)["active"], count_params(dense)["active"]
    moe_s = step_time_s(moe, batch_size, num_steps, torch.device("cpu"))
    dense_s = step_time_s(dense, batch_size, num_steps, torch.device("cpu"))
    print(
        f"[2] step time, 8-expert top-2 torch MoE ({active_moe / 1e6:.2f}M active of "
        f"{count_params(moe)['total'] / 1e6:.2f}M) vs dense ({active_dense / 1e6:.2f}M), CPU"
    )
    print(
        f"    dense {dense_s * 1e3:.1f} ms, MoE {moe_s * 1e3:.1f} ms; "
        f"ratio MoE / dense = {moe_s / dense_s:.3f}  (target <= 1.5)"
    )


def gpu_mfu(num_steps: int, batch_size: int) -> None:
    device = torch.device("cuda")
    peak = peak_flops(device)
    print(f"[3] GPU {torch.cuda.get_device_name(device)}, peak bf16 {peak} FLOP/s")
    variants = {
        "dense": {},
        "moe torch": {"d_ff": 2048, "num_experts": 8, "top_k": 2},
        "moe megablocks": {"d_ff": 2048, "num_experts": 8, "top_k": 2,
                           "moe_backend": "megablocks"},
    }  # fmt: skip
    for name, overrides in variants.items():
        if name == "moe megablocks" and not megablocks_available()[0]:
            print(f"    {name:15s}: skipped ({megablocks_available()[1]})")
            continue
        fields = {**GPU_MODEL, **overrides}
        metrics = workload_run(fields, batch_size, num_steps, device)
        fpt = flops_per_token(TransformerConfig(**fields))
        print(
            f"    {name:15s}: {metrics['tokens_per_s']:10.0f} tokens/s, "
            f"{fpt / 1e9:.2f} GFLOP/token, MFU {metrics['mfu']:.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="training steps per measurement")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats of [1]")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step on CPU")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    compare_with_plain_loop(args.steps, args.repeats, args.batch_size)
    compare_moe_with_dense(args.steps, args.batch_size)
    if torch.cuda.is_available():
        gpu_mfu(args.steps * 3, batch_size=16)
    else:
        print("[3] no CUDA device: GPU MFU not measured")


if __name__ == "__main__":
    main()
