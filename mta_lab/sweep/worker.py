"""A sweep worker: takes cells from the Optuna study one at a time and trains each in a child process.

The worker owns the trial: it finds or creates the cell's MLflow child run (resuming it when the cell
ran before on this machine, never duplicating it), starts ``mta_lab.sweep.child``, follows its
progress file, reports intermediate values, prunes by stopping the child, and records the outcome.
A child that fails (an exception, a NaN loss, out of memory, killed) fails the trial with its reason;
the worker goes on with the next cell.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from mlflow.exceptions import MlflowException
from optuna.trial import Trial, TrialState

from mta_lab.config import ConfigError, RunConfig, resolved_yaml
from mta_lab.config.loading import load_config_text
from mta_lab.config.sweep import Distribution, SweepSpec
from mta_lab.infra import slurm
from mta_lab.infra.processes import die_with_parent
from mta_lab.infra.signals import Interrupted, stop_once
from mta_lab.secrets import TRACKING_ENV, is_masked, mask
from mta_lab.sweep.child import PROGRESS_FILE
from mta_lab.sweep.records import TrialRecord, WorkerId, record_on
from mta_lab.sweep.spec import Cell, Profile, Sweep, search_cell
from mta_lab.sweep.storage import fail_trial
from mta_lab.sweep.tracking import client_for, create_child, find_child
from mta_lab.train.run import CONFIG_FILE, RUN_FILE

POLL_S = 0.5
WAIT_S = 5.0
"""How often a worker with nothing to do looks for trials whose worker died."""
STOP_GRACE_S = 120


class CellFailed(Exception):
    """The cell's training did not finish; the message is the reason."""


CHILD = (sys.executable, "-m", "mta_lab.sweep.child")
"""The command that trains a cell, given its run directory."""


@dataclass
class Context:
    study: optuna.Study
    sweep: Sweep
    tracking_uri: str
    experiment: str
    parent: str
    sweep_dir: Path
    devices: int = 1
    """Processes (GPUs on CUDA) that train each cell together, with DDP: ``runtime.devices``."""
    child: tuple[str, ...] = CHILD
    """The training command; tests give a stand-in that records a result without training."""

    @classmethod
    def load(
        cls, study: optuna.Study, tracking_uri: str | None, sweep_dir: Path, devices: int = 1
    ) -> Context:
        """What the launcher stored in the study: workers on other machines need nothing else."""
        from omegaconf import OmegaConf

        attrs = study.user_attrs
        spec = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SweepSpec), attrs["spec"]))
        sweep = Sweep(spec, Path(attrs["source"]), Profile(attrs["profile"]))
        uri = tracking_uri or os.environ.get(TRACKING_ENV) or attrs["tracking_uri"]
        if is_masked(uri):
            raise ConfigError(
                f"study '{study.study_name}' records its MLflow store as {uri} (the password is not kept): "
                f"give --tracking-uri or {TRACKING_ENV}"
            )
        return cls(
            study,
            sweep,
            uri,
            attrs["experiment_id"],
            attrs["parent_run_id"],
            sweep_dir,
            devices,
        )


def join(
    study_name: str, storage: str, tracking_uri: str | None, sweep_dir: Path, index: int, devices: int
) -> None:
    """Be worker ``index`` of the study ``study_name`` (``mta-lab worker``, and each Slurm job)."""
    from mta_lab.sweep.storage import make_pruner, open_storage

    try:
        study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
    except KeyError:
        raise ConfigError(
            f"no study '{study_name}' at {mask(storage)}: start it with `mta-lab sweep`"
        ) from None
    context = Context.load(study, tracking_uri, sweep_dir, devices)
    study.pruner = make_pruner(context.sweep.spec)  # Optuna keeps no pruner with the study
    search = context.sweep.spec.search
    if search is not None:  # worker k uses seed + k: different points per worker, the same on a rerun
        study.sampler = optuna.samplers.TPESampler(seed=search.seed + index)
    run_worker(study, context)


def run_worker(study: optuna.Study, context: Context) -> None:
    """Train cells until every trial of the study has ended (an ablation) or the search has its trials.

    While no cell waits but other workers' trials still run, the worker stays: a worker that died
    leaves its trial RUNNING, and this one fails it (after the storage's heartbeat grace, or at once
    when it ran on this machine) and trains its cell, requeued."""
    with stop_once():  # Ctrl-C arrives here and from the launcher (SIGTERM): stop the child once
        while True:
            recover_orphans(study)
            with warnings.catch_warnings():  # "experimental" in Optuna 5, and what heartbeats are for
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)  # a no-op without heartbeats; requeues with them
            if _more_work(study, context.sweep.spec):
                study.optimize(lambda trial: objective(trial, context), n_trials=1, catch=(CellFailed,))
            elif context.sweep.spec.search is None and _running_elsewhere(study):
                time.sleep(WAIT_S)
            else:
                return


