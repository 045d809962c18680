"""Sweep files (``sweeps/*.yaml``): which configs an ablation or search trains, with which seeds, for
how long, and which metric decides.

A sweep is a delta over a base preset: ``fixed`` overrides apply to every cell, then each cell adds
its own: an assignment of ``axes`` (a full grid, or one factor at a time around the base), a named
``variant`` overlay, or parameters sampled by a ``search``. Every cell runs with every seed (the
same seeds for all: comparisons are paired), and the plain-attention baseline joins every ablation
unless ``baseline: false``. A ``cpu`` block is a delta over the sweep itself, used on machines
without a GPU so that the sweep fits a few minutes on a laptop-class CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from mta_lab.config.model import _check


class Design(str, Enum):
    grid = "grid"
    """Every combination of the axes' values."""
    ofat = "ofat"
    """One factor at a time: the base, then each axis value with the other axes at the base."""


class Goal(str, Enum):
    minimize = "minimize"
    maximize = "maximize"


class Distribution(str, Enum):
    float = "float"
    """Uniform (or log-uniform with ``log: true``) between low and high."""
    int = "int"
    """An integer between low and high (log-scaled with ``log: true``)."""
    categorical = "categorical"
    """One of ``choices``."""


class PrunerKind(str, Enum):
    none = "none"
    """Every trial runs its full budget (right for fair comparisons)."""
    median = "median"
    """Stop a trial whose metric is worse than the median of earlier trials at the same step."""
    percentile = "percentile"
    """Stop a trial outside the best ``percentile`` of earlier trials at the same step."""
    hyperband = "hyperband"
    """Hyperband (successive halving over several brackets)."""


@dataclass
class MetricSpec:
    name: str = "val/loss"
    """A metric the runs log at evaluation, e.g. val/loss, val/shakespeare/bpb, toy_block/err_seq."""
    goal: Goal = Goal.minimize
    """``minimize`` or ``maximize``."""


@dataclass
class BudgetSpec:
    """Training length of every run of the sweep; overrides the base's train.steps / train.tokens."""

    steps: int | None = None
    """Optimizer steps per run."""
    tokens: int | None = None
    """Training tokens per run."""

    def __post_init__(self) -> None:
        _check(
            (self.steps is None) != (self.tokens is None),
            "steps",
            "give budget.steps or budget.tokens (exactly one)",
        )
        for name in ("steps", "tokens"):
            value = getattr(self, name)
            _check(value is None or value >= 1, name, f"{value} is not a budget; use an integer >= 1")

    def overrides(self) -> list[str]:
        if self.steps is not None:
            return [f"train.steps={self.steps}", "train.tokens=null"]
        return ["train.steps=null", f"train.tokens={self.tokens}"]


@dataclass
class ParamSpec:
    """One searched parameter."""

    type: Distribution = Distribution.float
    """``float``, ``int`` or ``categorical``."""
    low: float | None = None
    """Lower bound (float, int)."""
    high: float | None = None
    """Upper bound (float, int)."""
    log: bool = False
    """Sample on a log scale (float, int)."""
    step: float | None = None
    """Discretization step (float, int)."""
    choices: list[Any] | None = None
    """Values to choose from (categorical)."""

    def __post_init__(self) -> None:
        if self.type == Distribution.categorical:
            _check(bool(self.choices), "choices", "a categorical parameter needs a non-empty list of choices")
            _check(
                self.low is None and self.high is None,
                "low",
                "a categorical parameter takes choices, not low/high",
            )
            return
        _check(self.choices is None, "choices", f"a {self.type.value} parameter takes low/high, not choices")
        _check(
            self.low is not None and self.high is not None,
            "low",
            f"a {self.type.value} parameter needs low and high",
        )
        _check(self.low < self.high, "high", f"{self.high} must be greater than low={self.low}")
        _check(not self.log or self.low > 0, "low", f"{self.low} must be > 0 with log: true")
        _check(not (self.log and self.step is not None), "step", "step and log: true cannot be combined")
        if self.type == Distribution.int:
            _check(
                float(self.low).is_integer() and float(self.high).is_integer(),
                "low",
                "int bounds must be integers",
            )


