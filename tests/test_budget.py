"""Budgets in compute: steps, tokens, FLOPs or seconds of training, resolved to what a run trains;
a sweep's ``compute: matched`` cells get the baseline's FLOPs; a time budget stops on its clock and
resumes it."""

from __future__ import annotations

import math

import pytest
from mlflow.tracking import MlflowClient

from mta_lab.cli import main
from mta_lab.config import ConfigError, load_config
from mta_lab.model.flops import training_flops_per_token
from mta_lab.sweep.spec import Profile, expand, load_sweep
from mta_lab.train import budget as budget_module
from mta_lab.train.budget import resolve_budget
from mta_lab.train.module import LanguageModel
from mta_lab.train.run import RunInterrupted, resume, train

QUICK = ["train.log_every=1", "train.checkpoint_every=3", "eval.every=null", "eval.batches=1",
         "data.seq_len=32", "data.corpora.stdlib=null", "train.schedule.warmup_steps=2"]  # fmt: skip


def per_token(overrides: list[str]) -> float:
    config = load_config("tiny", overrides)
    return sum(training_flops_per_token(config.model, config.data.seq_len).values())


def test_a_flop_budget_becomes_the_nearest_whole_steps_and_a_token_budget_those_that_cover_it():
    fpt = per_token(["data.seq_len=32"])
    tokens_per_step = 8 * 32  # tiny's batch of 8 rows
    for flops, steps in [
        (10 * tokens_per_step * fpt, 10),
        (10.4 * tokens_per_step * fpt, 10),
        (10.6 * tokens_per_step * fpt, 11),
    ]:
        config = load_config("tiny", ["data.seq_len=32", "train.steps=null", f"train.flops={flops!r}"])
        budget = resolve_budget(config)
        assert (budget.kind, budget.steps, budget.tokens) == ("flops", steps, steps * tokens_per_step)
    config = load_config("tiny", ["data.seq_len=32", "train.steps=null", "train.tokens=2561"])
    assert resolve_budget(config).steps == 11  # 10 steps hold 2,560 tokens


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["train.flops=1e12"],
            "train.flops: the budget is steps=300 and flops=1000000000000.0; give exactly one",
        ),
        (["train.steps=null"], "train.steps: the budget is all null"),
        (["train.steps=null", "train.seconds=0"], "train.seconds: 0.0 is not a budget"),
    ],
)
def test_a_budget_is_exactly_one_of_four(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config("tiny", overrides)


def round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def write(tmp_path, text: str) -> str:
    path = tmp_path / "matched.yaml"
    path.write_text(text)
    return str(path)


MATCHED = """
base: tiny
fixed: {data.seq_len: 64}
variants:
  mta: {model.mta: {pre_qk_conv: {query_kernel: 2, key_kernel: 5}}}
  cheaper: {model.mta: null, model.ffn_mult: 0.5}
seeds: [0, 1]
budget: {steps: 300}
compute: matched
"""


def test_matched_cells_train_on_the_tokens_the_baselines_flops_buy(tmp_path):
    cells = expand(load_sweep(write(tmp_path, MATCHED), Profile.full))
    tokens_per_step = 8 * 64
    baseline_flops = 300 * tokens_per_step * per_token(["data.seq_len=64", "model.mta=null"])
    expected = {
        "baseline": 300,
        "mta": round_half_up(baseline_flops / tokens_per_step / per_token(
            ["data.seq_len=64", "model.mta.pre_qk_conv.query_kernel=2", "model.mta.pre_qk_conv.key_kernel=5"])),
        "cheaper": round_half_up(baseline_flops / tokens_per_step / per_token(
            ["data.seq_len=64", "model.mta=null", "model.ffn_mult=0.5"])),
    }  # fmt: skip
    assert expected["mta"] < 300 < expected["cheaper"]  # costlier trains on fewer tokens, cheaper on more
    for cell in cells:
        budget = resolve_budget(cell.config)
        assert budget.steps == expected[cell.label], cell.label
        assert (
            abs(budget.flops - baseline_flops) <= tokens_per_step * budget.flops_per_token / 2
        )  # half a step


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("baseline: false", "compute: matched gives every cell the baseline's FLOPs; it needs the baseline"),
        ("budget: {flops: 1e12}", "with budget.flops every cell already has the same budget"),
    ],
)
def test_matched_compute_is_refused_where_it_means_nothing(tmp_path, change, message):
    text = MATCHED.replace("budget: {steps: 300}", "") + change + "\n"
    with pytest.raises(ConfigError, match=message):
        load_sweep(write(tmp_path, text), Profile.full)


