"""Sweeps on Slurm: the options a Slurm user gives, and a real single-node cluster (slurmctld + slurmd on
127.0.0.1) running a sweep end to end, a job cancelled mid-trial and its cell resumed."""

from __future__ import annotations

import glob
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import sweep_command
from optuna.trial import TrialState
from test_sweep_run import QUICK

from mta_lab.cli import main
from mta_lab.infra import slurm
from mta_lab.infra.tracking import TrackingClient
from mta_lab.sweep.records import WorkerId
from mta_lab.sweep.slurm import SlurmOptions, parse_time, sbatch_options
from mta_lab.sweep.storage import open_storage

# test_sweep_run's quick cells, checkpointed every 5 steps, for 300 steps: long enough to cancel mid-way.
SWEEP = (
    QUICK
    + """  train.checkpoint_every: 5
variants: {a: {}, b: {model.mta.post_qk_conv: null}}
seeds: [0]
budget: {steps: 300}
"""
)


@pytest.mark.parametrize(
    ("text", "minutes"),
    [("30", 30), ("1:30", 2), ("4:00:00", 240), ("2:30:00", 150), ("1-0", 1440), ("1-02:30", 1590)],
)
def test_time_limits_read_as_sbatch_reads_them(text, minutes):
    assert parse_time(text) == minutes


def test_a_bad_time_limit_or_sbatch_option_is_one_line_with_exit_code_2(capsys):
    assert main(["sweep", "kernel_size", "--launcher", "slurm", "--time", "soon", "--dry-run"]) == 2
    assert "--time 'soon' is not a Slurm time (allowed: MM, HH:MM:SS, D-HH:MM)" in capsys.readouterr().err
    assert main(["sweep", "kernel_size", "--launcher", "slurm", "--sbatch", "constraint", "--dry-run"]) == 2
    assert "--sbatch 'constraint': not an sbatch option" in capsys.readouterr().err
    assert main(["sweep", "kernel_size", "--partition", "gpu", "--dry-run"]) == 2
    assert "--partition: Slurm options; add --launcher slurm" in capsys.readouterr().err


def test_slurm_options_become_sbatch_parameters():
    options = SlurmOptions(
        workers=4,
        partition="gpu",
        account="lab",
        qos="high",
        time_min=90,
        gpus_per_trial=2,
        cpus_per_gpu=8,
        mem_per_gpu="64G",
        sbatch=("--constraint=h100", "#SBATCH --exclusive", "--mail-type END"),
    )
    parameters = options.parameters()
    assert {key: parameters[key] for key in ("partition", "account", "qos", "time", "gpus_per_node")} == {
        "partition": "gpu",
        "account": "lab",
        "qos": "high",
        "time": 90,
        "gpus_per_node": 2,
    }
    assert (parameters["cpus_per_gpu"], parameters["mem_per_gpu"], "cpus_per_task" in parameters) == (
        8,
        "64G",
        False,
    )
    assert parameters["additional_parameters"] == {
        "constraint": "h100",
        "exclusive": True,
        "mail_type": "END",
    }
    assert options.devices == 2
    assert SlurmOptions(processes_per_trial=2).parameters()["cpus_per_task"] == 2
    assert sbatch_options(("-C a100",)) == {"C": "a100"}


def _study(path: Path) -> optuna.Study:
    storage = f"journal:{path.parent}/runs/sweeps/grid/optuna.journal"
    return optuna.load_study(study_name="grid", storage=open_storage(storage))


def _wait_for(predicate, process: subprocess.Popen, timeout: float = 400) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if process.poll() is not None:
            pytest.fail(f"the sweep ended (exit {process.returncode}) first:\n{process.communicate()[0]}")
        assert time.time() < deadline, "timed out"
        time.sleep(0.5)


def _running_with_checkpoint(path: Path):
    """A trial that trains in a Slurm job and has written a checkpoint: (trial, job) or None."""
    try:
        trials = _study(path).get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    except KeyError:
        return None
    for trial in trials:
        cell, worker = trial.user_attrs.get("cell"), trial.user_attrs.get("worker")
        checkpoint = path.parent / f"runs/sweeps/grid/cells/{cell}/checkpoints/last.ckpt"
        if worker and worker.get("slurm_job") and checkpoint.is_file():
            return trial, worker["slurm_job"]
    return None


