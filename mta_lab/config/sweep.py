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

from mta_lab.config.model import ConfigFieldError, _check
from mta_lab.config.train import BUDGET_KINDS


class Design(str, Enum):
    grid = "grid"
    """Every combination of the axes' values."""
    ofat = "ofat"
    """One factor at a time: the base, then each axis value with the other axes at the base."""
    scaling = "scaling"
    """Every cell (the baseline, each variant) on every rung of the ``ladder`` of budgets or model
    sizes: a curve of the metric against compute per variant, and the compute multiplier."""


class Compute(str, Enum):
    """What a sweep holds equal between its cells."""

    given = "given"
    """The budget as given: equal steps or tokens (or FLOPs, or seconds, if the budget is one)."""
    matched = "matched"
    """Equal FLOPs: every cell gets the FLOPs the baseline spends on the budget, so a cheaper cell
    trains on more tokens and a costlier one on fewer."""


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
    """Training length of every run of the sweep (exactly one of the four); it replaces the base's
    train.steps / tokens / flops / seconds."""

    steps: int | None = None
    """Optimizer steps per run."""
    tokens: int | None = None
    """Training tokens per run."""
    flops: float | None = None
    """Training FLOPs per run (forward + backward, analytic)."""
    seconds: float | None = None
    """Seconds of training per run on its device (evaluation excluded)."""

    def __post_init__(self) -> None:
        given = [name for name in BUDGET_KINDS if getattr(self, name) is not None]
        _check(
            len(given) == 1,
            given[-1] if given else "steps",
            f"give exactly one of budget.steps, tokens, flops or seconds (given: {', '.join(given) or 'none'})",
        )
        for name in ("steps", "tokens"):
            value = getattr(self, name)
            _check(value is None or value >= 1, name, f"{value} is not a budget; use an integer >= 1")
        for name in ("flops", "seconds"):
            value = getattr(self, name)
            _check(value is None or value > 0, name, f"{value} is not a budget; use a number > 0")

    @property
    def kind(self) -> str:
        return next(name for name in BUDGET_KINDS if getattr(self, name) is not None)

    def overrides(self) -> list[str]:
        return [f"train.{name}={_null(getattr(self, name))}" for name in BUDGET_KINDS]


def rung_budget(rung: dict[str, Any], where: str) -> BudgetSpec | None:
    """A ladder rung's budget, if it has one, validated."""
    if "budget" not in rung:
        return None
    given = rung["budget"]
    unknown = set(given) - set(BUDGET_KINDS) if isinstance(given, dict) else {"?"}
    _check(not unknown, f"{where}.budget", f"allowed: one of {', '.join(BUDGET_KINDS)}, e.g. {{steps: 400}}")
    try:
        return BudgetSpec(**given)
    except ConfigFieldError as error:
        raise ConfigFieldError(f"{where}.budget.{error.field}", error.message) from None


def _null(value: float | None) -> str:
    return "null" if value is None else str(value)


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
class PretrainSpec:
    """A model trained once, before the cells, that every cell then continues (``train.init_from``):
    the paper's continual-training protocol (Table 10) without a checkpoint from elsewhere. It is the
    sweep's base with the sweep's ``fixed`` overrides and plain attention; MTA stages the cells add
    start at identity."""

    budget: BudgetSpec = field(default_factory=lambda: BudgetSpec(steps=1000))
    """How long the pretraining run trains."""
    fixed: dict[str, Any] = field(default_factory=dict)
    """Overrides of the pretraining run only (e.g. a learning rate)."""
    seed: int = 0
    """Its seed: one starting point for every cell and seed."""


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
    """How axes combine: ``grid`` or ``ofat``; ``scaling`` runs the variants on the ``ladder``."""
    ladder: list[dict[str, Any]] = field(default_factory=list)
    """The rungs of a scaling design (at least 3), each a change to every cell: dotted overrides
    (``{model.dim: 96}``) and/or a budget (``{budget: {steps: 400}}``) that replaces the sweep's."""
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
    compute: Compute = Compute.given
    """``given`` (the budget as given to every cell) or ``matched`` (every cell gets the baseline's FLOPs
    on the budget: comparisons at equal compute)."""
    search: SearchSpec | None = None
    """TPE search instead of axes and variants."""
    pretrain: PretrainSpec | None = None
    """Train a plain-attention model first, once, and start every cell from it; null: cells start from
    their own init (or their base's ``train.init_from``)."""
    cpu: dict[str, Any] | None = None
    """Changes to this sweep on a machine without a GPU (the ``cpu`` profile)."""

    @property
    def held_equal(self) -> str:
        """What the sweep's comparisons hold equal: ``equal tokens`` (a budget in steps or tokens; steps
        are equal tokens while the cells share batch and sequence length), ``equal FLOPs`` or
        ``equal time``."""
        if self.compute == Compute.matched or self.budget.kind == "flops":
            return "equal FLOPs"
        return "equal time" if self.budget.kind == "seconds" else "equal tokens"

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
        if self.design == Design.scaling:
            _check(
                len(self.ladder) >= 3,
                "ladder",
                f"a scaling design needs a ladder of at least 3 rungs (budgets or model sizes), got "
                f"{len(self.ladder)}",
            )
            _check(
                self.search is None and not self.axes,
                "design",
                "scaling takes variants, not axes or a search",
            )
            _check(
                self.compute == Compute.given,
                "compute",
                "scaling compares across its own ladder; use compute: given",
            )
            for index, rung in enumerate(self.ladder):
                _check(bool(rung), f"ladder[{index}]", "an empty rung; give overrides or a budget")
                if "budget" in rung:
                    rung_budget(rung, f"ladder[{index}]")
        else:
            _check(not self.ladder, "ladder", "a ladder needs design: scaling")
        if self.compute == Compute.matched:
            _check(
                self.baseline and self.search is None,
                "compute",
                "matched gives every cell the baseline's FLOPs; it needs the baseline (baseline: true) "
                "and fixed cells (not a search)",
            )
            _check(
                self.budget.kind in ("steps", "tokens"),
                "compute",
                f"matched turns the baseline's steps or tokens into FLOPs; with budget.{self.budget.kind} "
                "every cell already has the same budget (use compute: given)",
            )
