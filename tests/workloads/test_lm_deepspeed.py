"""A 2-worker DeepSpeed ``lm`` trial of an MoE model with ep_size 2, on CPU (gloo).

The processes are started by hand, as the orchestrator's executor would start them: a
gloo process group, then a Context with the DeepSpeed JSON and world size 2.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[2]
PARAMS = {
    "d_model": 32, "num_layers": 2, "num_heads": 2, "d_ff": 64, "context_length": 16,
    "num_experts": 4, "top_k": 2, "moe_backend": "deepspeed", "ep_size": 2,
    "num_workers": 2, "batch_size": 8, "num_tokens": 6 * 8 * 16, "eval_every": 3,
    "log_every": 3, "eval_tokens": 256,
}  # fmt: skip


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)  # fmt: skip
    torch.set_num_threads(1)
    from orchestrator.workload import Context
    from workloads.lm import LanguageModel
    from workloads.models import build_model

    config = json.loads((ROOT / "clusters/deepspeed/zero1_cpu.json").read_text())
    ctx = Context("ds-test", Path(out_dir), Path(out_dir), torch.device("cpu"), rank=rank,
                  world_size=2, deepspeed_config=config)  # fmt: skip
    workload = LanguageModel()
    metrics = workload.run(workload.parse_params(PARAMS), ctx)

    model = build_model(workload.parse_params(PARAMS).transformer_config())
    local = model.moe_layers()[0].experts.export_weights()["w_in"].shape[0]
    result = {"metrics": metrics, "curves": ctx.curves, "local_experts": local}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_two_worker_deepspeed_moe_trial_with_expert_parallelism(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    for result in ranks:
        assert result["local_experts"] == 2  # 4 experts over ep_size 2
    metrics = ranks[0]["metrics"]
    assert metrics["tokens"] == PARAMS["num_tokens"]
    assert metrics["params_total"] > metrics["params_active"]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in (metrics, ranks[1]["metrics"]))
    assert [c["step"] for c in ranks[0]["curves"] if "val_loss" in c] == [3, 6]
    assert ranks[1]["curves"] == []  # only rank 0 keeps curves