@dataclass
class PrunerSpec:
    kind: PrunerKind = PrunerKind.none
    """``none``, ``median``, ``percentile`` or ``hyperband``."""
    startup_trials: int = 5
    """Trials that run to the end before any pruning."""
    warmup_steps: int = 0
    """Optimizer steps before a trial can be pruned."""
    percentile: float = 25.0
    """Kept percentile (percentile pruner)."""


@dataclass
class SearchSpec:
    """Hyper-parameter search with Optuna's TPE sampler instead of fixed cells."""

    params: dict[str, ParamSpec] = field(default_factory=dict)
    """Dotted config keys and their distributions."""
    n_trials: int = 20
    """Trials in total, across all workers (pruned ones count)."""
    seed: int = 0
    """Seed of the sampler (worker k uses seed + k)."""
    pruner: PrunerSpec = field(default_factory=PrunerSpec)
    """Early stopping of unpromising trials."""

    def __post_init__(self) -> None:
        _check(bool(self.params), "params", "a search needs at least one parameter")
        _check(self.n_trials >= 1, "n_trials", f"{self.n_trials} must be >= 1")


@dataclass
class SweepSpec:
    name: str = ""
    """Sweep name: the Optuna study and the MLflow experiment; defaults to the file name."""
    description: str = ""
    """What the sweep asks, in a sentence (shown by --dry-run and in reports); a ``cpu`` block that asks
    a different question states its own."""
    paper: str = ""
    """What the paper reports for this question (table, rows, numbers): what the full profile is meant
    to reproduce. Shown in reports and in the README's table of shipped sweeps."""
    base: str = "small"
    """A preset name or config path every cell starts from."""
    fixed: dict[str, Any] = field(default_factory=dict)
    """Dotted overrides applied to every cell, the baseline included."""
    axes: dict[str, list[Any]] = field(default_factory=dict)
    """Dotted keys and the values they take."""
    design: Design = Design.grid
    """How axes combine: ``grid`` or ``ofat``."""
    variants: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    """Named overlays of dotted overrides; a variant set to null is removed (e.g. by the cpu block)."""
    baseline: bool = True
    """Add the plain-attention baseline (model.mta = null), with the same budget and seeds."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Seeds of every cell (weights, dropout and data order)."""
    metric: MetricSpec = field(default_factory=MetricSpec)
    """What decides: logged at the end of every run."""
    budget: BudgetSpec = field(default_factory=lambda: BudgetSpec(steps=1000))
    """Training length of every run."""
    search: SearchSpec | None = None
    """TPE search instead of axes and variants."""
    cpu: dict[str, Any] | None = None
    """Changes to this sweep on a machine without a GPU (the ``cpu`` profile)."""

    def __post_init__(self) -> None:
        _check(bool(self.seeds), "seeds", "the seed list is empty; give at least one seed, e.g. [0, 1, 2]")
        _check(len(set(self.seeds)) == len(self.seeds), "seeds", f"{self.seeds} has repeated seeds")
        _check(
            all(isinstance(s, int) and 0 <= s < 2**32 for s in self.seeds),
            "seeds",
            f"{self.seeds}: seeds must be integers in 0..4294967295",
        )
        empty = [key for key, values in self.axes.items() if not values]
        _check(not empty, "axes", f"{empty} have no values; give each axis a non-empty list")
        for key, values in self.axes.items():
            _check(len(values) == len({repr(v) for v in values}), f"axes.{key}", f"{values} repeats a value")
        _check(not (self.axes and self.variants), "variants", "give axes or variants, not both")
        if self.search is not None:
            _check(
                not (self.axes or self.variants),
                "search",
                "a search samples its own cells; remove axes and variants",
            )
        else:
            has_cells = bool(self.axes) or any(v is not None for v in self.variants.values()) or self.baseline
            _check(has_cells, "axes", "the sweep has no cells: give axes, variants or a search")
