"""How much compute does a variant save? A scaling fit and a compute multiplier with a paired bootstrap.

Each variant is trained on a ladder of compute budgets (or model sizes), several seeds per rung. Its
final losses are fitted with a saturating power law, loss(C) = E + A * C**-alpha: E is the loss no
amount of compute removes, alpha how fast the rest falls. With only 3 distinct budgets the three
parameters would pass through the three means exactly and say nothing about the noise, so there the
floor is fixed at 0 (a pure power law, two parameters, one degree of freedom left).

The comparison is read off the two curves at the largest compute the baseline reached: the baseline's
fitted loss there is the target, and the compute multiplier is the compute the variant's curve needs to
reach that target, divided by the baseline's. 0.8 means the variant gets there with 0.8x the FLOPs; inf
means its curve flattens out above the target.

The uncertainty comes from a bootstrap over seeds, paired: each resample draws seeds with replacement and
takes the same seeds for both variants, so noise that a seed shares across variants (the same
initialisation and data order) cancels in the multiplier rather than widening its interval. The interval
is the percentile interval of the resampled multipliers; resamples whose fit fails are counted and
reported, and too many of them refuse the comparison rather than quietly narrow it. With few seeds a
percentile bootstrap is narrower than it should be (it can only reshuffle the seeds it has): in
simulations of 5 seeds per variant, the 95% interval held the true multiplier about 80% of the time.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import polars as pl
from numpy.typing import ArrayLike
from scipy.optimize import OptimizeWarning, curve_fit

from mta_lab.sweep.spec import split_rung

MIN_RUNGS = 3
"""Below this many distinct compute values no curve with a degree of freedom to spare can be fitted."""
SATURATING_MIN_RUNGS = 4
"""With 3 distinct compute levels, 3 parameters would pass through the 3 means exactly: fit the pure power
law (floor 0) instead, which keeps a degree of freedom."""
MIN_EXPONENT = 1e-6
"""A fitted exponent at or below this is a loss that does not fall with compute."""
MAX_EXPONENT = 5.0
MAXFEV = 400
"""Enough for curve_fit from the log-log starting point; a fit that needs more is refused, not waited on."""


class ScalingFitError(ValueError):
    """A ladder that cannot be fitted; the message says why in one line, naming the variant if given."""


@dataclass(frozen=True)
class PowerLaw:
    """loss(C) = floor + scale * C ** -exponent  (floor = 0 for the pure power law)."""

    floor: float
    """E: the loss the curve approaches as compute grows."""
    scale: float
    """A, in the original compute unit."""
    exponent: float
    """alpha > 0: how fast the reducible loss falls."""
    saturating: bool
    """True if the floor was fitted, False if it was fixed at 0."""

    def loss(self, compute: float | np.ndarray) -> float | np.ndarray:
        """The curve's loss at ``compute``."""
        return self.floor + self.scale * np.power(compute, -self.exponent)

    def compute_for(self, loss: float) -> float:
        """The compute at which the curve reaches ``loss``; math.inf if loss <= floor."""
        if loss <= self.floor:
            return math.inf
        # In logs: scale can be large (C ** alpha in the original unit), the ratio stays representable.
        return math.exp((math.log(self.scale) - math.log(loss - self.floor)) / self.exponent)


