"""The fused MTA path (mta_lab.kernels) against the reference score-map path and the float64
re-derivation: outputs and gradients of q, k, v and every MTA parameter, causality, and the choice
of path. Without a GPU the Triton kernel runs under TRITON_INTERPRET=1 (set in conftest)."""

from __future__ import annotations

import dataclasses
import functools
import logging

import mta_reference as reference
import pytest
import torch
from conftest import MadeTensors, build_attention, randomize_, run_attention
from test_attention_reference import CASES, reference_spec

from mta_lab.config import (
    AttentionKernel,
    HeadMixConfig,
    KernelInit,
    KeyPadding,
    ModelConfig,
    MTAConfig,
    QKConvConfig,
    RuntimeConfig,
)
from mta_lab.kernels import band_flash, diagonals, score_conv
from mta_lab.kernels.band_flash import band_attention, band_attention_reference
from mta_lab.model import plan_layers
from mta_lab.model.execution import AttentionPath, LayerExecution, choose_execution

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_skip_without_triton = pytest.mark.skipif(
    not band_flash.available(), reason="needs triton (pip install triton)"
)


def needs_triton(test):
    """Runs the Triton kernel (interpreted on CPU, about a second or more per test): marked ``kernel``."""
    return pytest.mark.kernel(_skip_without_triton(test))


def conv(c_q: int, c_k: int, padding: str = "both") -> QKConvConfig:
    return QKConvConfig(
        query_kernel=c_q, key_kernel=c_k, key_padding=KeyPadding(padding), init=KernelInit.normal
    )


def layer_config(n_heads, n_kv_heads, head_dim, mta) -> ModelConfig:
    return ModelConfig(dim=n_heads * head_dim, n_heads=n_heads, n_kv_heads=n_kv_heads, n_layers=4, mta=mta)


FUSED = RuntimeConfig(attention_kernel=AttentionKernel.fused)
REFERENCE = RuntimeConfig(attention_kernel=AttentionKernel.reference)


def build(config: ModelConfig, runtime: RuntimeConfig = FUSED, dtype=torch.float64, layer_id: int = 0):
    """Layer ``layer_id`` of ``config``, built for DEVICE to run as ``runtime`` says."""
    return build_attention(config, layer_id, dtype, runtime=runtime, device=torch.device(DEVICE))


