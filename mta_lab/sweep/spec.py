"""Loading a sweep file, choosing its profile, and expanding it into cells with validated configs."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mta_lab.config import ConfigError, RunConfig, config_hash, load_config
from mta_lab.config.loading import bundled_names, describe_merge_error, failing_node, find_yaml, read_yaml
from mta_lab.config.model import ConfigFieldError
from mta_lab.config.sweep import BudgetSpec, Compute, Design, SweepSpec, rung_budget
from mta_lab.config.train import BUDGET_KINDS


class Profile(str, Enum):
    auto = "auto"
    """``cpu`` on a machine without a GPU, else ``full``."""
    full = "full"
    """The file's sweep and budget."""
    cpu = "cpu"
    """The file's ``cpu`` block applied: a tiny model and a short budget, minutes on 2 cores."""


# Applied when a sweep file has no cpu block of its own.
DEFAULT_CPU = {"base": "tiny", "budget": {"steps": 100}}


def resolve_profile(profile: Profile) -> Profile:
    if profile != Profile.auto:
        return profile
    import torch

    return Profile.full if torch.cuda.is_available() else Profile.cpu


def sweep_names() -> list[str]:
    return bundled_names("sweeps")


@dataclass
class Sweep:
    spec: SweepSpec
    path: Path
    profile: Profile
    """``full`` or ``cpu`` (resolved)."""

    @property
    def study_name(self) -> str:
        """The Optuna study; the profiles of one sweep are different studies."""
        return self.spec.name if self.profile == Profile.full else f"{self.spec.name}-cpu"

    @property
    def source(self) -> str:
        return str(self.path)

    @property
    def where(self) -> str:
        """The file and, for the cpu profile, which profile: where an error is."""
        return f"{self.path}{' (cpu profile)' if self.profile == Profile.cpu else ''}"


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
"""A sweep's name becomes an MLflow experiment, an Optuna study, a directory and part of queries."""


def load_sweep(name_or_path: str, profile: Profile = Profile.auto) -> Sweep:
    """The validated sweep of a bundled name or a YAML path, with the profile's changes applied.
    Both profiles are validated, whichever is asked for: a mistake in the full profile must not wait
    for a GPU cluster to be found."""
    path, source = find_yaml(name_or_path, "sweeps")
    raw = read_yaml(path, source, "sweep keys")
    if not raw:
        raise ConfigError(
            f"{source}: the sweep file is empty; give at least base and axes, variants or a search"
        )
    resolved = resolve_profile(profile)
    specs = {each: _profile_spec(raw, each, source, path) for each in (Profile.full, Profile.cpu)}
    return Sweep(specs[resolved], path, resolved)


def _profile_spec(raw: DictConfig, profile: Profile, source: str, path: Path) -> SweepSpec:
    raw = _whole_budget(raw)
    where = source
    if profile == Profile.cpu:
        cpu = raw.get("cpu")
        delta = _whole_budget(OmegaConf.create(DEFAULT_CPU) if cpu is None else cpu)
        raw = OmegaConf.merge({k: v for k, v in raw.items() if k != "cpu"}, delta)
        where = f"{source} (cpu profile)"
    try:
        merged = OmegaConf.merge(OmegaConf.structured(SweepSpec), raw)
        spec = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise ConfigError(f"{where}: {describe_merge_error(error)}") from None
    except ConfigFieldError as error:
        node = failing_node(merged)
        key = f"{node}.{error.field}" if node else error.field
        raise ConfigError(f"{where}: {key}: {error.message}") from None
    if not spec.name:
        spec = dataclasses.replace(spec, name=path.stem)
    if not NAME.fullmatch(spec.name):
        given = "name" if raw.get("name") else f"name (from the file name {path.name})"
        raise ConfigError(
            f"{source}: {given}: '{spec.name}' cannot name a sweep (allowed: up to 100 letters, digits, "
            "'_', '-' and '.', starting with a letter or digit); set name: in the file"
        )
    return spec