def fit_power_law(compute: ArrayLike, loss: ArrayLike, *, name: str = "") -> PowerLaw:
    """Least squares in loss (curve_fit) of a ladder's runs, one (compute, loss) pair per run.

    The fit runs in a normalised compute unit (C / max C), where the reducible loss at the top rung is
    the scale itself and every power is >= 1, which keeps it well-conditioned whatever the unit of C;
    the parameters are reported in the original unit. The saturating law is fitted from
    SATURATING_MIN_RUNGS distinct compute values on, otherwise the floor is fixed at 0. Bounds:
    0 <= floor < min(loss), scale > 0, 0 < exponent <= 5. Refuses (ScalingFitError) a ladder with fewer
    than MIN_RUNGS distinct compute values, unequal or empty inputs, non-finite or non-positive values,
    a loss that does not fall with compute, or a fit that does not converge.
    """
    who = f"{name}: " if name else ""
    c = np.asarray(compute, dtype=float).ravel()
    y = np.asarray(loss, dtype=float).ravel()
    if c.size != y.size:
        raise ScalingFitError(f"{who}compute and loss differ in length ({c.size} and {y.size})")
    if c.size == 0:
        raise ScalingFitError(f"{who}no runs to fit")
    for label, values in (("compute", c), ("loss", y)):
        if not np.all(np.isfinite(values)):
            raise ScalingFitError(f"{who}{label} has non-finite values (missing or diverged runs?)")
        if np.any(values <= 0):
            raise ScalingFitError(f"{who}{label} must be positive, got {values.min():g}")
    levels = np.unique(c)
    if levels.size < MIN_RUNGS:
        raise ScalingFitError(
            f"{who}needs at least {MIN_RUNGS} budgets or sizes, got {levels.size}: "
            f"{', '.join(f'{v:g}' for v in levels)}"
        )
    first, last = y[c == levels[0]].mean(), y[c == levels[-1]].mean()
    if last >= first:
        raise ScalingFitError(
            f"{who}loss does not fall with compute ({first:.4g} at {levels[0]:g}, {last:.4g} at {levels[-1]:g})"
        )

    top = levels[-1]
    x = c / top
    saturating = levels.size >= SATURATING_MIN_RUNGS
    floor0 = 0.5 * y.min() if saturating else 0.0
    exponent0, scale0 = _log_log_start(x, y - floor0)
    if saturating:
        lower, upper = [0.0, 0.0, 0.0], [np.nextafter(y.min(), 0.0), np.inf, MAX_EXPONENT]
        floor, scale, exponent = _least_squares(
            _saturating, _saturating_jac, x, y, [floor0, scale0, exponent0], lower, upper, who
        )
    else:
        floor = 0.0
        scale, exponent = _least_squares(
            _pure, _pure_jac, x, y, [scale0, exponent0], [0.0, 0.0], [np.inf, MAX_EXPONENT], who
        )
    if not exponent > MIN_EXPONENT or not scale > 0:
        raise ScalingFitError(f"{who}loss does not fall with compute (fitted exponent {exponent:.3g})")
    # Back to the original unit: scale * (C / top) ** -alpha = (scale * top ** alpha) * C ** -alpha.
    return PowerLaw(
        floor=float(floor),
        scale=float(math.exp(math.log(scale) + exponent * math.log(top))),
        exponent=float(exponent),
        saturating=saturating,
    )


@dataclass(frozen=True)
class Multiplier:
    """A variant's compute multiplier against the baseline, with its bootstrap interval."""

    estimate: float
    """The compute the variant needs to reach the baseline's loss at the reference compute, divided by
    the reference compute (0.8 = the variant needs 0.8x the FLOPs); math.inf if its curve never does."""
    low: float
    """Lower end of the percentile bootstrap interval (may be inf)."""
    high: float
    """Upper end of the percentile bootstrap interval (may be inf)."""
    reference: float
    """The largest compute the baseline's ladder reached."""
    target_loss: float
    """The baseline fit's loss at the reference compute."""
    baseline: PowerLaw
    variant: PowerLaw
    n_boot: int
    """Bootstrap resamples that could be fitted."""
    n_failed: int
    """Resamples whose fit failed (reported, not hidden)."""
    confidence: float = 0.95
    """The interval's coverage, as asked for."""