@pytest.mark.parametrize("name", CASES)
def test_moved_stages_equal_the_float64_reference_exactly(name, monkeypatch):
    """The algebra of mta_lab.kernels.mta alone: with the band attention materialised in float64 the
    fused path must agree with the independent re-derivation to rounding, for every stage."""
    monkeypatch.setattr(band_flash, "band_attention", band_attention_reference)
    monkeypatch.setattr(band_flash, "available", lambda: True)
    n_heads, n_kv_heads, head_dim, seq_len, mta = CASES[name]
    config = layer_config(n_heads, n_kv_heads, head_dim, mta)
    layer = build(config, layer_id=3)
    randomize_(layer, seed=sum(map(ord, name)))
    x = torch.randn(2, seq_len, config.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    params = {key: value.detach() for key, value in layer.named_parameters()}
    expected = reference.attention_layer(x, params, reference_spec(config, 3))
    torch.testing.assert_close(run_attention(layer, x, config.rope_theta), expected, rtol=1e-10, atol=1e-12)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("t", "dqk", "dv", "width", "atomic_dq"),
    [(45, 40, 24, 5, False), (16, 8, 8, 1, False), (35, 24, 40, 20, False), (33, 40, 24, 5, True)],
)
def test_band_kernel_matches_its_definition(t, dqk, dv, width, atomic_dq, dtype):
    """Lengths and widths that are not multiples of the blocks, gradients of all inputs and of lse;
    the backward in two passes and in one (dq by atomics)."""
    generator = torch.Generator().manual_seed(t)
    shapes = [(2, 3, t, dqk), (2, 3, t, dqk), (2, 3, t, dv), (2, 3, t, width)]
    inputs = [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]
    d_out = torch.randn(2, 3, t, dv, generator=generator, dtype=torch.float64)
    d_lse = torch.randn(2, 3, t, generator=generator, dtype=torch.float64)

    def run(attention, tensors):
        leaves = [x.clone().requires_grad_() for x in tensors]
        out, lse = attention(*leaves)
        out, lse = out.double().cpu(), lse.double().cpu()
        ((out * d_out).sum() + (lse * d_lse).sum()).backward()
        return [out, lse] + [x.grad for x in leaves]

    expected = run(band_attention_reference, inputs)
    low = [x.to(DEVICE, dtype) for x in inputs[:3]] + [inputs[3].to(DEVICE, torch.float32)]
    actual = run(functools.partial(band_attention, tuning=band_flash.Tuning(atomic_dq=atomic_dq)), low)
    tolerance = {torch.float32: 2e-5, torch.bfloat16: 4e-2}[dtype]
    for name, a, e in zip(["out", "lse", "dq", "dk", "dv", "dband"], actual, expected, strict=True):
        error = (a.double().cpu() - e).abs().max() / e.abs().max()
        assert error < tolerance, f"{name}: relative error {error:.2e}"


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# Blocks of 16 rows in the interpreter: several of them, and a band wider than the sequence.
@pytest.mark.parametrize(("t", "d", "width"), [(37, 24, 15), (10, 8, 15)])
def test_diagonal_kernel_reads_the_score_map_next_to_the_edge(t, d, width, dtype):
    """r[i, u] = (q k^T)[i, i - u], 0 where i < u, and the gradients of q and k, against the float64
    score map."""
    generator = torch.Generator().manual_seed(t)
    q, k = (torch.randn(2, 3, t, d, generator=generator, dtype=torch.float64) for _ in range(2))
    d_r = torch.randn(2, 3, t, width, generator=generator, dtype=torch.float64)
    lag_tu = torch.arange(t)[:, None] - torch.arange(width)[None, :]  # the key of row i, diagonal u

    def from_score_map(q, k):
        scores_bhqk = q @ k.transpose(-2, -1)
        picked = scores_bhqk.gather(-1, lag_tu.clamp(min=0).expand(2, 3, t, width))
        return picked * (lag_tu >= 0)

    def run(function, tensors):
        leaves = [x.clone().requires_grad_() for x in tensors]
        r = function(*leaves)
        (r.double() * d_r.to(r.device)).sum().backward()
        return [r.double().cpu()] + [x.grad.double().cpu() for x in leaves]

    expected = run(from_score_map, [q, k])
    actual = run(lambda q, k: diagonals.near_diagonal(q, k, width), [x.to(DEVICE, dtype) for x in (q, k)])
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    for name, a, e in zip(["r", "dq", "dk"], actual, expected, strict=True):
        error = (a - e).abs().max() / e.abs().max()
        assert error < tolerance, f"{name}: relative error {error:.2e}"


FUSED_LAYERS = {
    # (n_heads, n_kv_heads, head_dim, seq_len, mta)
    "paper-convs-6x11": (2, 2, 8, 37, MTAConfig(pre_qk_conv=conv(6, 11), post_qk_conv=conv(6, 11))),
    "left-right-gqa": (
        4,
        2,
        8,
        35,
        MTAConfig(pre_qk_conv=conv(3, 4, "left"), post_qk_conv=conv(2, 3, "right")),
    ),
    "right-left-mqa": (
        4,
        1,
        8,
        33,
        MTAConfig(pre_qk_conv=conv(2, 5, "right"), post_qk_conv=conv(3, 4, "left")),
    ),
    "mix-c1": (
        4,
        4,
        8,
        34,
        MTAConfig(
            pre_qk_conv=conv(3, 5),
            pre_head_mix=HeadMixConfig(group_size=1),
            post_head_mix=HeadMixConfig(group_size=1),
        ),
    ),
    "mix-c2-gqa": (
        4,
        2,
        8,
        35,
        MTAConfig(
            pre_qk_conv=conv(2, 3),
            pre_head_mix=HeadMixConfig(group_size=2),
            post_qk_conv=conv(2, 3),
            post_head_mix=HeadMixConfig(group_size=2),
        ),
    ),
    "mix-all-heads": (
        4,
        4,
        8,
        33,
        MTAConfig(
            pre_qk_conv=conv(2, 3),
            pre_head_mix=HeadMixConfig(),
            post_qk_conv=conv(2, 3),
            post_head_mix=HeadMixConfig(),
        ),
    ),
}


@needs_triton
@pytest.mark.parametrize(
    ("name", "dtype"),
    [pytest.param(name, torch.float32, id=f"{name}-fp32") for name in FUSED_LAYERS]
    + [pytest.param(name, torch.bfloat16, id=f"{name}-bf16") for name in ("paper-convs-6x11", "mix-c2-gqa")],
)
def test_fused_layer_outputs_and_gradients_match_the_reference(name, dtype):
    """Random kernels and mixing weights; gradients of the input (so of q, k, v) and every parameter
    against the reference path in float64."""
    n_heads, n_kv_heads, head_dim, _, mta = FUSED_LAYERS[name]
    assert_matches_reference(name, layer_config(n_heads, n_kv_heads, head_dim, mta), dtype)


