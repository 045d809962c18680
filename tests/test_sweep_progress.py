"""A running sweep's display: a bar per cell training here, at its step, with its loss."""

from __future__ import annotations

import io
import json

import optuna
from rich.console import Console

from mta_lab.config import load_config, resolved_yaml
from mta_lab.sweep.progress import SweepProgress, cell_budget, last_step
from mta_lab.sweep.spec import Profile, load_sweep


def test_each_running_cell_shows_its_step_of_the_total_and_its_loss(tmp_path):
    config = load_config("toy-block-cpu-mta", ["train.steps=600"])
    cell = tmp_path / "cells" / "abc123"
    cell.mkdir(parents=True)
    (cell / "config.yaml").write_text(resolved_yaml(config))
    records = [{"step": 10, "metrics": {"train/loss": 3.2}}, {"step": 20, "metrics": {"train/loss": 2.5}},
               {"step": 20, "metrics": {"toy_block/err_seq": 0.9}}]  # fmt: skip
    (cell / "progress.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 3')
    assert last_step(cell / "progress.jsonl") == (20, 2.5, 0.0)  # evaluations and a torn line skipped
    assert last_step(cell / "not-yet.jsonl") == (0, None, 0.0)
    assert cell_budget(cell / "config.yaml").steps == 600 and cell_budget(tmp_path / "nowhere.yaml") is None

    study = optuna.create_study()
    running = study.ask()
    for key, value in {"cell": "abc123", "label": "query_kernel=2 key_kernel=9", "seed": 1}.items():
        running.set_user_attr(key, value)
    elsewhere = study.ask()  # trained on another machine: no files here
    for key, value in {"cell": "def456", "label": "baseline", "seed": 0}.items():
        elsewhere.set_user_attr(key, value)
    screen = Console(file=io.StringIO(), width=150)
    with SweepProgress(study, load_sweep("kernel_size", Profile.cpu), tmp_path, 15, screen) as progress:
        progress.update()
        (bar,) = progress.cells.values()
        task = progress.progress.tasks[bar]
        assert (task.completed, task.total, task.fields["loss"]) == (20, 600, "loss 2.500")
        assert task.description == "  query_kernel=2 key_kernel=9 · seed 1"
        study.tell(running, 0.1)
        progress.update()
        assert progress.cells == {}  # finished: its bar goes, its result is printed
    assert "done   query_kernel=2 key_kernel=9 · seed 1: toy_block/err_seq = 0.1" in screen.file.getvalue()