def test_dry_run_shows_each_cells_steps_tokens_and_flops(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", write(tmp_path, MATCHED), "--dry-run", "--profile", "full"]) == 0
    out = capsys.readouterr().out
    assert "equal FLOPs (compute: matched)" in out
    mta = next(line for line in out.splitlines() if " mta " in line)
    steps, tokens = mta.split()[4:6]
    assert int(tokens.replace(",", "")) == int(steps.replace(",", "")) * 8 * 64


class FakeTimer:
    """One second per micro-batch trained: a time budget's run becomes exact and repeatable."""

    def __init__(self):
        self.seconds = 0.0

    def __call__(self) -> float:
        return self.seconds


def test_a_time_budget_stops_on_its_clock_and_a_resume_continues_it(tmp_path, monkeypatch):
    timer = FakeTimer()
    monkeypatch.setattr(budget_module, "TIMER", timer)
    original = LanguageModel.training_step

    def one_second_each(self, batch, batch_idx):
        timer.seconds += 1.0
        if self.global_step == 5 and getattr(self, "interrupt", False):
            raise KeyboardInterrupt
        return original(self, batch, batch_idx)

    evaluate = LanguageModel._evaluate

    def slow_evaluation(self, step):  # evaluation and checkpoints are not training time
        timer.seconds += 100.0
        return evaluate(self, step)

    monkeypatch.setattr(LanguageModel, "training_step", one_second_each)
    monkeypatch.setattr(LanguageModel, "_evaluate", slow_evaluation)
    config = load_config("tiny", [*QUICK, "train.steps=null", "train.seconds=10.5", "eval.every=2"])

    def history(uri, run_id, key):
        return {m.step: m.value for m in MlflowClient(uri).get_metric_history(run_id, key)}

    whole = train(
        config, "tiny", tracking_uri=f"sqlite:///{tmp_path}/a.db", runs_dir=tmp_path / "a", progress=False
    )
    seconds = history(whole.tracking_uri, whole.run_id, "train/seconds")
    assert max(seconds) == 11 and seconds[11] == 11.0  # 11 one-second steps reach 10.5 s
    lr = history(whole.tracking_uri, whole.run_id, "train/lr")
    assert lr[11] == pytest.approx(3e-3 * 0.1)  # the schedule spans the time: min_lr_ratio at the end

    monkeypatch.setattr(LanguageModel, "interrupt", True, raising=False)
    with pytest.raises(RunInterrupted) as stopped:
        train(
            config, "tiny", tracking_uri=f"sqlite:///{tmp_path}/b.db", runs_dir=tmp_path / "b", progress=False
        )
    monkeypatch.setattr(LanguageModel, "interrupt", False, raising=False)
    resumed = resume(stopped.value.run_dir, progress=False)
    seconds = history(resumed.tracking_uri, resumed.run_id, "train/seconds")
    assert resumed.status == "FINISHED" and max(seconds) == 11 and seconds[11] == 11.0
    assert history(resumed.tracking_uri, resumed.run_id, "train/lr") == pytest.approx(lr)


SCALING = """
base: tiny
variants:
  mta: {}
seeds: [0, 1]
design: scaling
ladder:
  - {budget: {steps: 50}}
  - {budget: {steps: 100}}
  - {model.dim: 96, budget: {tokens: 40960}}
"""


def test_a_scaling_design_runs_every_variant_on_every_rung(tmp_path):
    cells = expand(load_sweep(write(tmp_path, SCALING), Profile.full))
    assert len(cells) == 3 * 2 * 2  # rungs x (baseline, mta) x seeds
    steps = {(c.label, c.seed): resolve_budget(c.config).steps for c in cells}
    assert steps[("baseline @ steps=50", 0)] == 50 and steps[("mta @ steps=100", 1)] == 100
    big = [c for c in cells if c.label.endswith("dim=96 tokens=40960")]
    assert len(big) == 4 and all(
        c.config.model.dim == 96 and resolve_budget(c.config).steps == 40 for c in big
    )
    assert {c.axis for c in cells} == {"scaling"}
    assert all(c.config.model.mta is None for c in cells if c.label.startswith("baseline"))


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("  - {model.dim: 96, budget: {tokens: 40960}}\n", "", "needs a ladder of at least 3 rungs"),
        ("design: scaling", "design: grid", "ladder: a ladder needs design: scaling"),
        ("{tokens: 40960}", "{tokens: 40960, steps: 3}", r"ladder\[2\].budget.tokens: give exactly one"),
        ("{tokens: 40960}", "{token: 40960}", r"ladder\[2\].budget: allowed: one of steps, tokens"),
    ],
)
def test_bad_ladders_are_refused_with_the_rung_named(tmp_path, old, new, message):
    with pytest.raises(ConfigError, match=message):
        load_sweep(write(tmp_path, SCALING.replace(old, new)), Profile.full)
