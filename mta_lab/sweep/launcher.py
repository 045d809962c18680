"""``mta-lab sweep``: plan a sweep, prepare its study and MLflow parent run, start the workers.

Everything that can be wrong with the sweep is found before anything starts: every cell's config
is built and validated, and every distinct data setup is loaded (which also fills the tokenized
corpus cache once, instead of in every worker). Then, in this order, so that workers never race to
create them: the MLflow experiment and parent run, the Optuna study, and the cells not done yet.
Running the same command again resumes: finished cells are skipped, unfinished and failed ones run.
"""

from __future__ import annotations

import fcntl
import functools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import optuna
from mlflow.exceptions import MlflowException
from omegaconf import OmegaConf
from optuna.trial import TrialState
from rich.console import Console
from rich.table import Table

from mta_lab.assembly.run_data import load_run_data
from mta_lab.config import ConfigError
from mta_lab.config.sweep import Compute, Design, Distribution, Goal
from mta_lab.infra.signals import stop_once
from mta_lab.infra.tracking import RunRecord, flat_params, resolve_tracking_uri, store_lock
from mta_lab.secrets import STORAGE_ENV, TRACKING_ENV, mask
from mta_lab.sweep.progress import SweepProgress
from mta_lab.sweep.records import TrialRecord
from mta_lab.sweep.slurm import (
    MAX_JOBS,
    SlurmOptions,
    SlurmWorkers,
    live_jobs,
    read_jobs,
    submit,
    tracking_server,
)
from mta_lab.sweep.spec import (
    Cell,
    Profile,
    Sweep,
    check_metric,
    expand,
    load_sweep,
    pretrain_cell,
    search_cell,
)
from mta_lab.sweep.status import status_table
from mta_lab.sweep.storage import default_storage, open_study
from mta_lab.sweep.tracking import child_runs, client_for, experiment_id, parent_run
from mta_lab.sweep.worker import recover_orphans
from mta_lab.train.budget import Budget, resolve_budget

optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass
class Slot:
    """Where one worker runs: its GPUs (empty on CPU), its CPU threads per training process, and on
    CPU how many processes train each cell."""

    gpus: tuple[int, ...]
    threads: int
    processes: int = 1

    @property
    def devices(self) -> int:
        """Processes that train each of the worker's cells together (DDP)."""
        return len(self.gpus) or self.processes

    def env(self) -> dict[str, str]:
        return {"CUDA_VISIBLE_DEVICES": ",".join(map(str, self.gpus)), "OMP_NUM_THREADS": str(self.threads)}

    def describe(self) -> str:
        if self.gpus:
            return f"GPU {','.join(map(str, self.gpus))}"
        processes = f"{self.processes} processes of " if self.processes > 1 else ""
        return f"CPU, {processes}{self.threads} threads"


CPU_WORKERS = 4
"""Default workers on a machine without a GPU: one per core, at most this many, so that a large machine
does not start dozens of training processes against one MLflow store unasked."""


