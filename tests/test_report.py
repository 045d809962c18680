"""The results frame and the dashboard of a real small sweep, opened in a headless browser."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from conftest import sweep_command
from mlflow.tracking import MlflowClient

from mta_lab.cli import main

# Every test reads one real sweep (the baseline and MTA, 2 seeds each, at equal FLOPs), trained once:
# about a minute.
pytestmark = pytest.mark.slow

SWEEP = """
base: tiny
fixed:
  data.seq_len: 16
  data.corpora.stdlib: null
  eval.batches: 1
  eval.every: 2
  train.batch_size: 2
  train.log_every: 1
variants: {mta: {}}
seeds: [0, 1]
budget: {steps: 8}
compute: matched
"""


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> Path:
    """A finished sweep: the baseline and MTA, 2 seeds each."""
    directory = tmp_path_factory.mktemp("swept")
    path = directory / "small.yaml"
    path.write_text(SWEEP)
    command = sweep_command(path)
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return path


def args(path: Path, *more: str) -> list[str]:
    return [str(path), "--profile", "full", "--tracking-uri", f"sqlite:///{path.parent}/mlflow.db", *more]


def test_results_frame_and_formats(swept, capsys, tmp_path):
    assert main(["results", *args(swept), "--format", "csv"]) == 0
    runs = pl.read_csv(io.StringIO(capsys.readouterr().out))
    assert (
        runs.height == 4
        and set(runs["variant"]) == {"baseline", "mta"}
        and sorted(runs["seed"]) == [0, 0, 1, 1]
    )
    assert set(runs["status"]) == {"FINISHED"} and set(runs["role"]) == {"baseline", "variant"}
    for column in (
        "val/loss",
        "best val/loss",
        "val/shakespeare/bpb",
        "tokens_per_s",
        "peak_memory_mb",
        "wall_time_s",
        "parameters",
    ):
        assert runs[column].null_count() == 0, column
    # MTA adds the kernels, head mixing, norm and gate of tiny: more parameters than plain attention.
    by_role = dict(zip(runs["role"], runs["parameters"], strict=False))
    assert by_role["variant"] > by_role["baseline"]
    assert (runs["best val/loss"] <= runs["val/loss"]).all()  # best over the run, final at its end

    assert (
        main(["results", *args(swept), "--format", "parquet", "--out", str(tmp_path / "runs.parquet")]) == 0
    )
    assert pl.read_parquet(tmp_path / "runs.parquet").height == 4
    assert main(["results", *args(swept), "--format", "parquet"]) == 2
    assert "--format parquet writes a file" in capsys.readouterr().err

    assert main(["results", *args(swept), "--stats", "--format", "csv"]) == 0
    stats = pl.read_csv(io.StringIO(capsys.readouterr().out))
    expected = runs.filter(pl.col("variant") == "mta")["val/loss"].mean()
    assert stats.filter(pl.col("variant") == "mta")["mean"][0] == pytest.approx(expected)


def test_report_writes_the_dashboard_and_logs_it(swept, tmp_path, capsys):
    out = tmp_path / "dashboards"
    assert (
        main(["report", *args(swept), "--out-dir", str(out), "--runs-dir", str(swept.parent / "runs")]) == 0
    )
    printed = capsys.readouterr().out
    assert "dashboard:" in printed and "small/index.html" in printed
    index, markdown = out / "small" / "index.html", out / "small" / "report.md"
    html = index.read_text()
    assert "http" not in html.replace("http://127.0.0.1:5000", "").split("<svg")[0]  # no external resources
    assert "<script" not in html
    assert html.count("<svg") >= 3 and "Comparison with the baseline, at equal FLOPs" in html
    assert "The metric against training FLOPs and training time" in html  # the compute figure
    assert "At equal training time: every run read at" in html
    assert "against the baseline, at equal FLOPs" in printed and "At equal training time" in printed
    runs = pl.read_csv(io.StringIO(_csv(swept)))
    for run_id, value in zip(runs["run_id"], runs["val/loss"], strict=True):
        assert run_id in html and f"{value:.4g}" in html  # every run, its number and its MLflow link
    assert "| mta |" in markdown.read_text() and (out / "small" / "figures" / "forest.png").is_file()

    client = MlflowClient(f"sqlite:///{swept.parent}/mlflow.db")
    parent = next(
        r
        for r in client.search_runs([client.get_experiment_by_name("small").experiment_id])
        if r.data.tags.get("mta.role") == "parent"
    )
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {
        "report/index.html",
        "report/report.md",
        "report/comparison.json",
        "report/forest.png",
    } <= artifacts


def _csv(path: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "mta_lab.cli", "results", *args(path), "--format", "csv"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result.stdout


def test_dashboard_in_a_headless_browser(swept, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        message = "no Chromium (apt-get install chromium)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    from playwright.sync_api import sync_playwright

    out = tmp_path / "dashboards"
    assert main(["report", *args(swept), "--out-dir", str(out)]) == 0
    flags = [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
    ]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=flags)
        page = browser.new_page()
        errors: list[str] = []
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on(
            "request",
            lambda request: (
                errors.append(f"request: {request.url}") if not request.url.startswith("file:") else None
            ),
        )
        page.goto((out / "small" / "index.html").resolve().as_uri())
        rows = page.locator("#comparison tbody tr")
        assert rows.count() == 2 and "baseline" in rows.nth(0).inner_text()
        assert page.locator("figure svg").count() >= 3
        assert page.locator("figure svg").first.bounding_box()["width"] > 200  # drawn, not empty
        assert page.locator("#runs tbody tr").count() == 4
        browser.close()
    assert errors == []


def test_bad_requests_say_so(swept, tmp_path, capsys, monkeypatch):
    assert main(["report", *args(swept), "--metric", "val/nope", "--out-dir", str(tmp_path)]) == 2
    assert "no finished run of 'small' logged 'val/nope' (logged: " in capsys.readouterr().err

    other = tmp_path / "never.yaml"
    other.write_text("base: tiny\nvariants: {a: {}}\n")
    assert (
        main(["report", str(other), "--profile", "full", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]) == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no runs of sweep 'never' (full profile)" in err

    # A sweep whose only run failed: a real store, its run made by hand.
    uri = f"sqlite:///{tmp_path}/failed.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("never")
    parent = client.create_run(experiment, tags={"mta.role": "parent", "mta.study": "never"}).info.run_id
    child = client.create_run(
        experiment, tags={"mlflow.parentRunId": parent, "mta.variant": "a", "mta.seed": "0"}
    )
    client.set_terminated(child.info.run_id, "FAILED")
    monkeypatch.chdir(tmp_path)
    assert main(["results", str(other), "--profile", "full", "--tracking-uri", uri]) == 0
    assert main(["report", str(other), "--profile", "full", "--tracking-uri", uri]) == 2
    assert "sweep 'never' has no finished runs yet (runs: 1 FAILED)" in capsys.readouterr().err
    assert not (tmp_path / "dashboards").exists()
