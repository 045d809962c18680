"""What a running sweep shows: a line per finished cell, a bar of finished cells, and one bar per cell
training on this machine (its step of the total or its seconds of a time budget, its latest training loss and the time left), read
from the progress file its worker follows. Cells that workers on other machines train count in the
overall bar only."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from mta_lab.config import ConfigError, load_config
from mta_lab.sweep.child import PROGRESS_FILE
from mta_lab.sweep.records import TrialRecord
from mta_lab.sweep.spec import Sweep
from mta_lab.train.budget import Budget, resolve_budget

FINISHED = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
TAIL_BYTES = 4096
"""Enough of a progress file's end to hold its last few records."""


class SweepProgress:
    def __init__(self, study: optuna.Study, sweep: Sweep, sweep_dir: Path, total: int, console: Console):
        self.study, self.sweep, self.sweep_dir = study, sweep, sweep_dir
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[loss]}"),
            TimeElapsedColumn(),
            TextColumn("left"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.bar = self.progress.add_task(sweep.spec.name, total=total, loss="")
        self.cells: dict[int, int] = {}  # trial number -> its bar
        self.totals: dict[int, Budget | None] = {}  # trial number -> its budget
        self.reported: set[int] = set()

    def __enter__(self) -> SweepProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def update(self) -> None:
        trials = [(trial, TrialRecord.of(trial)) for trial in self.study.get_trials(deepcopy=False)]
        for trial, record in trials:
            if trial.state in FINISHED and trial.number not in self.reported and record.cell is not None:
                self.reported.add(trial.number)
                self._say(trial, record)
        self._cells(
            {t.number: (t, r) for t, r in trials if t.state == TrialState.RUNNING and r.cell is not None}
        )
        done = {r.cell for t, r in trials if t.state in FINISHED and r.cell is not None}
        total = self.progress.tasks[self.bar].total or 0
        self.progress.update(self.bar, completed=min(len(done), total))

    def _say(self, trial: FrozenTrial, record: TrialRecord) -> None:
        name = record.name
        metric = self.sweep.spec.metric.name
        if trial.state == TrialState.COMPLETE:
            self.progress.console.print(
                f"  [green]done[/green]   {name}: {metric} = {trial.value:.4g}", highlight=False
            )
        elif trial.state == TrialState.PRUNED:
            self.progress.console.print(f"  [yellow]pruned[/yellow] {name}", highlight=False)
        else:
            error = record.error or str(
                trial.system_attrs.get(
                    "fail_reason", "its worker stopped before it could say why (see its log)"
                )
            )
            self.progress.console.print(f"  [red]failed[/red] {name}: {error}", highlight=False)

    def _cells(self, running: dict[int, tuple[FrozenTrial, TrialRecord]]) -> None:
        """One bar per running cell whose progress file is on this machine."""
        for number in list(self.cells):
            if number not in running:
                self.progress.remove_task(self.cells.pop(number))
        for number, (_, record) in running.items():
            directory = self.sweep_dir / "cells" / record.cell
            step, loss, seconds = last_step(directory / PROGRESS_FILE)
            if number not in self.totals:
                self.totals[number] = cell_budget(directory / "config.yaml")
            budget = self.totals[number]
            if budget is None:
                continue  # trained elsewhere, or not started yet
            if number not in self.cells:
                total = budget.seconds if budget.steps is None else budget.steps
                self.cells[number] = self.progress.add_task(f"  {record.name}", total=total, loss="")
            self.progress.update(
                self.cells[number],
                completed=round(seconds) if budget.steps is None else step,  # a time budget: its seconds
                loss="" if loss is None else f"loss {loss:.3f}",
            )


def last_step(path: Path) -> tuple[int, float | None, float]:
    """The latest step, training loss and seconds of training a cell's progress file records (0, None
    and 0 before any)."""
    try:
        with path.open("rb") as stream:
            stream.seek(max(0, stream.seek(0, 2) - TAIL_BYTES))
            lines = stream.read().decode(errors="replace").splitlines()
    except OSError:
        return 0, None, 0.0
    step, loss, seconds = None, None, 0.0
    for line in reversed(lines):
        try:
            record = json.loads(line)
            step = int(record["step"]) if step is None else step
            loss = record["metrics"].get("train/loss")
            seconds = float(record["metrics"].get("train/seconds", 0.0))
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # the first line of the tail, cut, or a damaged one
        if loss is not None:
            break
    return step or 0, loss, seconds


def cell_budget(config_file: Path) -> Budget | None:
    """A cell's budget, from the resolved config its worker wrote (None until it exists here)."""
    try:
        config = load_config(str(config_file))
    except ConfigError:
        return None
    return resolve_budget(config)