def compute_multiplier(
    runs: pl.DataFrame,
    variant: str,
    *,
    baseline: str = "baseline",
    compute: str = "flops",
    loss: str = "loss",
    seed: str = "seed",
    variant_col: str = "variant",
    n_boot: int = 1000,
    confidence: float = 0.95,
    rng: int = 0,
) -> Multiplier:
    """The compute multiplier of ``variant`` against ``baseline``, with a bootstrap over seeds, paired.

    ``runs`` has one row per run (variant, rung, seed). The point estimate comes from fits on all of
    each variant's runs. Each resample draws the seeds common to both variants with replacement, the
    same draw for both, takes every row of each drawn seed (a seed drawn twice counts twice), refits
    both curves and recomputes the multiplier against the resample's own target and reference; the
    interval is the percentile interval of those multipliers. Refuses (ScalingFitError) fewer than 2
    common seeds, a variant whose full fit fails, and a bootstrap in which more than half the resamples
    cannot be fitted.
    """
    missing = [col for col in (variant_col, seed, compute, loss) if col not in runs.columns]
    if missing:
        raise ScalingFitError(f"runs has no column {', '.join(map(repr, missing))}")
    if not 0 < confidence < 1:
        raise ScalingFitError(f"confidence must lie between 0 and 1, got {confidence}")
    if n_boot < 1:
        raise ScalingFitError(f"n_boot must be at least 1, got {n_boot}")
    ladders = {name: _by_seed(runs, variant_col, name, seed, compute, loss) for name in (baseline, variant)}
    for name, ladder in ladders.items():
        if not ladder:
            raise ScalingFitError(f"{name}: no runs in the frame")
    common = sorted(set(ladders[baseline]) & set(ladders[variant]))
    if len(common) < 2:
        raise ScalingFitError(
            f"a bootstrap over seeds needs at least 2 seeds per variant, common to {baseline} and "
            f"{variant}; got {len(common)}"
        )

    base_fit, variant_fit, reference = _fit_both(ladders, baseline, variant, None)
    estimate = _multiplier(base_fit, variant_fit, reference)

    generator = np.random.default_rng(rng)
    values, failed = [], 0
    for _ in range(n_boot):
        draw = [common[i] for i in generator.integers(0, len(common), size=len(common))]
        try:
            values.append(_multiplier(*_fit_both(ladders, baseline, variant, draw)))
        except ScalingFitError:
            failed += 1
    if failed > n_boot / 2:
        raise ScalingFitError(
            f"{failed} of {n_boot} bootstrap resamples of {variant} against {baseline} could not be fitted"
        )
    tail = (1 - confidence) / 2
    # The closest resampled values rather than interpolation, which would turn an inf neighbour into nan.
    low = float(np.quantile(values, tail, method="lower"))
    high = float(np.quantile(values, 1 - tail, method="higher"))
    return Multiplier(
        estimate=estimate,
        low=low,
        high=high,
        reference=reference,
        target_loss=float(base_fit.loss(reference)),
        baseline=base_fit,
        variant=variant_fit,
        n_boot=len(values),
        n_failed=failed,
        confidence=confidence,
    )


def describe(m: Multiplier, unit: str = "FLOPs") -> str:
    """The multiplier in one line of words, for a report."""
    target = _number(m.target_loss)
    if math.isinf(m.estimate):
        return (
            f"does not reach the baseline's loss {target} within its fitted curve "
            f"(its floor is {_number(m.variant.floor)})"
        )
    interval = f"{round(m.confidence * 100):g}% interval [{_bound(m.low)}, {_bound(m.high)}]"
    return (
        f"reaches the baseline's loss {target} at {_number(m.estimate)}x its {unit}, {interval}: {verdict(m)}"
    )


def verdict(m: Multiplier) -> str:
    """Whether the interval tells the variant's compute from the baseline's."""
    if m.high < 1:
        return "needs less"
    if m.low > 1:
        return "needs more"
    return "cannot be told from 1x"


def by_rung(runs: pl.DataFrame) -> tuple[pl.DataFrame, str]:
    """A scaling sweep's runs with the variant and the rung apart, and its top rung: the one whose
    runs spent the most FLOPs."""
    parts = runs["variant"].map_elements(
        lambda label: list(split_rung(label)), return_dtype=pl.List(pl.String)
    )
    runs = runs.with_columns(variant=parts.list.get(0), rung=parts.list.get(1))
    spent = runs.group_by("rung").agg(pl.col("train/flops").mean()).sort("train/flops")
    return runs, spent["rung"][-1]


def ladder_multipliers(finished: pl.DataFrame, metric: str) -> tuple[list[dict], dict[str, dict]]:
    """Each variant's compute multiplier against the baseline, in FLOPs and in training time, and the
    fitted curves (``fits[axis][variant]``)."""
    rows, fits = [], {}
    units = {"flops": ("train/flops", "FLOPs"), "seconds": ("train/seconds", "training time")}
    for axis, (column, unit) in units.items():
        fits[axis] = {}
        if column not in finished.columns:  # runs of a version that did not log it
            continue
        frame = finished.select(
            "variant", "seed", pl.col(column).alias("compute"), pl.col(metric).alias("loss")
        )
        for variant in frame["variant"].unique(maintain_order=True):
            try:
                fits[axis][variant] = fit_power_law(
                    frame.filter(pl.col("variant") == variant)["compute"],
                    frame.filter(pl.col("variant") == variant)["loss"],
                    name=variant,
                )
            except ScalingFitError:
                pass  # said in the variant's row below (or the baseline's, for all of them)
            if variant == "baseline":
                continue
            try:
                found = compute_multiplier(frame, variant, compute="compute", loss="loss")
            except ScalingFitError as error:
                rows.append({"variant": variant, "axis": axis, "text": f"could not be fitted: {error}",
                             "estimate": None, "low": None, "high": None})  # fmt: skip
                continue
            rows.append({"variant": variant, "axis": axis, "text": describe(found, unit),
                         "estimate": found.estimate, "low": found.low, "high": found.high})  # fmt: skip
    return rows, fits


