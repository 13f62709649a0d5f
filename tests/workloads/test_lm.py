"""The ``lm`` workload on one CPU worker: learning, accounting, token sources, errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pydantic
import pytest
import torch

from orchestrator.errors import UserError
from orchestrator.workload import Context
from workloads.data.lm_tokens import ZipfLanguage
from workloads.lm import LanguageModel

TINY = {
    "d_model": 32, "num_layers": 1, "num_heads": 2, "d_ff": 64, "context_length": 32,
    "batch_size": 8, "eval_every": 20, "log_every": 10, "eval_tokens": 1024,
}  # fmt: skip


def run_lm(tmp_path: Path, **overrides: object) -> tuple[dict[str, float], Context]:
    workload = LanguageModel()
    params = workload.parse_params({**TINY, **overrides})
    workload.check(params)
    ctx = Context("test", tmp_path, tmp_path, torch.device("cpu"))
    return workload.run(params, ctx), ctx


def test_synthetic_language_is_learned_and_accounted(tmp_path: Path) -> None:
    metrics, ctx = run_lm(tmp_path, num_tokens=60 * 8 * 32, lr=1e-2, warmup_steps=5)
    assert metrics["loss"] < math.log(256) - 0.5  # uniform guessing is ln 256
    assert metrics["loss"] > metrics["loss_floor"]
    assert metrics["tokens"] == 60 * 8 * 32
    assert metrics["flops"] == pytest.approx(LanguageModel().flops(
        LanguageModel().parse_params({**TINY, "num_tokens": 60 * 8 * 32})
    ))  # fmt: skip
    assert metrics["params_active"] == metrics["params_total"] > metrics["params_non_embedding"]
    assert metrics["tokens_per_s"] > 0 and metrics["mfu"] == 0.0  # no CPU peak assumed
    val_steps = [c["step"] for c in ctx.curves if "val_loss" in c]
    assert val_steps == [20, 40, 60]


@pytest.mark.parametrize("backend", ["torch", "deepspeed"])
def test_moe_model_trains_and_counts_active_params(tmp_path: Path, backend: str) -> None:
    moe = {"num_experts": 4, "top_k": 2, "moe_backend": backend}
    metrics, _ = run_lm(tmp_path, num_tokens=4 * 8 * 32, **moe)
    assert math.isfinite(metrics["loss"])
    assert metrics["params_active"] < metrics["params_total"]


def test_flops_are_linear_in_tokens() -> None:
    workload = LanguageModel()
    one = workload.flops(workload.parse_params({**TINY, "num_tokens": 1000}))
    three = workload.flops(workload.parse_params({**TINY, "num_tokens": 3000}))
    assert three == pytest.approx(3 * one)


def test_zipf_language_is_deterministic_by_seed() -> None:
    language = ZipfLanguage(64, 1.2, language_seed=0)
    first = language.batch(4, 16, torch.Generator().manual_seed(7))
    again = ZipfLanguage(64, 1.2, language_seed=0).batch(4, 16, torch.Generator().manual_seed(7))
    other = ZipfLanguage(64, 1.2, language_seed=1).batch(4, 16, torch.Generator().manual_seed(7))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert int(first.max()) < 64


def test_token_file_trains(tmp_path: Path) -> None:
    path = tmp_path / "tokens.bin"
    np.random.default_rng(0).integers(0, 100, 20_000, dtype=np.uint16).tofile(path)
    metrics, _ = run_lm(tmp_path, data="tokens", data_path=str(path), vocab_size=100,
                        num_tokens=2 * 8 * 32)  # fmt: skip
    assert math.isfinite(metrics["loss"]) and "loss_floor" not in metrics


def bad_token_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x00\x02")
    short = tmp_path / "short.bin"
    np.zeros(100, dtype=np.uint16).tofile(short)
    big_ids = tmp_path / "big.bin"
    np.full(5000, 300, dtype=np.uint16).tofile(big_ids)
    return {
        "missing": (tmp_path / "nope.bin", "no file"),
        "odd": (odd, "odd byte count"),
        "short": (short, "needs at least"),
        "ids": (big_ids, "vocab_size"),
    }


@pytest.mark.parametrize("case", ["missing", "odd", "short", "ids"])
def test_bad_token_file_is_one_line_user_error(tmp_path: Path, case: str) -> None:
    path, expected = bad_token_files(tmp_path)[case]
    workload = LanguageModel()
    params = workload.parse_params({**TINY, "data": "tokens", "data_path": str(path)})
    with pytest.raises(UserError, match=expected) as error:
        workload.check(params)
    assert str(error.value).startswith("data_path:") and "\n" not in str(error.value)


def write_parquet(path: Path, num_docs: int = 200) -> list[str]:
    texts = [f"document {i}: the quick brown fox jumps over the lazy dog" for i in range(num_docs)]
    pq.write_table(pa.table({"text": texts, "n": list(range(num_docs))}), path)
    return texts


def test_parquet_bytes_trains(tmp_path: Path) -> None:
    path = tmp_path / "corpus.parquet"
    write_parquet(path)
    metrics, _ = run_lm(tmp_path, data="parquet", data_path=str(path), num_tokens=2 * 8 * 32)
    assert math.isfinite(metrics["loss"])


def test_parquet_with_a_local_tokenizers_json(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    path = tmp_path / "corpus.parquet"
    texts = write_parquet(path)
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.WordLevelTrainer(special_tokens=["[UNK]"])
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer_path = tmp_path / "tokenizer.json"
    tokenizer.save(str(tokenizer_path))

    metrics, _ = run_lm(
        tmp_path,
        data="parquet",
        data_path=str(path),
        tokenizer=str(tokenizer_path),
        vocab_size=512,
        num_tokens=2 * 8 * 32,
    )
    assert math.isfinite(metrics["loss"])
    small = LanguageModel().parse_params(
        {
            **TINY,
            "data": "parquet",
            "data_path": str(path),
            "tokenizer": str(tokenizer_path),
            "vocab_size": 8,
        }
    )
    with pytest.raises(UserError, match="vocab_size"):
        LanguageModel().check(small)  # fmt: skip


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [("text_column", "body", "text_column: .* no column 'body'"),
     ("tokenizer", "missing.json", "tokenizer: no file"),
     ("data_path", "nowhere.parquet", "data_path: no Parquet")],
)  # fmt: skip
def test_bad_parquet_corpus_is_a_user_error(
    tmp_path: Path, field: str, value: str, expected: str
) -> None:
    path = tmp_path / "corpus.parquet"
    write_parquet(path)
    raw = {**TINY, "data": "parquet", "data_path": str(path), field: value}
    with pytest.raises(UserError, match=expected):
        LanguageModel().check(LanguageModel().parse_params(raw))
    (tmp_path / "junk.parquet").write_text("not parquet")
    junk = {**TINY, "data": "parquet", "data_path": str(tmp_path / "junk.parquet")}
    with pytest.raises(UserError, match="not readable Parquet"):
        LanguageModel().check(LanguageModel().parse_params(junk))


def test_params_reject_inconsistent_models() -> None:
    with pytest.raises(pydantic.ValidationError, match="top_k"):
        LanguageModel().parse_params({"num_experts": 2, "top_k": 3})
    with pytest.raises(pydantic.ValidationError, match="num_workers"):
        LanguageModel().parse_params({"batch_size": 3, "num_workers": 2})
    with pytest.raises(UserError, match="data_path: required"):
        LanguageModel().check(LanguageModel().parse_params({"data": "tokens"}))