def plan_slots(
    workers: int | None, gpus: list[int] | None, gpus_per_trial: int, processes_per_trial: int = 1
) -> list[Slot]:
    """One worker per group of ``gpus_per_trial`` GPUs; on a CPU machine ``workers`` (by default one
    per core, up to ``CPU_WORKERS``, fewer with several processes per trial) share the cores."""
    import torch

    cores = os.cpu_count() or 1
    if gpus is None and torch.cuda.is_available():
        gpus = list(range(torch.cuda.device_count()))
    if gpus:
        if len(gpus) % gpus_per_trial:
            raise ConfigError(
                f"--gpus-per-trial {gpus_per_trial} does not divide the {len(gpus)} GPUs {gpus}"
            )
        groups = [tuple(gpus[i : i + gpus_per_trial]) for i in range(0, len(gpus), gpus_per_trial)]
        groups = groups[:workers] if workers else groups
        return [Slot(group, max(1, cores // len(groups))) for group in groups]
    # Single-threaded workers side by side train small models faster than one worker on every core:
    # on 2 cores, two 1-thread processes trained the toy MTA model at 1.3x the steps per second of one
    # 2-thread process (and start their child processes in parallel).
    count = workers or max(1, min(cores, CPU_WORKERS) // processes_per_trial)
    return [
        Slot((), max(1, cores // (count * processes_per_trial)), processes_per_trial) for _ in range(count)
    ]


def prepare(name_or_path: str, profile: Profile) -> tuple[Sweep, list[Cell]]:
    """The sweep and its cells, every config and data setup validated, and every config runnable on
    this machine. The other profile's cells are validated too (configs and metric, not data)."""
    import torch

    from mta_lab.model.execution import unmet_requirement

    sweep = load_sweep(name_or_path, profile)
    cells = _cells(sweep)
    if sweep.profile == Profile.cpu or sweep.spec.cpu is not None:  # the implicit cpu profile is a fallback
        other = load_sweep(name_or_path, Profile.cpu if sweep.profile == Profile.full else Profile.full)
        check_metric(other, _cells(other))
    check_metric(sweep, cells)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seen = set()
    for cell in cells:
        unmet = unmet_requirement(cell.config.model, cell.config.runtime, device)
        if unmet:
            raise ConfigError(f"{sweep.where}: cell '{cell.run_name}': {unmet}")
        setup = (
            repr(cell.config.data),
            repr(cell.config.tasks),
            cell.config.model.max_seq_len,
            cell.config.model.vocab_size,
        )
        if setup not in seen:
            seen.add(setup)
            load_run_data(cell.config)  # DataError names the problem; fills the corpus cache
    return sweep, cells


def _cells(sweep: Sweep) -> list[Cell]:
    return expand(sweep) if sweep.spec.search is None else [_probe_cell(sweep)]


def _probe_cell(sweep: Sweep) -> Cell:
    """A search cell at the low end of every range: checks that the searched keys exist and validate."""
    params = {}
    for key, param in sweep.spec.search.params.items():
        if param.type == Distribution.categorical:
            params[key] = param.choices[0]
        else:
            params[key] = int(param.low) if param.type == Distribution.int else param.low
    return search_cell(sweep, params, sweep.spec.seeds[0])


def print_plan(
    sweep: Sweep, cells: list[Cell], workers: str, storage: str, tracking_uri: str, console: Console
) -> None:
    spec = sweep.spec
    console.print(
        f"[bold]{spec.name}[/bold] ({sweep.source}, profile {sweep.profile.value}): {spec.description}",
        highlight=False,
    )
    budgets = [resolve_budget(cell.config) for cell in cells]
    if spec.search is None:
        table = Table(
            "#",
            "cell",
            "seed",
            "role",
            "steps",
            "tokens",
            "FLOPs",
            "config hash",
            title="Cells = MLflow child runs",
            title_justify="left",
            box=None,
        )
        for index, (cell, budget) in enumerate(zip(cells, budgets, strict=True)):
            table.add_row(
                str(index), cell.label, str(cell.seed), cell.role, *_sizes(budget), cell.config_hash
            )
        console.print(table)
        runs = len(cells)
    else:
        table = Table("parameter", "distribution", title="Search (TPE)", title_justify="left", box=None)
        for key, param in spec.search.params.items():
            shape = (
                param.choices if param.type == Distribution.categorical else f"[{param.low}, {param.high}]"
            )
            table.add_row(key, f"{param.type.value} {shape}{' log' if param.log else ''}")
        console.print(table)
        runs = spec.search.n_trials
    if spec.design == Design.scaling:
        length = f"a ladder of {len(spec.ladder)} rungs, {spec.held_equal} on each"
    else:
        matched = " (compute: matched)" if spec.compute == Compute.matched else ""
        length = f"budget {budgets[0].describe()} per run, {spec.held_equal}{matched}"
    if spec.pretrain is not None:
        first = resolve_budget(pretrain_cell(sweep).config).describe()
        console.print(
            f"first: pretraining the baseline once ({first}); every cell continues it", highlight=False
        )
    console.print(
        f"base {spec.base}; {length}; {runs} runs; metric {spec.metric.name} ({spec.metric.goal.value})",
        highlight=False,
    )
    console.print(
        f"MLflow: experiment '{spec.name}', parent run '{spec.name} ({sweep.profile.value})' at {mask(tracking_uri)}\n"
        f"Optuna: study '{sweep.study_name}' at {mask(storage)}\n"
        f"workers: {workers}",
        highlight=False,
    )


def launch(
    name_or_path: str,
    *,
    profile: Profile = Profile.auto,
    workers: int | None = None,
    gpus: list[int] | None = None,
    gpus_per_trial: int = 1,
    processes_per_trial: int = 1,
    slurm: SlurmOptions | None = None,
    storage: str | None = None,
    tracking_uri: str | None = None,
    runs_dir: Path = Path("runs"),
    dry_run: bool = False,
    console: Console | None = None,
) -> int:
    """Plan, set up and run a sweep: workers on this machine (``slots``), or Slurm jobs (``slurm``)."""
    console = console or Console()
    sweep, cells = prepare(name_or_path, profile)
    if sweep.profile == Profile.cpu and profile == Profile.auto:
        console.print(
            "[yellow]No GPU: running the sweep's cpu profile (a tiny model and a short budget, minutes on a "
            "CPU); --profile full runs the file's own budget.[/yellow]"
        )
    sweep_dir = (runs_dir / "sweeps" / sweep.study_name).resolve()
    storage = storage or default_storage(sweep_dir)
    uri = resolve_tracking_uri(tracking_uri)
    if slurm is None:
        slots = plan_slots(workers, gpus, gpus_per_trial, processes_per_trial)
        count, placement = len(slots), f"{len(slots)} ({'; '.join(s.describe() for s in slots)})"
    else:
        slots, count = [], slurm.workers or MAX_JOBS
        placement = slurm.describe()
    if count > 2 and storage.startswith("sqlite"):
        raise ConfigError(
            f"--storage {mask(storage)}: SQLite is for one or two workers; use journal:PATH or postgresql://"
        )
    if sweep.spec.pretrain is not None:  # every cell continues the sweep's own pretrained model
        cells = expand(sweep, sweep_dir / PRETRAINED)
    print_plan(sweep, cells, placement, storage, uri, console)
    if dry_run:
        console.print("dry run: nothing was started")
        return 0

    with setup_lock(sweep_dir, uri):  # a second launcher waits, then finds everything set up
        study = open_study(sweep, storage, create=True)  # a bad storage stops here, before any MLflow run
        if sweep.spec.pretrain is not None:
            _pretrain(sweep, sweep_dir, uri, console)
        client = client_for(uri)
        experiment = experiment_id(client, sweep.spec.name)
        parent = parent_run(client, experiment, sweep, flat_params(sweep.spec, prefix="sweep"))
        queued = _register(sweep, study, cells, uri, experiment, parent, console)
    with stop_once():  # Ctrl-C (the workers get it too) or SIGTERM: stop once, record it once
        try:
            start = functools.partial(_run_workers, slots, storage, uri, runs_dir, sweep_dir)
            if slurm is not None:
                start = functools.partial(_run_jobs, slurm, storage, uri, sweep_dir, queued)
            return _start(sweep, study, cells, start, client, parent, uri, queued, console)
        except BaseException as error:  # before or after the workers ran: never leave the parent RUNNING
            try:
                stopped = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
                _finish_parent(client, parent, study, sweep, stopped)
            except MlflowException as problem:  # e.g. a store made read-only: say so, in one line
                console.print(
                    f"[red]the MLflow store {mask(uri)} cannot be written ({str(problem).splitlines()[0]}): "
                    f"its runs stay RUNNING until `mta-lab sweep {sweep.spec.name}` runs again, which ends "
                    "them[/red]",
                    highlight=False,
                )
                if isinstance(error, MlflowException):
                    return 1
            raise


PRETRAINED = "pretrained.safetensors"
"""A sweep's pretrained weights (``pretrain``), in its directory: what every cell starts from."""


def _pretrain(sweep: Sweep, sweep_dir: Path, uri: str, console: Console) -> None:
    """Train the sweep's pretraining run once (in this process, before any worker starts) and keep its
    weights; a later launch finds them. An interrupted pretraining run starts over next time."""
    from mta_lab.hf.convert import export_weights
    from mta_lab.train.run import train

    weights = sweep_dir / PRETRAINED
    if weights.is_file():
        console.print(f"pretrained model: {weights} (trained before)", highlight=False)
        return
    first = pretrain_cell(sweep)
    console.print(f"pretraining the model every cell starts from ({resolve_budget(first.config).describe()})")
    tags = {"mta.sweep": sweep.spec.name, "mta.study": sweep.study_name, "mta.role": "pretrain"}
    result = train(
        first.config,
        sweep.source,
        tracking_uri=uri,
        runs_dir=sweep_dir / "pretrain",
        run_name=f"{sweep.spec.name}: pretrain",
        tags=tags,
    )
    export_weights(result.run_dir, weights)
    console.print(f"pretrained model: {weights} (MLflow run {result.run_id})", highlight=False)


@contextmanager
def setup_lock(sweep_dir: Path, tracking_uri: str) -> Iterator[None]:
    """One launcher at a time sets a sweep up on this machine: two finding no parent run would each
    create one. An SQLite store's own lock is held too, for launchers of one store with other run
    directories."""
    path = sweep_dir / "launch.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when closed
        with store_lock(tracking_uri):
            yield


def _register(sweep, study, cells, uri, experiment, parent, console) -> int:
    """Record the sweep in its study and enqueue its unfinished cells; how many were queued."""
    attrs = {
        "spec": OmegaConf.to_container(OmegaConf.structured(sweep.spec), enum_to_str=True),
        "profile": sweep.profile.value,
        "source": sweep.source,
        "tracking_uri": mask(uri),  # workers elsewhere are given the store; the study never holds secrets
        "experiment_id": experiment,
        "parent_run_id": parent,
    }
    for key, value in attrs.items():
        study.set_user_attr(key, value)
    recovered = recover_orphans(study)
    if recovered:
        console.print(f"trials {recovered} had lost their worker: their cells run again")
    abandoned = _end_abandoned_runs(client_for(uri), experiment, parent, study)
    if abandoned:
        console.print(f"{len(abandoned)} MLflow runs left RUNNING by an earlier attempt are marked FAILED")
    done, queued = enqueue(study, sweep, cells)
    if sweep.spec.search is None:
        console.print(
            f"{len(done)} of {len(cells)} cells already finished (skipped); {queued} to run", highlight=False
        )
    return queued


def _end_abandoned_runs(client, experiment: str, parent: str, study) -> list[str]:
    """End the child runs that an earlier attempt left RUNNING (killed, or stopped by a store it could
    no longer write) and that no live trial trains; their cells resume in them when they run again."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    live = {TrialRecord.of(t).cell for t in running}  # a run's id reaches its trial just after it starts
    ended = []
    for run in child_runs(client, experiment, parent):
        if run.info.status == "RUNNING" and run.data.tags.get("mta.config_hash") not in live:
            client.set_tag(
                run.info.run_id, "mta.error", "its sweep stopped before it could record how it ended"
            )
            client.set_terminated(run.info.run_id, "FAILED")
            ended.append(run.info.run_id)
    return ended


def _start(sweep, study, cells, start, client, parent, uri, queued, console) -> int:
    """Run the workers (``start``) and end the parent run."""
    if sweep.spec.search is None and not queued and not _waiting(study):
        console.print("every cell is done")
        _finish_parent(client, parent, study, sweep)
        return 0

    code = start(sweep, study, console)
    status = _finish_parent(client, parent, study, sweep, "KILLED" if code == 130 else None, console)
    if code == 1 and status == "FINISHED":
        code = 0  # a worker died, but the others trained its cells: the sweep is complete
    if code == 0 and status == "FAILED":
        code = 1  # some cells failed: the parent run and the table say which, and why
    console.print(status_table(study, sweep, cells if sweep.spec.search is None else None))
    console.print(
        f"parent run {parent}: {status}; browse with: mta-lab ui --tracking-uri {mask(uri)}", highlight=False
    )
    return code


def enqueue(study: optuna.Study, sweep: Sweep, cells: list[Cell]) -> tuple[list[Cell], int]:
    """Enqueue each cell that is not finished, waiting or running; once, keyed by its config hash."""
    if sweep.spec.search is not None:
        return [], 0
    by_cell: dict[str, set[TrialState]] = {}
    for trial in study.get_trials(deepcopy=False):
        if (cell := TrialRecord.of(trial).cell) is not None:
            by_cell.setdefault(cell, set()).add(trial.state)
    done, queued = [], 0
    for cell in cells:
        states = by_cell.get(cell.config_hash, set())
        if TrialState.COMPLETE in states:
            done.append(cell)
        elif not states & {TrialState.WAITING, TrialState.RUNNING}:
            study.enqueue_trial({}, user_attrs=TrialRecord.queued_for(cell).queued())
            queued += 1
    return done, queued


class LocalWorkers:
    """Worker processes on this machine, one per slot."""

    def __init__(
        self, sweep: Sweep, slots: list[Slot], storage: str, uri: str, runs_dir: Path, sweep_dir: Path
    ):
        self.logs = sweep_dir / "workers"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.processes = []
        for index, slot in enumerate(slots):
            command = [
                sys.executable,
                "-m",
                "mta_lab.cli",
                "worker",
                sweep.spec.name,
                "--index",
                str(index),
                "--devices",
                str(slot.devices),
                "--profile",
                sweep.profile.value,
                "--runs-dir",
                str(runs_dir),
            ]
            # The stores travel in the environment: a command line is visible to every user (ps).
            env = {**os.environ, **slot.env(), STORAGE_ENV: storage, TRACKING_ENV: uri}
            log = (self.logs / f"worker-{index}.log").open("a")
            self.processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env))

    @property
    def where(self) -> str:
        return str(self.logs)

    def running(self) -> bool:
        return any(p.poll() is None for p in self.processes)

    def stop(self) -> None:
        for p in self.processes:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.processes:
            p.wait()

    def failed(self) -> list[str]:
        return [str(i) for i, p in enumerate(self.processes) if p.returncode not in (0, None)]


def _run_workers(slots, storage, uri, runs_dir, sweep_dir, sweep, study, console) -> int:
    return _follow(
        LocalWorkers(sweep, slots, storage, uri, runs_dir, sweep_dir), study, sweep, sweep_dir, console
    )


def _run_jobs(options: SlurmOptions, storage, uri, sweep_dir, queued, sweep, study, console) -> int:
    """Submit the sweep's workers as Slurm jobs (joining those of an earlier launch that still run) and
    follow them; the MLflow store reaches them through a server where it is an SQLite file."""
    folder = sweep_dir / "slurm"
    live = live_jobs(folder)
    wanted = options.workers or max(1, min(MAX_JOBS, queued if sweep.spec.search is None else MAX_JOBS))
    with tracking_server(uri, sweep_dir) as served:
        if served != uri:
            console.print(
                f"MLflow for the jobs: an `mlflow server` on this host over {mask(uri)}, at {served}; it stops with this command",
                highlight=False,
            )
        jobs = live
        if len(live) < wanted:
            new = submit(
                sweep.study_name,
                sweep_dir,
                wanted - len(live),
                options,
                storage,
                served,
                len(read_jobs(folder)),
            )
            jobs = [*live, *new]
            console.print(f"submitted Slurm jobs {', '.join(new)} (logs in {folder})", highlight=False)
        if live:
            console.print(
                f"following the sweep's Slurm jobs still queued or running: {', '.join(live)}",
                highlight=False,
            )
        return _follow(SlurmWorkers(folder, jobs), study, sweep, sweep_dir, console)


def _follow(workers, study, sweep, sweep_dir, console) -> int:
    """Show the sweep's progress until the workers end; Ctrl-C stops them."""
    try:
        with SweepProgress(study, sweep, sweep_dir, _total(study, sweep), console) as progress:
            while workers.running():
                progress.update()
                time.sleep(1.0)
            progress.update()
    except KeyboardInterrupt:
        console.print(
            "stopping: workers stop their training runs (marked KILLED); run the same command to resume"
        )
        workers.stop()
        return 130
    failed = workers.failed()
    if failed:
        console.print(
            f"[red]workers [{', '.join(failed)}] stopped with an error: see {workers.where}[/red]",
            highlight=False,
        )
        return 1
    return 0


def _total(study, sweep) -> int:
    if sweep.spec.search is not None:
        return sweep.spec.search.n_trials
    return len(_cells_of(study.get_trials(deepcopy=False)))


def _cells_of(trials) -> set[str]:
    """The config hashes of the cells that ``trials`` train."""
    return {record.cell for record in map(TrialRecord.of, trials) if record.cell is not None}


def _waiting(study) -> bool:
    return bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING)))


def _finish_parent(client, parent: str, study, sweep, stopped: str | None = None, console=None) -> str:
    """The parent run's summary and status: FINISHED when every cell finished, ``stopped`` (KILLED,
    FAILED) when this launcher was stopped; left RUNNING while other workers still train cells (another
    launcher, or workers elsewhere): the last to finish ends it."""
    recover_orphans(study)
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if running:
        if console is not None:
            console.print(
                f"{len(running)} cells are still training in other workers: the parent run stays RUNNING and "
                "ends with the last of them (or with the next `mta-lab sweep` of this sweep)"
            )
        return "RUNNING"
    complete = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if TrialRecord.of(t).cell is not None
    ]
    cells = _cells_of(study.get_trials(deepcopy=False))
    finished_cells = _cells_of(complete)
    metrics = {"sweep/cells": len(cells), "sweep/cells_finished": len(finished_cells)}
    if complete:
        best = (
            min(complete, key=lambda t: t.value)
            if sweep.spec.metric.goal == Goal.minimize
            else max(complete, key=lambda t: t.value)
        )
        metrics[f"best/{sweep.spec.metric.name}"] = best.value
        client.set_tag(parent, "mta.best_cell", TrialRecord.of(best).name)
    RunRecord(client, parent).log_metrics(metrics, step=0)
    if sweep.spec.search is None:
        done = finished_cells >= cells
    else:  # a search is done when it has its trials; pruned ones count
        ended = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        done = len(ended) >= sweep.spec.search.n_trials
    status = stopped or ("FINISHED" if done else "FAILED")
    client.set_terminated(parent, status)
    return status


def _sizes(budget: Budget) -> tuple[str, str, str]:
    """A cell's steps, tokens and FLOPs as the plan shows them (a time budget: its seconds)."""
    if budget.steps is None:
        return (f"{budget.seconds:g} s", "", "")
    return (f"{budget.steps:,}", f"{budget.tokens:,}", f"{budget.flops:.3g}")
