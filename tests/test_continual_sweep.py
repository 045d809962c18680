"""A continual-training sweep end to end: the baseline is pretrained once, every cell starts from its
weights, and MTA added at identity starts exactly where the pretrained model was."""

from __future__ import annotations

import subprocess

import pytest
from conftest import sweep_command
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow  # a pretraining run and 4 short cells: about a minute

SWEEP = """
base: tiny
fixed:
  data.seq_len: 32
  data.corpora.stdlib: null
  eval.batches: 1
  eval.every: null
  train.batch_size: 4
variants:
  mta:
    model.mta.out_norm: null
seeds: [0, 1]
budget: {steps: 6}
pretrain:
  budget: {steps: 20}
"""


def test_every_cell_continues_the_pretrained_model(tmp_path):
    path = tmp_path / "cont.yaml"
    path.write_text(SWEEP)
    result = subprocess.run(sweep_command(path), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    weights = tmp_path / "runs" / "sweeps" / "cont" / "pretrained.safetensors"
    assert weights.is_file() and "pretraining the model every cell starts from" in result.stdout

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("cont").experiment_id])
    (pretrain,) = [r for r in runs if r.data.tags.get("mta.role") == "pretrain"]
    cells = [r for r in runs if r.data.tags.get("mta.role") in ("baseline", "variant")]
    assert pretrain.info.status == "FINISHED" and len(cells) == 4
    start = {}
    for run in cells:
        assert run.data.params["train.init_from"] == str(weights)
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/loss")}
        assert set(history) == {0, 6}
        start[(run.data.tags["mta.variant"], run.data.tags["mta.seed"])] = history[0]
    # One starting point: every cell, MTA at identity included, evaluates the pretrained model at step 0.
    first = next(iter(start.values()))
    assert all(value == pytest.approx(first, rel=1e-5) for value in start.values()), start
    pretrained_end = {m.step: m.value for m in client.get_metric_history(pretrain.info.run_id, "val/loss")}[
        20
    ]
    assert first == pytest.approx(pretrained_end, rel=1e-5)

    again = subprocess.run(sweep_command(path), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "(trained before)" in again.stdout  # not pretrained twice
