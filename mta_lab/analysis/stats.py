"""Does a variant beat the baseline, by how much, with what certainty, at what cost?

Per variant: the mean of the metric over seeds with a 95% t interval (and a bootstrap interval from 4
seeds on). Against the baseline, paired by seed (same seed = same init and data order): the mean
difference with its 95% t interval, the paired t-test and the Wilcoxon signed-rank test, the
p-values Holm-corrected across the sweep's variants, and the effect size d_z = mean / sd of the
differences. A verdict in words, and how many seeds a paired t-test needs to detect the observed
effect with 80% power. Cost: training time per step and peak memory relative to the baseline.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl
from scipy import stats

from mta_lab.config.sweep import Goal

ALPHA = 0.05
POWER = 0.8
BOOTSTRAP_MIN_SEEDS = 4
"""Below this many seeds a bootstrap interval only restates the few values it resamples."""


def compare(
    runs: pl.DataFrame,
    metric: str,
    goal: Goal,
    *,
    baseline: str = "baseline",
    alpha: float = ALPHA,
    power: float = POWER,
) -> pl.DataFrame:
    """One row per variant (the baseline first) of a results frame's finished runs."""
    finished = runs.filter((pl.col("status") == "FINISHED") & pl.col(metric).is_not_null())
    reference = _by_seed(finished.filter(pl.col("variant") == baseline), metric)
    reference_cost = _cost(finished.filter(pl.col("variant") == baseline))
    rows = []
    for (variant,), group in finished.group_by("variant", maintain_order=True):
        values = _by_seed(group, metric)
        row = {"variant": variant, "role": group["role"][0], **_spread(np.array(list(values.values())))}
        row |= (
            _paired(values, reference)
            if variant != baseline and reference
            else _no_pairs(values, reference, variant == baseline)
        )
        cost = _cost(group)
        row |= {
            "tokens_per_s": cost[0],
            "time_ratio": reference_cost[0] / cost[0] if cost[0] and reference_cost[0] else None,
            "peak_memory_mb": cost[1],
            "memory_ratio": cost[1] / reference_cost[1] if cost[1] and reference_cost[1] else None,
        }
        rows.append(row)
    table = pl.DataFrame(rows, infer_schema_length=None)
    table = table.with_columns(pl.Series("p_holm", holm(table["p_t"].to_list()), dtype=pl.Float64))
    table = table.with_columns(
        pl.struct(["variant", "delta", "p_holm", "n_pairs", "effect_dz"])
        .map_elements(lambda r: _verdict(r, baseline, goal, alpha, bool(reference)), return_dtype=pl.String)
        .alias("verdict"),
        pl.col("effect_dz")
        .map_elements(lambda d: seeds_for_power(d, alpha, power), return_dtype=pl.Int64, skip_nulls=True)
        .alias("seeds_needed"),
    )
    ordering = pl.when(pl.col("variant") == baseline).then(0).otherwise(1)
    descending = goal == Goal.maximize
    return table.sort([ordering, "mean"], descending=[False, descending], nulls_last=True).select(COLUMNS)


COLUMNS = [
    "variant", "role", "n", "mean", "std", "ci_low", "ci_high", "boot_low", "boot_high",
    "n_pairs", "delta", "delta_low", "delta_high", "p_t", "p_wilcoxon", "p_holm", "effect_dz",
    "verdict", "seeds_needed", "tokens_per_s", "time_ratio", "peak_memory_mb", "memory_ratio", "note",
]  # fmt: skip


