"""The mta-lab command: info prints the counts; bad input is one stderr line and exit code 2."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from mta_lab.cli import main


@pytest.mark.parametrize(
    ("preset", "total"),
    [
        ("paper-830m-baseline", "876,553,728"),
        ("paper-830m-talking-heads", "876,566,016"),
        ("paper-830m-mta", "876,583,320"),
    ],
)
def test_info_prints_resolved_config_and_counts(preset, total, capsys):
    assert main(["info", preset]) == 0
    out = capsys.readouterr().out
    assert "n_layers: 24" in out and "vocab_size: 128256" in out
    assert total in out.split("total")[1].splitlines()[0]


def test_info_shows_the_layer_plan(capsys):
    assert main(["info", "paper-830m-mta"]) == 0
    out = capsys.readouterr().out
    assert "2, 6, 10, 14, 18, 22" in out and "6x11" in out and "norm+scalar gate" in out


def test_overrides_after_options(capsys):
    assert main(["check", "tiny", "--steps", "2", "model.mta=null", "--seq-len", "16"]) == 0
    assert "loss" in capsys.readouterr().out


def test_check_trains_the_tiny_preset(capsys):
    assert main(["check", "tiny", "--steps", "5", "--seq-len", "32"]) == 0
    assert "ok: loss" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["info", "tiny", "model.mta.pre_qk_conv.key_kernel=4"],
        ["info", "no-such-preset"],
        ["info", "tiny", "model.n_kv_heads=3"],
        ["check", "tiny", "--seq-len", "5000"],
        ["info", "tiny", "runtime.attention_kernel=fast"],
        ["bench", "attention", "no-such-layer"],
        ["bench", "attention", "--paths", "sdpa,flash"],
        ["bench", "kernels", "no-such-kernel"],
        ["bench", "kernels", "--conv", "6x10"],
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(argv, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("mta-lab: error: ")


def test_console_script_exit_code():
    command = shutil.which("mta-lab")
    argv = [command] if command else [sys.executable, "-m", "mta_lab.cli"]
    result = subprocess.run(
        [*argv, "info", "tiny", "model.mta.pre_qk_conv.key_kernel=4"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "mta-lab: error: override 'model.mta.pre_qk_conv.key_kernel=4': model.mta.pre_qk_conv.key_kernel: "
        "4 is even, but key_padding=both needs an odd key_kernel (allowed: odd values, or key_padding=left|right)"
    ]


@pytest.mark.kernel
def test_bench_attention_times_every_path(capsys):
    """On CPU the Triton kernels run under Triton's interpreter (conftest), so every path has a time."""
    pytest.importorskip("triton")
    argv = ["bench", "attention", "pre-conv-6x11", "--seq-len", "20", "--heads", "2", "--head-dim", "8"]
    assert main([*argv, "--repeats", "1", "--paths", "sdpa,reference,tiled-triton,fused"]) == 0
    rows = {line.split()[1]: line.split() for line in capsys.readouterr().out.splitlines()[2:6]}
    assert set(rows) == {"sdpa", "reference", "tiled-triton", "fused"}
    assert all(float(row[3]) > 0 for row in rows.values())  # forward+backward ms


@pytest.mark.kernel
def test_bench_kernels_checks_each_kernel_against_its_definition(monkeypatch, capsys):
    """A table per kernel with its error; a kernel 10% off is flagged and the exit code says so."""
    pytest.importorskip("triton")
    from mta_lab.kernels import score_conv

    convolve = score_conv._convolve
    monkeypatch.setattr(score_conv, "_convolve", lambda *args: convolve(*args) * 1.1)
    argv = ["bench", "kernels", "--conv", "3x5", "--seq-len", "20", "--heads", "1", "--head-dim", "8"]
    assert main([*argv, "--repeats", "1"]) == 1
    out = capsys.readouterr().out
    assert out.count("(default)") == 3
    assert "fastest correct: block=" in out and "fastest correct: block_rows=" in out  # band, diagonals
    assert "no setting of score-conv matched its definition" in out
    wrong = [line for line in out.splitlines() if "WRONG" in line]
    assert len(wrong) == 1
    words = wrong[0].split()
    assert words[0].startswith("block_rows=") and float(words[words.index("WRONG") - 1]) > 0.05  # ~0.1


def test_bench_attention_measures_memory_on_cpu_too():
    """The tiled path's maps hold 128 query rows (plus the convolutions' halo), the reference's all 384."""
    from mta_lab.bench.attention import Shape, bench_attention

    shape = Shape(batch=1, heads=2, seq_len=384, head_dim=8, dtype=torch.float32)
    timings = bench_attention(["paper-layer"], ["reference", "tiled"], shape, 1, torch.device("cpu"))
    reference, tiled = (t.extra_gib for t in timings)
    assert 0 < tiled < 0.6 * reference


def test_cpu_memory_is_the_peak_of_live_tensors():
    """Hand-counted: two 4000-byte tensors alive at once at most; views and in-place results are free."""
    from mta_lab.bench.attention import _LiveBytes

    with torch.no_grad(), _LiveBytes() as tracker:
        a = torch.ones(1000)  # 4000 bytes live
        b = a.add_(1).mul(2)  # in place, then a new 4000: 8000
        del a  # 4000
        c = b.view(10, 100).exp()  # a view, then a new 4000: 8000
        del b, c  # 0
        d = torch.zeros(500)  # 2000
    assert (tracker.peak, tracker.live) == (8000, 2000)
    del d