@pytest.mark.slow
def test_a_sweep_runs_as_slurm_jobs_and_a_cancelled_job_resumes(tmp_path, slurm_cluster):
    path = tmp_path / "grid.yaml"
    path.write_text(SWEEP)
    launch = sweep_command(
        path, "--launcher", "slurm", "--workers", "2", "--partition", "debug", "--time", "20"
    ) + ["--sbatch=--comment=mta-lab-test", "--setup", "export MTA_LAB_TEST_SETUP=1"]
    process = subprocess.Popen(launch, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(lambda: _running_with_checkpoint(path) is not None, process)
    trial, job = _running_with_checkpoint(path)
    cancelled_cell = trial.user_attrs["cell"]

    status = subprocess.run(
        [sys.executable, "-m", "mta_lab.cli", "status", str(path), "--profile", "full"]
        + ["--runs-dir", str(tmp_path / "runs")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert status.returncode == 0, status.stderr
    assert "Slurm job" in status.stdout and job in status.stdout  # the job next to its cell
    assert f"{job} running" in status.stdout  # and the sweep's jobs with their states

    slurm.cancel([job])  # scancel mid-trial: the job's worker stops the cell and queues it again
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output  # the other job resumed the cell: the sweep is complete
    assert (
        "MLflow for the jobs: an `mlflow server` on this host" in output and "submitted Slurm jobs" in output
    )

    trials = _study(path).get_trials()
    states = {t.user_attrs["cell"]: [] for t in trials}
    for t in trials:
        states[t.user_attrs["cell"]].append(t.state)
    assert states[cancelled_cell] == [TrialState.FAIL, TrialState.COMPLETE]  # stopped, then resumed
    assert [t.state for t in trials if t.state == TrialState.RUNNING] == []

    client = TrackingClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("grid").experiment_id
    runs = client.search_runs([experiment], max_results=100)
    (parent,) = [r for r in runs if r.data.tags.get("mta.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("mta.role") != "parent"]
    assert parent.info.status == "FINISHED"
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)  # resumed, not repeated
    (resumed,) = [c for c in children if c.data.tags["mta.config_hash"] == cancelled_cell]
    steps = [m.step for m in client.get_metric_history(resumed.info.run_id, "train/loss")]
    repeated = sorted({s for s in steps if steps.count(s) > 1})
    assert steps[-1] == 300 and repeated and repeated[0] > 1, repeated  # it went on from a checkpoint

    (script,) = glob.glob(str(tmp_path / "runs/sweeps/grid/slurm/*_submission.sh"))
    text = Path(script).read_text()
    for line in ("#SBATCH --partition=debug", "#SBATCH --time=20", "#SBATCH --comment=mta-lab-test"):
        assert line in text
    assert "export MTA_LAB_TEST_SETUP=1" in text and "MLFLOW_TRACKING_URI" not in text  # no store in files

    again = subprocess.run(
        sweep_command(path, "--launcher", "slurm"), capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0 and "every cell is done" in again.stdout, again.stdout + again.stderr


@pytest.mark.slow
def test_a_worker_whose_slurm_job_ended_counts_as_dead_elsewhere(slurm_cluster):
    ended = subprocess.run(
        ["sbatch", "--parsable", "--output=/dev/null", "--wrap", "true"],
        capture_output=True,
        text=True,
        check=True,
    )
    running = subprocess.run(
        ["sbatch", "--parsable", "--output=/dev/null", "--wrap", "sleep 60"],
        capture_output=True,
        text=True,
        check=True,
    )
    ended_id, running_id = ended.stdout.strip(), running.stdout.strip()
    deadline = time.time() + 60
    while (slurm.queue(fresh=True) or {}).get(running_id) != "RUNNING" or ended_id in (
        slurm.queue(fresh=True) or {}
    ):
        assert time.time() < deadline, slurm.queue(fresh=True)
        time.sleep(0.5)
    elsewhere = {"host": "another-node", "pid": 1, "started": 0.0}
    assert not WorkerId(**elsewhere, slurm_job=ended_id).alive()  # its job has ended: it is dead
    assert WorkerId(**elsewhere, slurm_job=running_id).alive()  # another node, running job: alive
    assert WorkerId(**elsewhere).alive()  # no Slurm job: only a heartbeat could tell
    slurm.cancel([running_id])


@pytest.mark.slow
def test_a_slurm_job_trains_its_cell_on_two_processes(tmp_path, slurm_cluster):
    path = tmp_path / "grid.yaml"
    path.write_text(
        SWEEP.replace(", b: {model.mta.post_qk_conv: null}", "").replace("steps: 300", "steps: 20")
    )
    launch = sweep_command(
        path, "--launcher", "slurm", "--workers", "1", "--processes-per-trial", "2", "--time", "10"
    )
    result = subprocess.run(launch, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    (script,) = glob.glob(str(tmp_path / "runs/sweeps/grid/slurm/*_submission.sh"))
    assert "#SBATCH --cpus-per-task=2" in Path(script).read_text()  # a core per process

    client = TrackingClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("grid").experiment_id], max_results=100)
    (child,) = [r for r in runs if r.data.tags.get("mta.role") != "parent"]  # one run, not one per rank
    assert child.info.status == "FINISHED" and "val/loss" in child.data.metrics
    (cell,) = glob.glob(str(tmp_path / "runs/sweeps/grid/cells/*/config.yaml"))
    assert "devices: 2" in Path(cell).read_text()
