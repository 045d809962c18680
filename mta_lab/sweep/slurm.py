"""A sweep's workers as Slurm jobs (``mta-lab sweep NAME --launcher slurm``), submitted with submitit.

Each job of one job array runs one worker, as ``mta-lab worker`` would: it takes cells from the study
until none is left. The jobs need what the nodes of a cluster share anyway: the file system the
runs directory is on (the journal storage, checkpoints, the submitit folder) and this Python
environment. The stores reach them in the environment (``sbatch`` exports it), never in a file.

- A job stopped by ``scancel``, preemption or its time limit puts its cell back in the queue; the
  cell resumes from its checkpoint in whichever worker takes it next, or when the sweep is launched
  again.
- submitit asks Slurm for SIGUSR2 ``SIGNAL_DELAY_S`` before the time limit (and a preempting Slurm
  sends it too): the job then requeues itself, and the requeued job resumes the cell.
- A job that dies leaves its trial RUNNING only until someone looks: Slurm no longer lists the job
  (:meth:`mta_lab.sweep.records.WorkerId.alive`), so the next worker, launcher or ``status`` fails
  it and queues its cell again. Database storages add their own heartbeats.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mta_lab.config import ConfigError
from mta_lab.infra import slurm
from mta_lab.infra.processes import die_with_parent
from mta_lab.secrets import STORAGE_ENV, TRACKING_ENV, mask

JOBS_FILE = "jobs.json"
"""In ``SWEEP_DIR/slurm``: the jobs submitted for the sweep, for ``status``, ``cancel`` and a relaunch."""
SIGNAL_DELAY_S = 120
"""Seconds before the time limit at which a job is told to requeue itself: time to stop its cell."""
MAX_JOBS = 16
"""Default array size: one job per cell to run, at most this many."""
STOP_WAIT_S = 180


@dataclass(frozen=True)
class SlurmOptions:
    """What a Slurm user says about the jobs; ``None`` leaves it to the cluster's defaults."""

    workers: int | None = None
    """Jobs in the array, one worker each (default: one per cell to run, at most ``MAX_JOBS``)."""
    max_running: int | None = None
    """At most this many of them run at once (``--array=...%N``)."""
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_min: int = 240
    """Each job's time limit; a cell longer than it is requeued with its job and resumes."""
    gpus_per_trial: int = 0
    """GPUs per job (on one node); the worker trains each cell on all of them with DDP."""
    processes_per_trial: int = 1
    """On CPU nodes: processes per cell (DDP over gloo); ``gpus_per_trial`` rules where given."""
    cpus_per_gpu: int | None = None
    mem_per_gpu: str | None = None
    cpus_per_worker: int | None = None
    """CPU jobs: cores per job (default: one per process)."""
    mem: str | None = None
    """Memory per job (``--mem``), e.g. ``16G``."""
    sbatch: tuple[str, ...] = ()
    """Further ``#SBATCH`` options as written on sbatch's command line, e.g. ``--constraint=a100``."""
    setup: tuple[str, ...] = ()
    """Shell lines run before the worker, e.g. ``module load cuda``."""

    @property
    def devices(self) -> int:
        return self.gpus_per_trial or self.processes_per_trial

    def describe(self) -> str:
        jobs = (
            f"{self.workers} Slurm jobs"
            if self.workers
            else f"one Slurm job per cell to run (at most {MAX_JOBS})"
        )
        each = f"{self.gpus_per_trial} GPU" if self.gpus_per_trial else f"{self.devices} process"
        plural = "es" if self.devices > 1 and not self.gpus_per_trial else "s" if self.devices > 1 else ""
        where = "".join(
            f", {key} {value}"
            for key, value in (("partition", self.partition), ("account", self.account), ("qos", self.qos))
            if value
        )
        return f"{jobs}, {each}{plural} each, {self.time_min} min{where}"

    def parameters(self) -> dict:
        """submitit's Slurm parameters."""
        cpu = not self.gpus_per_trial
        given = {
            "partition": self.partition,
            "account": self.account,
            "qos": self.qos,
            "time": self.time_min,
            "nodes": 1,
            "ntasks_per_node": 1,  # one worker; it starts its own training processes
            "gpus_per_node": self.gpus_per_trial or None,
            "cpus_per_gpu": self.cpus_per_gpu,
            "mem_per_gpu": self.mem_per_gpu,
            "cpus_per_task": (self.cpus_per_worker or self.processes_per_trial) if cpu else None,
            "mem": self.mem,
            "signal_delay_s": SIGNAL_DELAY_S,
            "setup": list(self.setup) or None,
            "array_parallelism": self.max_running,
            "additional_parameters": sbatch_options(self.sbatch) or None,
        }
        return {key: value for key, value in given.items() if value is not None}


