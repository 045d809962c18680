"""Comparisons at equal compute read off the runs' histories: each evaluation placed at the FLOPs and
seconds spent by then, every run read at the largest compute all of them reached (hand-computed)."""

from __future__ import annotations

import polars as pl
import pytest

from mta_lab.analysis.compute import at_compute, iso_compute, largest_shared
from mta_lab.config.sweep import Goal


def history(run_id: str, variant: str, seed: int, flops_per_step: float, losses: list[float]) -> list[dict]:
    """Evaluations at steps 10, 20, 30; FLOPs and seconds logged every 5 steps (1 s per step)."""
    rows = [dict(run_id=run_id, variant=variant, seed=seed, metric="val/loss", step=10 * (i + 1), value=v)
            for i, v in enumerate(losses)]  # fmt: skip
    for step in range(5, 31, 5):
        rows.append(dict(run_id=run_id, variant=variant, seed=seed, metric="train/flops", step=step,
                         value=step * flops_per_step))  # fmt: skip
        rows.append(dict(run_id=run_id, variant=variant, seed=seed, metric="train/seconds", step=step,
                         value=float(step)))  # fmt: skip
    return rows


RUNS = pl.DataFrame(
    {
        "run_id": ["b0", "b1", "m0", "m1"],
        "variant": ["baseline", "baseline", "mta", "mta"],
        "role": ["baseline", "baseline", "variant", "variant"],
        "seed": [0, 1, 0, 1],
        "status": ["FINISHED"] * 4,
    }
)
HISTORY = pl.DataFrame(
    history("b0", "baseline", 0, 1.0, [3.0, 2.0, 1.5])
    + history("b1", "baseline", 1, 1.0, [3.2, 2.2, 1.7])
    + history("m0", "mta", 0, 2.0, [2.5, 1.8, 1.2])  # twice the FLOPs per step
    + history("m1", "mta", 1, 2.0, [2.9, 2.0, 1.3])
)


def test_each_evaluation_is_placed_at_the_compute_spent_by_then():
    points = at_compute(HISTORY, "val/loss").sort("run_id", "step")
    m0 = points.filter(pl.col("run_id") == "m0")
    assert m0["flops"].to_list() == [20.0, 40.0, 60.0] and m0["seconds"].to_list() == [10.0, 20.0, 30.0]
    assert largest_shared(points, "flops") == 30.0  # the baseline's last evaluation
    assert largest_shared(points, "seconds") == 30.0


def test_at_equal_flops_the_costlier_variant_is_read_earlier():
    budget, table = iso_compute(at_compute(HISTORY, "val/loss"), RUNS, "flops", Goal.minimize)
    assert budget == 30.0
    mta = table.filter(pl.col("variant") == "mta").row(0, named=True)
    # At 30 FLOPs mta is halfway between its evaluations at 20 and 40 FLOPs: (2.5 + 1.8) / 2, (2.9 + 2.0) / 2.
    assert mta["mean"] == pytest.approx((2.15 + 2.45) / 2)
    assert mta["delta"] == pytest.approx(((2.15 - 1.5) + (2.45 - 1.7)) / 2)
    # At equal tokens (the last evaluation) mta is the better one; at equal FLOPs it is behind.
    assert 1.25 - 1.6 < 0 < mta["delta"]


def test_a_run_evaluated_only_after_the_shared_compute_is_left_out():
    late = HISTORY.filter(
        ~((pl.col("run_id") == "m1") & (pl.col("metric") == "val/loss") & (pl.col("step") < 30))
    )
    budget, table = iso_compute(at_compute(late, "val/loss"), RUNS, "flops", Goal.minimize)
    assert budget == 30.0
    mta = table.filter(pl.col("variant") == "mta").row(0, named=True)
    assert mta["n"] == 1 and "only 1 seed shared" in mta["note"]
