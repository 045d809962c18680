"""What a sweep's trial records about its cell, in one typed shape.

Optuna keeps a trial's user attributes as a free dict; every key a sweep stores there is a field of
:class:`TrialRecord`, and code reads and writes them only through it (``TrialRecord.of(trial)``,
``record_on(trial, ...)``). Where the rest of a sweep's state lives (study attributes, MLflow tags, run
directories) is in docs/how-a-sweep-runs.md.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass
from typing import Any

import psutil
from optuna.trial import BaseTrial, FrozenTrial

from mta_lab.config import resolved_yaml
from mta_lab.infra import slurm
from mta_lab.sweep.spec import Cell


@dataclass(frozen=True)
class WorkerId:
    """The process that took a trial: its host, pid and start time (a pid is reused; the pair is not)."""

    host: str
    pid: int
    started: float | None = None
    """psutil's create_time of the process; None in records of older versions, which had only the pid."""
    slurm_job: str | None = None
    """The Slurm job the worker ran in (``JOB_TASK`` in an array); None outside Slurm."""
    slurm_restarts: int = 0
    """How often that job had been requeued when the worker started (``SLURM_RESTART_COUNT``)."""

    @classmethod
    def here(cls) -> WorkerId:
        return cls(socket.gethostname(), os.getpid(), psutil.Process().create_time(), *slurm.this_job_run())

    @property
    def on_this_machine(self) -> bool:
        return self.host == socket.gethostname()

    def alive(self) -> bool:
        """Whether the process still runs. Another machine's worker counts as alive (its storage's
        heartbeat, if any, decides) unless it ran in a Slurm job that Slurm says has ended, or that
        has been requeued since (the job runs again, but with a new worker)."""
        if self.slurm_job is not None:
            if slurm.job_running(self.slurm_job) is False:
                return False
            job, restarts = slurm.this_job_run()
            if job == self.slurm_job and restarts > self.slurm_restarts:
                return False
        if not self.on_this_machine:
            return True
        try:
            started = psutil.Process(self.pid).create_time()
        except psutil.NoSuchProcess:
            return False
        except psutil.AccessDenied:
            return True  # another user's process: not ours to judge
        return self.started is None or abs(started - self.started) < 0.01


@dataclass(frozen=True)
class TrialRecord:
    """A trial's user attributes. The first six say which cell it trains and are written when the
    cell is queued (a search trial writes them once it has sampled its point); the rest, by the worker."""

    cell: str | None = None
    """The cell's config hash; None while a search trial has not sampled its point."""
    label: str | None = None
    """The variant's name, e.g. ``query_kernel=4 key_kernel=3``."""
    seed: int | None = None
    role: str | None = None
    """``baseline`` or ``variant``."""
    axis: str | None = None
    """The axes (or ``variants``, ``search``) the cell belongs to."""
    config: str | None = None
    """The cell's resolved config YAML: workers on other machines need no sweep file."""
    worker: WorkerId | None = None
    mlflow_run_id: str | None = None
    error: str | None = None
    """Why the trial failed or stopped, masked; what ``status`` and the launcher show."""
    pruned_at: int | None = None
    """The step at which the pruner stopped it."""
    duplicate_of: int | None = None
    """The trial that already trains or trained this cell."""

    @classmethod
    def of(cls, trial: FrozenTrial | BaseTrial) -> TrialRecord:
        attrs = dict(trial.user_attrs)
        worker = attrs.pop("worker", None)
        return cls(
            **{key: value for key, value in attrs.items() if key in FIELDS},
            worker=WorkerId(**worker) if worker else None,
        )

    @staticmethod
    def queued_for(cell: Cell) -> TrialRecord:
        """What a trial of ``cell`` records before a worker takes it."""
        return TrialRecord(
            cell.config_hash, cell.label, cell.seed, cell.role, cell.axis, resolved_yaml(cell.config)
        )

    @property
    def name(self) -> str:
        """How reports and progress name the cell: ``label · seed N``."""
        return f"{self.label} · seed {self.seed}"

    def queued(self) -> dict[str, Any]:
        """The attributes that say which cell a trial trains: what a requeued trial carries over."""
        return {key: getattr(self, key) for key in QUEUED}

    def training(self) -> bool:
        """Whether the trial's worker still trains its cell: alive (true for other machines' workers
        and untaken trials), and it has not recorded why it stopped."""
        return self.error is None and (self.worker is None or self.worker.alive())


QUEUED = ("cell", "label", "seed", "role", "axis", "config")
FIELDS = frozenset(field.name for field in dataclasses.fields(TrialRecord))


def record_on(trial: BaseTrial, **fields: Any) -> None:
    """Store fields of :class:`TrialRecord` in the trial; an unknown name is a bug, refused here."""
    for key, value in fields.items():
        if key not in FIELDS:
            raise KeyError(f"{key} is not a field of TrialRecord")
        trial.set_user_attr(key, dataclasses.asdict(value) if isinstance(value, WorkerId) else value)
