"""A worker's decisions for each cell, with a stand-in for the training process: a new run, a run that
finished before its trial was told, a run resumed in place, a run from another machine superseded, and a
failing child. Real Optuna (in memory) and MLflow (SQLite) stores; seconds, not minutes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from mta_lab.config import config_hash, load_config
from mta_lab.infra.tracking import TrackingClient
from mta_lab.sweep.launcher import enqueue, plan_slots
from mta_lab.sweep.records import TrialRecord
from mta_lab.sweep.spec import Profile, expand, load_sweep
from mta_lab.sweep.tracking import child_runs, create_child, experiment_id, parent_run
from mta_lab.sweep.worker import Context, run_worker

# The stand-in: counts its starts in the run directory and ends its MLflow run as a training process
# would, FINISHED with the metric (and a progress line), or FAILED with an mta.error tag and exit 1.
FAKE_CHILD = """
import json, os, sys
from pathlib import Path
from mlflow.tracking import MlflowClient  # the store exists: no schema to create, so no lock needed
run_dir = Path(sys.argv[1])
with (run_dir / "starts").open("a") as starts:
    starts.write("x")
run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
if os.environ.get("FAKE_CHILD_FAILS"):
    client.set_tag(run_id, "mta.error", "ValueError: the loss is nan")
    client.set_terminated(run_id, "FAILED")
    sys.exit(1)
client.log_metric(run_id, "val/loss", 0.25, step=3)
with (run_dir / "progress.jsonl").open("a") as progress:
    progress.write(json.dumps({"step": 3, "metrics": {"val/loss": 0.25}}) + "\\n")
client.set_terminated(run_id, "FINISHED")
"""


@pytest.fixture
def worker_setup(tmp_path):
    """A two-cell sweep queued in an in-memory study, its MLflow parent run, and a worker context."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    path = tmp_path / "grid.yaml"
    path.write_text(
        "base: tiny\nbaseline: false\nvariants: {a: {}, b: {model.mta.pre_qk_conv.key_kernel: 5}}\n"
        "seeds: [0]\nbudget: {steps: 3}\n"
    )
    (tmp_path / "fake_child.py").write_text(FAKE_CHILD)
    sweep = load_sweep(str(path), Profile.full)
    cells = expand(sweep)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = TrackingClient(uri)
    experiment = experiment_id(client, sweep.spec.name)
    parent = parent_run(client, experiment, sweep, {})

    def context(study: optuna.Study) -> Context:
        child = (sys.executable, str(tmp_path / "fake_child.py"))
        return Context(study, sweep, uri, experiment, parent, tmp_path / "sweep", child=child)

    def queued_study() -> optuna.Study:
        study = optuna.create_study()
        enqueue(study, sweep, cells)
        return study

    return sweep, cells, client, experiment, parent, context, queued_study


def starts(run_dir: Path) -> int:
    return len((run_dir / "starts").read_text()) if (run_dir / "starts").is_file() else 0


def test_new_cells_each_get_one_run_and_report_its_metric(worker_setup, tmp_path):
    _, cells, client, experiment, parent, context, queued_study = worker_setup
    study = queued_study()
    run_worker(study, context(study))
    trials = study.get_trials()
    assert [(t.state, t.value) for t in trials] == [(TrialState.COMPLETE, 0.25)] * 2
    runs = {r.data.tags["mta.config_hash"]: r for r in child_runs(client, experiment, parent)}
    assert set(runs) == {c.config_hash for c in cells} and {r.info.status for r in runs.values()} == {
        "FINISHED"
    }
    for trial in trials:
        record = TrialRecord.of(trial)
        assert record.mlflow_run_id == runs[record.cell].info.run_id and record.worker.alive()
        run_dir = tmp_path / "sweep" / "cells" / record.cell
        assert starts(run_dir) == 1
        assert json.loads((run_dir / "run.json").read_text())["run_id"] == record.mlflow_run_id


