"""What Slurm says about its jobs, from its own commands (``squeue``, ``scancel``).

Submission lives with the sweep launcher (``mta_lab.sweep.slurm``, through submitit); this room only
answers the questions every layer may ask: is this process a Slurm job, which of a user's jobs are
still queued or running, and cancel these. A controller that does not answer (down, restarting) is
"we could not tell" (``None``), never "the job is gone": a sweep must not fail live trials because
``slurmctld`` was briefly away.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

ALIVE = frozenset(
    {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD", "RESIZING"}
)
"""Job states in which a job still holds, or will again hold, its worker."""
RUNNING = frozenset({"CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED"})
"""Job states in which the job's worker process exists (a PENDING job was requeued: its worker died)."""
CACHE_S = 5.0
"""How long one ``squeue`` answer is reused: workers ask about every RUNNING trial each loop."""

_answer: tuple[float, dict[str, str] | None] = (-CACHE_S, None)
_reasons: dict[str, str] = {}


def this_job() -> str | None:
    """This process's job as ``squeue`` names it: ``JOB_TASK`` in an array, else ``JOB``; None outside
    Slurm."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


def this_job_run() -> tuple[str | None, int]:
    """This process's job (:func:`this_job`) and how often it has been requeued before this run."""
    return this_job(), int(os.environ.get("SLURM_RESTART_COUNT") or 0)


def available() -> bool:
    return shutil.which("squeue") is not None


def queue(fresh: bool = False) -> dict[str, str] | None:
    """The state of each of this user's jobs that Slurm still lists (array tasks one by one), keyed
    like :func:`this_job`; None when Slurm cannot be asked. A job missing from it has ended."""
    global _answer
    when, jobs = _answer
    if not fresh and time.monotonic() - when < CACHE_S:
        return jobs
    try:
        listed = subprocess.run(
            ["squeue", "--me", "--array", "--noheader", "--format=%i|%T|%r"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        jobs = None
    else:
        jobs = None
        if listed.returncode == 0:
            rows = [line.split("|") for line in listed.stdout.splitlines() if line.count("|") == 2]
            jobs = {job: state for job, state, _ in rows}
            _reasons.clear()
            _reasons.update({job: reason for job, state, reason in rows if state == "PENDING"})
    _answer = (time.monotonic(), jobs)
    return jobs


def pending_reason(job: str) -> str | None:
    """Why Slurm keeps ``job`` waiting (e.g. ``Priority``, ``PartitionTimeLimit``), as of the last
    :func:`queue`; None if it is not pending."""
    return _reasons.get(job)


def job_running(job: str) -> bool | None:
    """Whether ``job``'s worker process can exist (None: Slurm could not be asked)."""
    jobs = queue()
    if jobs is None:
        return None
    return jobs.get(job) in RUNNING


def cancel(jobs: list[str]) -> None:
    """Cancel ``jobs`` (Slurm sends their processes SIGTERM, then SIGKILL after its KillWait)."""
    if jobs:
        subprocess.run(["scancel", *jobs], capture_output=True, timeout=60)
