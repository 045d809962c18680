"""Sweep files: the shipped ones expand and validate; expansion rules; bad files fail up front."""

from __future__ import annotations

from pathlib import Path

import pytest

from mta_lab.cli import main
from mta_lab.config import ConfigError
from mta_lab.sweep.spec import Profile, check_metric, expand, load_sweep, split_rung, sweep_names

SHIPPED = [
    "kernel_size",
    "softmax_position",
    "head_groups",
    "norm_gating",
    "layer_placement",
    "kernel_init",
    "paper_table5",
    "toy_block",
    "lr",
    "scaling",
    "equal_compute",
    "continual",
]


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return str(path)


def test_the_required_sweeps_ship():
    assert set(SHIPPED) <= set(sweep_names())


@pytest.mark.parametrize("profile", [Profile.cpu, Profile.full])
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_sweeps_expand_and_validate(name, profile):
    sweep = load_sweep(name, profile)
    if sweep.spec.search is not None:
        assert sweep.spec.search.n_trials >= 1
        return
    cells = expand(sweep)
    check_metric(sweep, cells)
    assert len({cell.config_hash for cell in cells}) == len(cells)  # no two cells train the same thing
    labels = {cell.label for cell in cells}
    variants = {split_rung(label)[0] for label in labels}  # a scaling cell's label names its rung too
    for label in labels:  # paired: every cell has every seed
        assert sorted(c.seed for c in cells if c.label == label) == sorted(sweep.spec.seeds)
    assert ("baseline" in variants) == sweep.spec.baseline
    assert all(cell.config.model.mta is None for cell in cells if cell.role == "baseline")
    assert all(cell.config.train.seed == cell.seed == cell.config.data.seed for cell in cells)
    if profile == Profile.cpu:
        assert {cell.config.model.dim for cell in cells} <= {64}  # the tiny model, or the narrowed toy one


def test_grid_ofat_and_variants(tmp_path):
    grid = load_sweep(
        write(
            tmp_path,
            """
base: tiny
axes: {model.mta.pre_qk_conv.query_kernel: [2, 6], model.mta.pre_qk_conv.key_kernel: [3, 11]}
seeds: [0, 1]
budget: {steps: 5}
""",
        ),
        Profile.full,
    )
    cells = expand(grid)
    assert len(cells) == (1 + 4) * 2
    assert {c.label for c in cells} == {
        "baseline",
        "query_kernel=2 key_kernel=3",
        "query_kernel=2 key_kernel=11",
        "query_kernel=6 key_kernel=3",
        "query_kernel=6 key_kernel=11",
    }
    cell = next(c for c in cells if c.label == "query_kernel=2 key_kernel=11" and c.seed == 1)
    assert (cell.config.model.mta.pre_qk_conv.query_kernel, cell.config.model.mta.pre_qk_conv.key_kernel) == (
        2,
        11,
    )
    assert cell.config.train.steps == 5 and cell.config.tracking.experiment == "sweep"

    ofat = load_sweep(
        write(
            tmp_path,
            """
base: tiny
baseline: false
design: ofat
axes: {model.mta.pre_qk_conv.query_kernel: [2, 6], model.mta.pre_qk_conv.key_kernel: [3, 11]}
seeds: [0]
""",
        ),
        Profile.full,
    )
    # tiny's own values are 6 and 11: the base, then each other value alone.
    assert [c.label for c in expand(ofat)] == [
        "query_kernel=6 key_kernel=11 (base)",
        "query_kernel=2 key_kernel=11",
        "query_kernel=6 key_kernel=3",
    ]
    assert [c.axis for c in expand(ofat)] == [
        "",
        "model.mta.pre_qk_conv.query_kernel",
        "model.mta.pre_qk_conv.key_kernel",
    ]

    variants = load_sweep(
        write(
            tmp_path,
            """
base: tiny
variants:
  pre: {model.mta.post_qk_conv: null}
  dropped: null
seeds: [3]
""",
        ),
        Profile.full,
    )
    cells = expand(variants)
    assert [c.label for c in cells] == ["baseline", "pre"] and cells[1].config.model.mta.post_qk_conv is None