SBATCH_OPTION = re.compile(r"^(?:#SBATCH\s+)?--?(?P<key>[A-Za-z][\w-]*)(?:[= ](?P<value>.+))?$")


def sbatch_options(lines: tuple[str, ...]) -> dict[str, object]:
    """``--constraint=a100`` -> ``{"constraint": "a100"}``; ``--exclusive`` -> ``{"exclusive": True}``."""
    options: dict[str, object] = {}
    for line in lines:
        found = SBATCH_OPTION.match(line.strip())
        if found is None:
            raise ConfigError(
                f"--sbatch '{line}': not an sbatch option (allowed: --key=value or --flag, e.g. --constraint=a100)"
            )
        options[found["key"].replace("-", "_")] = found["value"].strip() if found["value"] else True
    return options


def parse_time(text: str) -> int:
    """A Slurm time limit in minutes: ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH`` or ``D-HH:MM[:SS]``."""
    found = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if found is None:
        raise ValueError(f"'{text}' is not a Slurm time (allowed: MM, HH:MM:SS, D-HH:MM)")
    days, first, second, third = (int(part) if part else None for part in found.groups())
    if days is not None:
        minutes = days * 1440 + first * 60 + (second or 0)
    elif third is not None:
        minutes = first * 60 + second + (third > 0)
    else:
        minutes = first + bool(second)
    if minutes < 1:
        raise ValueError(f"'{text}': a time limit of at least one minute")
    return minutes


class SlurmWorker:
    """What each job runs: worker ``index`` of the study. submitit requeues it (calling it again) when
    the job is preempted or reaches its time limit."""

    def __init__(self, study_name: str, sweep_dir: Path, index: int, devices: int):
        self.study_name, self.sweep_dir, self.index, self.devices = study_name, sweep_dir, index, devices

    def __call__(self) -> str:
        from mta_lab.sweep.worker import join

        try:
            join(
                self.study_name,
                os.environ[STORAGE_ENV],
                os.environ.get(TRACKING_ENV),
                self.sweep_dir,
                self.index,
                self.devices,
            )
        except KeyboardInterrupt:
            return "stopped"  # scancel, preemption: the cell went back to the queue
        return "done"

    def checkpoint(self):
        """submitit's hook before it requeues the job: the same worker, again (the cell it was training
        is stopped as the job ends, and queued again)."""
        import submitit

        return submitit.helpers.DelayedSubmission(
            SlurmWorker(self.study_name, self.sweep_dir, self.index, self.devices)
        )


class SlurmWorkers:
    """The sweep's jobs, as the launcher follows and stops them."""

    def __init__(self, folder: Path, jobs: list[str]):
        self.folder, self.jobs = folder, jobs

    @property
    def where(self) -> str:
        return str(self.folder)

    def running(self) -> bool:
        listed = slurm.queue(fresh=True)
        return listed is None or any(listed.get(job) in slurm.ALIVE for job in self.jobs)

    def stop(self) -> None:
        """Cancel the jobs and wait until Slurm has ended them (their workers stop their cells)."""
        slurm.cancel(self.jobs)
        deadline = time.monotonic() + STOP_WAIT_S
        while self.running() and time.monotonic() < deadline:
            time.sleep(2.0)

    def failed(self) -> list[str]:
        """The jobs that ended with an error (submitit's outcome file says so, or there is none)."""
        return [job for job in self.jobs if _outcome(self.folder, job) != "success"]


