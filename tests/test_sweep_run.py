"""Sweeps that run: workers, storages, the MLflow topology, kills, interrupts and failures (CPU)."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import sweep_command
from optuna.trial import TrialState

from mta_lab.cli import main
from mta_lab.infra.tracking import TrackingClient
from mta_lab.sweep.storage import open_storage

# Each test launches real sweeps (workers, child processes, stores): minutes each on 2 cores.
pytestmark = pytest.mark.slow

# Runs of a few steps: the child processes' start-up dominates.
QUICK = """
base: tiny
baseline: false
fixed:
  data.seq_len: 16
  data.corpora.stdlib: null
  eval.batches: 1
  eval.every: null
  train.batch_size: 2
  train.log_every: 1
"""
GRID = (
    QUICK
    + """
axes:
  model.mta.pre_qk_conv.query_kernel: [2, 4]
  model.mta.pre_qk_conv.key_kernel: [3, 5]
"""
)


def sweep_file(tmp_path: Path, body: str, seeds: str = "[0, 1]", steps: int = 3) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(body + f"seeds: {seeds}\nbudget: {{steps: {steps}}}\n")
    return path


def launch(path: Path, *args: str, wait: bool = True) -> subprocess.Popen | subprocess.CompletedProcess:
    command = sweep_command(path, *args)
    if wait:
        return subprocess.run(command, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def study(path: Path, name: str = "grid", storage: str | None = None) -> optuna.Study:
    storage = storage or f"journal:{path.parent}/runs/sweeps/{name}/optuna.journal"
    return optuna.load_study(study_name=name, storage=open_storage(storage))


def mlflow_runs(path: Path) -> tuple[list, list]:
    client = TrackingClient(f"sqlite:///{path.parent}/mlflow.db")  # locked, as a sweep may be creating it
    experiment = client.get_experiment_by_name("grid").experiment_id
    runs = client.search_runs([experiment], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("mta.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("mta.role") != "parent"]
    return parents, children


def wait_for(predicate, process: subprocess.Popen, timeout: float = 300) -> None:
    """Poll until ``predicate()`` holds; fail at once, with its output, if ``process`` ends first."""
    deadline = time.time() + timeout
    while not predicate():
        if process.poll() is not None:
            pytest.fail(f"the sweep ended (exit {process.returncode}) first:\n{process.communicate()[0]}")
        assert time.time() < deadline, "timed out"
        time.sleep(0.5)


def test_two_workers_run_every_cell_once_with_the_mlflow_topology(tmp_path):
    path = sweep_file(tmp_path, GRID)
    result = launch(path, "--workers", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 of 8 cells already finished (skipped); 8 to run" in result.stdout

    trials = study(path).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 8
    assert len({t.user_attrs["cell"] for t in trials}) == 8
    assert {t.user_attrs["worker"]["pid"] for t in trials}.__len__() == 2  # both workers took cells

    (parent,), children = mlflow_runs(path)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "grid (full)"
    assert parent.data.tags["mta.study"] == "grid" and parent.data.params["sweep.seeds"] == "[0, 1]"
    assert parent.data.metrics["sweep/cells_finished"] == 8
    assert len(children) == 8 and all(c.info.status == "FINISHED" for c in children)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert {c.data.tags["mta.config_hash"] for c in children} == {t.user_attrs["cell"] for t in trials}
    child = next(c for c in children if c.info.run_name == "query_kernel=4 key_kernel=3 · seed 1")
    tags = child.data.tags
    assert (tags["mta.sweep"], tags["mta.role"], tags["mta.seed"], tags["mta.variant"]) == (
        "grid",
        "variant",
        "1",
        "query_kernel=4 key_kernel=3",
    )
    assert tags["mta.axis"] == "model.mta.pre_qk_conv.query_kernel,model.mta.pre_qk_conv.key_kernel"
    assert tags["optuna.study"] == "grid" and tags["optuna.trial"].isdigit()
    assert "mlflow.source.git.commit" in tags
    assert (
        child.data.params["model.mta.pre_qk_conv.query_kernel"] == "4"
        and child.data.params["train.seed"] == "1"
    )
    assert "val/loss" in child.data.metrics

    again = launch(path)
    assert again.returncode == 0 and "8 of 8 cells already finished (skipped); 0 to run" in again.stdout
    assert "every cell is done" in again.stdout
    assert len(mlflow_runs(path)[1]) == 8  # nothing was run twice

    status = subprocess.run(
        [
            sys.executable,
            "-m",
            "mta_lab.cli",
            "status",
            str(path),
            "--profile",
            "full",
            "--runs-dir",
            str(tmp_path / "runs"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert status.returncode == 0 and "grid: 8 cells: 8 done; best val/loss = " in status.stdout
    assert status.stdout.count(" done ") == 8 and child.info.run_id in status.stdout


def test_a_killed_worker_loses_nothing_and_its_cell_resumes(tmp_path):
    path = sweep_file(
        tmp_path, QUICK + "variants: {a: {}, b: {model.mta.post_qk_conv: null}}\n", seeds="[0]", steps=150
    )
    path.write_text(
        path.read_text().replace(
            "  train.log_every: 1\n", "  train.log_every: 1\n  train.checkpoint_every: 5\n"
        )
    )
    process = launch(path, wait=False)
    checkpoints = str(tmp_path / "runs/sweeps/grid/cells/*/checkpoints/last.ckpt")
    wait_for(lambda: glob.glob(checkpoints), process)
    worker = subprocess.run(
        ["pgrep", "-f", f"mta_lab.cli worker grid .*{tmp_path}"], capture_output=True, text=True
    )
    os.kill(int(worker.stdout.split()[0]), signal.SIGKILL)
    output = process.communicate(timeout=300)[0]
    assert "stopped with an error" in output  # the launcher reports the dead worker...
    assert process.returncode == 0, output  # ...and the other worker trained its cell (default: 2 on 2 cores)
    (killed_run,) = [c for c in mlflow_runs(path)[1] if c.info.status != "FINISHED"] or [None]

    result = launch(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "had lost their worker: their cells run again" in result.stdout or killed_run is None
    states = [t.state for t in study(path).get_trials()]
    assert states.count(TrialState.COMPLETE) == 2
    (parent,), children = mlflow_runs(path)
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)  # resumed, not repeated
    if killed_run is not None:
        assert killed_run.info.run_id in {c.info.run_id for c in children}
    assert parent.info.status == "FINISHED"


def test_ctrl_c_stops_everything_cleanly_and_resumes(tmp_path):
    path = sweep_file(tmp_path, QUICK + "variants: {a: {}}\n", seeds="[0]", steps=200)
    path.write_text(
        path.read_text().replace(
            "  train.log_every: 1\n", "  train.log_every: 1\n  train.checkpoint_every: 5\n"
        )
    )
    process = launch(path, wait=False)
    wait_for(lambda: glob.glob(str(tmp_path / "runs/sweeps/grid/cells/*/checkpoints/last.ckpt")), process)
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 130, output
    parents, children = mlflow_runs(path)
    assert [r.info.status for r in parents + children] == ["KILLED", "KILLED"]
    assert [t.state for t in study(path).get_trials()] == [TrialState.FAIL]  # nothing left RUNNING

    result = launch(path)
    assert result.returncode == 0, result.stdout + result.stderr
    parents, children = mlflow_runs(path)
    assert [r.info.status for r in parents + children] == ["FINISHED", "FINISHED"]


def test_a_failing_cell_is_recorded_and_the_sweep_goes_on(tmp_path):
    path = sweep_file(
        tmp_path, QUICK + "variants: {fine: {}, diverges: {train.optim.lr: 1.0e+30}}\n", seeds="[0]", steps=6
    )
    result = launch(path)
    assert result.returncode == 1  # not every cell finished
    assert "failed diverges · seed 0: FloatingPointError: the training loss is" in result.stdout
    trials = {t.user_attrs["label"]: t for t in study(path).get_trials()}
    assert trials["fine"].state == TrialState.COMPLETE and trials["diverges"].state == TrialState.FAIL
    (parent,), children = mlflow_runs(path)
    by_name = {c.data.tags["mta.variant"]: c for c in children}
    assert (
        by_name["diverges"].info.status == "FAILED"
        and "loss is" in by_name["diverges"].data.tags["mta.error"]
    )
    assert by_name["fine"].info.status == "FINISHED" and parent.info.status == "FAILED"

    # The report lists the cell that never finished, and why, instead of leaving it out silently.
    out = tmp_path / "dashboards"
    store = ["--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--runs-dir", str(tmp_path / "runs")]
    assert main(["report", str(path), "--profile", "full", *store, "--out-dir", str(out)]) == 0
    markdown = (out / "grid" / "report.md").read_text()
    assert (
        "| diverges (no finished run: left out above) | 0 | FAILED | FloatingPointError: the training loss is"
        in markdown
    )
    assert "no finished run: left out above" in (out / "grid" / "index.html").read_text()


def test_workers_share_a_postgresql_study(tmp_path, postgres):
    path = sweep_file(tmp_path, GRID, seeds="[0]")
    result = launch(path, "--workers", "2", "--storage", postgres)
    assert result.returncode == 0, result.stdout + result.stderr
    trials = study(path, storage=postgres).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4 and len(
        {t.user_attrs["cell"] for t in trials}
    ) == 4
    assert len(mlflow_runs(path)[1]) == 4
    # A third machine would join the same way: `mta-lab worker grid --storage <url> --tracking-uri <url>`.
    joined = subprocess.run(
        [
            sys.executable,
            "-m",
            "mta_lab.cli",
            "worker",
            "grid",
            "--profile",
            "full",
            "--storage",
            postgres,
            "--tracking-uri",
            f"sqlite:///{tmp_path}/mlflow.db",
            "--runs-dir",
            str(tmp_path / "runs"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert joined.returncode == 0, joined.stderr  # nothing left to do: it exits at once
    assert len(study(path, storage=postgres).get_trials()) == 4


def test_a_failed_cell_is_reported_by_the_exception_its_log_names():
    from mta_lab.sweep.worker import what_was_raised

    log = (
        "train:   3%|  | 30/1000\n"
        "Traceback (most recent call last):\n"
        '  File "x.py", line 1, in <module>\n'
        "sqlite3.OperationalError: database is locked\n\n"
        "The above exception was the direct cause of the following exception:\n\n"
        "Traceback (most recent call last):\n"
        '  File "y.py", line 2, in log_batch\n'
        "mlflow.exceptions.MlflowException: (sqlite3.OperationalError) database is locked\n"
        '[SQL: INSERT INTO tags ("key", value, run_uuid) VALUES (?, ?, ?)]\n'
        "(Background on this error at: https://sqlalche.me/e/21/e3q8)\n"
    )
    assert (
        what_was_raised(log)
        == "mlflow.exceptions.MlflowException: (sqlite3.OperationalError) database is locked"
    )
    assert what_was_raised("step 1\nstep 2\nsegfault in libfoo\nbye\n") == "step 2 / segfault in libfoo / bye"