def test_cpu_profile_is_a_delta_and_defaults_to_tiny(tmp_path):
    path = write(tmp_path, "base: small\nvariants: {a: {}}\nbudget: {tokens: 1000000}\n")
    full, cpu = load_sweep(path, Profile.full), load_sweep(path, Profile.cpu)
    assert full.spec.budget.tokens == 1_000_000 and full.spec.base == "small" and full.study_name == "sweep"
    assert (cpu.spec.base, cpu.spec.budget.steps, cpu.spec.budget.tokens) == ("tiny", 100, None)
    assert cpu.study_name == "sweep-cpu"


BAD = {
    "unknown key": ("base: tiny\naxis: {}\n", "axis: unknown key; did you mean 'axes'?"),
    "wrong type": ("base: tiny\nseeds: one\n", "seeds"),
    "empty axis": ("base: tiny\naxes: {model.dim: []}\n", "axes: ['model.dim'] have no values"),
    "empty seeds": ("base: tiny\nseeds: []\nvariants: {a: {}}\n", "seeds: the seed list is empty"),
    "unknown preset": (
        "base: tinyy\nvariants: {a: {}}\n",
        "cell 'baseline · seed 0': unknown preset 'tinyy'",
    ),
    "invalid cell": (
        "base: tiny\naxes: {model.mta.pre_qk_conv.key_kernel: [5, 4]}\nseeds: [0]\n",
        "cell 'key_kernel=4 · seed 0': override 'model.mta.pre_qk_conv.key_kernel=4': "
        "model.mta.pre_qk_conv.key_kernel: 4 is even",
    ),
    "unknown config key": (
        "base: tiny\nvariants: {a: {model.nope: 1}}\n",
        "cell 'a · seed 0': override 'model.nope=1'",
    ),
    "bad distribution": (
        "base: tiny\nsearch: {params: {train.optim.lr: {type: float, low: 0, high: 1, log: true}}}\n",
        "search.params.train.optim.lr.low: 0.0 must be > 0 with log: true",
    ),
    "categorical without choices": (
        "base: tiny\nsearch: {params: {model.dim: {type: categorical}}}\n",
        "needs a non-empty list of choices",
    ),
    "unknown distribution": (
        "base: tiny\nsearch: {params: {model.dim: {type: beta}}}\n",
        "expected one of [float, int, categorical]",
    ),
    "axes and variants": (
        "base: tiny\naxes: {model.dim: [32]}\nvariants: {a: {}}\n",
        "give axes or variants, not both",
    ),
    "bad metric": (
        "base: tiny\nvariants: {a: {}}\nmetric: {name: val/nope/loss}\n",
        "metric.name: 'val/nope/loss' is not logged",
    ),
    "a metric no run logs": (
        "base: tiny\nvariants: {a: {}}\nmetric: {name: val/nonexistent}\n",
        "metric.name: 'val/nonexistent' is not logged by cell 'baseline' (allowed: ",
    ),
    "a text metric on the toy task": (
        "base: toy-block-cpu-mta\nvariants: {a: {}}\nmetric: {name: val/loss}\n",
        "'val/loss' is not logged by cell 'baseline' (allowed: sys/peak_memory_mb, sys/wall_time_s, toy_block/err_seq",
    ),
    "a quote in the name": (
        "name: it's\nbase: tiny\nvariants: {a: {}}\n",
        "name: 'it's' cannot name a sweep (allowed: up to 100 letters, digits",
    ),
    "a path in the name": ("name: ../x\nbase: tiny\nvariants: {a: {}}\n", "name: '../x' cannot name a sweep"),
    "an empty file": ("", "the sweep file is empty"),
    "a huge seed": (
        "base: tiny\nvariants: {a: {}}\nseeds: [100000000000000000000000]\n",
        "seeds must be integers in 0..4294967295",
    ),
    "an interpolation": (
        "base: tiny\nvariants: {a: {model.dim: '${oc.env:HOME}'}}\n",
        "variants.a.model.dim: interpolations (${...}) are not allowed here",
    ),
    "a bad budget in the cpu profile": (
        "base: tiny\nvariants: {a: {}}\ncpu: {budget: {steps: -5}}\n",
        "sweep.yaml (cpu profile): budget.steps: -5 is not a budget",
    ),
    "two budgets": (
        "base: tiny\nvariants: {a: {}}\nbudget: {steps: 5, tokens: 9}\n",
        "budget.tokens: give exactly one of budget.steps, tokens, flops or seconds (given: steps, tokens)",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_sweep_files_fail_up_front(tmp_path, capsys, monkeypatch, case):
    text, message = BAD[case]
    path = write(tmp_path, text)
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", path, "--profile", "full"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "sweep.yaml" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.yaml"]  # no study, no MLflow store


def test_unknown_sweep_name(capsys):
    with pytest.raises(ConfigError, match="did you mean 'kernel_size'"):
        load_sweep("kernel_sise")
    assert main(["sweep", "kernel_sise"]) == 2 and "unknown sweep" in capsys.readouterr().err


def test_dry_run_lists_cells_and_starts_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "kernel_size", "--dry-run", "--profile", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "query_kernel=1 key_kernel=9" in out and "baseline" in out and "15 runs" in out
    assert (
        "experiment 'kernel_size', parent run 'kernel_size (cpu)'" in out and "study 'kernel_size-cpu'" in out
    )
    assert "600 steps = 960,000 tokens = 8.04e+11 FLOPs per run, equal tokens" in out
    assert "dry run: nothing was started" in out
    assert list(tmp_path.iterdir()) == []


def test_every_shipped_sweep_records_its_settings_in_a_real_mlflow_store(tmp_path):
    # The parent run's params are the flattened sweep file; variant names such as "pre c_h=1" hold
    # characters MLflow refuses in a param name (head_groups could not start before they were replaced).
    from mlflow.tracking import MlflowClient

    from mta_lab.infra.tracking import RunRecord, flat_params

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.create_experiment("sweeps")
    for name in sweep_names():
        for profile in (Profile.full, Profile.cpu):
            params = flat_params(load_sweep(name, profile).spec, prefix="sweep")
            run = client.create_run(experiment, run_name=f"{name} {profile.value}").info.run_id
            RunRecord(client, run).log_params(params)
            assert client.get_run(run).data.params == params
    assert "sweep.variants.pre c_h_1.model.mta.post_head_mix" in flat_params(
        load_sweep("head_groups", Profile.full).spec, prefix="sweep"
    )


@pytest.mark.parametrize(
    "budget", ["{steps: forty}", "{steps: -5}", "{steps: 20, tokens: 1000}"], ids=["text", "negative", "both"]
)
def test_the_full_profile_is_validated_on_a_machine_that_runs_the_cpu_one(tmp_path, capsys, budget):
    path = write(
        tmp_path, f"base: tiny\nvariants: {{a: {{}}}}\nbudget: {budget}\ncpu: {{budget: {{steps: 3}}}}\n"
    )
    assert main(["sweep", path, "--profile", "cpu", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sweep.yaml: budget" in err and "(cpu profile)" not in err


def test_a_sweep_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_bytes(b"base: tiny\nvariants: {caf\xe9: {}}\n")
    assert main(["sweep", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not UTF-8 text (byte 0xe9 at offset 25)" in err


def test_a_kernel_this_machine_cannot_run_is_refused_before_anything_starts(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TRITON_INTERPRET")  # no GPU, no interpreter: Triton kernels cannot run here
    path = write(tmp_path, "base: tiny\nvariants: {a: {runtime.score_conv: triton}}\nbudget: {steps: 3}\n")
    assert main(["sweep", path, "--profile", "full"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cell 'a · seed 0': runtime.score_conv=triton needs Triton" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.yaml"]
