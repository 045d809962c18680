"""A scaling sweep end to end: a ladder of budgets per variant, trained for real, ends with each
variant's compute multiplier and its interval; the report draws the fitted curves."""

from __future__ import annotations

import re
import subprocess

import pytest
from conftest import sweep_command

from mta_lab.cli import main

pytestmark = pytest.mark.slow  # 12 short runs: about a minute

SWEEP = """
base: tiny
fixed:
  data.seq_len: 16
  data.corpora.stdlib: null
  eval.batches: 2
  eval.every: null
  train.batch_size: 4
  train.schedule.warmup_steps: 2
variants: {mta: {}}
seeds: [0, 1]
design: scaling
ladder:
  - {budget: {steps: 6}}
  - {budget: {steps: 12}}
  - {budget: {steps: 24}}
"""


def test_a_scaling_sweep_ends_with_a_compute_multiplier_per_variant(tmp_path, capsys):
    path = tmp_path / "ladder.yaml"
    path.write_text(SWEEP)
    result = subprocess.run(sweep_command(path), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    said = result.stdout
    for unit in ("FLOPs", "time"):
        line = next(line for line in said.splitlines() if line.strip().startswith(f"mta ({unit}):"))
        found = re.search(r"at ([0-9.]+)x its .*95% interval \[([0-9.]+), ([0-9.]+|never)\]", line)
        assert found, line
        estimate, low = float(found[1]), float(found[2])
        assert low <= estimate and (found[3] == "never" or estimate <= float(found[3]))

    out = tmp_path / "dashboards"
    store = f"sqlite:///{tmp_path}/mlflow.db"
    assert (
        main(["report", str(path), "--profile", "full", "--tracking-uri", store, "--out-dir", str(out)]) == 0
    )
    printed = capsys.readouterr().out
    assert "at equal tokens, at the top rung (steps=24)" in printed and "Compute multiplier" in printed
    html = (out / "ladder" / "index.html").read_text()
    assert "The compute multiplier" in html and "fitted curve" in html
    assert (out / "ladder" / "figures" / "scaling.png").is_file()
