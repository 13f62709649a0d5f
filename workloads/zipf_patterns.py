"""Zipf pattern memorization: the effective-frontier workload (SCIENCE.md, section 1).

A task is a set of K atomic patterns. Pattern k (rank k = 1..K) is a fixed random input
vector, its key, mapped to a fixed random label, and it occurs with probability
p_k = k^-alpha / sum_j j^-alpha. The label is a deterministic function of the key, so the
Bayes loss is zero and every nat of loss is reducible. An MLP, dense or with a top-k
mixture of experts, is trained on D examples drawn i.i.d. from that distribution for T
steps. The measured loss is the exact expected cross entropy under the Zipf law, summed
over all K keys, so the three bottlenecks of the theory can be read off directly:
capacity (``width``, ``num_experts``), coverage (``num_samples``) and optimization
(``steps``).

Randomness comes from three separate streams of one ``seed``: the task (keys, labels),
the training set, and the minibatch order (one stream per rank). Changing N, D or T
therefore leaves the task itself unchanged, which is what a scaling study compares.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pydantic
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from orchestrator.training import prepare_training
from orchestrator.workload import Context, Params, Workload

logger = logging.getLogger("frontier.workloads.zipf_patterns")

_EVAL_CHUNK = 8192
"""Keys per forward pass in the exact evaluation; bounds memory for large K."""

# Independent random streams derived from one seed (see `_generator`).
_STREAM_TASK = 0
_STREAM_TRAIN_SET = 1
_STREAM_MINIBATCH = 2


class ZipfPatternsParams(Params):
    """Task, model and training of one Zipf-memorization trial."""

    alpha: float = Field(
        1.5, gt=1.0, description="Zipf exponent; p_k is proportional to k^-alpha."
    )
    num_patterns: int = Field(1024, ge=2, description="K, the number of distinct patterns.")
    input_dim: int = Field(32, ge=1, description="Dimension of each pattern's random key.")
    num_classes: int = Field(16, ge=2, description="Labels a pattern can map to.")
    width: int = Field(
        64, ge=1, description="Hidden width of the MLP (of each expert when MoE); sets N."
    )
    depth: int = Field(1, ge=1, description="Hidden layers of the MLP (of each expert).")
    num_experts: int = Field(
        0, ge=0, description="0 for a dense MLP; otherwise experts of the MoE model."
    )
    top_k: int = Field(
        1, ge=1, description="Experts each example is routed to; ignored when dense."
    )
    aux_loss_coef: float = Field(
        0.01, ge=0.0, description="Weight of the MoE load-balancing loss; 0 turns it off."
    )
    num_samples: int = Field(
        4096, ge=1, description="D, training examples drawn i.i.d. from the Zipf law."
    )
    steps: int = Field(500, ge=1, description="T, optimizer steps.")
    batch_size: int = Field(128, ge=1, description="Examples per step on each worker.")
    lr: float = Field(1e-2, gt=0.0, description="AdamW learning rate (constant).")
    weight_decay: float = Field(
        0.0, ge=0.0, description="AdamW decoupled weight decay; it makes rare patterns fade."
    )
    seed: int = Field(0, ge=0, description="Seeds the task, the training set and the init.")
    num_workers: int = Field(
        1, ge=1, description="Training processes; each adds batch_size examples per step."
    )
    eval_every: int = Field(
        100, ge=1, description="Steps between reports of train loss and exact eval metrics."
    )
    learned_threshold: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="Accuracy at which a run of ranks counts as learned (defines frontier_k).",
    )

    @pydantic.model_validator(mode="after")
    def _check_consistency(self) -> ZipfPatternsParams:
        if self.num_experts > 0 and self.top_k > self.num_experts:
            raise ValueError(
                f"top_k ({self.top_k}) must be at most num_experts ({self.num_experts})"
            )
        chance = 1.0 / self.num_classes
        if self.learned_threshold <= chance:
            # At or below chance accuracy, unlearned patterns would count as learned.
            raise ValueError(
                f"learned_threshold ({self.learned_threshold}) must exceed chance accuracy "
                f"1/num_classes = {chance:.3g}; raise it or use more classes"
            )
        return self

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0


# --- the task -------------------------------------------------------------------------


def zipf_probs(alpha: float, num_patterns: int) -> torch.Tensor:
    """p_k for ranks k = 1..K (index k-1), normalized over the K patterns, in float64."""
    ranks = torch.arange(1, num_patterns + 1, dtype=torch.float64)
    weights = ranks.pow(-alpha)
    return weights / weights.sum()


def sample_zipf(probs: torch.Tensor, num_samples: int, generator: torch.Generator) -> torch.Tensor:
    """Draw ``num_samples`` pattern indices (0-based ranks) i.i.d. from ``probs``."""
    return torch.multinomial(probs, num_samples, replacement=True, generator=generator)


def _generator(seed: int, stream: int, rank: int = 0) -> torch.Generator:
    """A CPU generator for one named stream of one seed; streams do not overlap."""
    state = np.random.SeedSequence([seed, stream, rank]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


@dataclass(frozen=True)
class PatternTask:
    """Keys, labels and Zipf probabilities of the K patterns, indexed by rank - 1."""

    keys: torch.Tensor
    labels: torch.Tensor
    probs: torch.Tensor


def build_task(params: ZipfPatternsParams, device: torch.device) -> PatternTask:
    """The patterns of one seed. Drawn on the CPU, so every device sees the same task."""
    gen = _generator(params.seed, _STREAM_TASK)
    keys = torch.randn(params.num_patterns, params.input_dim, generator=gen)
    labels = torch.randint(params.num_classes, (params.num_patterns,), generator=gen)
    probs = zipf_probs(params.alpha, params.num_patterns)
    return PatternTask(keys.to(device), labels.to(device), probs.to(device))


# --- the model ------------------------------------------------------------------------


def _mlp(in_dim: int, width: int, depth: int, out_dim: int) -> nn.Sequential:
    """``depth`` ReLU hidden layers of ``width``, then a linear read-out (all with biases)."""
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(in_dim if i == 0 else width, width), nn.ReLU()]
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)


def _mlp_num_params(in_dim: int, width: int, depth: int, out_dim: int) -> int:
    first = in_dim * width + width
    hidden = (depth - 1) * (width * width + width)
    return first + hidden + width * out_dim + out_dim


class DenseMLP(nn.Module):
    """Key -> logits. Returns ``(logits, aux_loss)`` like the MoE model (aux_loss is 0)."""

    def __init__(self, params: ZipfPatternsParams) -> None:
        super().__init__()
        self.net = _mlp(params.input_dim, params.width, params.depth, params.num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(x), x.new_zeros(())


class MoEMLP(nn.Module):
    """A router over whole-MLP experts: each expert maps the key to logits by itself.

    Every expert is the dense MLP of ``width`` and ``depth``, so an expert alone could
    memorize as much as the dense model; with E experts total capacity grows E-fold while
    the active parameters per example are the router plus ``top_k`` experts. The router is
    a bias-free linear map to E scores; the softmax over the scores is kept on the top_k
    experts and renormalized to give the mixing weights of their logits. The auxiliary
    loss is the Switch-Transformer form E * sum_e f_e * P_e (f_e: share of routing slots
    sent to e; P_e: mean router probability of e); it is 1 when the load is uniform.
    """

    def __init__(self, params: ZipfPatternsParams) -> None:
        super().__init__()
        self.top_k = params.top_k
        self.router = nn.Linear(params.input_dim, params.num_experts, bias=False)
        self.experts = nn.ModuleList(
            _mlp(params.input_dim, params.width, params.depth, params.num_classes)
            for _ in range(params.num_experts)
        )
        self.num_classes = params.num_classes

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        num_experts = len(self.experts)
        probs = self.router(x).float().softmax(dim=-1)
        gate, chosen = probs.topk(self.top_k, dim=-1)
        gate = gate / gate.sum(dim=-1, keepdim=True)

        slot_expert = chosen.reshape(-1)
        slot_example = torch.arange(x.shape[0], device=x.device).repeat_interleave(self.top_k)
        slot_gate = gate.reshape(-1, 1)
        out = x.new_zeros(x.shape[0], self.num_classes)
        # TODO: experts run one after another; with many experts a grouped matmul over
        # stacked weights would be faster. Kept simple because this workload's experts are
        # small MLPs and the loop is easy to check against the parameter count.
        for e, expert in enumerate(self.experts):
            # An expert with no examples still runs on an empty batch, so its parameters
            # get zero gradients instead of none (DeepSpeed and DDP expect all of them).
            slots = (slot_expert == e).nonzero(as_tuple=True)[0]
            rows = slot_example[slots]
            out.index_add_(0, rows, expert(x[rows]) * slot_gate[slots].to(x.dtype))

        load = torch.bincount(slot_expert, minlength=num_experts).float() / slot_expert.numel()
        aux_loss = num_experts * (load * probs.mean(dim=0)).sum()
        return out, aux_loss


def build_model(params: ZipfPatternsParams) -> nn.Module:
    return MoEMLP(params) if params.is_moe else DenseMLP(params)


def count_params(params: ZipfPatternsParams) -> tuple[int, int]:
    """(total, active per example) parameters of the model ``build_model`` builds."""
    expert = _mlp_num_params(params.input_dim, params.width, params.depth, params.num_classes)
    if not params.is_moe:
        return expert, expert
    router = params.input_dim * params.num_experts
    return router + params.num_experts * expert, router + params.top_k * expert


# --- evaluation and the frontier ------------------------------------------------------


@torch.no_grad()
def per_pattern_eval(
    forward: nn.Module, task: PatternTask, input_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross entropy (nats) and 0/1 correctness of every pattern, in rank order, on CPU.

    NOTE: every rank evaluates all K keys, repeating rank 0's work; sharding the keys
    would need a gather, and evaluation is a small share of a trial's time.
    """
    ce_chunks, correct_chunks = [], []
    for start in range(0, task.keys.shape[0], _EVAL_CHUNK):
        keys = task.keys[start : start + _EVAL_CHUNK].to(input_dtype)
        labels = task.labels[start : start + _EVAL_CHUNK]
        logits = forward(keys)[0].float()
        ce_chunks.append(F.cross_entropy(logits, labels, reduction="none"))
        correct_chunks.append((logits.argmax(dim=-1) == labels).float())
    ce = torch.cat(ce_chunks).double().cpu()
    correct = torch.cat(correct_chunks).double().cpu()
    return ce, correct