def objective(trial: Trial, context: Context) -> float:
    record_on(trial, worker=WorkerId.here())
    cell = _cell(trial, context)
    if cell is None:
        raise optuna.TrialPruned("no cell was waiting (another worker took the last one)")
    duplicate = _duplicate_of(context.study, trial.number, cell.config_hash)
    if duplicate is not None:
        record_on(trial, duplicate_of=duplicate)
        raise optuna.TrialPruned(f"cell already done or running in trial {duplicate}")
    try:
        return train_cell(trial, cell, context)
    except MlflowException as error:  # the store stopped taking writes: this cell, and likely the rest
        failure = CellFailed(f"the MLflow store cannot be written: {str(error).splitlines()[0]}")
    except CellFailed as error:
        failure = error
    record_on(trial, error=mask(str(failure))[:2000])  # what `status` and the launcher show
    raise failure from None


def train_cell(trial: Trial, cell: Cell, context: Context) -> float:
    client = client_for(context.tracking_uri)
    metric = context.sweep.spec.metric.name
    run_dir = context.sweep_dir / "cells" / cell.config_hash
    run = find_child(client, context.experiment, context.parent, cell.config_hash)
    if run is not None and run.info.status == "FINISHED" and metric in run.data.metrics:
        record_on(trial, mlflow_run_id=run.info.run_id)
        return run.data.metrics[metric]  # it finished, but its trial was not told (a stopped worker)
    if run is not None and not _resumable(run_dir, run.info.run_id):
        client.set_tag(run.info.run_id, "mta.superseded", "no checkpoint on this machine; trained again")
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, "FAILED")
        run = None
    if run is None:
        run_id = create_child(client, context.experiment, context.parent, context.sweep, cell, trial.number)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / CONFIG_FILE).write_text(resolved_yaml(_placed(cell.config, context.devices)))
        info = {
            "run_id": run_id,
            "tracking_uri": mask(context.tracking_uri),  # the child gets the real one in its environment
            "source": f"{context.sweep.source} · {cell.run_name}",
        }
        (run_dir / RUN_FILE).write_text(json.dumps(info, indent=2) + "\n")
    else:
        run_id = run.info.run_id
        client.set_tag(run_id, "optuna.trial", str(trial.number))
    record_on(trial, mlflow_run_id=run_id)

    progress = run_dir / PROGRESS_FILE
    with (run_dir / "child.log").open("a") as log:
        child = subprocess.Popen(
            [*context.child, str(run_dir)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, TRACKING_ENV: context.tracking_uri},
            preexec_fn=_die_with_parent,
        )
        try:
            _follow(trial, child, progress, metric)
        except optuna.TrialPruned:
            client.set_tag(run_id, "mta.pruned", f"at step {TrialRecord.of(trial).pruned_at}")
            raise
        except (KeyboardInterrupt, SystemExit) as stop:  # SystemExit: submitit requeues the Slurm job
            _stop(child)
            _end_if_running(client, run_id, "KILLED")  # the child was stopped before it could say so
            record_on(trial, error="stopped (Ctrl-C or SIGTERM); it resumes from its checkpoint next time")
            if slurm.this_job() is not None:
                # Slurm stops jobs to preempt them, at their time limit and on scancel: the cell goes
                # back to the queue at once (this trial no longer counts as training it), for the
                # requeued job or another worker to resume from its checkpoint.
                context.study.enqueue_trial({}, user_attrs=TrialRecord.of(trial).queued())
            if isinstance(stop, SystemExit):
                raise Interrupted("the Slurm job is being requeued") from None  # Optuna fails the trial
            raise
        finally:
            _stop(child)
    code = child.returncode
    if code == 0:
        # The run's own record decides: the progress file only mirrors it (and can be damaged).
        logged = client.get_run(run_id).data.metrics
        if metric not in logged:
            raise CellFailed(
                f"the run finished without logging '{metric}' (logged: {', '.join(sorted(logged))})"
            )
        return logged[metric]
    raise CellFailed(_failure_reason(client, run_id, run_dir, code))


def _follow(trial: Trial, child: subprocess.Popen, progress: Path, metric: str) -> None:
    """Report the child's evaluations to the trial and prune if told to, until the child exits.

    The whole file is read, also what an earlier attempt of the cell wrote: a resumed child may have
    nothing left to train (Optuna ignores a second report for a step)."""
    final: dict[str, float] = {}
    offset = 0
    while True:
        running = child.poll() is None
        if progress.is_file():
            with progress.open("rb") as stream:  # bytes: a damaged line may not even be UTF-8
                stream.seek(offset)
                for line in stream:
                    if not line.endswith(b"\n"):
                        break  # a partly written line: read it next time
                    offset += len(line)
                    try:
                        record = json.loads(line)
                        record["metrics"], record["step"]  # noqa: B018 (the fields the worker reads)
                    except (ValueError, KeyError, TypeError):
                        continue  # a damaged line; the run's metrics are in MLflow, which decides at the end
                    if metric in record["metrics"]:
                        final = record["metrics"]
                        trial.report(final[metric], record["step"])
                        if trial.should_prune():
                            record_on(trial, pruned_at=record["step"])
                            child.send_signal(signal.SIGTERM)
                            child.wait(STOP_GRACE_S)
                            raise optuna.TrialPruned(
                                f"pruned at step {record['step']}: {metric}={final[metric]:.4g}"
                            )
        if not running:
            return
        time.sleep(POLL_S)