def test_a_run_that_finished_before_its_trial_was_told_is_not_trained_again(worker_setup, tmp_path):
    sweep, cells, client, experiment, parent, context, queued_study = worker_setup
    # Each cell's run finished with its metric, but the worker was stopped before it told its trial.
    finished = {}
    for cell in cells:
        finished[cell.config_hash] = create_child(client, experiment, parent, sweep, cell, 0)
        client.log_metric(finished[cell.config_hash], "val/loss", 0.5, step=3)
        client.set_terminated(finished[cell.config_hash], "FINISHED")
    study = queued_study()
    run_worker(study, context(study))
    assert [(t.state, t.value) for t in study.get_trials()] == [(TrialState.COMPLETE, 0.5)] * 2
    assert {TrialRecord.of(t).cell: TrialRecord.of(t).mlflow_run_id for t in study.get_trials()} == finished
    assert [starts(tmp_path / "sweep" / "cells" / c.config_hash) for c in cells] == [0, 0]  # nothing trained
    assert len(child_runs(client, experiment, parent)) == 2


def test_a_run_with_its_directory_here_resumes_in_place_and_one_without_is_superseded(worker_setup, tmp_path):
    sweep, cells, client, experiment, parent, context, queued_study = worker_setup
    here, elsewhere = cells
    # Both cells ran before and were killed (their runs are RUNNING); only the first has its run
    # directory (and so its checkpoint) on this machine.
    earlier = {cell.label: create_child(client, experiment, parent, sweep, cell, 0) for cell in cells}
    run_dir = tmp_path / "sweep" / "cells" / here.config_hash
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"run_id": earlier["a"]}))
    study = queued_study()
    run_worker(study, context(study))

    runs = child_runs(client, experiment, parent)
    resumed = client.get_run(earlier["a"])
    assert resumed.info.status == "FINISHED" and resumed.data.metrics["val/loss"] == 0.25
    assert [r.info.run_id for r in runs if r.data.tags["mta.config_hash"] == here.config_hash] == [
        earlier["a"]
    ]
    superseded = client.get_run(earlier["b"])
    assert superseded.info.status == "FAILED" and "mta.superseded" in superseded.data.tags
    (fresh,) = [
        r
        for r in runs
        if r.data.tags["mta.config_hash"] == elsewhere.config_hash and r.info.run_id != earlier["b"]
    ]
    assert fresh.info.status == "FINISHED"
    assert {TrialRecord.of(t).mlflow_run_id for t in study.get_trials()} == {earlier["a"], fresh.info.run_id}


def test_a_failing_child_fails_its_trial_with_the_reason_and_the_worker_goes_on(
    worker_setup, tmp_path, monkeypatch
):
    *_, context, queued_study = worker_setup
    monkeypatch.setenv("FAKE_CHILD_FAILS", "1")
    study = queued_study()
    run_worker(study, context(study))
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * 2  # the second cell was still tried
    assert {TrialRecord.of(t).error for t in trials} == {"ValueError: the loss is nan"}


def test_a_worker_with_several_devices_writes_them_into_the_cell_config_and_keeps_its_hash(
    worker_setup, tmp_path
):
    _, cells, _, _, _, context, queued_study = worker_setup
    study = queued_study()
    placed = context(study)
    placed.devices = 2
    run_worker(study, placed)
    for cell in cells:
        written = (tmp_path / "sweep" / "cells" / cell.config_hash / "config.yaml").read_text()
        assert "devices: 2" in written and cell.config.runtime.devices == 1  # the cell itself is unchanged
        assert (
            config_hash(load_config(str(tmp_path / "sweep" / "cells" / cell.config_hash / "config.yaml")))
            == cell.config_hash
        )


def test_cpu_slots_with_several_processes_per_trial_share_the_cores(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    slots = plan_slots(None, [], 1, processes_per_trial=2)
    assert [(s.processes, s.threads, s.devices) for s in slots] == [(2, 2, 2)] * 2  # 2 workers x 2 x 2 = 8
    assert slots[0].describe() == "CPU, 2 processes of 2 threads"
    assert [s.devices for s in plan_slots(None, [0, 1, 2, 3], 2)] == [2, 2]  # a GPU group per worker