def holm(p_values: list[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of the non-null p-values (each multiplied by the number still in
    play, made monotone, capped at 1); nulls stay null."""
    present = sorted((p, i) for i, p in enumerate(p_values) if p is not None and not math.isnan(p))
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, index) in enumerate(present):
        running = max(running, min(1.0, (len(present) - rank) * p))
        adjusted[index] = running
    return adjusted


def seeds_for_power(
    effect_dz: float, alpha: float = ALPHA, power: float = POWER, most: int = 1000
) -> int | None:
    """The fewest seeds with which a two-sided paired t-test at ``alpha`` detects a standardized
    effect ``effect_dz`` with probability ``power`` (noncentral t); None if it needs more than ``most``."""
    if effect_dz is None or not math.isfinite(effect_dz) or effect_dz == 0:
        return None
    for n in range(2, most + 1):
        df, shift = n - 1, abs(effect_dz) * math.sqrt(n)
        critical = stats.t.ppf(1 - alpha / 2, df)
        if stats.nct.sf(critical, df, shift) + stats.nct.cdf(-critical, df, shift) >= power:
            return n
    return None


def _by_seed(group: pl.DataFrame, metric: str) -> dict[int, float]:
    return dict(zip(group["seed"].to_list(), group[metric].to_list(), strict=True))


def _spread(values: np.ndarray) -> dict:
    n = len(values)
    row = {"n": n, "mean": float(values.mean()), "std": None, "ci_low": None, "ci_high": None,
           "boot_low": None, "boot_high": None}  # fmt: skip
    if n >= 2:
        sem = stats.sem(values)
        low, high = (
            stats.t.interval(0.95, n - 1, loc=values.mean(), scale=sem) if sem > 0 else (values.mean(),) * 2
        )
        row |= {"std": float(values.std(ddof=1)), "ci_low": float(low), "ci_high": float(high)}
    if n >= BOOTSTRAP_MIN_SEEDS and values.std() > 0:
        result = stats.bootstrap((values,), np.mean, confidence_level=0.95, n_resamples=9999, rng=0)
        row |= {
            "boot_low": float(result.confidence_interval.low),
            "boot_high": float(result.confidence_interval.high),
        }
    return row


def _paired(values: dict[int, float], reference: dict[int, float]) -> dict:
    shared = sorted(set(values) & set(reference))
    missing = sorted(set(reference) - set(values))
    if len(shared) < 2:
        note = f"only {len(shared)} seed shared with the baseline's {sorted(reference)}"
        return _no_pairs(values, reference, False, note)
    note = f"seeds {missing} missing, compared on the {len(shared)} shared" if missing else ""
    variant = np.array([values[s] for s in shared])
    base = np.array([reference[s] for s in shared])
    diffs = variant - base
    mean, sd, n = float(diffs.mean()), float(diffs.std(ddof=1)), len(diffs)
    if sd > 0:
        low, high = stats.t.interval(0.95, n - 1, loc=mean, scale=sd / math.sqrt(n))
        p_t = float(stats.ttest_rel(variant, base).pvalue)
        effect = mean / sd
    else:  # the same difference on every seed: no spread to test against
        low = high = mean
        p_t, effect = (1.0, 0.0) if mean == 0 else (None, math.copysign(math.inf, mean))
        note = note or "identical difference on every seed"
    p_w = float(stats.wilcoxon(variant, base).pvalue) if np.any(diffs != 0) else 1.0
    return {"n_pairs": n, "delta": mean, "delta_low": float(low), "delta_high": float(high), "p_t": p_t,
            "p_wilcoxon": p_w, "effect_dz": effect, "note": note}  # fmt: skip


def _no_pairs(values: dict, reference: dict, is_baseline: bool, note: str = "") -> dict:
    if not is_baseline and not reference:
        note = note or "no baseline runs to compare with"
    return {"n_pairs": len(set(values) & set(reference)) if not is_baseline else None, "delta": None,
            "delta_low": None, "delta_high": None, "p_t": None, "p_wilcoxon": None, "effect_dz": None,
            "note": note}  # fmt: skip


def _cost(group: pl.DataFrame) -> tuple[float | None, float | None]:
    """(mean tokens/s, mean peak memory) of a variant's runs."""
    speed = group["tokens_per_s"].drop_nulls() if "tokens_per_s" in group.columns else pl.Series([])
    memory = group["peak_memory_mb"].drop_nulls() if "peak_memory_mb" in group.columns else pl.Series([])
    return (speed.mean() if speed.len() else None, memory.mean() if memory.len() else None)


def _verdict(row: dict, baseline: str, goal: Goal, alpha: float, has_baseline: bool) -> str:
    if row["variant"] == baseline:
        return "baseline"
    if row["delta"] is None:
        no_baseline = row["n_pairs"] is not None and row["n_pairs"] == 0 and not has_baseline
        return "" if no_baseline else "not compared: needs 2+ seeds shared with the baseline"
    if row["p_holm"] is not None and row["p_holm"] < alpha:
        improves = row["delta"] < 0 if goal == Goal.minimize else row["delta"] > 0
        return "better" if improves else "worse"
    if row["p_holm"] is None and row["effect_dz"] is not None and math.isinf(row["effect_dz"]):
        improves = row["delta"] < 0 if goal == Goal.minimize else row["delta"] > 0
        return (
            "better (same difference on every seed)" if improves else "worse (same difference on every seed)"
        )
    return f"no detectable difference with {row['n_pairs']} seeds"