def _stop(child: subprocess.Popen) -> None:
    """Make sure the child is gone: ask (SIGTERM, so it marks its run KILLED), then insist."""
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)(: |$)")
"""The line of a traceback that names what was raised, e.g. ``sqlite3.OperationalError: database is locked``."""


def _end_if_running(client, run_id: str, status: str, reason: str | None = None) -> bool:
    """End a run its training process left RUNNING (it was killed before it could record anything)."""
    if client.get_run(run_id).info.status != "RUNNING":
        return False
    if reason:
        client.set_tag(run_id, "mta.error", reason)
    client.set_terminated(run_id, status)
    return True


def _failure_reason(client, run_id: str, run_dir: Path, code: int) -> str:
    reason = f"the training process was killed (exit code {code})"  # SIGKILL, the OOM killer
    if _end_if_running(client, run_id, "FAILED", reason):
        return reason
    error = client.get_run(run_id).data.tags.get("mta.error")
    if error:
        return error
    return f"exit code {code}: {what_was_raised((run_dir / 'child.log').read_text(errors='replace'))}"


def what_was_raised(log: str) -> str:
    """The last exception a process's log names; its last lines where it names none.

    A traceback ends in its exception, but a database error's message runs on for lines after it
    (the SQL, a link), so the last lines alone would not say what went wrong."""
    lines = log.strip().splitlines()
    raised = [line for line in lines if EXCEPTION_LINE.match(line)]
    return raised[-1] if raised else " / ".join(lines[-3:])


def _cell(trial: Trial, context: Context) -> Cell | None:
    spec = context.sweep.spec
    if spec.search is not None:
        params = {key: _suggest(trial, key, param) for key, param in spec.search.params.items()}
        cell = search_cell(context.sweep, params, spec.seeds[0])
        record_on(trial, **TrialRecord.queued_for(cell).queued())
        return cell
    record = TrialRecord.of(trial)
    if record.cell is None:
        return None
    # The launcher put the resolved config in the trial: workers on other machines need no sweep file.
    config = load_config_text(record.config, f"trial {trial.number} of {context.study.study_name}")
    return Cell(record.label, record.seed, record.role, record.axis, (), config, record.cell)


def _suggest(trial: Trial, key: str, param) -> Any:
    if param.type == Distribution.categorical:
        return trial.suggest_categorical(key, param.choices)
    if param.type == Distribution.int:
        return trial.suggest_int(
            key, int(param.low), int(param.high), step=int(param.step or 1), log=param.log
        )
    return trial.suggest_float(key, param.low, param.high, step=param.step, log=param.log)


def _duplicate_of(study: optuna.Study, number: int, cell_hash: str) -> int | None:
    for other in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)):
        if other.number != number and TrialRecord.of(other).cell == cell_hash:
            if other.state == TrialState.COMPLETE or TrialRecord.of(other).training():
                return other.number
    return None


def _more_work(study: optuna.Study, spec: SweepSpec) -> bool:
    if spec.search is None:
        return bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    counted = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    return len(study.get_trials(deepcopy=False, states=counted)) < spec.search.n_trials


def recover_orphans(study: optuna.Study) -> list[int]:
    """Fail the RUNNING trials whose worker is gone (on this machine, or in a Slurm job that ended;
    storages without heartbeats keep them RUNNING forever) and queue their cells again. Returns the
    trial numbers."""
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        record = TrialRecord.of(trial)
        if record.worker and not record.worker.alive():  # another machine's: only Slurm can tell
            if not fail_trial(study, trial, "its worker died"):
                continue  # another worker or launcher got there first, and requeued it
            if record.cell is not None:  # an ablation's cell; a search samples a new point instead
                study.enqueue_trial({}, user_attrs=record.queued())
            failed.append(trial.number)
    return failed


def _running_elsewhere(study: optuna.Study) -> bool:
    """Whether trials of other workers still run (this worker runs none between cells)."""
    return bool(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def _resumable(run_dir: Path, run_id: str) -> bool:
    path = run_dir / RUN_FILE
    return path.is_file() and json.loads(path.read_text())["run_id"] == run_id


def _placed(config: RunConfig, devices: int) -> RunConfig:
    """The cell's config as this worker runs it: on ``devices`` processes (how, not what: the cell and
    its hash are the same)."""
    if devices == config.runtime.devices:
        return config
    return dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, devices=devices))


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM when its worker dies, so no training outlives its trial. It
    ignores SIGUSR2, which Slurm sends every process of a job before its time limit (``--signal``):
    the worker stops the child when the job is requeued."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    die_with_parent(signal.SIGTERM)
