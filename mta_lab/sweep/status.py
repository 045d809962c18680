"""``mta-lab status``: every cell's state (done, running, failed, pending), its metric, and the best."""

from __future__ import annotations

from collections import Counter

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.table import Table

from mta_lab.config.sweep import Goal
from mta_lab.sweep.records import TrialRecord
from mta_lab.sweep.spec import Cell, Sweep

# The state that describes a cell when it has several trials (a failure, then a retry).
PRIORITY = {
    TrialState.COMPLETE: 0,
    TrialState.RUNNING: 1,
    TrialState.WAITING: 2,
    TrialState.FAIL: 3,
    TrialState.PRUNED: 4,
}
WORDS = {
    TrialState.COMPLETE: "done",
    TrialState.RUNNING: "running",
    TrialState.WAITING: "queued",
    TrialState.FAIL: "failed",
    TrialState.PRUNED: "pruned",
}


def cell_states(study: optuna.Study) -> dict[str, FrozenTrial]:
    """The deciding trial of each cell (by config hash)."""
    best: dict[str, FrozenTrial] = {}
    for trial in study.get_trials(deepcopy=False):
        record = TrialRecord.of(trial)
        cell = record.cell
        if cell is None or record.duplicate_of is not None:
            continue
        if cell not in best or PRIORITY[trial.state] < PRIORITY[best[cell].state]:
            best[cell] = trial
    return best


def status_table(study: optuna.Study, sweep: Sweep, cells: list[Cell] | None = None) -> Table:
    metric, goal = sweep.spec.metric.name, sweep.spec.metric.goal
    states = cell_states(study)
    rows: list[tuple[str, str, str, str, str, str]] = []
    if cells is not None:  # every cell of the sweep, also those never enqueued
        for cell in cells:
            trial = states.get(cell.config_hash)
            rows.append(_row(cell.label, cell.seed, trial))
    else:
        for trial in sorted(states.values(), key=lambda t: t.number):
            record = TrialRecord.of(trial)
            rows.append(_row(record.label, record.seed, trial))
    counts = Counter(row[2] for row in rows)
    done = [t for t in states.values() if t.state == TrialState.COMPLETE]
    best = ""
    if done:
        pick = min if goal == Goal.minimize else max
        top = pick(done, key=lambda t: t.value)
        best = f"; best {metric} = {top.value:.4g} ({TrialRecord.of(top).name})"
    summary = ", ".join(
        f"{counts[word]} {word}"
        for word in ("done", "running", "queued", "failed", "pruned", "pending")
        if counts[word]
    )
    jobs = {number: _slurm_job(trial) for number, trial in _by_number(states).items()}
    in_slurm = any(jobs.values())
    table = Table(
        "cell",
        "seed",
        "state",
        metric,
        "trial",
        "MLflow run",
        *(["Slurm job"] if in_slurm else []),
        box=None,
        title=f"{sweep.study_name}: {len(rows)} cells: {summary}{best}",
        title_justify="left",
    )
    for row in rows:
        job = jobs.get(int(row[4]), "") if row[4] else ""
        table.add_row(*row, *([job] if in_slurm else []))
    return table


def _by_number(states: dict[str, FrozenTrial]) -> dict[int, FrozenTrial]:
    return {trial.number: trial for trial in states.values()}


def _slurm_job(trial: FrozenTrial) -> str:
    """The Slurm job that trains or trained the trial's cell; empty outside Slurm and while queued."""
    worker = TrialRecord.of(trial).worker
    if worker is None or worker.slurm_job is None or trial.state == TrialState.WAITING:
        return ""
    return worker.slurm_job


def _row(label: str, seed: int, trial: FrozenTrial | None) -> tuple[str, str, str, str, str, str]:
    if trial is None:
        return label, str(seed), "pending", "", "", ""
    if trial.state == TrialState.COMPLETE:
        value = f"{trial.value:.4g}"
    elif trial.state in (TrialState.FAIL, TrialState.PRUNED):
        value = (TrialRecord.of(trial).error or "")[:60]
    else:  # queued again or running: an earlier attempt's reason no longer holds
        value = ""

    return (
        label,
        str(seed),
        WORDS[trial.state],
        value,
        str(trial.number),
        TrialRecord.of(trial).mlflow_run_id or "",
    )
