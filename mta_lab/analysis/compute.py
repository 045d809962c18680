"""The metric against the compute spent on it: comparisons at equal FLOPs and at equal training time.

Every run logs cumulative training FLOPs (``train/flops``, analytic) and training seconds
(``train/seconds``, evaluation excluded) as it trains, and the sweep's metric at each evaluation. Each
evaluation is placed at the FLOPs and seconds spent when it was taken (interpolated between the
training logs, which come every ``train.log_every`` steps). A sweep that holds tokens equal gives a
costlier variant more FLOPs and time than the baseline; reading every run at the largest FLOPs (or
seconds) that *all* runs reached, interpolating between its evaluations, compares them at equal compute
after the fact. A run whose first evaluation came after that point has no value there and is left out
(evaluate more often to keep it).
"""

from __future__ import annotations

import numpy as np
import polars as pl

from mta_lab.analysis.stats import compare
from mta_lab.config.sweep import Goal

AXES = {"flops": "train/flops", "seconds": "train/seconds"}
"""The compute axes and the cumulative metric each is read from."""


def at_compute(history: pl.DataFrame, metric: str) -> pl.DataFrame:
    """Each evaluation of ``metric`` (rows of a long ``histories`` frame that also holds train/flops
    and train/seconds) with the FLOPs and seconds spent by then: run_id, variant, seed, step, value,
    flops, seconds."""
    rows = []
    for (run_id,), run in history.group_by("run_id", maintain_order=True):
        points = run.filter(pl.col("metric") == metric).sort("step")
        if points.is_empty():
            continue
        steps = points["step"].to_numpy()
        spent = {}
        for axis, logged in AXES.items():
            log = run.filter(pl.col("metric") == logged).sort("step")
            # Nothing is spent at step 0; between logs, compute grows linearly with steps.
            xs = np.concatenate([[0], log["step"].to_numpy()])
            ys = np.concatenate([[0.0], log["value"].to_numpy()])
            spent[axis] = np.interp(steps, xs, ys) if log.height else np.full(len(steps), np.nan)
        rows.append(
            pl.DataFrame(
                {
                    "run_id": run_id,
                    "variant": points["variant"],
                    "seed": points["seed"],
                    "step": points["step"],
                    "value": points["value"],
                    **spent,
                }
            )
        )
    schema = {"run_id": pl.String, "variant": pl.String, "seed": pl.Int64, "step": pl.Int64,
              "value": pl.Float64, "flops": pl.Float64, "seconds": pl.Float64}  # fmt: skip
    return pl.concat(rows) if rows else pl.DataFrame(schema=schema)


def largest_shared(points: pl.DataFrame, axis: str) -> float | None:
    """The largest FLOPs (or seconds) that every run reached at an evaluation."""
    reached = points.drop_nans(axis).group_by("run_id").agg(pl.col(axis).max())
    return float(reached[axis].min()) if reached.height else None


def iso_compute(
    points: pl.DataFrame, runs: pl.DataFrame, axis: str, goal: Goal
) -> tuple[float | None, pl.DataFrame]:
    """The comparison (as :func:`~mta_lab.analysis.stats.compare` gives it, paired by seed) of every
    finished run's metric at the largest ``axis`` value all of them reached, and that value."""
    finished = runs.filter(pl.col("status") == "FINISHED").select("run_id", "variant", "role", "seed")
    points = points.join(finished.select("run_id"), on="run_id")
    budget = largest_shared(points, axis)
    if budget is None:
        return None, pl.DataFrame()
    values = []
    for (run_id,), run in points.group_by("run_id"):
        run = run.sort(axis)
        xs, ys = run[axis].to_numpy(), run["value"].to_numpy()
        # Interpolation only: before a run's first evaluation there is nothing to read.
        values.append({"run_id": run_id, "at": float(np.interp(budget, xs, ys)) if xs[0] <= budget else None})
    read = finished.join(pl.DataFrame(values, schema={"run_id": pl.String, "at": pl.Float64}), on="run_id")
    read = read.with_columns(status=pl.lit("FINISHED"))
    return budget, compare(read, "at", goal)