def rank_bins(num_patterns: int) -> list[tuple[int, int]]:
    """log2-spaced inclusive rank bins (hi/2, hi]: [1,1], [2,2], [3,4], [5,8], ..., cut at K."""
    bins, hi = [(1, 1)], 2
    while hi // 2 < num_patterns:
        bins.append((hi // 2 + 1, min(hi, num_patterns)))
        hi *= 2
    return bins


def bin_accuracies(correct: torch.Tensor) -> dict[str, float]:
    """Unweighted accuracy per log2 rank bin, named ``acc_bin_<lo>_<hi>`` (ranks inclusive)."""
    return {
        f"acc_bin_{lo}_{hi}": float(correct[lo - 1 : hi].mean())
        for lo, hi in rank_bins(correct.numel())
    }


def effective_frontier(correct: torch.Tensor, threshold: float) -> int:
    """Empirical k*: the end of the learned prefix that best fits the 0/1 correctness.

    k* maximizes sum_{j <= k} (correct_j - threshold) over k = 0..K (the first maximizer
    on ties). Equivalently, every run of ranks ending at k* has accuracy >= threshold and
    every run starting after k* has accuracy < threshold, so k* is where accuracy falls
    below the threshold for good. A sharp frontier is recovered exactly, and an isolated
    miss among learned patterns (or a lucky guess in the tail) does not move it much,
    which a "first unlearned rank" rule would not survive.
    """
    excess = torch.cat([correct.new_zeros(1), (correct - threshold).cumsum(0)])
    return int(excess.argmax())


def frontier_metrics(
    ce: torch.Tensor, correct: torch.Tensor, probs: torch.Tensor, threshold: float
) -> dict[str, float]:
    """The scaling-law target and the frontier quantities of SCIENCE.md, section 1."""
    probs = probs.double().cpu()
    loss = float((probs * ce).sum())
    frontier_k = effective_frontier(correct, threshold)
    return {
        "loss": loss,
        # Labels are a function of the key, so the Bayes loss is 0 and all loss is reducible.
        "reducible_loss": loss,
        "accuracy": float((probs * correct).sum()),
        "frontier_k": float(frontier_k),
        "tail_mass": float(probs[frontier_k:].sum()),
        **bin_accuracies(correct),
    }


# --- the workload ---------------------------------------------------------------------


class ZipfPatterns(Workload):
    """Memorize Zipf-distributed key -> label patterns with a dense or MoE MLP."""

    name = "zipf_patterns"
    version = "1"
    params_model = ZipfPatternsParams
    key_metric = "loss"

    def tokens(self, params: ZipfPatternsParams) -> float:
        """Examples processed by all workers: steps * batch_size * num_workers."""
        return float(params.steps * params.batch_size * params.num_workers)

    def flops(self, params: ZipfPatternsParams) -> float:
        """6 * active parameters * examples processed (forward 2, backward 4 per weight).

        Active parameters count weights and biases an example passes through: the whole
        MLP when dense; the router plus ``top_k`` experts when MoE. Evaluation and the
        routing bookkeeping are left out, as is usual for this convention. Linear in steps.
        """
        _, active = count_params(params)
        return 6.0 * active * self.tokens(params)

    def run(self, params: ZipfPatternsParams, ctx: Context) -> dict[str, float]:
        torch.manual_seed(params.seed)
        if ctx.world_size != params.num_workers:
            logger.warning(
                "num_workers=%d but the trial runs on %d ranks; accounting uses %d",
                params.num_workers,
                ctx.world_size,
                ctx.world_size,
            )

        task = build_task(params, ctx.device)
        train_idx = sample_zipf(
            task.probs.cpu(), params.num_samples, _generator(params.seed, _STREAM_TRAIN_SET)
        ).to(ctx.device)
        model = build_model(params)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=params.lr, weight_decay=params.weight_decay
        )
        trainer = prepare_training(model, optimizer, ctx, micro_batch_size=params.batch_size)
        # DeepSpeed may cast the model to bf16/fp16; inputs must follow.
        input_dtype = next(trainer.module.parameters()).dtype

        # Each rank draws its own minibatches, so the global batch is batch_size * ranks.
        batch_gen = _generator(params.seed, _STREAM_MINIBATCH, ctx.rank)
        loss_sum = torch.zeros((), device=ctx.device)
        steps_since_report, last_time_s = 0, time.perf_counter()

        for step in range(1, params.steps + 1):
            rows = torch.randint(params.num_samples, (params.batch_size,), generator=batch_gen)
            patterns = train_idx[rows.to(ctx.device)]
            logits, aux_loss = trainer.model(task.keys[patterns].to(input_dtype))
            loss = F.cross_entropy(logits.float(), task.labels[patterns])
            trainer.step(loss + params.aux_loss_coef * aux_loss.float())
            loss_sum += loss.detach()
            steps_since_report += 1

            # NOTE: a NaN is caught only here, up to eval_every steps late: checking every
            # step would force a device sync per step, which costs more than the late stop.
            if step % params.eval_every == 0 or step == params.steps:
                ce, correct = per_pattern_eval(trainer.model, task, input_dtype)
                train_loss = float(loss_sum) / steps_since_report
                now_s = time.perf_counter()
                self._report(
                    params,
                    ctx,
                    task,
                    step=step,
                    train_loss=train_loss,
                    aux_loss=aux_loss,
                    ce=ce,
                    correct=correct,
                    interval_s=now_s - last_time_s,
                    interval_steps=steps_since_report,
                )
                loss_sum.zero_()
                steps_since_report, last_time_s = 0, now_s

        return self._final_metrics(params, ctx, task, train_idx, ce, correct)

    def _report(
        self,
        params: ZipfPatternsParams,
        ctx: Context,
        task: PatternTask,
        *,
        step: int,
        train_loss: float,
        aux_loss: torch.Tensor,
        ce: torch.Tensor,
        correct: torch.Tensor,
        interval_s: float,
        interval_steps: int,
    ) -> None:
        """Report one point of the curves and log one line on the main rank."""
        examples_per_step = params.batch_size * ctx.world_size
        examples = step * examples_per_step
        _, params_active = count_params(params)
        evaluated = frontier_metrics(ce, correct, task.probs, params.learned_threshold)
        metrics = {
            # NOTE: the mean over this rank's minibatches since the last report, not
            # averaged over ranks: an all-reduce per report would buy only less noise.
            "loss": train_loss,
            "tokens": float(examples),
            "flops": 6.0 * params_active * examples,
            "eval_loss": evaluated["loss"],
            "accuracy": evaluated["accuracy"],
            "frontier_k": evaluated["frontier_k"],
        }
        if params.is_moe:
            metrics["aux_loss"] = float(aux_loss.detach())
        ctx.report(step, metrics)

        if ctx.is_main:
            rate = interval_steps * examples_per_step / max(interval_s, 1e-9)
            ctx.logger.info(
                "step %d/%d | loss %.4f | eval_loss %.4f | acc %.3f | k* %d | %.0f examples/s",
                step,
                params.steps,
                train_loss,
                metrics["eval_loss"],
                metrics["accuracy"],
                int(metrics["frontier_k"]),
                rate,
            )

    def _final_metrics(
        self,
        params: ZipfPatternsParams,
        ctx: Context,
        task: PatternTask,
        train_idx: torch.Tensor,
        ce: torch.Tensor,
        correct: torch.Tensor,
    ) -> dict[str, float]:
        """Exact metrics of the final model (``ce``, ``correct`` come from the last report)."""
        params_total, params_active = count_params(params)
        examples = params.steps * params.batch_size * ctx.world_size
        counts = torch.bincount(train_idx, minlength=params.num_patterns).double().cpu()
        coverage_k = (params.num_samples * task.probs.cpu() >= 1.0).sum()
        return {
            **frontier_metrics(ce, correct, task.probs, params.learned_threshold),
            # Exact CE on the training set: each pattern weighted by its count in the D draws.
            "train_loss": float((counts * ce).sum() / params.num_samples),
            "params_total": float(params_total),
            "params_active": float(params_active),
            "tokens": float(examples),
            "flops": 6.0 * params_active * examples,
            "num_samples": float(params.num_samples),
            "num_patterns_seen": float((counts > 0).sum()),
            # The theory's data frontier: the largest k with D * p_k >= 1.
            "coverage_k": float(coverage_k),
        }
