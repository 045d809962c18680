"""The scaling fit and the compute multiplier against known truths: curves planted in synthetic ladders,
hand-computed inverses, and ladders that must be refused."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from mta_lab.analysis.scaling import (
    Multiplier,
    PowerLaw,
    ScalingFitError,
    compute_multiplier,
    describe,
    fit_power_law,
)

FLOOR, EXPONENT = 1.5, 0.3
SCALE = 2.0 * 1e12**EXPONENT  # reducible loss 2.0 at the smallest budget, 0.25 at the largest
RUNGS = np.logspace(12, 15, 6)


def planted(compute: np.ndarray) -> np.ndarray:
    return FLOOR + SCALE * compute**-EXPONENT


def ladder(
    curves: dict[str, object],
    rungs: np.ndarray = RUNGS,
    seeds: int = 5,
    seed_sd: float = 0.005,
    run_sd: float = 0.002,
    rng: int = 0,
) -> pl.DataFrame:
    """One row per (variant, rung, seed). A seed's offset is shared by every variant, as the same
    initialisation and data order would be; each run adds its own smaller noise."""
    generator = np.random.default_rng(rng)
    rows = []
    for seed in range(seeds):
        offset = generator.normal(0, seed_sd)
        for name, curve in curves.items():
            for compute, value in zip(rungs, curve(rungs), strict=True):
                noise = generator.normal(0, run_sd)
                rows.append({"variant": name, "seed": seed, "flops": compute, "loss": value + offset + noise})
    return pl.DataFrame(rows)


def twice_as_efficient(compute: np.ndarray) -> np.ndarray:
    """L_v(C) = L_b(2C): the variant reaches any loss with half the compute, a true multiplier of 0.5."""
    return planted(2.0 * compute)


def test_the_planted_curve_and_multiplier_are_recovered():
    runs = ladder({"baseline": planted, "mta": twice_as_efficient})
    m = compute_multiplier(runs, "mta", n_boot=1000)

    assert m.baseline.saturating and m.variant.saturating
    assert m.baseline.floor == pytest.approx(FLOOR, abs=0.03)
    assert m.baseline.exponent == pytest.approx(EXPONENT, abs=0.02)
    assert m.variant.floor == pytest.approx(FLOOR, abs=0.03)
    assert m.reference == RUNGS[-1]
    assert m.target_loss == pytest.approx(planted(RUNGS[-1]), abs=0.01)
    assert m.estimate == pytest.approx(0.5, rel=0.15)
    assert m.low <= 0.5 <= m.high
    assert m.high < 1.0  # the saving is resolved, not only estimated
    assert m.n_boot == 1000 and m.n_failed == 0


def test_noise_a_seed_shares_across_variants_cancels_in_the_paired_bootstrap():
    # Large seed offsets, almost no per-run noise: a constant added to a seed's losses moves both
    # curves' floors alike and leaves where the variant meets the baseline's target unchanged, so every
    # paired resample finds the true multiplier. Unpaired, the offsets would not cancel.
    runs = ladder({"baseline": planted, "mta": twice_as_efficient}, seed_sd=0.05, run_sd=1e-4)
    m = compute_multiplier(runs, "mta", n_boot=300)
    assert 0.49 < m.low <= m.high < 0.51


def test_three_rungs_fit_the_pure_power_law():
    def pure(compute: np.ndarray) -> np.ndarray:
        return 20.0 * compute**-0.05

    rungs = np.array([1e12, 1e13, 1e14])
    runs = ladder({"baseline": pure, "mta": lambda c: pure(2.0 * c)}, rungs=rungs, seed_sd=0.0)
    base = runs.filter(pl.col("variant") == "baseline")
    fit = fit_power_law(base["flops"], base["loss"])
    assert not fit.saturating and fit.floor == 0.0
    assert fit.exponent == pytest.approx(0.05, abs=0.005)
    assert fit.scale == pytest.approx(20.0, rel=0.2)

    m = compute_multiplier(runs, "mta", n_boot=200)
    assert not m.variant.saturating
    assert m.estimate == pytest.approx(0.5, rel=0.15)


def test_the_baseline_against_itself_is_one_exactly():
    m = compute_multiplier(ladder({"baseline": planted}), "baseline", n_boot=100)
    assert (m.estimate, m.low, m.high) == (1.0, 1.0, 1.0)


def test_fewer_than_three_rungs_are_refused():
    with pytest.raises(ScalingFitError, match="needs at least 3 budgets or sizes, got 2: 1e\\+12, 1e\\+13"):
        fit_power_law([1e12, 1e13, 1e12, 1e13], [3.0, 2.5, 3.1, 2.6])


def test_a_loss_that_rises_with_compute_is_refused_and_names_the_variant():
    with pytest.raises(ScalingFitError, match="^mta: loss does not fall with compute"):
        fit_power_law(RUNGS, planted(RUNGS)[::-1], name="mta")
    runs = ladder({"baseline": planted, "mta": lambda c: planted(c)[::-1]})
    with pytest.raises(ScalingFitError, match="^mta: loss does not fall with compute"):
        compute_multiplier(runs, "mta", n_boot=10)


@pytest.mark.parametrize(
    ("compute", "loss", "message"),
    [
        ([1e12, 1e13, 0.0, 1e15], [3.0, 2.5, 2.2, 2.0], "compute must be positive, got 0"),
        ([1e12, 1e13, 1e14, 1e15], [3.0, 2.5, -2.2, 2.0], "loss must be positive, got -2.2"),
        ([1e12, 1e13, 1e14, 1e15], [3.0, 2.5, math.nan, 2.0], "loss has non-finite values"),
        ([1e12, 1e13, 1e14], [3.0, 2.5], "differ in length"),
        ([], [], "no runs to fit"),
    ],
)
def test_unusable_values_are_refused(compute, loss, message):
    with pytest.raises(ScalingFitError, match=message):
        fit_power_law(compute, loss)


def test_one_seed_is_refused_for_the_bootstrap():
    runs = ladder({"baseline": planted, "mta": twice_as_efficient}, seeds=1)
    with pytest.raises(ScalingFitError, match="a bootstrap over seeds needs at least 2 seeds per variant"):
        compute_multiplier(runs, "mta")


def test_failed_resamples_are_counted_and_too_many_refuse():
    full = ladder({"baseline": planted, "mta": twice_as_efficient}, seeds=4)
    # The variant's seeds 2 and 3 ran only the smallest budget: a resample without seed 0 or 1 has one
    # budget to fit and fails, with probability (1/2) ** 4.
    partial = full.filter(
        (pl.col("variant") == "baseline") | (pl.col("seed") < 2) | (pl.col("flops") == RUNGS[0])
    )
    m = compute_multiplier(partial, "mta", n_boot=1000)
    assert m.n_boot + m.n_failed == 1000
    assert 30 < m.n_failed < 100  # about 62 expected

    # Each of the variant's 3 seeds ran a different budget: only the 6 of 27 resamples that draw all
    # three have 3 budgets to fit.
    scattered = full.filter(
        (pl.col("variant") == "baseline")
        | (
            pl.col("flops")
            == pl.col("seed").replace_strict({0: RUNGS[0], 1: RUNGS[2], 2: RUNGS[5]}, default=None)
        )
    )
    with pytest.raises(ScalingFitError, match="of 200 bootstrap resamples of mta against baseline could not"):
        compute_multiplier(scattered, "mta", n_boot=200)


def test_compute_for_inverts_the_curve():
    # 1 + 10 * C ** -0.5 reaches 2 at C = 100 and 1.1 at C = 10_000; it never reaches its floor.
    curve = PowerLaw(floor=1.0, scale=10.0, exponent=0.5, saturating=True)
    assert curve.loss(100.0) == pytest.approx(2.0)
    assert curve.compute_for(2.0) == pytest.approx(100.0)
    assert curve.compute_for(1.1) == pytest.approx(10_000.0)
    assert curve.compute_for(1.0) == math.inf
    assert curve.compute_for(0.5) == math.inf
    # 4 * C ** -2 reaches 1 at C = 2.
    pure = PowerLaw(floor=0.0, scale=4.0, exponent=2.0, saturating=False)
    assert pure.compute_for(1.0) == pytest.approx(2.0)
    assert pure.compute_for(0.0) == math.inf


def test_a_variant_whose_floor_is_above_the_target_never_reaches_it():
    def high_floor(compute: np.ndarray) -> np.ndarray:
        return 2.0 + SCALE * compute**-EXPONENT  # floor 2.0, above the baseline's 1.75 at 1e15

    m = compute_multiplier(ladder({"baseline": planted, "mta": high_floor}), "mta", n_boot=200)
    assert m.variant.floor == pytest.approx(2.0, abs=0.03)
    assert m.estimate == math.inf
    words = describe(m)
    assert words.startswith("does not reach the baseline's loss 1.75 within its fitted curve (its floor is ")
    assert float(words.removesuffix(")").rsplit(" ", 1)[1]) == pytest.approx(2.0, abs=0.03)


def test_describe_in_words():
    curve = PowerLaw(floor=2.0, scale=1.0, exponent=0.3, saturating=True)
    m = Multiplier(0.8, 0.71, 0.92, 1e15, 3.21, curve, curve, 1000, 0)
    assert describe(m) == (
        "reaches the baseline's loss 3.21 at 0.80x its FLOPs, 95% interval [0.71, 0.92]: needs less"
    )
    unbounded = Multiplier(0.8, 0.71, math.inf, 1e15, 3.21, curve, curve, 1000, 0)
    assert describe(unbounded, "GPU-hours").endswith(
        "0.80x its GPU-hours, 95% interval [0.71, never]: cannot be told from 1x"
    )
