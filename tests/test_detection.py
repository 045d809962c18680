"""Detection power, end to end: a real sweep on the toy task, trained, read back from MLflow, compared.

Variants whose effect is known and large must come out "better" (MTA on find-the-block, where plain
attention is stuck) and "worse" (the same plain model with a learning rate too small to learn), each
with Holm-corrected p < 0.05 over 3 seeds; the baseline again under another name must come out "no
detectable difference". These are the tests that show the statistics tell signal from noise.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import polars as pl
import pytest
from conftest import sweep_command

from mta_lab.analysis.report import build_report
from mta_lab.sweep.spec import Profile

SWEEP = """
base: toy-block-cpu-mta
variants:
  mta: {}
  crippled: {model.mta: null, train.optim.lr: 1.0e-5}
  baseline again: {model.mta: null, tracking.run_name: baseline again}
seeds: [0, 1, 2]
metric: {name: toy_block/err_seq, goal: minimize}
budget: {steps: 700}
"""


@pytest.mark.slow
def test_known_effects_are_found_and_a_null_is_not(tmp_path: Path):
    path = tmp_path / "detection.yaml"
    path.write_text(SWEEP)
    result = subprocess.run(sweep_command(path), capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout + result.stderr

    report = build_report(
        str(path),
        profile=Profile.full,
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        out_dir=tmp_path / "dashboards",
        runs_dir=tmp_path / "runs",
        log_to_mlflow=False,
    )
    table = {row["variant"]: row for row in report.comparison.iter_rows(named=True)}
    assert table["mta"]["verdict"] == "better" and table["mta"]["p_holm"] < 0.05, table["mta"]
    assert table["crippled"]["verdict"] == "worse" and table["crippled"]["p_holm"] < 0.05, table["crippled"]
    again = table["baseline again"]
    assert again["verdict"] == "no detectable difference with 3 seeds" and again["delta"] == 0.0, again
    # The known gap itself: MTA well under the baseline's error; its interval excludes no difference.
    assert table["mta"]["delta_high"] < -0.3 and table["baseline"]["mean"] > 0.5

    # When each variant learns: the task metric over steps, per variant, in the dashboard.
    html = report.index.read_text()
    assert "toy_block/err_seq (mean over seeds" in html
    history = report.runs.filter(pl.col("variant") == "mta")
    assert history.height == 3
