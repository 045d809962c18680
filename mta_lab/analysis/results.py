"""A sweep's runs as a Polars frame: one row per MLflow child run.

Columns: identity (``run_id``, ``run_name``, ``status``, ``variant``, ``role``, ``axis``, ``seed``,
``config_hash``, ``trial``); the config params that differ between runs (dotted names); the final value
of every metric (named as logged, e.g. ``val/loss``); ``best <metric>`` of the sweep's metric; and
cost: ``tokens_per_s`` (median over the run), ``peak_memory_mb``, ``wall_time_s``, ``parameters``.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import polars as pl
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from mta_lab.config import ConfigError
from mta_lab.config.sweep import Goal
from mta_lab.infra.tracking import resolve_tracking_uri
from mta_lab.secrets import mask
from mta_lab.sweep.spec import Profile, Sweep, load_sweep
from mta_lab.sweep.tracking import child_runs, client_for, find_parent

IDENTITY = [
    "run_id",
    "run_name",
    "status",
    "error",
    "variant",
    "role",
    "axis",
    "seed",
    "config_hash",
    "trial",
]
COST = ["tokens_per_s", "peak_memory_mb", "wall_time_s", "parameters"]
# Params that identify the run rather than its configuration.
NOT_CONFIG = ("train.seed", "data.seed", "tracking.")


@dataclass
class SweepRuns:
    sweep: Sweep
    client: MlflowClient
    tracking_uri: str
    experiment_id: str
    parent: Run
    runs: list[Run]


def sweep_runs(
    name_or_path: str, profile: Profile = Profile.auto, tracking_uri: str | None = None
) -> SweepRuns:
    """The sweep's parent run and child runs; a ConfigError says what is missing."""
    sweep = load_sweep(name_or_path, profile)
    uri = resolve_tracking_uri(tracking_uri)
    client = client_for(uri)
    experiment = client.get_experiment_by_name(sweep.spec.name)
    parent = find_parent(client, experiment.experiment_id, sweep.study_name) if experiment else None
    if parent is None:
        raise ConfigError(
            f"no runs of sweep '{sweep.spec.name}' ({sweep.profile.value} profile) in {uri}: run "
            f"`mta-lab sweep {name_or_path}` first, or give the store with --tracking-uri"
        )
    runs = child_runs(client, experiment.experiment_id, parent.info.run_id)
    return SweepRuns(sweep, client, uri, experiment.experiment_id, parent, runs)


def results_frame(data: SweepRuns, metric: str | None = None) -> pl.DataFrame:
    """One row per run (see the module docstring), ordered by variant and seed."""
    metric = metric or data.sweep.spec.metric.name
    goal = data.sweep.spec.metric.goal
    varying = _varying_params(data.runs)
    rows = []
    for run in data.runs:
        tags, metrics = run.data.tags, run.data.metrics
        row = {
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "status": run.info.status,
            "error": mask(tags.get("mta.error") or tags.get("mta.stopped") or ""),
            "variant": tags.get("mta.variant", run.info.run_name),
            "role": tags.get("mta.role", "variant"),
            "axis": tags.get("mta.axis", ""),
            "seed": int(tags.get("mta.seed", -1)),
            "config_hash": tags.get("mta.config_hash", ""),
            "trial": int(tags["optuna.trial"]) if tags.get("optuna.trial", "").isdigit() else None,
        }
        row |= {key: run.data.params.get(key) for key in varying}
        row |= dict(metrics)
        row[f"best {metric}"] = _best(data.client, run, metric, goal)
        row["tokens_per_s"] = _median_history(data.client, run, "train/tokens_per_s")
        row["peak_memory_mb"] = metrics.get("sys/peak_memory_mb")
        end = run.info.end_time or run.info.start_time
        # The run's own training time (resumes add no downtime); older runs: start to end.
        row["wall_time_s"] = metrics.get("sys/wall_time_s") or (
            (end - run.info.start_time) / 1000 if run.info.start_time else None
        )
        row["parameters"] = metrics.get("model/parameters")
        rows.append(row)
    if not rows:
        return pl.DataFrame(schema=dict.fromkeys(IDENTITY, pl.String))
    frame = pl.DataFrame(rows, infer_schema_length=None)
    for key in varying:  # params are text in MLflow; numeric axes should sort and plot as numbers
        numbers = frame[key].cast(pl.Float64, strict=False)
        if numbers.null_count() == frame[key].null_count():
            frame = frame.with_columns(numbers.alias(key))
    leading = [c for c in IDENTITY if c in frame.columns] + varying
    metric_columns = sorted(c for c in frame.columns if c not in leading and c not in COST)
    return frame.select(leading + metric_columns + COST).sort(
        ["role", "variant", "seed"], descending=[False, False, False]
    )


def histories(data: SweepRuns, metrics: list[str]) -> pl.DataFrame:
    """Long frame (run_id, variant, seed, metric, step, value) of the given metrics' histories."""
    rows = []
    for run in data.runs:
        for metric in metrics:
            for point in data.client.get_metric_history(run.info.run_id, metric):
                rows.append(
                    {
                        "run_id": run.info.run_id,
                        "variant": run.data.tags.get("mta.variant", run.info.run_name),
                        "seed": int(run.data.tags.get("mta.seed", -1)),
                        "metric": metric,
                        "step": point.step,
                        "value": point.value,
                    }
                )
    schema = {
        "run_id": pl.String,
        "variant": pl.String,
        "seed": pl.Int64,
        "metric": pl.String,
        "step": pl.Int64,
        "value": pl.Float64,
    }
    return pl.DataFrame(rows, schema=schema)


def _varying_params(runs: list[Run]) -> list[str]:
    """Config keys whose value differs between the variants' runs (the baseline differs everywhere
    MTA is configured, which says nothing about what the sweep varies)."""
    variants = [run for run in runs if run.data.tags.get("mta.role") != "baseline"]
    compared = variants if len(variants) >= 2 else runs
    keys = sorted({key for run in compared for key in run.data.params})
    keys = [key for key in keys if not key.startswith(NOT_CONFIG)]
    return [key for key in keys if len({run.data.params.get(key) for run in compared}) > 1]


def _best(client: MlflowClient, run: Run, metric: str, goal: Goal) -> float | None:
    values = [point.value for point in client.get_metric_history(run.info.run_id, metric)]
    if not values:
        return None
    return min(values) if goal == Goal.minimize else max(values)


def _median_history(client: MlflowClient, run: Run, metric: str) -> float | None:
    values = [point.value for point in client.get_metric_history(run.info.run_id, metric)]
    return statistics.median(values) if values else None
