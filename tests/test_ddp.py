"""One run trained by two processes (DDP, gloo on CPU): the numbers of one process, one MLflow run, a
sweep cell's child that stops, leaves nothing behind and resumes exactly, and batches that do not split.

Every process runs one torch thread (two ranks on two cores)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from test_train import finish

from mta_lab.cli import main
from mta_lab.config import ConfigError, RuntimeConfig, load_config, resolved_yaml
from mta_lab.secrets import TRACKING_ENV
from mta_lab.sweep.child import PROGRESS_FILE
from mta_lab.train import run as run_module

# tiny, a few seconds a run. A toy-block task mixed in gives rows with different numbers of targets,
# so each rank's share of the batch's targets differs from step to step.
QUICK = [
    "train.steps=30",
    "train.log_every=1",
    "train.checkpoint_every=10",
    "eval.every=15",
    "eval.batches=1",
    "data.seq_len=32",
    "data.corpora.stdlib=null",
    "tasks.toy_block.weight=1",
    "tasks.toy_block.length=29",
    "tasks.toy_block.eval_examples=8",
    "model.dropout=0.0",  # one process draws the masks of a batch, two processes other masks
]
TWO = "runtime.devices=2"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TOLERANCE = 1e-5
"""Relative, between the train loss of one process and of two, step by step: the same rows and the
same gradient, summed in another order (measured: at most 1.4e-7 over 30 steps)."""


def runs(uri: str) -> list:
    client = MlflowClient(uri)
    experiments = client.search_experiments()
    return client.search_runs([e.experiment_id for e in experiments]) if experiments else []


def history(uri: str, run_id: str, key: str) -> dict[int, float]:
    """A metric by step; a step logged twice (before a stop and after the resume) keeps the last."""
    metrics = sorted(MlflowClient(uri).get_metric_history(run_id, key), key=lambda m: m.timestamp)
    return {m.step: m.value for m in metrics}


def cli_train(tmp_path: Path, name: str, *overrides: str) -> tuple[str, str]:
    """``mta-lab train tiny`` in a fresh process into ``tmp_path/name.db``: (store, output)."""
    uri = f"sqlite:///{tmp_path}/{name}.db"
    command = [sys.executable, "-m", "mta_lab.cli", "train", "tiny", *QUICK, *overrides]
    command += ["--tracking-uri", uri, "--runs-dir", str(tmp_path / name)]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    return uri, result.stdout + result.stderr


def ranks_of(pid: int) -> list[int]:
    """The processes a training process started (its ranks > 0), by ``ps``."""
    found = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(line) for line in found.stdout.split()]


def alive(pids: list[int]) -> list[int]:
    found = subprocess.run(
        ["ps", "-o", "pid=,stat=", "-p", ",".join(map(str, pids))], capture_output=True, text=True
    )
    return [int(pid) for pid, stat in (line.split() for line in found.stdout.splitlines()) if "Z" not in stat]


def wait_for(path_glob: str, root: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not list(root.glob(path_glob)):
        assert time.time() < deadline, f"no {path_glob} under {root}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory):
    """The same run trained by one process and by two (``mta-lab train``): (store, output) of each."""
    tmp_path = tmp_path_factory.mktemp("ddp")
    return cli_train(tmp_path, "one"), cli_train(tmp_path, "two", TWO)


@pytest.mark.slow  # two runs in fresh processes: about 25 s
def test_two_processes_train_what_one_does(one_and_two):
    (one_uri, _), (two_uri, _) = one_and_two
    (one,), (two,) = runs(one_uri), runs(two_uri)
    assert (one.data.params["runtime.devices"], two.data.params["runtime.devices"]) == ("1", "2")
    assert one.data.tags["mta.config_hash"] == two.data.tags["mta.config_hash"]  # the same cell
    for key in ("train/loss", "train/grad_norm", "val/loss", "toy_block/err_tok"):
        reference = history(one_uri, one.info.run_id, key)
        shared = history(two_uri, two.info.run_id, key)
        assert sorted(shared) == sorted(reference), key
        for step, value in reference.items():
            assert shared[step] == pytest.approx(value, rel=TOLERANCE, abs=1e-7), (key, step)
    assert two.data.metrics["train/tokens"] == one.data.metrics["train/tokens"] == 30 * 8 * 32


@pytest.mark.slow  # shares the runs of the test above
def test_mta_lab_train_on_two_processes_records_one_run(one_and_two, tmp_path_factory):
    _, (uri, output) = one_and_two
    (run,) = runs(uri)  # rank 1 created none
    assert run.info.status == "FINISHED" and "mta.stopped" not in run.data.tags
    assert output.count(f"run {run.info.run_id}: FINISHED") == 1  # rank 1 does not run the command
    assert {"train/loss", "val/loss", "model/parameters"} <= set(run.data.metrics)
    assert list(history(uri, run.info.run_id, "train/loss")) == list(range(1, 31))  # logged once a step
    run_dir = Path(run.data.tags["mta.run_dir"])
    assert [p.name for p in run_dir.parent.iterdir()] == [run.info.run_id]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow  # one two-process run of 4 s of training: about 20 s
def test_a_time_budget_ends_on_the_same_step_on_every_rank(tmp_path):
    """Each rank's clock reads its own waits; on rank 0's alone, all step with the same learning rate
    and stop together (a rank that stopped alone would leave the other waiting in a collective)."""
    budget = ["train.steps=null", "train.seconds=4", "train.log_every=5", "eval.every=null"]
    uri, _ = cli_train(tmp_path, "timed", TWO, *budget)
    (run,) = runs(uri)
    assert run.info.status == "FINISHED" and run.data.metrics["train/seconds"] >= 4
    assert run.data.metrics["train/lr"] == pytest.approx(3e-3 * 0.1)  # the schedule spans the time


def child_run(tmp_path: Path, *overrides: str) -> tuple[str, str, Path]:
    """A cell's run directory as a sweep worker writes it (config.yaml, run.json, an MLflow run)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("ddp")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("ddp")
    run_id = client.create_run(experiment_id).info.run_id
    run_dir = tmp_path / "cells" / run_id
    run_dir.mkdir(parents=True)
    config = load_config("tiny", [*QUICK, TWO, *overrides])
    (run_dir / run_module.CONFIG_FILE).write_text(resolved_yaml(config))
    info = {"run_id": run_id, "tracking_uri": uri, "source": "test_ddp"}
    (run_dir / run_module.RUN_FILE).write_text(json.dumps(info) + "\n")
    return uri, run_id, run_dir