def _whole_budget(node: DictConfig) -> DictConfig:
    """A budget replaces the one it is merged onto: ``{tokens: N}`` means steps null (and flops and
    seconds), not the default steps as well; the same for a pretraining run's budget."""
    budget = node.get("budget")
    if isinstance(budget, DictConfig):
        node = OmegaConf.merge(node, {"budget": {kind: budget.get(kind) for kind in BUDGET_KINDS}})
    pretrain = node.get("pretrain")
    if isinstance(pretrain, DictConfig) and isinstance(pretrain.get("budget"), DictConfig):
        budget = pretrain.get("budget")
        node = OmegaConf.merge(
            node, {"pretrain": {"budget": {kind: budget.get(kind) for kind in BUDGET_KINDS}}}
        )
    return node


@dataclass(frozen=True)
class Cell:
    """One configuration of a sweep, with one seed: one training run."""

    label: str
    """What differs from the base, e.g. "query_kernel=4 key_kernel=9" or "baseline"."""
    seed: int
    role: str
    """``baseline`` or ``variant``."""
    axis: str
    """The varied keys (axes), ``variants``, ``search`` or ``baseline``."""
    overrides: tuple[str, ...]
    """Everything applied on top of the base, in order."""
    config: RunConfig
    config_hash: str

    @property
    def run_name(self) -> str:
        return f"{self.label} · seed {self.seed}"


def expand(sweep: Sweep, init_from: Path | None = None) -> list[Cell]:
    """Every cell of an ablation (not a search), each config built and validated now; with
    ``init_from`` (a sweep's pretrained weights) every cell starts from those weights."""
    spec = sweep.spec
    start = [f"train.init_from={init_from}"] if init_from is not None else []
    groups: list[tuple[str, str, str, list[str]]] = []  # label, role, axis, overrides
    if spec.baseline:
        groups.append(("baseline", "baseline", "baseline", ["model.mta=null"]))
    if spec.axes:
        keys = list(spec.axes)
        axis = ",".join(keys)
        for assignment, shown in _assignments(sweep):
            label = " ".join(f"{_short(keys, key)}={_show(value)}" for key, value in shown.items())
            if spec.design == Design.ofat and not assignment:
                label += " (base)"
            overrides = [f"{key}={_value(value)}" for key, value in assignment.items()]
            groups.append(
                (label, "variant", axis if spec.design == Design.grid else ",".join(assignment), overrides)
            )
    for name, overlay in spec.variants.items():
        if overlay is not None:
            groups.append((name, "variant", "variants", [f"{k}={_value(v)}" for k, v in overlay.items()]))
    if not spec.axes and not any(v is not None for v in spec.variants.values()) and spec.search is None:
        groups.append(("base", "variant", "base", []))
    if spec.design == Design.scaling:
        return [
            cell(sweep, f"{label}{RUNG}{name}", seed, role, "scaling", [*start, *overrides, *changes], budget)
            for name, changes, budget in _rungs(sweep)
            for label, role, _, overrides in groups
            for seed in spec.seeds
        ]
    budget = matched_budget(sweep) if spec.compute == Compute.matched else spec.budget
    return [
        cell(sweep, label, seed, role, axis, [*start, *overrides], budget)
        for label, role, axis, overrides in groups
        for seed in spec.seeds
    ]


def pretrain_cell(sweep: Sweep) -> Cell:
    """The run a sweep with ``pretrain`` trains first: its base and fixed overrides, plain attention."""
    pretrain = sweep.spec.pretrain
    changes = ["model.mta=null", *(f"{key}={_value(value)}" for key, value in pretrain.fixed.items())]
    return cell(sweep, "pretrain", pretrain.seed, "pretrain", "pretrain", changes, pretrain.budget)


RUNG = " @ "
"""Between a scaling cell's variant and its rung in its label: ``mta @ steps=400``."""


def split_rung(label: str) -> tuple[str, str]:
    """A scaling cell's (variant, rung) from its label; ("label", "") for other cells."""
    variant, _, rung = label.partition(RUNG)
    return variant, rung


def _rungs(sweep: Sweep) -> list[tuple[str, list[str], BudgetSpec | None]]:
    """Each ladder rung's name, overrides and budget (None: the sweep's)."""
    rungs = []
    for index, rung in enumerate(sweep.spec.ladder):
        changes = {key: value for key, value in rung.items() if key != "budget"}
        try:
            budget = rung_budget(rung, f"ladder[{index}]")
        except ConfigFieldError as error:
            raise ConfigError(f"{sweep.where}: {error}") from None
        keys = list(changes)
        parts = [f"{_short(keys, key)}={_show(value)}" for key, value in changes.items()]
        if budget is not None:
            parts.append(f"{budget.kind}={_show(getattr(budget, budget.kind))}")
        rungs.append((" ".join(parts), [f"{k}={_value(v)}" for k, v in changes.items()], budget))
    return rungs