def _outcome(folder: Path, job: str) -> str | None:
    """submitit's record of how a job's function ended: ``success`` or ``error``; None if it has none."""
    import submitit

    path = folder / f"{job}_0_result.pkl"  # submitit's JobPaths.result_pickle: JOB_TASK_result.pkl
    if not path.is_file():
        return None
    try:
        return submitit.core.utils.pickle_load(path)[0]
    except Exception:  # a torn file: the job was killed while writing it
        return None


def submit(
    study_name: str,
    sweep_dir: Path,
    count: int,
    options: SlurmOptions,
    storage: str,
    tracking_uri: str,
    first_index: int = 0,
) -> list[str]:
    """Submit ``count`` workers as one job array; their job ids (also added to the jobs file)."""
    import submitit

    folder = sweep_dir / "slurm"
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=1000)
    executor.update_parameters(job_name=f"mta-lab:{study_name}", **options.parameters())
    workers = [SlurmWorker(study_name, sweep_dir, first_index + k, options.devices) for k in range(count)]
    with _exported({STORAGE_ENV: storage, TRACKING_ENV: tracking_uri}):
        try:
            jobs = executor.submit_array(workers)
        except Exception as error:  # sbatch refused: its own words say why (partition, account, limits)
            message = str(error).strip().splitlines()
            raise ConfigError(
                f"sbatch refused the sweep's jobs: {mask(message[-1] if message else repr(error))}"
            ) from None
    ids = [job.job_id for job in jobs]
    _write_jobs(folder, [*read_jobs(folder), *ids])
    return ids


@contextmanager
def _exported(variables: dict[str, str]) -> Iterator[None]:
    """``variables`` in this process's environment while sbatch copies it into the jobs."""
    before = {key: os.environ.get(key) for key in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def read_jobs(folder: Path) -> list[str]:
    path = folder / JOBS_FILE
    return json.loads(path.read_text())["jobs"] if path.is_file() else []


def _write_jobs(folder: Path, jobs: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / (JOBS_FILE + ".partial")
    partial.write_text(json.dumps({"jobs": jobs}, indent=2) + "\n")
    os.replace(partial, folder / JOBS_FILE)


def live_jobs(folder: Path) -> list[str]:
    """The sweep's jobs that Slurm still lists (queued, running, requeued)."""
    listed = slurm.queue(fresh=True) or {}
    return [job for job in read_jobs(folder) if listed.get(job) in slurm.ALIVE]


def job_states(folder: Path) -> list[tuple[str, str]]:
    """Each job of the sweep with its state; ``ended`` once Slurm no longer lists it."""
    listed = slurm.queue(fresh=True)
    if listed is None:
        return [(job, "unknown (squeue did not answer)") for job in read_jobs(folder)]
    states = []
    for job in read_jobs(folder):
        reason = slurm.pending_reason(job)
        state = listed.get(job, "ended")
        states.append((job, f"{state} ({reason})" if reason and reason != "None" else state))
    return states


SERVER_WAIT_S = 120


@contextmanager
def tracking_server(uri: str, sweep_dir: Path) -> Iterator[str]:
    """An SQLite store is one file that one machine should write: for the jobs, serve it with
    ``mlflow server`` on this host while they run, and give them its URL. Other stores are used as
    they are."""
    if not uri.startswith("sqlite:"):
        yield uri
        return
    host = socket.gethostname()
    address = socket.gethostbyname(host)
    with socket.socket() as probe:
        probe.bind((address, 0))
        port = probe.getsockname()[1]
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    allowed = ",".join(f"{name}:{port}" for name in {host, address, socket.getfqdn()})
    log = sweep_dir / "slurm" / "mlflow-server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [mlflow, "server", "--backend-store-uri", uri, "--host", address, "--port", str(port)]
    command += ["--workers", "1", "--allowed-hosts", allowed]
    with log.open("a") as output:
        server = subprocess.Popen(
            command,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
    url = f"http://{host}:{port}"
    try:
        _wait_until_up(url, server, log)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


def _wait_until_up(url: str, server: subprocess.Popen, log: Path) -> None:
    import urllib.request

    deadline = time.monotonic() + SERVER_WAIT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise ConfigError(f"the MLflow server for the Slurm jobs stopped at start: see {log}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise ConfigError(
        f"the MLflow server for the Slurm jobs did not answer at {url} within {SERVER_WAIT_S} s: see {log}"
    )