def start_child(run_dir: Path, uri: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mta_lab.sweep.child", str(run_dir)],
        env={**ENV, TRACKING_ENV: uri},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.slow  # three two-process runs: about 45 s
def test_a_sweep_cell_on_two_processes_stops_cleanly_and_resumes_exactly(tmp_path):
    # Dropout, and micro-batches: a resume must restore each rank's generator and skip the rows used.
    overrides = ["train.steps=40", "model.dropout=0.1", "train.grad_accum=2"]
    uri, straight_id, straight_dir = child_run(tmp_path, *overrides)
    code, output = finish(start_child(straight_dir, uri))
    assert code == 0, output
    assert MlflowClient(uri).get_run(straight_id).info.status == "FINISHED"
    progress = [json.loads(line) for line in (straight_dir / PROGRESS_FILE).read_text().splitlines()]
    trained = [record["step"] for record in progress if "train/loss" in record["metrics"]]
    assert trained == list(range(1, 41))  # rank 0 wrote it, once a step

    _, run_id, run_dir = child_run(tmp_path, *overrides)
    child = start_child(run_dir, uri)
    wait_for("checkpoints/last.ckpt", run_dir)
    ranks = ranks_of(child.pid)
    assert len(ranks) == 1
    child.send_signal(signal.SIGTERM)  # how a worker prunes or stops its cell
    code, output = finish(child, timeout=60)
    assert code == 143, output
    assert alive(ranks) == [], "rank 1 outlived rank 0"
    stopped = MlflowClient(uri).get_run(run_id)
    assert stopped.info.status == "KILLED" and "mta.stopped" in stopped.data.tags
    assert max(history(uri, run_id, "train/loss")) < 40  # stopped mid-way

    code, output = finish(start_child(run_dir, uri))  # the worker's next attempt at the cell
    assert code == 0, output
    assert MlflowClient(uri).get_run(run_id).info.status == "FINISHED"
    assert [r.info.run_id for r in runs(uri)].count(run_id) == 1 and len(runs(uri)) == 2
    for key in ("train/loss", "val/loss"):
        resumed, reference = history(uri, run_id, key), history(uri, straight_id, key)
        assert sorted(resumed) == sorted(reference), key
        for step, value in reference.items():
            assert resumed[step] == pytest.approx(value, rel=TOLERANCE), (key, step)


@pytest.mark.slow  # one two-process run, killed: about 10 s
def test_ranks_die_with_a_killed_rank_zero(tmp_path):
    """Killed while rank 1 is still starting (before any collective whose broken connection would
    also end it): only the kernel can stop rank 1 then (PR_SET_PDEATHSIG), or it waits for rank 0 at
    the rendezvous for half an hour."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    command = [sys.executable, "-m", "mta_lab.cli", "train", "tiny", *QUICK, TWO, "train.steps=100000"]
    process = subprocess.Popen(
        [*command, "--tracking-uri", uri, "--runs-dir", str(tmp_path / "runs")],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not ranks_of(process.pid):
        assert time.time() < deadline and process.poll() is None, "rank 1 never started"
        time.sleep(0.05)
    ranks = ranks_of(process.pid)
    process.kill()  # no chance to stop its ranks
    process.wait()
    deadline = time.time() + 10
    while alive(ranks) and time.time() < deadline:
        time.sleep(0.1)
    assert alive(ranks) == [], "rank 1 outlived a killed rank 0"


def test_a_batch_that_does_not_split_between_the_processes_starts_nothing(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    argv = ["train", "tiny", *QUICK, "runtime.devices=3", "--tracking-uri", uri, "--runs-dir", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "train.batch_size: 8 sequences do not split evenly between runtime.devices=3 processes" in err
    assert runs(uri) == []
    with pytest.raises(ValueError, match="devices: 0 is not allowed"):
        RuntimeConfig(devices=0)


def test_more_processes_than_visible_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    config = load_config("tiny", [TWO])
    with pytest.raises(
        ConfigError, match=r"runtime.devices: 2 processes need 2 GPUs, but this process sees 1 "
    ):
        run_module._check_devices(config, torch.device("cuda"))
    run_module._check_devices(config, torch.device("cpu"))  # CPU processes: as many as asked