def assert_matches_reference(
    name: str, config: ModelConfig, dtype: torch.dtype, runtime: RuntimeConfig = FUSED
) -> None:
    """The layer of ``config`` in ``dtype`` against the reference path in float64 on the case ``name``
    of FUSED_LAYERS (its sequence length): the output and the gradients of the input and of every
    parameter, within the dtype's tolerance relative to each one's largest entry."""
    seq_len = FUSED_LAYERS[name][3]
    layer = build(config, runtime)
    randomize_(layer, seed=sum(map(ord, name)), scale=0.3)
    exact = build(config, REFERENCE)
    exact.load_state_dict(layer.state_dict())
    layer = layer.to(DEVICE, dtype)
    x = torch.randn(2, seq_len, config.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    d_out = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def run(layer, inputs):
        inputs = inputs.clone().requires_grad_()
        out = run_attention(layer, inputs, 10_000.0)
        (out.double() * d_out.to(out.device)).sum().backward()
        grads = {"input": inputs.grad} | {n: p.grad for n, p in layer.named_parameters()}
        return out, grads

    expected_out, expected = run(exact, x)
    actual_out, actual = run(layer, x.to(DEVICE, dtype))
    tolerance = {torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype]
    for key, e in ({"output": expected_out} | expected).items():
        a = actual_out if key == "output" else actual[key]
        error = (a.double().cpu() - e).abs().max() / e.abs().max()
        assert error < tolerance, f"{key}: relative error {error:.2e}"


@needs_triton
@pytest.mark.parametrize("name", ["paper-convs-6x11", "mix-c2-gqa"])
def test_fused_path_is_causal(name):
    """Changing future tokens leaves every earlier output unchanged. Without a post-softmax conv the
    outputs are bit-identical; with one, future values enter the moved form and are subtracted again
    (C_i in mta_lab.kernels.mta), so they may differ by float rounding and no more."""
    n_heads, n_kv_heads, head_dim, seq_len, mta = FUSED_LAYERS[name]
    layer = build(layer_config(n_heads, n_kv_heads, head_dim, mta), dtype=torch.float32).to(DEVICE)
    randomize_(layer, seed=5, scale=0.3)
    x = torch.randn(1, seq_len, layer.n_heads * head_dim, device=DEVICE)
    changed = x.clone()
    changed[:, 20:] = torch.randn_like(changed[:, 20:]) * 3
    with torch.no_grad():
        before, after = run_attention(layer, x, 10_000.0), run_attention(layer, changed, 10_000.0)
    rounding = 4 * torch.finfo(torch.float32).eps * before.abs().max()
    assert (before[:, :20] - after[:, :20]).abs().max() <= rounding
    assert (before[:, 20:] - after[:, 20:]).abs().max() > 1e4 * rounding
    without_post = dataclasses.replace(mta, post_qk_conv=None)
    layer = build(layer_config(n_heads, n_kv_heads, head_dim, without_post), dtype=torch.float32).to(DEVICE)
    randomize_(layer, seed=5, scale=0.3)
    with torch.no_grad():
        before, after = run_attention(layer, x, 10_000.0), run_attention(layer, changed, 10_000.0)
    assert torch.equal(before[:, :20], after[:, :20])


@needs_triton
def test_fused_path_never_makes_a_query_by_key_tensor():
    """O(T) memory: no tensor made in forward or backward has two axes of length T (the reference
    path makes several)."""
    t = 37

    def maps_made(kernel):
        n_heads, n_kv_heads, head_dim, _, mta = FUSED_LAYERS["mix-c2-gqa"]
        runtime = RuntimeConfig(attention_kernel=kernel)
        layer = build(layer_config(n_heads, n_kv_heads, head_dim, mta), runtime, torch.float32).to(DEVICE)
        x = torch.randn(1, t, layer.n_heads * head_dim, device=DEVICE, requires_grad=True)
        with MadeTensors() as made:
            run_attention(layer, x, 10_000.0).sum().backward()
        return [(op, shape) for op, shape in made.shapes if shape.count(t) >= 2]

    assert maps_made(AttentionKernel.fused) == []
    assert maps_made(AttentionKernel.reference)  # the probe sees maps where there are some


def test_auto_uses_the_tiled_path_on_cpu_and_says_so(caplog):
    config = layer_config(2, 2, 4, MTAConfig(pre_qk_conv=conv(2, 3)))
    with caplog.at_level(logging.INFO, logger="mta_lab.model.attention"):
        layer = build_attention(config, runtime=RuntimeConfig())
    assert layer.execution == LayerExecution(
        0, AttentionPath.tiled, "the fused kernel runs on CUDA with Triton", tile_rows=128
    )
    assert (
        "layer 0: explicit score map: pre_qk_conv (2x3 normal); on the tiled path in blocks of "
        "128 query rows (the fused kernel runs on CUDA with Triton)" in caplog.messages
    )


def test_auto_keeps_wide_head_groups_off_the_fused_path(monkeypatch):
    """On CUDA, auto takes the fused path up to head groups of 2 and the tiled path for wider mixing
    (the fused kernel measured slower there than even the full score map), convolving by Triton."""
    monkeypatch.setattr(band_flash, "available", lambda: True)
    checked = []
    monkeypatch.setattr(score_conv, "passes_check", lambda *args: checked.append(args) or True)

    def on_cuda(group_size):
        mta = MTAConfig(pre_qk_conv=conv(2, 3), post_head_mix=HeadMixConfig(group_size=group_size))
        config = layer_config(4, 4, 4, mta)
        return choose_execution(config, plan_layers(config)[0], RuntimeConfig(), torch.device("cuda:0"))

    assert on_cuda(2) == LayerExecution(0, AttentionPath.fused, "auto on CUDA")
    assert on_cuda(4) == LayerExecution(
        0, AttentionPath.tiled, "head groups of 4: the fused kernel is slower there", 128, triton_convs=True
    )
    # The Triton convolution was checked on the device in every dtype a map can have, for this kernel.
    assert checked == [("cuda:0", dtype, 2, 3, 1) for dtype in (torch.bfloat16, torch.float16, torch.float32)]
    monkeypatch.setattr(score_conv, "passes_check", lambda *args: False)
    assert not on_cuda(4).triton_convs  # a disagreeing kernel costs speed, not correctness


def test_attention_dropout_keeps_the_fused_kernel_off(monkeypatch):
    monkeypatch.setattr(band_flash, "available", lambda: True)
    monkeypatch.setattr(score_conv, "passes_check", lambda *args: True)
    config = layer_config(2, 2, 4, MTAConfig(pre_qk_conv=conv(2, 3)))
    config.dropout = 0.1
    for kernel in (AttentionKernel.auto, AttentionKernel.fused):
        execution = choose_execution(
            config, plan_layers(config)[0], RuntimeConfig(attention_kernel=kernel), torch.device("cuda")
        )
        assert (execution.path, execution.reason) == ("tiled", "the fused kernel has no attention dropout")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    ("name", "path"),
    [(name, "fused") for name in ("pre-conv-6x11", "convs-6x11-mix-c2", "paper-layer")]
    + [("paper-layer", "tiled-triton")],
)
def test_full_size_fused_layer_matches_the_reference_on_gpu(name, path):
    """The issue's shape (H=16, T=2048, d=64, bf16; batch 2 to keep the reference's maps small): the
    fused path, or the tiled path with the Triton convolutions, against the reference path computed
    in fp32, outputs and gradients."""
    from mta_lab.bench.attention import LAYERS

    config = ModelConfig(dim=16 * 64, n_heads=16, n_layers=1, mta=LAYERS[name]())
    fused = build(config, FUSED, torch.float32).cuda()
    randomize_(fused, seed=7, scale=0.05)
    exact = build(config, REFERENCE, torch.float32).cuda()
    exact.load_state_dict(fused.state_dict())
    generator = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 16, 2048, 64, device="cuda", generator=generator) for _ in range(3))
    d_out = torch.randn(q.shape, device="cuda", generator=generator)

    def run(core, dtype):
        leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        out = core(*leaves)
        out.backward(d_out.to(dtype))
        return [out] + [x.grad for x in leaves]

    expected = run(exact.score_map_attention, torch.float32)
    core = (
        fused.fused_attention
        if path == "fused"
        else functools.partial(fused.score_map_attention, tile_rows=128, triton_convs=True)
    )
    actual = run(core, torch.bfloat16)
    for key, a, e in zip(["out", "dq", "dk", "dv"], actual, expected, strict=True):
        error = (a.float() - e).abs().max() / e.abs().max()
        assert error < 5e-2, f"{key}: relative error {error:.2e}"
