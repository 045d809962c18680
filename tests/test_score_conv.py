"""The Triton score-map convolution (mta_lab.kernels.score_conv) against a float64 sum of shifted maps,
and the tiled attention path that uses it against the float64 reference path. Interpreted on CPU."""

from __future__ import annotations

import logging

import pytest
import torch
from test_fused_attention import (
    DEVICE,
    FUSED_LAYERS,
    assert_matches_reference,
    conv,
    layer_config,
    needs_triton,
)

from mta_lab.config import AttentionKernel, MTAConfig, RuntimeConfig, ScoreConvKernel
from mta_lab.kernels import band_flash, score_conv
from mta_lab.model import plan_layers
from mta_lab.model.execution import choose_execution


def past(rows: int, keys: int) -> torch.Tensor:
    """[rows, keys] True where the key is at or before the query; row r is query keys - rows + r."""
    return torch.arange(keys)[None, :] <= torch.arange(keys - rows, keys)[:, None]


def shifted_sum(x_bhrk, w_hae, left_pad, top_pad, out_rows):
    """The definition, tap by tap in float64: out[r, j] = sum_{a,e} w[a, e] x[r + a - top, j + e - left]
    over the past entries of x, then masked to the past. Independent of the kernel's Toeplitz products."""
    b, h, rows, keys = x_bhrk.shape
    c_q, c_k = w_hae.shape[1:]
    x = x_bhrk * past(rows, keys)
    out = torch.zeros(b, h, out_rows, keys, dtype=x.dtype)
    for r in range(out_rows):
        for a in range(c_q):
            source = r + a - top_pad
            if not 0 <= source < rows:
                continue
            for e in range(c_k):
                shift = e - left_pad  # out[:, j] += w * x[:, j + shift]
                lo, hi = max(0, -shift), min(keys, keys - shift)
                out[:, :, r, lo:hi] += w_hae[None, :, a, e, None] * x[:, :, source, lo + shift : hi + shift]
    return out * past(out_rows, keys)


@needs_triton
@pytest.mark.parametrize(
    ("rows", "keys", "c_q", "c_k", "left_pad", "halo"),
    [
        (37, 37, 6, 11, 5, False),  # the paper's kernel on a full map, both-sided key padding
        (23, 41, 6, 11, 5, True),  # a tiled block: 5 halo rows above 18 output rows
        (19, 33, 3, 4, 3, True),  # left padding (the official "left": keys up to the query)
        (33, 33, 2, 5, 0, False),  # right padding
        (17, 17, 1, 1, 0, False),  # a 1 x 1 kernel: a per-head scale
    ],
)
def test_kernel_matches_the_shifted_sum(rows, keys, c_q, c_k, left_pad, halo):
    """Output and gradients of the map and the kernel, fp32 against float64; shapes cross tile edges.
    The input's future is random, so a kernel that read it would fail."""
    generator = torch.Generator().manual_seed(rows * c_k)
    top = 0 if halo else c_q - 1
    out_rows = rows - (c_q - 1) + top
    x = torch.randn(1, 2, rows, keys, dtype=torch.float64, generator=generator)
    w = torch.randn(2, c_q, c_k, dtype=torch.float64, generator=generator)
    d_out = torch.randn(1, 2, out_rows, keys, dtype=torch.float64, generator=generator)

    def run(conv, x, w):
        x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = conv(x, w, left_pad, top, out_rows)
        (out.double().cpu() * d_out).sum().backward()
        return out.double().cpu(), x.grad.double().cpu(), w.grad.double().cpu()

    expected = run(shifted_sum, x, w)
    actual = run(score_conv.score_conv, x.to(DEVICE, torch.float32), w.to(DEVICE, torch.float32))
    for name, a, e in zip(["out", "d_maps", "d_weight"], actual, expected, strict=True):
        error = (a - e).abs().max() / e.abs().max()
        assert error < 2e-6, f"{name}: relative error {error:.2e}"
    assert actual[0][..., ~past(out_rows, keys)].abs().max() == 0  # the future is exactly 0


@needs_triton
def test_tiled_path_with_triton_convolutions_matches_the_reference():
    """The whole layer (GQA; a left- and a right-padded conv), blocks of 16 rows (several per sequence,
    each with its halo), fp32 against the float64 reference: output and gradients of the input and
    every parameter."""
    name = "left-right-gqa"
    n_heads, n_kv_heads, head_dim, _, mta = FUSED_LAYERS[name]
    config = layer_config(n_heads, n_kv_heads, head_dim, mta)
    runtime = RuntimeConfig(AttentionKernel.tiled, attention_tile_rows=24, score_conv=ScoreConvKernel.triton)
    assert_matches_reference(name, config, torch.float32, runtime)


@needs_triton
def test_the_device_check_passes_the_kernel_and_catches_a_wrong_one(monkeypatch, caplog):
    """auto trusts the kernel on a device only after it agrees with F.conv2d there; a kernel whose
    output is off by a little (one tap's worth) fails the check and says so."""
    assert score_conv.passes_check(DEVICE, torch.float32, 1, 3, 1)
    convolve = score_conv._convolve
    monkeypatch.setattr(score_conv, "_convolve", lambda *args: convolve(*args) * 1.1)
    with caplog.at_level(logging.WARNING, logger="mta_lab.kernels.score_conv"):
        assert not score_conv.passes_check(DEVICE, torch.float32, 1, 3, 0)  # another key: not cached
    assert "score_conv kernel disagrees with F.conv2d" in caplog.text


def test_auto_convolves_by_f_conv2d_where_the_kernel_fails_its_check(monkeypatch):
    monkeypatch.setattr(band_flash, "available", lambda: True)
    checked = []
    monkeypatch.setattr(score_conv, "passes_check", lambda *args: checked.append(args) and False)
    config = layer_config(4, 4, 4, MTAConfig(pre_qk_conv=conv(2, 3)))
    runtime = RuntimeConfig(attention_kernel=AttentionKernel.tiled)
    execution = choose_execution(config, plan_layers(config)[0], runtime, torch.device("cuda:0"))
    assert (execution.path, execution.triton_convs) == ("tiled", False)
    assert checked[0] == ("cuda:0", torch.bfloat16, 2, 3, 1)
