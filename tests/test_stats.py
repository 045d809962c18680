"""Paired statistics against hand computations, planted effects and null effects."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
from scipy import stats

from mta_lab.analysis.stats import compare, holm, seeds_for_power
from mta_lab.config.sweep import Goal


def frame(values: dict[str, dict[int, float]], speed: dict[str, float] | None = None) -> pl.DataFrame:
    rows = []
    for variant, by_seed in values.items():
        for seed, value in by_seed.items():
            rows.append(
                {
                    "variant": variant,
                    "role": "baseline" if variant == "baseline" else "variant",
                    "seed": seed,
                    "status": "FINISHED",
                    "val/loss": value,
                    "tokens_per_s": (speed or {}).get(variant, 100.0),
                    "peak_memory_mb": 10.0 if variant == "baseline" else 12.0,
                }
            )
    return pl.DataFrame(rows)


def row(table: pl.DataFrame, variant: str) -> dict:
    return table.filter(pl.col("variant") == variant).row(0, named=True)


def test_a_hand_computed_paired_comparison():
    # Differences 0.5, 0.5, 0.7: mean 0.5667, sd 0.11547, t = 0.5667 / (0.11547 / sqrt 3) = 8.5 on 2 df.
    table = compare(
        frame(
            {"baseline": {0: 1.0, 1: 2.0, 2: 3.0}, "v": {0: 1.5, 1: 2.5, 2: 3.7}},
            {"baseline": 100.0, "v": 50.0},
        ),
        "val/loss",
        Goal.minimize,
    )
    base, v = row(table, "baseline"), row(table, "v")
    assert base["verdict"] == "baseline" and base["mean"] == pytest.approx(2.0)
    half = (
        4.302652729911275 * 1.0 / math.sqrt(3)
    )  # t(0.975, 2) * sd / sqrt(n) for the baseline's values 1, 2, 3
    assert (base["ci_low"], base["ci_high"]) == (pytest.approx(2 - half), pytest.approx(2 + half))
    assert v["delta"] == pytest.approx(0.56667, abs=1e-5) and v["effect_dz"] == pytest.approx(
        0.56667 / 0.11547, rel=1e-4
    )
    assert v["p_t"] == pytest.approx(2 * stats.t.sf(8.5, 2), rel=1e-6)
    half_delta = 4.302652729911275 * 0.115470 / math.sqrt(3)
    assert (v["delta_low"], v["delta_high"]) == (
        pytest.approx(0.56667 - half_delta, abs=1e-5),
        pytest.approx(0.56667 + half_delta, abs=1e-5),
    )
    assert v["p_wilcoxon"] == pytest.approx(0.25)  # exact: 3 positive differences, 2 / 2^3
    assert v["verdict"] == "worse"  # lower is better and the variant is higher, p_holm = p_t < 0.05
    assert v["time_ratio"] == pytest.approx(2.0) and v["memory_ratio"] == pytest.approx(1.2)


def test_holm_by_hand():
    # Sorted 0.01, 0.03, 0.04 -> 3 x 0.01 = 0.03, 2 x 0.03 = 0.06, 1 x 0.04 -> max(0.06, 0.04) = 0.06.
    assert holm([0.01, 0.04, 0.03, None]) == [
        pytest.approx(0.03),
        pytest.approx(0.06),
        pytest.approx(0.06),
        None,
    ]
    assert holm([0.6, 0.9]) == [pytest.approx(1.0), pytest.approx(1.0)]


def test_compare_corrects_across_its_variants():
    """Three variants: each p_holm is Holm's adjustment of the three p_t, recomputed here by hand, so
    a variant that would pass uncorrected (p_t < 0.05) is "better" only if it survives the correction."""
    base = {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}
    shifts = {
        "a": [-0.30, -0.32, -0.29, -0.31],
        "b": [-0.20, -0.08, -0.30, -0.12],
        "c": [0.1, -0.2, 0.05, -0.1],
    }
    values = {"baseline": base} | {k: {s: base[s] + d for s, d in enumerate(v)} for k, v in shifts.items()}
    table = compare(frame(values), "val/loss", Goal.minimize)
    p = {k: stats.ttest_rel(np.array(shifts[k]), np.zeros(4)).pvalue for k in shifts}
    order = sorted(p, key=p.get)  # step-down: the smallest p times 3, the next times 2, then times 1
    adjusted, running = {}, 0.0
    for rank, variant in enumerate(order):
        running = max(running, min(1.0, (3 - rank) * p[variant]))
        adjusted[variant] = running
    for variant in shifts:
        assert row(table, variant)["p_t"] == pytest.approx(p[variant], rel=1e-6)
        assert row(table, variant)["p_holm"] == pytest.approx(adjusted[variant], rel=1e-6)
    assert p["b"] < 0.05 < adjusted["b"]  # b passes uncorrected (p 0.037) and not after (x 2 = 0.073)
    assert row(table, "a")["verdict"] == "better"
    assert row(table, "b")["verdict"].startswith("no detectable difference")


def test_seeds_for_power_matches_gpower():
    # G*Power, paired t-test, two-sided alpha 0.05, power 0.8: d_z 0.5 -> 34, 0.8 -> 15, 1.0 -> 10.
    assert [seeds_for_power(d) for d in (0.5, 0.8, 1.0, -1.0)] == [34, 15, 10, 10]
    assert seeds_for_power(0.0) is None and seeds_for_power(float("nan")) is None


def test_a_planted_effect_is_detected_and_a_null_one_is_not():
    rng = np.random.default_rng(0)
    seeds = range(8)
    baseline = {s: 3.0 + rng.normal(0, 0.2) for s in seeds}  # seeds differ a lot...
    better = {s: baseline[s] - 0.05 + rng.normal(0, 0.01) for s in seeds}  # ...but the pairing removes it
    same = {s: baseline[s] + rng.normal(0, 0.01) for s in seeds}
    worse = {s: baseline[s] + 0.04 + rng.normal(0, 0.01) for s in seeds}
    table = compare(
        frame({"baseline": baseline, "better": better, "same": same, "worse": worse}),
        "val/loss",
        Goal.minimize,
    )
    assert row(table, "better")["verdict"] == "better" and row(table, "worse")["verdict"] == "worse"
    assert row(table, "same")["verdict"] == "no detectable difference with 8 seeds"
    assert row(table, "better")["boot_low"] is not None  # 8 seeds: a bootstrap interval too
    # Unpaired, the seed-to-seed spread would swamp the 0.05 effect: the intervals of the means overlap.
    assert row(table, "better")["ci_high"] > row(table, "baseline")["ci_low"]
    assert table["variant"].to_list() == ["baseline", "better", "same", "worse"]  # best first for minimize


def test_maximize_flips_the_verdict():
    values = {"baseline": {0: 0.1, 1: 0.2, 2: 0.3}, "v": {0: 0.5, 1: 0.61, 2: 0.7}}
    assert row(compare(frame(values), "val/loss", Goal.maximize), "v")["verdict"] == "better"


def test_unequal_seeds_are_paired_on_the_shared_ones():
    values = {
        "baseline": {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0},
        "partial": {0: 1.1, 1: 2.3, 3: 4.2},
        "lonely": {9: 1.0},
    }
    table = compare(frame(values), "val/loss", Goal.minimize)
    partial, lonely = row(table, "partial"), row(table, "lonely")
    assert partial["n_pairs"] == 3 and partial["note"] == "seeds [2] missing, compared on the 3 shared"
    assert partial["delta"] == pytest.approx((0.1 + 0.3 + 0.2) / 3)
    assert (
        lonely["delta"] is None
        and lonely["verdict"] == "not compared: needs 2+ seeds shared with the baseline"
    )
    assert "only 0 seed shared" in lonely["note"]


def test_without_a_baseline_nothing_is_compared():
    table = compare(frame({"a": {0: 1.0, 1: 2.0}, "b": {0: 1.5, 1: 2.5}}), "val/loss", Goal.minimize)
    assert set(table["note"]) == {"no baseline runs to compare with"} and table["p_holm"].null_count() == 2


def test_failed_runs_are_left_out():
    table = frame({"baseline": {0: 1.0, 1: 2.0}, "v": {0: 1.0, 1: 2.0, 2: 99.0}})
    table = table.with_columns(
        pl.when(pl.col("val/loss") == 99.0).then(pl.lit("FAILED")).otherwise(pl.col("status")).alias("status")
    )
    assert row(compare(table, "val/loss", Goal.minimize), "v")["n"] == 2


def test_pairs_are_formed_by_seed_not_by_rank_or_row_order():
    # By seed the differences are 2.1, -0.9, -0.9: mean 0.1, sd sqrt(3). Paired by rank (both sorted) or
    # by row order they would be 0.1 on every seed, a "difference" with no spread at all.
    values = {"baseline": {0: 1.0, 1: 2.0, 2: 3.0}, "v": {2: 2.1, 0: 3.1, 1: 1.1}}
    v = row(compare(frame(values), "val/loss", Goal.minimize), "v")
    assert v["delta"] == pytest.approx(0.1) and v["effect_dz"] == pytest.approx(0.1 / math.sqrt(3))
    assert v["verdict"] == "no detectable difference with 3 seeds"


@pytest.mark.slow  # 200 sweeps' comparisons, each with its bootstrap intervals: half a minute
def test_a_sweep_of_aa_variants_rarely_finds_a_difference():
    """The false-positive rate of a whole sweep stays at alpha: each A/A variant is the baseline's
    procedure again (the same seed effects, fresh noise), and Holm's correction across the sweep's four
    variants holds the chance of any "better" or "worse" to 5% (here 15 of 200 sweeps; with the p-values
    uncorrected, 34)."""
    rng = np.random.default_rng(0)
    sweeps, flagged = 200, 0
    for _ in range(sweeps):
        seed_effect = rng.normal(0, 1.0, 3)
        values = {
            name: {s: 3.0 + seed_effect[s] + rng.normal(0, 0.1) for s in range(3)}
            for name in ("baseline", "a", "b", "c", "d")
        }
        verdicts = compare(frame(values), "val/loss", Goal.minimize)["verdict"]
        flagged += any(v.startswith(("better", "worse")) for v in verdicts)
    # Binomial(200, 0.05) exceeds 18 with probability 0.6%; Binomial(200, 0.15) stays at 18 or less with 0.8%.
    assert flagged <= 18
