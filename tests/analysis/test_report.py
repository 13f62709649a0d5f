"""`aggregate` on synthetic results roots written in the store's layout."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.errors import UserError
from orchestrator.report import aggregate

ZIPF_ALPHA = 1.5


def write_trial(root: Path, study: str, trial_id: str, row: dict, curve: list[dict]) -> None:
    for folder, table in (("trials", [row]), ("curves", curve)):
        path = root / study / folder / f"{trial_id}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [{"study": study, "trial_id": trial_id, **r} for r in table]
        pq.write_table(pa.Table.from_pylist(rows), path)


def base_row(workload: str, status: str = "done") -> dict:
    return {"workload": workload, "status": status, "wall_s": 1.0, "workers": 1, "seed": 0}


def zipf_study(root: Path, rng: np.random.Generator) -> None:
    """An (N, D) grid whose true exponents are the SCIENCE.md predictions for alpha 1.5."""
    a_n, a_d = ZIPF_ALPHA - 1, (ZIPF_ALPHA - 1) / ZIPF_ALPHA
    for i, n in enumerate(np.geomspace(1e4, 1e7, 6)):
        for j, d in enumerate(np.geomspace(1e5, 1e8, 6)):
            loss = (0.05 + 30 * n**-a_n + 40 * d**-a_d) * np.exp(rng.normal(0, 0.003))
            row = base_row("zipf_patterns")
            row.update(
                {
                    "params.alpha": ZIPF_ALPHA,
                    "params.num_experts": 0,
                    "metrics.loss": loss,
                    "metrics.params_active": n,
                    "metrics.tokens": d,
                    "metrics.flops": 6 * n * d,
                }
            )
            write_trial(root, "zipf", f"z{i}{j}", row, [{"step": 1.0, "loss": loss}])


def isoflop_study(root: Path, rng: np.random.Generator) -> None:
    """Dense isoFLOP profiles with curves, plus MoE runs worth 3x their active parameters."""
    for c in np.geomspace(1e17, 1e19, 4):
        n_opt = 0.5 * (c / 6) ** 0.5
        for k, n in enumerate(n_opt * np.geomspace(0.2, 5, 7)):
            d = c / (6 * n)
            tokens = np.geomspace(d / 100, d, 30)
            curve = 1.8 + 400 * n**-0.34 + 400 * tokens**-0.34
            loss = curve[-1] * np.exp(rng.normal(0, 0.002))
            for family, experts, scale in (("d", 0, 1.0), ("m", 8, 3.0)):
                row = base_row("lm")
                row.update(
                    {
                        "params.flop_budget": c,
                        "params.num_experts": experts,
                        "metrics.loss": 1.8
                        + (loss - 1.8 - 400 * d**-0.34) * scale**-0.34
                        + 400 * d**-0.34
                        if experts
                        else loss,
                        "metrics.params_active": n,
                        "metrics.tokens": d,
                        "metrics.flops": c,
                    }
                )
                points = [
                    {
                        "step": float(s),
                        "loss": float(v),
                        "tokens": float(t),
                        "flops": float(6 * n * t),
                    }
                    for s, (v, t) in enumerate(zip(curve, tokens, strict=True))
                ]
                write_trial(root, "iso", f"{family}{c:.0e}{k}", row, points if not experts else [])
    row = base_row("lm", status="failed")
    write_trial(root, "iso", "broken", row, [])
    row = base_row("lm")
    row.update(
        {
            "metrics.loss": float("nan"),
            "metrics.params_active": 1e6,
            "metrics.tokens": 1e9,
            "params.flop_budget": 1e17,
        }
    )
    write_trial(root, "iso", "nan", row, [])


def test_aggregate_writes_report_parquet_plots_and_verdicts(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    zipf_study(tmp_path / "results", rng)
    isoflop_study(tmp_path / "results", rng)
    report = aggregate(str(tmp_path / "results"), str(tmp_path / "out"))

    text = report.read_text()
    fits = pq.read_table(tmp_path / "out" / "fits.parquet").to_pylist()
    by_key = {(f["study"], f["family"], f["law"], f["name"]): f for f in fits}

    joint = by_key[("zipf", "dense", "L(N,D)", "alpha")]
    assert joint["predicted"] == pytest.approx(ZIPF_ALPHA - 1)
    assert joint["estimate"] == pytest.approx(ZIPF_ALPHA - 1, abs=0.03)
    assert joint["ci_low"] < joint["estimate"] < joint["ci_high"]
    assert "| zipf | dense | alpha=1.5 | L(N,D) | alpha | 0.5 |" in text

    iso = by_key[("iso", "dense", "allocation (approach 2)", "a")]
    assert iso["estimate"] == pytest.approx(0.5, abs=0.05)
    assert np.isnan(iso["predicted"])
    assert ("iso", "dense", "allocation (approach 1)", "a") in by_key
    multiplier = by_key[("iso", "moe", "MoE multiplier", "multiplier")]
    assert multiplier["estimate"] == pytest.approx(3.0, rel=0.3)

    assert "iso: 1 failed or diverged trials left out" in text
    assert "iso: 1 runs with a NaN loss excluded" in text
    # zipf: 1 curve point per trial is too little for an envelope; D, N, C fits all ran.
    for name in (
        "zipf_loss",
        "zipf_residuals",
        "zipf_frontier",
        "iso_loss",
        "iso_dense_isoflop",
        "iso_frontier",
        "iso_residuals",
    ):
        assert (tmp_path / "out" / f"{name}.png").stat().st_size > 10_000, name
        assert f"]({name}.png)" in text


def test_too_few_points_is_a_note_not_a_crash(tmp_path: Path) -> None:
    for k, n in enumerate((1e4, 1e5, 1e6)):
        row = base_row("zipf_patterns")
        row.update(
            {
                "params.alpha": 1.5,
                "metrics.loss": 1 + n**-0.5,
                "metrics.params_active": n,
                "metrics.tokens": 1e6,
                "metrics.flops": 6e6 * n,
            }
        )
        write_trial(tmp_path / "r", "tiny", f"t{k}", row, [])
    text = aggregate(str(tmp_path / "r"), str(tmp_path / "out")).read_text()

    assert "tiny dense alpha=1.5: L(N): L(N) fit: too few points for a fit (3 usable" in text
    assert pq.read_table(tmp_path / "out" / "fits.parquet").num_rows == 0


def test_empty_root_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no finished trials under") as error:
        aggregate(str(tmp_path / "nothing"), str(tmp_path / "out"))
    assert "\n" not in str(error.value)