def _multiplier(base_fit: PowerLaw, variant_fit: PowerLaw, reference: float) -> float:
    """Compute the variant needs for the baseline's loss at ``reference``, over ``reference``."""
    if variant_fit == base_fit:  # the same curve: 1 exactly, not 1 up to rounding
        return 1.0
    return variant_fit.compute_for(float(base_fit.loss(reference))) / reference


def _fit_both(
    ladders: dict, baseline: str, variant: str, draw: list | None
) -> tuple[PowerLaw, PowerLaw, float]:
    """Both curves and the reference compute (the baseline's largest), on the rows of the drawn seeds,
    the same seeds for both; with no draw, each curve on all of its own runs."""
    curves, reference = {}, 0.0
    for name in dict.fromkeys((baseline, variant)):  # once if the variant is the baseline
        rows = [ladders[name][s] for s in (draw if draw is not None else ladders[name])]
        curves[name] = fit_power_law(
            np.concatenate([r[0] for r in rows]), np.concatenate([r[1] for r in rows]), name=name
        )
        if name == baseline:
            reference = float(max(r[0].max() for r in rows))
    return curves[baseline], curves[variant], reference


def _by_seed(
    runs: pl.DataFrame, variant_col: str, name: str, seed: str, compute: str, loss: str
) -> dict[object, tuple[np.ndarray, np.ndarray]]:
    """A variant's runs as seed -> (compute, loss) arrays, ready to be concatenated per resample."""
    group = runs.filter(pl.col(variant_col) == name)
    ladder = {}
    for (key,), rows in group.group_by(seed, maintain_order=True):
        ladder[key] = (
            rows[compute].cast(pl.Float64).to_numpy(),
            rows[loss].cast(pl.Float64).to_numpy(),
        )
    return ladder


def _least_squares(model, jac, x, y, start, lower, upper, who: str) -> np.ndarray:
    """curve_fit's optimum within the bounds.

    Levenberg-Marquardt (MINPACK) first: several times faster than the bounded solver, which matters
    for a thousand bootstrap refits, and an optimum it finds inside the bounds is the bounded optimum
    too. Only when it leaves the bounds, or fails, does the bounded trust-region solver run.
    """
    with warnings.catch_warnings(), np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        warnings.simplefilter("error", OptimizeWarning)
        try:
            params, _ = curve_fit(model, x, y, p0=start, jac=jac, method="lm", maxfev=MAXFEV)
            if np.all(np.isfinite(params)) and np.all(params >= lower) and np.all(params <= upper):
                return params
        except (RuntimeError, OptimizeWarning, ValueError):
            pass  # the bounded solver below decides
        try:
            params, _ = curve_fit(
                model, x, y, p0=start, jac=jac, bounds=(lower, upper), method="trf", max_nfev=MAXFEV
            )
        except (RuntimeError, OptimizeWarning) as error:
            raise ScalingFitError(f"{who}the fit did not converge ({str(error).splitlines()[0]})") from error
    return params


def _log_log_start(x: np.ndarray, reducible: np.ndarray) -> tuple[float, float]:
    """Starting exponent and scale from a straight line through log(reducible loss) against log(x)."""
    slope, intercept = np.polyfit(np.log(x), np.log(reducible), 1)
    exponent = float(np.clip(-slope, 1e-3, MAX_EXPONENT * 0.99))
    return exponent, float(math.exp(intercept))


def _saturating(x: np.ndarray, floor: float, scale: float, exponent: float) -> np.ndarray:
    return floor + scale * x**-exponent


def _saturating_jac(x: np.ndarray, floor: float, scale: float, exponent: float) -> np.ndarray:
    power = x**-exponent
    return np.column_stack([np.ones_like(x), power, -scale * power * np.log(x)])


def _pure(x: np.ndarray, scale: float, exponent: float) -> np.ndarray:
    return scale * x**-exponent


def _pure_jac(x: np.ndarray, scale: float, exponent: float) -> np.ndarray:
    power = x**-exponent
    return np.column_stack([power, -scale * power * np.log(x)])


def _number(value: float) -> str:
    return f"{value:.2f}" if abs(value) >= 0.1 else f"{value:.2g}"


def _bound(value: float) -> str:
    return "never" if math.isinf(value) else _number(value)
