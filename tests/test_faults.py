"""Fault injection: sweeps killed, interrupted, corrupted, cut off from their store and shared, then
checked: every cell done exactly once, no MLflow run left RUNNING, and no password anywhere.

Real sweeps (workers, child processes, an SQLite MLflow store, journal and PostgreSQL storages): slow.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import PG_PASSWORD
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from test_sweep_run import GRID, QUICK, launch, mlflow_runs, study, sweep_file, wait_for

from mta_lab.cli import main

pytestmark = pytest.mark.slow

TWO_CELLS = QUICK + "variants: {a: {}, b: {model.mta.pre_qk_conv.key_kernel: 5}}\n"


def assert_clean(path: Path, cells: int, storage: str | None = None) -> None:
    """Every cell finished exactly once, in one MLflow run each; nothing RUNNING; the parent FINISHED."""
    parents, children = mlflow_runs(path)
    assert [p.info.status for p in parents] == ["FINISHED"], [p.info.status for p in parents]
    assert not [c.info.run_name for c in children if c.info.status == "RUNNING"]
    finished = [c.data.tags["mta.config_hash"] for c in children if c.info.status == "FINISHED"]
    assert len(finished) == len(set(finished)) == cells, finished
    complete = [
        t.user_attrs["cell"]
        for t in study(path, storage=storage).get_trials()
        if t.state == TrialState.COMPLETE
    ]
    assert sorted(complete) == sorted(finished)


def a_run_finished(path: Path) -> bool:
    try:
        return any(c.info.status == "FINISHED" for c in mlflow_runs(path)[1])
    except Exception:  # no experiment yet
        return False


def test_two_launchers_started_together_share_one_parent_and_run_each_cell_once(tmp_path):
    path = sweep_file(tmp_path, GRID, seeds="[0]", steps=6)
    first, second = launch(path, wait=False), launch(path, wait=False)
    outputs = [p.communicate(timeout=600)[0] for p in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], outputs
    assert_clean(path, cells=4)


def test_a_damaged_progress_file_does_not_fail_its_cell(tmp_path):
    path = sweep_file(tmp_path, TWO_CELLS, seeds="[0]", steps=60)
    process = launch(path, wait=False)
    cells = tmp_path / "runs" / "sweeps" / "grid" / "cells"
    wait_for(lambda: any(p.stat().st_size > 0 for p in cells.glob("*/progress.jsonl")), process)
    progress = next(p for p in cells.glob("*/progress.jsonl") if p.stat().st_size > 0)
    with progress.open("ab") as stream:
        stream.write(b'\x00\xffnot json at all\n{"step": 1}\n')
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output
    assert_clean(path, cells=2)


def _immutable(path: Path, on: bool) -> bool:
    return subprocess.run(["chattr", "+i" if on else "-i", str(path)], capture_output=True).returncode == 0


def test_a_store_that_cannot_be_written_is_said_and_its_runs_are_ended_next_time(tmp_path):
    path = sweep_file(tmp_path, TWO_CELLS, seeds="[0, 1]", steps=40)
    store = tmp_path / "mlflow.db"
    process = launch(path, wait=False)
    wait_for(lambda: store.is_file() and a_run_finished(path), process)
    if not _immutable(store, True):  # root ignores file modes; the immutable flag stops even root
        process.kill()
        pytest.skip("chattr +i is not supported on this file system")
    try:
        output = process.communicate(timeout=600)[0]
    finally:
        _immutable(store, False)
    assert process.returncode == 1, output
    assert (
        "cannot be written" in output and "runs stay RUNNING until `mta-lab sweep grid` runs again" in output
    )
    assert "Traceback" not in output
    again = launch(path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert_clean(path, cells=4)


@pytest.mark.parametrize("postgres", [True], ids=["password"], indirect=True)
def test_a_killed_workers_cell_is_trained_by_the_survivor_and_no_password_leaks(
    tmp_path, postgres, monkeypatch
):
    monkeypatch.setenv("MTA_LAB_HEARTBEAT_S", "2")  # a dead worker's trial is stale after 8 s
    monkeypatch.setenv("MTA_LAB_STORAGE", postgres)  # as the README advises: not on the command line
    path = sweep_file(tmp_path, TWO_CELLS, seeds="[0, 1]", steps=60)
    process = launch(path, "--workers", "2", wait=False)

    def running_trials():
        try:
            return [t for t in study(path, storage=postgres).get_trials() if t.state == TrialState.RUNNING]
        except Exception:  # the study is not created yet
            return []

    wait_for(lambda: len(running_trials()) == 2, process)
    command_lines = _command_lines()
    assert any("mta_lab.cli worker" in line for line in command_lines)
    assert not [line for line in command_lines if PG_PASSWORD in line]  # ps shows no password
    victim = running_trials()[0].user_attrs["worker"]["pid"]
    os.kill(victim, signal.SIGKILL)
    output = process.communicate(timeout=900)[0]
    assert "workers [" in output and "stopped with an error" in output  # said, and the sweep still ends
    assert process.returncode == 0, output
    assert_clean(path, cells=4, storage=postgres)
    states = [t.state for t in study(path, storage=postgres).get_trials()]
    assert states.count(TrialState.FAIL) == 1 and states.count(TrialState.COMPLETE) == 4

    # The password appears nowhere: output, logs, run directories, the MLflow store, the study, the report.
    store = ["--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--runs-dir", str(tmp_path / "runs")]
    assert (
        main(
            [
                "report",
                str(path),
                "--profile",
                "full",
                *store,
                "--storage",
                postgres,
                "--out-dir",
                str(tmp_path / "d"),
            ]
        )
        == 0
    )
    assert PG_PASSWORD not in output
    for file in tmp_path.rglob("*"):
        if file.is_file():
            assert PG_PASSWORD.encode() not in file.read_bytes(), file
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    for run in client.search_runs([client.get_experiment_by_name("grid").experiment_id]):
        assert PG_PASSWORD not in repr(run.data.params) + repr(run.data.tags)
    assert PG_PASSWORD not in repr(study(path, storage=postgres).user_attrs)


def _command_lines() -> list[str]:
    lines = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            lines.append(cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    return lines


@pytest.mark.parametrize("postgres", [True], ids=["password"], indirect=True)
def test_a_rejected_password_is_one_line_naming_the_database(tmp_path, capsys, monkeypatch, postgres):
    monkeypatch.chdir(tmp_path)
    wrong = postgres.replace(PG_PASSWORD, "not-the-password")
    assert main(["status", "kernel_size", "--storage", wrong]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not-the-password" not in err
    assert re.search(
        r"cannot open the database 127\.0\.0\.1:\d+/postgres: .*password authentication failed", err
    )


def test_a_journal_torn_by_a_full_disk_is_repaired_and_the_sweep_resumes(tmp_path, caplog):
    path = sweep_file(tmp_path, TWO_CELLS, seeds="[0]", steps=3)
    assert launch(path).returncode == 0
    journal = tmp_path / "runs" / "sweeps" / "grid" / "optuna.journal"
    with journal.open("ab") as stream:
        stream.write(b'{"op_code": 4, "worker_id": "ab')  # the disk filled up mid-record
    store = ["--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--runs-dir", str(tmp_path / "runs")]
    assert main(["status", str(path), "--profile", "full", *store]) == 0  # the CLI logs it on stderr
    assert "1 damaged record(s) (a full disk or a kill while writing) set aside" in caplog.text
    assert list(journal.parent.glob("optuna.journal.damaged-*"))
    again = launch(path)
    assert again.returncode == 0 and "every cell is done" in again.stdout, again.stdout + again.stderr
    assert_clean(path, cells=2)


def test_a_sweep_killed_outright_leaves_nothing_running_after_the_next_run(tmp_path):
    path = sweep_file(tmp_path, TWO_CELLS, seeds="[0, 1]", steps=40)
    process = launch(path, wait=False)
    wait_for(lambda: (tmp_path / "mlflow.db").is_file() and a_run_finished(path), process)
    os.killpg(process.pid, signal.SIGKILL)  # launcher, workers and training processes at once
    process.wait()
    time.sleep(1)
    assert any(c.info.status == "RUNNING" for c in mlflow_runs(path)[1])  # SIGKILL records nothing
    again = launch(path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert_clean(path, cells=4)
