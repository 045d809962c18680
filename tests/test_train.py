"""Training runs end to end on CPU: what MLflow records, failure and interruption statuses, bad input
that starts nothing, and exact resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mta_lab.cli import main
from mta_lab.config import load_config
from mta_lab.model.flops import training_flops_per_token
from mta_lab.train.module import LanguageModel
from mta_lab.train.run import train

# A few seconds of tiny: short rows, few steps, one validation batch per corpus.
QUICK = [
    "train.steps=12",
    "train.log_every=4",
    "train.checkpoint_every=6",
    "eval.every=6",
    "eval.batches=1",
    "data.seq_len=32",
    "data.corpora.stdlib=null",
]


def runs(uri: str) -> list:
    client = MlflowClient(uri)
    experiments = client.search_experiments()
    return client.search_runs([e.experiment_id for e in experiments]) if experiments else []


def test_train_tiny_records_one_finished_run(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    argv = ["train", "tiny", *QUICK, "--tracking-uri", uri, "--runs-dir", str(tmp_path / "runs")]
    assert main(argv) == 0
    assert "FINISHED" in capsys.readouterr().out
    (run,) = runs(uri)
    assert run.info.status == "FINISHED" and run.info.run_name.startswith("tiny steps=12")
    params = run.data.params
    assert params["model.mta.pre_qk_conv.key_kernel"] == "11" and params["train.steps"] == "12"
    assert params["data.corpora.stdlib"] == "None" and params["model.mta.out_norm.gate"] == "scalar"
    metrics = run.data.metrics
    for key in (
        "train/loss",
        "train/lr",
        "train/tokens_per_s",
        "train/tokens",
        "sys/peak_memory_mb",
        "val/loss",
        "val/ppl",
        "val/bpb",
        "val/shakespeare/loss",
        "val/shakespeare/bpb",
    ):
        assert key in metrics, key
    # What a sweep may choose as its metric is exactly what a run logs (besides its parameter count).
    assert set(metrics) - {"model/parameters"} == set(load_config("tiny", QUICK).logged_metrics())
    assert metrics["val/ppl"] == pytest.approx(2.718281828 ** metrics["val/loss"], rel=1e-6)
    assert metrics["train/tokens"] == 12 * 8 * 32
    per_token = sum(training_flops_per_token(load_config("tiny", QUICK).model, 32).values())
    assert metrics["train/flops"] == pytest.approx(12 * 8 * 32 * per_token)  # cumulative, analytic
    client = MlflowClient(uri)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == [6, 12]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [4, 8, 12]
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == ["config.yaml", "manifest.json"]
    manifest = json.loads(
        client.download_artifacts(run.info.run_id, "manifest.json", str(tmp_path))
        and (tmp_path / "manifest.json").read_text()
    )
    assert manifest["config_hash"] == run.data.tags["mta.config_hash"]
    assert manifest["packages"]["torch"] and manifest["device"].startswith("cpu")
    # Every layer of tiny mixes heads, so each runs on the tiled path on CPU, F.conv2d convolving.
    assert manifest["execution"] == [
        {
            "layer_id": layer,
            "path": "tiled",
            "reason": "the fused kernel runs on CUDA with Triton",
            "tile_rows": 128,
            "triton_convs": False,
        }
        for layer in range(4)
    ]
    assert "git_commit" in manifest and "git_dirty" in manifest
    run_dir = Path(run.data.tags["mta.run_dir"])
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "config.yaml").is_file()
    assert load_config(str(run_dir / "config.yaml")).train.steps == 12


def test_toy_task_trains_and_logs_its_error(tmp_path):
    config = load_config(
        "toy-block-mta",
        ["train.steps=3", "train.batch_size=4", "eval.every=null", "tasks.toy_block.eval_examples=20"],
    )
    result = train(
        config, "toy-block-mta", tracking_uri=f"sqlite:///{tmp_path}/m.db", runs_dir=tmp_path, progress=False
    )
    assert result.status == "FINISHED"
    assert 0 <= result.metrics["toy_block/err_seq"] <= 1 and 0 <= result.metrics["toy_block/err_tok"] <= 1
    (run,) = runs(result.tracking_uri)
    assert "toy_block/err_seq" in run.data.metrics


@pytest.mark.parametrize(
    ("error", "status"), [(RuntimeError("boom at step 3"), "FAILED"), (KeyboardInterrupt(), "KILLED")]
)
def test_failed_and_interrupted_runs_are_not_left_running(tmp_path, monkeypatch, error, status):
    original = LanguageModel.training_step

    def failing(self, batch, batch_idx):
        if self.global_step == 3:
            raise error
        return original(self, batch, batch_idx)

    monkeypatch.setattr(LanguageModel, "training_step", failing)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises((RuntimeError, KeyboardInterrupt, SystemExit)):
        train(load_config("tiny", QUICK), "tiny", tracking_uri=uri, runs_dir=tmp_path, progress=False)
    (run,) = runs(uri)
    assert run.info.status == status
    if status == "FAILED":
        assert run.data.tags["mta.error"] == "RuntimeError: boom at step 3"
        assert [a.path for a in MlflowClient(uri).list_artifacts(run.info.run_id) if a.path == "error.txt"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.seq_len=4096"], "data.seq_len: 4096 exceeds model.max_seq_len=1024"),
        (["train.steps=0"], "train.steps: 0 is not a budget"),
        (["tasks.nope.weight=1"], "tasks.nope: unknown key"),
        (["data.corpora.mine.path=/does/not/exist"], "/does/not/exist: not a prepared dataset"),
        (["data.corpora.mine.weight=1"], "'mine' is not a built-in corpus"),
        (["tasks.niah.contexts=[100]", "tasks.niah.weight=0"], "tasks.niah: 2 needles and the question take"),
        (["data.tokenizer.kind=char"], "the char tokenizer encodes only"),
    ],
)
def test_bad_input_starts_nothing(tmp_path, capsys, overrides, message):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert (
        main(["train", "tiny", *QUICK, *overrides, "--tracking-uri", uri, "--runs-dir", str(tmp_path)]) == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert runs(uri) == []  # no MLflow run was created, so none is left RUNNING
    assert not list(tmp_path.glob("*/checkpoints"))


def test_unknown_preset_and_bad_data_prepare_inputs(tmp_path, capsys):
    assert main(["train", "tinyy"]) == 2
    assert "did you mean 'tiny'" in capsys.readouterr().err
    (tmp_path / "rows.jsonl").write_text('{"body": "no text field"}\n')
    assert main(["data", "prepare", str(tmp_path / "rows.jsonl"), "--out", str(tmp_path / "ds")]) == 2
    assert "no 'text' field (found: body)" in capsys.readouterr().err
    assert not (tmp_path / "ds").exists() and [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]


def cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mta_lab.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    """Wait for a process while reading its output (a full pipe would block its exit)."""
    output = process.communicate(timeout=timeout)[0]
    return process.returncode, output


@pytest.mark.slow  # trains in a child process and interrupts it: tens of seconds
def test_a_killed_run_resumes_to_the_same_result(tmp_path):
    """SIGKILL after the first checkpoint, resume: the same final losses as an uninterrupted run."""
    # grad_accum 2: a resumed run must skip the micro-batches, not only the steps, it already used.
    overrides = [*QUICK, "train.steps=30", "train.checkpoint_every=10", "eval.every=15", "model.dropout=0.1"]
    overrides += ["train.grad_accum=2"]

    straight = cli(
        "train",
        "tiny",
        *overrides,
        "--tracking-uri",
        f"sqlite:///{tmp_path}/a.db",
        "--runs-dir",
        str(tmp_path / "a"),
    )
    code, output = finish(straight)
    assert code == 0, output

    uri = f"sqlite:///{tmp_path}/b.db"
    killed = cli("train", "tiny", *overrides, "--tracking-uri", uri, "--runs-dir", str(tmp_path / "b"))
    deadline = time.time() + 300
    while not list((tmp_path / "b").glob("*/checkpoints/last.ckpt")) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    (run_dir,) = (tmp_path / "b").iterdir()
    (interrupted,) = runs(uri)
    assert interrupted.info.status == "RUNNING"  # SIGKILL leaves no chance to record anything

    resumed = cli("train", "--resume", str(run_dir))
    code, output = finish(resumed)
    assert code == 0, output
    (a,), (b,) = runs(f"sqlite:///{tmp_path}/a.db"), runs(uri)
    assert b.info.status == "FINISHED" and b.info.run_id == interrupted.info.run_id
    for key in ("val/loss", "val/shakespeare/bpb", "train/loss"):
        assert b.data.metrics[key] == pytest.approx(a.data.metrics[key], rel=1e-5), key


@pytest.mark.slow  # trains in a child process and interrupts it: tens of seconds
def test_sigterm_marks_the_run_killed(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    process = cli(
        "train", "tiny", *QUICK, "train.steps=100000", "--tracking-uri", uri, "--runs-dir", str(tmp_path)
    )
    deadline = time.time() + 300
    while not list(tmp_path.glob("*/checkpoints/last.ckpt")) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    finish(process, timeout=120)
    (run,) = runs(uri)
    assert run.info.status == "KILLED"


@pytest.mark.slow  # trains in a child process and interrupts it: tens of seconds
def test_ctrl_c_says_how_to_resume_and_exits_130(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    process = cli(
        "train", "tiny", *QUICK, "train.steps=40", "--tracking-uri", uri, "--runs-dir", str(tmp_path)
    )
    deadline = time.time() + 300
    while not list(tmp_path.glob("*/checkpoints/last.ckpt")) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    code, output = finish(process, timeout=120)
    assert code == 130
    (run,) = runs(uri)
    assert run.info.status == "KILLED"
    assert f"mta-lab train --resume {tmp_path / run.info.run_id}" in output
    assert finish(cli("train", "--resume", str(tmp_path / run.info.run_id)))[0] == 0
    assert runs(uri)[0].info.status == "FINISHED"


def test_run_names_are_short_and_the_overrides_stay_whole(tmp_path, capsys):
    from mta_lab.train.run import default_run_name

    assert default_run_name("tiny", ["model.mta.pre_qk_conv.key_kernel=9", "train.steps=5"]) == (
        "tiny key_kernel=9 steps=5"
    )
    many = [f"tasks.toy_block.length={n}" for n in range(40)]
    name = default_run_name("configs/toy.yaml", many)
    assert len(name) <= 80 and name.startswith("toy length=0 length=1") and name.endswith("more)")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["train", "tiny", *QUICK, "--tracking-uri", uri, "--runs-dir", str(tmp_path)]) == 0
    (run,) = runs(uri)
    assert run.info.run_name.startswith("tiny steps=12 log_every=4 checkpoint_every=6")
    assert len(run.info.run_name) <= 80 and run.info.run_name.endswith(" more)")
    assert run.data.tags["mta.overrides"] == " ".join(QUICK)


def test_a_damaged_checkpoint_resumes_from_the_one_before(tmp_path):
    import torch

    from mta_lab.train.run import AtomicCheckpointIO, readable_checkpoint

    class Record:
        tags: dict = {}

        def set_tags(self, tags):
            self.tags |= tags

    last = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 6}, last)
    io.save_checkpoint({"global_step": 12}, last)
    assert torch.load(last)["global_step"] == 12
    assert torch.load(tmp_path / "last.previous.ckpt")["global_step"] == 6
    last.write_bytes(last.read_bytes()[:50])  # torn by a kill or a full disk
    record = Record()
    chosen = readable_checkpoint(last, record)
    assert chosen == tmp_path / "last.previous.ckpt" and torch.load(chosen)["global_step"] == 6
    assert record.tags["mta.resumed_from"].startswith(
        "resumed from last.previous.ckpt: last.ckpt could not be read"
    )
    assert (tmp_path / "last.ckpt.damaged").is_file()
    chosen.write_bytes(b"not a checkpoint")
    assert readable_checkpoint(last, record) is None
    assert record.tags["mta.resumed_from"].startswith("started again from step 0")


def test_a_run_whose_checkpoints_are_all_damaged_starts_again_and_says_so(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["train", "tiny", *QUICK, "--tracking-uri", uri, "--runs-dir", str(tmp_path)]) == 0
    (run,) = runs(uri)
    checkpoints = tmp_path / run.info.run_id / "checkpoints"
    for path in checkpoints.glob("*.ckpt"):
        path.write_bytes(b"\x00" * 64)
    assert main(["train", "--resume", str(tmp_path / run.info.run_id)]) == 0
    (again,) = runs(uri)
    assert (
        again.info.status == "FINISHED" and "started again from step 0" in again.data.tags["mta.resumed_from"]
    )