def matched_budget(sweep: Sweep) -> BudgetSpec:
    """``compute: matched``: the FLOPs the baseline spends on the sweep's budget, for every cell."""
    # FLOP counts come from the model library, which loads torch: only compute-matched sweeps pay for
    # it when a sweep file is read.
    from mta_lab.train.budget import resolve_budget

    spec = sweep.spec
    baseline = cell(sweep, "baseline", spec.seeds[0], "baseline", "baseline", ["model.mta=null"])
    return BudgetSpec(flops=resolve_budget(baseline.config).flops)


def search_cell(sweep: Sweep, params: dict[str, Any], seed: int) -> Cell:
    """The cell of a search trial's sampled parameters."""
    keys = list(params)
    label = " ".join(f"{_short(keys, key)}={_show(value)}" for key, value in params.items())
    return cell(sweep, label, seed, "variant", "search", [f"{k}={_value(v)}" for k, v in params.items()])


def cell(
    sweep: Sweep,
    label: str,
    seed: int,
    role: str,
    axis: str,
    overrides: list[str],
    budget: BudgetSpec | None = None,
) -> Cell:
    """A validated cell: base <- fixed <- the cell's overrides <- budget (the sweep's unless given)
    <- seed."""
    spec = sweep.spec
    fixed = [f"{key}={_value(value)}" for key, value in spec.fixed.items()]
    seeding = [f"train.seed={seed}", f"data.seed={seed}"]
    tracking = [f"tracking.experiment={spec.name}"]
    everything = (*fixed, *overrides, *(budget or spec.budget).overrides(), *seeding, *tracking)
    try:
        config = load_config(spec.base, everything)
    except ConfigError as error:
        raise ConfigError(f"{sweep.where}: cell '{label} · seed {seed}': {error}") from None
    return Cell(label, seed, role, axis, tuple(everything), config, config_hash(config))


def check_metric(sweep: Sweep, cells: list[Cell]) -> None:
    """Every cell must log the sweep's metric (the baseline too), or the sweep would train for nothing."""
    name = sweep.spec.metric.name
    for cell in cells:
        logged = cell.config.logged_metrics()
        if name not in logged:
            # A task's per-cell metrics (a NIAH run logs dozens) are named by family: niah/acc/...
            families = {
                n
                if n.startswith(("train/", "sys/", "val/")) or n.count("/") < 2
                else n.rsplit("/", n.count("/") - 1)[0] + "/..."
                for n in logged
            }
            raise ConfigError(
                f"{sweep.where}: metric.name: '{name}' is not logged by cell '{cell.label}' "
                f"(allowed: {', '.join(sorted(families))})"
            )


def _assignments(sweep: Sweep) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Each cell's (overridden axis values, every axis's value): the label names all axes, so that a
    one-factor-at-a-time cell says where the other factors stand."""
    axes = sweep.spec.axes
    if sweep.spec.design == Design.grid:
        grid = [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]
        return [(assignment, assignment) for assignment in grid]
    base = OmegaConf.structured(
        load_config(sweep.spec.base, [f"{k}={_value(v)}" for k, v in sweep.spec.fixed.items()])
    )
    current = {}
    for key in axes:
        value = OmegaConf.select(base, key)
        current[key] = value.value if isinstance(value, Enum) else value
    changes = [{key: value} for key, values in axes.items() for value in values if value != current[key]]
    return [({}, current), *((change, current | change) for change in changes)]


def _short(keys: list[str], key: str) -> str:
    """The shortest dotted suffix of ``key`` that no other key shares."""
    parts = key.split(".")
    for n in range(1, len(parts) + 1):
        suffix = ".".join(parts[-n:])
        if all(not other.endswith(suffix) for other in keys if other != key):
            return suffix
    return key


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value) if isinstance(value, dict | list) else str(value)


def _value(value: Any) -> str:
    """A value as the right-hand side of a dotted override."""
    if value is None:
        return "null"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)
